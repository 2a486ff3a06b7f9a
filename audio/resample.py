"""Sample-rate conversion with libsoxr (the `soxr` package): one-shot and streaming.

Contract:
- float32 mono in, float32 mono out. Any integer rate from 1 kHz to 384 kHz; the project uses
  8, 16, 22.05, 24 and 48 kHz. Equal rates return a copy of the input.
- `resample(x, from_hz, to_hz)` converts a whole signal (output length = len * to / from, rounded half up).
- `Resampler(from_hz, to_hz, quality="HQ")` converts a stream chunk by chunk: `.process(chunk)`
  returns what is ready (it may be shorter than the exact ratio: the filter holds back its
  delay), `.flush()` returns the rest and ends the stream. The concatenated stream output equals
  the one-shot output to within float rounding, so chunk boundaries cause no clicks.
  `ResampleStream` is the same class under the name libsoxr uses. soxr filters in blocks: a
  stream releases its output in bursts (from 8 kHz to 16 kHz "MQ" about 108 ms at a time, so up
  to 118 ms of audio is held back between bursts; from 24 or 48 kHz up to 38 ms).
- `LiveResampler(from_hz, to_hz)`: the same interface for a live stream (what a call's incoming
  audio uses): a polyphase Kaiser-windowed sinc in numpy that returns, for every chunk, each
  output sample whose input has come, so it holds back only the filter's half-length, the same
  at every chunk: `LiveResampler.held_back_s` (7.8 ms from 8 kHz, 3.9 ms from 24 or 48 kHz).
  Passband within 0.5 dB to 0.92 of the lower Nyquist (3.7 kHz of a phone line), stopband from
  the lower Nyquist on at least 80 dB down. Output sample n lies at input time n * from / to, as
  in `resample`, and the whole stream has as many samples as `resample` gives (len * to / from,
  rounded half up).
- `resample` is soxr "HQ": passband to ~0.91 of the lower Nyquist, stopband attenuation > 100 dB,
  so a tone above the target Nyquist is removed, not folded back.
"""

from __future__ import annotations

import numpy as np
import soxr

from audio.errors import AudioError

__all__ = ["LiveResampler", "ResampleStream", "Resampler", "resample"]

_QUALITY = "HQ"
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


class LiveResampler:
    """Streaming resampler that holds back only its filter's half-length (the module docstring):
    `.process(chunk)` for each chunk, `.flush()` once at the end."""

    PASSBAND = 0.92  # of the lower Nyquist: flat to here (within 0.5 dB)
    STOPBAND_DB = 80.0  # from the lower Nyquist on

    def __init__(self, from_hz: int, to_hz: int) -> None:
        self.from_hz = _check_rate(from_hz, "source rate")
        self.to_hz = _check_rate(to_hz, "target rate")
        g = np.gcd(self.from_hz, self.to_hz)
        self._up, self._down = self.to_hz // g, self.from_hz // g
        nyquist = min(self.from_hz, self.to_hz) / 2
        edge, transition = self.PASSBAND * nyquist, (1 - self.PASSBAND) * nyquist
        # Kaiser's design rule: the window's length for this transition and attenuation.
        half_s = (self.STOPBAND_DB - 8) / (2.285 * 2 * np.pi * transition) / 2
        beta = 0.1102 * (self.STOPBAND_DB - 8.7)
        cutoff = edge + transition / 2
        self._half = max(1, int(np.ceil(half_s * self.from_hz)))  # input samples each side
        self.held_back_s = 0.0 if self.from_hz == self.to_hz else self._half / self.from_hz
        # Output n lies at input time n * down / up = i + p / up: phase p weighs inputs i - half + 1 .. i + half.
        offsets = np.arange(-self._half + 1, self._half + 1)
        t_s = (np.arange(self._up)[:, None] / self._up - offsets[None, :]) / self.from_hz
        inside = np.clip(1.0 - (t_s / half_s) ** 2, 0.0, None)
        window = np.where(np.abs(t_s) <= half_s, np.i0(beta * np.sqrt(inside)) / np.i0(beta), 0.0)
        taps = 2 * cutoff * np.sinc(2 * cutoff * t_s) * window
        self._taps = (taps / taps.sum(axis=1, keepdims=True)).astype(np.float32)  # each phase passes DC exactly
        self._buffer = np.zeros(self._half - 1, dtype=np.float32)  # inputs from absolute index _base on
        self._base = -(self._half - 1)
        self._n_in = 0  # input samples so far
        self._n_out = 0  # output samples so far
        self._closed = False

    def _ready(self, n_end: int) -> np.ndarray:
        """Output samples _n_out .. n_end - 1 (their inputs are all in the buffer)."""
        if n_end <= self._n_out:
            return np.zeros(0, dtype=np.float32)
        n = np.arange(self._n_out, n_end, dtype=np.int64)
        first = n * self._down // self._up  # the input at or before each output's time
        windows = np.lib.stride_tricks.sliding_window_view(self._buffer, 2 * self._half)[first - self._half + 1 - self._base]
        out = np.einsum("ij,ij->i", windows, self._taps[n * self._down % self._up])
        self._n_out = n_end
        keep_from = self._n_out * self._down // self._up - self._half + 1  # the next output's first input
        if keep_from > self._base:
            self._buffer = self._buffer[keep_from - self._base :]
            self._base = keep_from
        return out.astype(np.float32, copy=False)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample one chunk; returns every output sample whose inputs have come."""
        if self._closed:
            raise AudioError("LiveResampler.process() after flush(): make a new one")
        a = _mono_float32(chunk)
        if self.from_hz == self.to_hz:
            return a.copy()
        if a.size == 0:
            return np.zeros(0, dtype=np.float32)
        self._buffer = np.concatenate([self._buffer, a])
        self._n_in += a.size
        # Output n needs the inputs up to first(n) + half.
        room = self._n_in - self._half
        return self._ready(max(0, -(-room * self._up // self._down)))

    def flush(self) -> np.ndarray:
        """End the stream: the samples still held back (the input continued by silence). Idempotent."""
        if self._closed or self.from_hz == self.to_hz:
            self._closed = True
            return np.zeros(0, dtype=np.float32)
        self._closed = True
        self._buffer = np.concatenate([self._buffer, np.zeros(2 * self._half, dtype=np.float32)])
        return self._ready((2 * self._n_in * self._up + self._down) // (2 * self._down))  # as soxr: half up
