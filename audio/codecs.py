"""Sample formats and telephone codecs: PCM16, G.711 µ-law and A-law, base64.

Contract:
- Float audio is float32 mono in [-1, 1]. `float32_to_pcm16` scales by 32768 and clips, so
  `pcm16_to_float32(float32_to_pcm16(x))` is exact for every value that came from PCM16.
  Non-finite samples are defined, not errors: NaN encodes as 0, ±inf as full scale.
- `mulaw_*` and `alaw_*` are bit-exact with the ITU-T G.711 reference algorithm (the Sun
  `g711.c` that the old stdlib `audioop` also used): 16-bit linear in, one byte per sample out.
  Both directions are table lookups built once, with numpy, from that algorithm.
- `b64decode` raises `AudioError` on anything that is not strict base64.
- Bytes that cannot hold whole samples (odd PCM16 length) raise `AudioError`.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from audio.errors import AudioError

__all__ = [
    "alaw_decode",
    "alaw_decode_pcm16",
    "alaw_encode",
    "b64decode",
    "b64encode",
    "float32_to_pcm16",
    "mulaw_decode",
    "mulaw_decode_pcm16",
    "mulaw_encode",
    "pcm16_to_float32",
]

_PCM16_SCALE = 32768.0


def _as_bytes(data: bytes | bytearray | memoryview, what: str) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise AudioError(f"{what}: expected bytes, got {type(data).__name__}")


def _as_float(x: np.ndarray) -> np.ndarray:
    """Any real array-like -> 1-D float32 with NaN -> 0, ±inf -> ±1, values clipped to [-1, 1]."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise AudioError(f"expected a numeric audio array, got dtype {a.dtype}")
    if a.dtype == np.int16:
        return a.astype(np.float32).ravel() / _PCM16_SCALE
    a = a.astype(np.float32, copy=False).ravel()
    if not np.isfinite(a).all():  # nan_to_num costs several passes: only where it changes something
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(a, -1.0, 1.0)


