"""Fixtures of the browser tests: Chromium or a skip, speech WAVs from espeak-ng, the artifacts folder."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from chromium_cdp import chromium_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return path


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots land here (git-ignored) so a person or CI can look at them after the run."""
    folder = ROOT / "artifacts" / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def speak(text: str, path: Path, *, lead_s: float = 1.0, tail_s: float = 2.0) -> Path:
    """espeak-ng speech with silence around it, so the server's VAD sees the start and the end."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: apt-get install espeak-ng (./install.sh --dev does)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    with wave.open(str(raw), "rb") as source:
        rate_hz = source.getframerate()
        speech = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
    lead, tail = np.zeros(int(lead_s * rate_hz), "<i2"), np.zeros(int(tail_s * rate_hz), "<i2")
    pcm = np.concatenate([lead, speech, tail])
    write_wav(path, pcm, rate_hz)
    raw.unlink()
    return path


def write_wav(path: Path, pcm: np.ndarray, rate_hz: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate_hz)
        out.writeframes(pcm.astype("<i2").tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as source:
        return np.frombuffer(source.readframes(source.getnframes()), dtype="<i2"), source.getframerate()
