"""Errors meant for the person at the terminal: the CLI prints the message, not a traceback."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Something the user can fix (a missing model, a missing library, bad input).

    The message is one line that names what is wrong and, where there is one, the command that
    fixes it.
    """
