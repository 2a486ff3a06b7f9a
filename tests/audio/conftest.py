"""Shared fixtures for the audio tests: real speech from espeak-ng and piper, models loaded once."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable

import numpy as np
import pytest

from audio.io import read_wav

SAMPLE_RATE_HZ = 16000


def _require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); CI installs it")


@pytest.fixture(scope="session")
def espeak() -> Callable[..., np.ndarray]:
    """espeak(text, sample_rate_hz=16000) -> float32 speech (espeak-ng via subprocess)."""
    _require_espeak()
    cache: dict[tuple[str, int], np.ndarray] = {}

    def speak(text: str, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
        key = (text, sample_rate_hz)
        if key not in cache:
            wav = subprocess.run(
                ["espeak-ng", "--stdout", text], check=True, capture_output=True, timeout=30
            ).stdout
            cache[key] = read_wav(io.BytesIO(wav), sample_rate_hz=sample_rate_hz)[0]
        return cache[key]

    return speak


@pytest.fixture(scope="session")
def transcriber():
    """The embedded faster-whisper tiny.en, loaded once per session."""
    from audio.asr import Transcriber
    from voice_agent.errors import UserError
    from voice_agent.models import resolve_asr_model

    try:
        path = resolve_asr_model("tiny.en")
    except UserError as e:
        pytest.skip(str(e))
    return Transcriber(path, cpu_threads=2)


@pytest.fixture(scope="session")
def synthesizer():
    """The embedded piper en_US-joe-medium voice, loaded once per session, without piper's random
    variation (the same samples for the same text in every run: a test's outcome cannot depend on
    the draw)."""
    from audio.tts import Synthesizer
    from voice_agent.errors import UserError
    from voice_agent.models import resolve_tts_voice

    try:
        path = resolve_tts_voice("en_US-joe-medium")
    except UserError as e:
        pytest.skip(str(e))
    return Synthesizer(path, noise_scale=0.0, noise_w_scale=0.0)


@pytest.fixture(scope="session")
def speech_bounds_s() -> Callable[..., tuple[float, float]]:
    """speech_bounds_s(clip) -> (start_s, end_s): first and last sample above 2 % of the peak."""

    def bounds(clip: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> tuple[float, float]:
        loud = np.flatnonzero(np.abs(clip) > 0.02 * np.max(np.abs(clip)))
        return loud[0] / sample_rate_hz, (loud[-1] + 1) / sample_rate_hz

    return bounds


@pytest.fixture(scope="session")
def tone() -> Callable[..., np.ndarray]:
    """tone(freq_hz, sample_rate_hz, seconds, amplitude=0.5) -> float32 sine."""

    def make(freq_hz: float, sample_rate_hz: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
        t = np.arange(int(seconds * sample_rate_hz)) / sample_rate_hz
        return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)

    return make
