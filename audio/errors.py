"""Errors the audio package raises for bad input (unreadable file, wrong rate, missing model)."""

from __future__ import annotations

__all__ = ["AudioError", "AudioModelNotFoundError"]


class AudioError(Exception):
    """Base class: a one-line message meant for the user."""


class AudioModelNotFoundError(AudioError):
    """An ASR or TTS model that is not on disk."""
