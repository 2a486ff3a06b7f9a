"""Errors the dlm package raises for bad input (unknown model, bad parameters, a training run
folder that cannot be continued), each with a one-line message meant for the user.

The engine raises these for one request and keeps serving the others.
"""

from __future__ import annotations

__all__ = ["DlmError", "InvalidRequestError", "ModelNotFoundError", "ResumeError", "UnsupportedCheckpointError"]


class DlmError(Exception):
    """Base class: a one-line message meant for the user."""


class ModelNotFoundError(DlmError):
    """A model name or path that resolves to nothing on disk."""


class UnsupportedCheckpointError(DlmError):
    """A folder or file that is not a checkpoint of a supported family."""


class InvalidRequestError(DlmError):
    """A request the engine refuses (empty prompt, too long, absurd parameters)."""


class ResumeError(DlmError):
    """A training run folder whose saved state another run cannot continue (other settings or
    other training data: dlm.adapt.state)."""
