"""WAV files: read any common WAV as float32 mono at a chosen rate; write 16-bit PCM WAV.

Contract:
- `read_wav(source, sample_rate_hz=None) -> (audio, rate_hz)`: `source` is a path or a binary
  file object. Understands RIFF/WAVE with integer PCM of 8 (unsigned), 16, 24 or 32 bits, IEEE
  float of 32 or 64 bits, G.711 µ-law and A-law, plain or WAVE_FORMAT_EXTENSIBLE, any number of
  channels (averaged to mono), and streamed files whose data size field is 0 or 0xFFFFFFFF.
  With `sample_rate_hz` the audio is resampled to it. Float files are clipped to [-1, 1] and
  NaN/inf samples become 0. Anything unreadable raises `AudioError` naming the file and the reason.
- `write_wav(dest, audio, sample_rate_hz)`: float32 (or int16) mono -> 16-bit PCM mono WAV.
- `to_mono(x)`: (frames, channels) -> (frames,) by averaging channels.
Only numpy and the stdlib: the stdlib `wave` module reads neither float nor 24-bit-extensible
files, so the RIFF chunks are parsed here.
"""

from __future__ import annotations

import io
import os
import struct
import wave
from typing import BinaryIO

import numpy as np

from audio.codecs import alaw_decode, float32_to_pcm16, mulaw_decode
from audio.errors import AudioError
from audio.resample import resample

__all__ = ["read_wav", "to_mono", "write_wav"]

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_ALAW = 0x0006
_FORMAT_MULAW = 0x0007
_FORMAT_EXTENSIBLE = 0xFFFE
_MAX_CHANNELS = 64


def to_mono(x: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> float32 (frames,), channels averaged."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise AudioError(f"expected (frames,) or (frames, channels) audio, got shape {a.shape}")
    return a.mean(axis=1, dtype=np.float32)


def _name(source: str | os.PathLike[str] | BinaryIO) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return getattr(source, "name", "<stream>")


def _read_bytes(source: str | os.PathLike[str] | BinaryIO) -> bytes:
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as e:
            raise AudioError(f"cannot read {os.fspath(source)!r}: {e.strerror or e}") from None
    try:
        return source.read()
    except (OSError, AttributeError) as e:
        raise AudioError(f"cannot read {_name(source)!r}: {e}") from None


def _decode_samples(data: bytes, fmt: int, bits: int, block_align: int, channels: int) -> np.ndarray:
    """Interleaved sample bytes -> float32 (frames, channels)."""
    n_frames = len(data) // block_align
    data = data[: n_frames * block_align]
    width = block_align // channels
    if fmt == _FORMAT_PCM:
        if bits <= 8 and width == 1:
            x = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width == 2:
            x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        elif width == 3:
            b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            v = np.where(v >= 1 << 23, v - (1 << 24), v)
            x = v.astype(np.float32) / float(1 << 23)
        elif width == 4:
            x = (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
        else:
            raise AudioError(f"unsupported PCM sample width of {width} bytes")
    elif fmt == _FORMAT_FLOAT:
        if width == 4:
            x = np.frombuffer(data, dtype="<f4").astype(np.float32)
        elif width == 8:
            x = np.frombuffer(data, dtype="<f8").astype(np.float32)
        else:
            raise AudioError(f"unsupported float sample width of {width} bytes")
        x = np.clip(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
    elif fmt == _FORMAT_MULAW and width == 1:
        x = mulaw_decode(data)
    elif fmt == _FORMAT_ALAW and width == 1:
        x = alaw_decode(data)
    else:
        raise AudioError(f"unsupported WAV encoding (format tag 0x{fmt:04x}, {bits} bits)")
    return x.reshape(-1, channels)


def _parse(raw: bytes, name: str) -> tuple[np.ndarray, int]:
    if len(raw) < 12 or raw[:4] not in (b"RIFF", b"RIFX") or raw[8:12] != b"WAVE":
        raise AudioError(f"{name!r} is not a WAV file (no RIFF/WAVE header)")
    if raw[:4] == b"RIFX":
        raise AudioError(f"{name!r} is a big-endian (RIFX) WAV, which is not supported")
    pos = 12
    fmt_chunk: bytes | None = None
    data: bytes | None = None
    while pos + 8 <= len(raw):
        chunk_id = raw[pos : pos + 4]
        (size,) = struct.unpack("<I", raw[pos + 4 : pos + 8])
        body_start = pos + 8
        if chunk_id == b"data":
            # Streamed writers leave the size at 0 or 0xFFFFFFFF: take the rest of the file.
            end = len(raw) if size in (0, 0xFFFFFFFF) or body_start + size > len(raw) else body_start + size
            data = raw[body_start:end]
            if fmt_chunk is not None:
                break
        elif chunk_id == b"fmt ":
            fmt_chunk = raw[body_start : body_start + size]
        pos = body_start + size + (size & 1)  # chunks are padded to an even size
    if fmt_chunk is None or len(fmt_chunk) < 16:
        raise AudioError(f"{name!r}: WAV file without a valid 'fmt ' chunk")
    if data is None:
        raise AudioError(f"{name!r}: WAV file without a 'data' chunk")
    fmt, channels, rate_hz, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", fmt_chunk[:16])
    if fmt == _FORMAT_EXTENSIBLE:
        if len(fmt_chunk) < 40:
            raise AudioError(f"{name!r}: truncated WAVE_FORMAT_EXTENSIBLE header")
        fmt = struct.unpack("<H", fmt_chunk[24:26])[0]  # first two bytes of the sub-format GUID
    if not 1 <= channels <= _MAX_CHANNELS:
        raise AudioError(f"{name!r}: invalid channel count {channels}")
    if rate_hz <= 0:
        raise AudioError(f"{name!r}: invalid sample rate {rate_hz}")
    if block_align <= 0 or block_align % channels:
        raise AudioError(f"{name!r}: invalid block alignment {block_align} for {channels} channels")
    try:
        frames = _decode_samples(data, fmt, bits, block_align, channels)
    except AudioError as e:
        raise AudioError(f"{name!r}: {e}") from None
    return to_mono(frames), int(rate_hz)


def read_wav(
    source: str | os.PathLike[str] | BinaryIO, sample_rate_hz: int | None = None
) -> tuple[np.ndarray, int]:
    """Read a WAV as float32 mono; resampled to `sample_rate_hz` when given. Returns (audio, rate)."""
    name = _name(source)
    audio, rate_hz = _parse(_read_bytes(source), name)
    if sample_rate_hz is not None and sample_rate_hz != rate_hz:
        audio = resample(audio, rate_hz, sample_rate_hz)
        rate_hz = sample_rate_hz
    return audio, rate_hz


def write_wav(dest: str | os.PathLike[str] | BinaryIO, audio: np.ndarray, sample_rate_hz: int) -> None:
    """Write float32 (or int16) mono audio as a 16-bit PCM mono WAV."""
    a = np.asarray(audio)
    if a.ndim != 1:
        raise AudioError(f"write_wav expects mono audio (a 1-D array), got shape {a.shape}")
    if sample_rate_hz <= 0:
        raise AudioError(f"invalid sample rate {sample_rate_hz}")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate_hz))
        w.writeframes(float32_to_pcm16(a))
    payload = buffer.getvalue()
    if isinstance(dest, str | os.PathLike):
        try:
            with open(dest, "wb") as f:
                f.write(payload)
        except OSError as e:
            raise AudioError(f"cannot write {os.fspath(dest)!r}: {e.strerror or e}") from None
    else:
        dest.write(payload)
