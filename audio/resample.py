"""Sample-rate conversion with libsoxr (the `soxr` package): one-shot and streaming.

Contract:
- float32 mono in, float32 mono out. Any integer rate from 1 kHz to 384 kHz; the project uses
  8, 16, 22.05, 24 and 48 kHz. Equal rates return a copy of the input.
- `resample(x, from_hz, to_hz)` converts a whole signal (output length = round(len * to/from)).
- `Resampler(from_hz, to_hz, quality="HQ")` converts a stream chunk by chunk: `.process(chunk)`
  returns what is ready (it may be shorter than the exact ratio: the filter holds back its
  delay), `.flush()` returns the rest and ends the stream. The concatenated stream output equals
  the one-shot output to within float rounding, so chunk boundaries cause no clicks.
  `ResampleStream` is the same class under the name libsoxr uses. That delay is latency on a
  live stream: "HQ" holds back about 66 ms from 8 kHz to 16 kHz and 21 ms from 24 or 48 kHz,
  "MQ" (`LIVE_QUALITY`, what a call's incoming audio uses) 26 and 15 ms with the same flat
  passband (within 0.5 dB to 0.92 of the lower Nyquist: 3.7 kHz of a phone line) and a stopband
  still over 100 dB down.
- `resample` is soxr "HQ": passband to ~0.91 of the lower Nyquist, stopband attenuation > 100 dB,
  so a tone above the target Nyquist is removed, not folded back.
"""

from __future__ import annotations

import numpy as np
import soxr

from audio.errors import AudioError

__all__ = ["LIVE_QUALITY", "ResampleStream", "Resampler", "resample"]

_QUALITY = "HQ"
LIVE_QUALITY = "MQ"  # a live stream's: less held back, the same passband (module docstring)
_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")
_MIN_RATE_HZ = 1000
_MAX_RATE_HZ = 384_000


def _check_rate(rate_hz: int, what: str) -> int:
    if isinstance(rate_hz, bool) or not isinstance(rate_hz, int | np.integer):
        raise AudioError(f"{what} must be an integer number of Hz, got {rate_hz!r}")
    if not _MIN_RATE_HZ <= rate_hz <= _MAX_RATE_HZ:
        raise AudioError(f"{what} {rate_hz} Hz is outside {_MIN_RATE_HZ}..{_MAX_RATE_HZ} Hz")
    return int(rate_hz)


def _mono_float32(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2 and 1 in a.shape:
        a = a.ravel()
    if a.ndim != 1:
        raise AudioError(f"expected mono audio (a 1-D array), got shape {a.shape}")
    if a.dtype.kind != "f":
        raise AudioError(f"expected float audio, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def resample(x: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Resample a whole float32 mono signal from `from_hz` to `to_hz`."""
    from_hz = _check_rate(from_hz, "source rate")
    to_hz = _check_rate(to_hz, "target rate")
    a = _mono_float32(x)
    if from_hz == to_hz:
        return a.copy()
    if a.size == 0:
        return np.zeros(0, dtype=np.float32)
    return soxr.resample(a, from_hz, to_hz, quality=_QUALITY).astype(np.float32, copy=False)


class Resampler:
    """Streaming resampler: `.process(chunk)` for each chunk, `.flush()` once at the end."""

    def __init__(self, from_hz: int, to_hz: int, quality: str = _QUALITY) -> None:
        self.from_hz = _check_rate(from_hz, "source rate")
        self.to_hz = _check_rate(to_hz, "target rate")
        if quality not in _QUALITIES:
            raise AudioError(f"resampling quality must be one of {', '.join(_QUALITIES)}, got {quality!r}")
        self._stream = (
            None
            if self.from_hz == self.to_hz
            else soxr.ResampleStream(self.from_hz, self.to_hz, 1, dtype="float32", quality=quality)
        )
        self._closed = False

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample one chunk; returns the output that is ready (possibly empty)."""
        if self._closed:
            raise AudioError("Resampler.process() after flush(): make a new Resampler")
        a = _mono_float32(chunk)
        if self._stream is None:
            return a.copy()
        if a.size == 0:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(a, last=False)

    def flush(self) -> np.ndarray:
        """End the stream and return the samples still held in the filter. Idempotent."""
        if self._closed or self._stream is None:
            self._closed = True
            return np.zeros(0, dtype=np.float32)
        self._closed = True
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


ResampleStream = Resampler