def pcm16_to_float32(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian PCM16 bytes (or an int16 array) -> float32 in [-1, 1)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.int16:
            raise AudioError(f"pcm16_to_float32: expected an int16 array, got dtype {data.dtype}")
        samples = data.ravel()
    else:
        raw = _as_bytes(data, "pcm16_to_float32")
        if len(raw) % 2:
            raise AudioError(f"PCM16 data must have an even number of bytes, got {len(raw)}")
        samples = np.frombuffer(raw, dtype="<i2")
    return samples.astype(np.float32) / np.float32(_PCM16_SCALE)


def _float_to_int16(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.int16:
        return a.ravel()
    f = _as_float(a)
    return np.clip(np.round(f * _PCM16_SCALE), -32768, 32767).astype(np.int16)


def float32_to_pcm16(x: np.ndarray) -> bytes:
    """float audio -> little-endian PCM16 bytes (int16 arrays pass through unchanged)."""
    return _float_to_int16(x).astype("<i2", copy=False).tobytes()


# --- G.711 --------------------------------------------------------------------------------------
# The reference algorithm, vectorized over all 65536 int16 values / all 256 codes once at import.

_SIGN_BIT = 0x80
_QUANT_MASK = 0x0F
_SEG_SHIFT = 4
_SEG_MASK = 0x70
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # 14-bit magnitude limit
# Upper end of each segment: µ-law on the 14-bit value, A-law on the 13-bit value.
_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_SEG_AEND = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def _segment(value: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Index of the first segment end >= value (8 if beyond the last), as in g711.c `search`."""
    return np.searchsorted(ends, value, side="left").astype(np.int32)


def _linear2ulaw(pcm: np.ndarray) -> np.ndarray:
    v = pcm.astype(np.int32) >> 2  # 14-bit, arithmetic shift as in C
    mask = np.where(v < 0, 0x7F, 0xFF)
    v = np.minimum(np.abs(v), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = _segment(v, _SEG_UEND)
    code = (np.minimum(seg, 7) << 4) | ((v >> (np.minimum(seg, 7) + 1)) & _QUANT_MASK)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw2linear(code: np.ndarray) -> np.ndarray:
    u = ~code.astype(np.int32) & 0xFF
    t = ((u & _QUANT_MASK) << 3) + _ULAW_BIAS
    t = t << ((u & _SEG_MASK) >> _SEG_SHIFT)
    return np.where(u & _SIGN_BIT, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _linear2alaw(pcm: np.ndarray) -> np.ndarray:
    v = pcm.astype(np.int32) >> 3  # 13-bit
    mask = np.where(v >= 0, 0xD5, 0x55)
    v = np.where(v >= 0, v, -v - 1)
    seg = _segment(v, _SEG_AEND)
    s = np.minimum(seg, 7)
    quant = np.where(s < 2, v >> 1, v >> s) & _QUANT_MASK
    code = np.where(seg >= 8, 0x7F, (s << _SEG_SHIFT) | quant)
    return (code ^ mask).astype(np.uint8)


def _alaw2linear(code: np.ndarray) -> np.ndarray:
    a = code.astype(np.int32) ^ 0x55
    t = (a & _QUANT_MASK) << 4
    seg = (a & _SEG_MASK) >> _SEG_SHIFT
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & _SIGN_BIT, t, -t).astype(np.int16)


_ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
_ALL_CODES = np.arange(256, dtype=np.uint8)
# Encode tables are indexed by the int16 value viewed as uint16.
_ULAW_ENCODE = np.empty(65536, dtype=np.uint8)
_ULAW_ENCODE[_ALL_INT16.view(np.uint16)] = _linear2ulaw(_ALL_INT16)
_ALAW_ENCODE = np.empty(65536, dtype=np.uint8)
_ALAW_ENCODE[_ALL_INT16.view(np.uint16)] = _linear2alaw(_ALL_INT16)
_ULAW_DECODE = _ulaw2linear(_ALL_CODES)
_ALAW_DECODE = _alaw2linear(_ALL_CODES)


def mulaw_encode(x: np.ndarray) -> bytes:
    """float audio (or int16 PCM) -> G.711 µ-law bytes, one per sample."""
    return _ULAW_ENCODE[_float_to_int16(x).view(np.uint16)].tobytes()


def mulaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 µ-law bytes -> float32 in [-1, 1)."""
    codes = np.frombuffer(_as_bytes(data, "mulaw_decode"), dtype=np.uint8)
    return _ULAW_DECODE[codes].astype(np.float32) / np.float32(_PCM16_SCALE)


def alaw_encode(x: np.ndarray) -> bytes:
    """float audio (or int16 PCM) -> G.711 A-law bytes, one per sample."""
    return _ALAW_ENCODE[_float_to_int16(x).view(np.uint16)].tobytes()


def alaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 A-law bytes -> float32 in [-1, 1)."""
    codes = np.frombuffer(_as_bytes(data, "alaw_decode"), dtype=np.uint8)
    return _ALAW_DECODE[codes].astype(np.float32) / np.float32(_PCM16_SCALE)


def mulaw_decode_pcm16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 µ-law bytes -> int16 linear samples (the exact G.711 output)."""
    return _ULAW_DECODE[np.frombuffer(_as_bytes(data, "mulaw_decode"), dtype=np.uint8)]


def alaw_decode_pcm16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """G.711 A-law bytes -> int16 linear samples (the exact G.711 output)."""
    return _ALAW_DECODE[np.frombuffer(_as_bytes(data, "alaw_decode"), dtype=np.uint8)]


# --- base64 -------------------------------------------------------------------------------------


def b64encode(data: bytes | bytearray | memoryview) -> str:
    """bytes -> standard base64 text (with padding)."""
    return base64.b64encode(_as_bytes(data, "b64encode")).decode("ascii")


def b64decode(text: str | bytes) -> bytes:
    """Standard base64 text -> bytes; anything else (bad characters, bad padding) -> AudioError."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise AudioError(f"invalid base64 audio payload: {e}") from None
