"""Codecs: bit-exact G.711 against the reference algorithm, round-trip bounds, PCM16, base64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from audio import codecs
from audio.errors import AudioError

# --- the ITU-T G.711 reference (Sun g711.c), one sample at a time, written from the standard -----

_SEG_UEND = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_SEG_AEND = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _search(value: int, table: tuple[int, ...]) -> int:
    for i, end in enumerate(table):
        if value <= end:
            return i
    return len(table)


def ref_linear2ulaw(pcm: int) -> int:
    pcm >>= 2
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    else:
        mask = 0xFF
    pcm = min(pcm, 8159) + (0x84 >> 2)
    seg = _search(pcm, _SEG_UEND)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm >> (seg + 1)) & 0xF)) ^ mask


def ref_ulaw2linear(u: int) -> int:
    u = ~u & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


def ref_linear2alaw(pcm: int) -> int:
    pcm >>= 3
    if pcm >= 0:
        mask = 0xD5
    else:
        mask, pcm = 0x55, -pcm - 1
    seg = _search(pcm, _SEG_AEND)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    aval |= ((pcm >> 1) if seg < 2 else (pcm >> seg)) & 0xF
    return aval ^ mask


def ref_alaw2linear(a: int) -> int:
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


ALL_PCM = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def test_mulaw_encode_is_bit_exact_for_every_16_bit_value():
    expected = bytes(ref_linear2ulaw(int(v)) for v in ALL_PCM)
    assert codecs.mulaw_encode(ALL_PCM) == expected


def test_alaw_encode_is_bit_exact_for_every_16_bit_value():
    expected = bytes(ref_linear2alaw(int(v)) for v in ALL_PCM)
    assert codecs.alaw_encode(ALL_PCM) == expected


def test_decoders_are_bit_exact_for_every_code():
    codes = bytes(range(256))
    assert codecs.mulaw_decode_pcm16(codes).tolist() == [ref_ulaw2linear(c) for c in codes]
    assert codecs.alaw_decode_pcm16(codes).tolist() == [ref_alaw2linear(c) for c in codes]
    np.testing.assert_array_equal(codecs.mulaw_decode(codes), codecs.mulaw_decode_pcm16(codes) / 32768.0)


def test_known_g711_values():
    # Silence encodes to 0xFF (µ-law) and 0xD5 (A-law); the extreme codes decode to full scale.
    assert codecs.mulaw_encode(np.zeros(1, np.float32)) == b"\xff"
    assert codecs.alaw_encode(np.zeros(1, np.float32)) == b"\xd5"
    assert codecs.mulaw_decode_pcm16(b"\x00\x80").tolist() == [-32124, 32124]
    assert codecs.alaw_decode_pcm16(b"\x2a\xaa").tolist() == [-32256, 32256]


# Half a quantization step: 16 steps per segment (doubling) gives |x|/32, plus 8 LSB near zero.
def _g711_bound(x: np.ndarray) -> np.ndarray:
    return np.abs(x) / 32 + 8 / 32768


@pytest.mark.parametrize(
    ("encode", "decode"),
    [(codecs.mulaw_encode, codecs.mulaw_decode), (codecs.alaw_encode, codecs.alaw_decode)],
)
def test_g711_round_trip_error_is_within_half_a_step_for_all_values(encode, decode):
    x = ALL_PCM.astype(np.float32) / 32768
    err = np.abs(decode(encode(x)) - x)
    assert np.all(err <= _g711_bound(x))


@given(arrays(np.float32, st.integers(0, 500), elements=st.floats(-1, 1, width=32)))
def test_g711_round_trip_bound_on_floats(x):
    q = np.round(x * 32768).clip(-32768, 32767) / 32768  # the PCM16 step comes first
    for encode, decode in (
        (codecs.mulaw_encode, codecs.mulaw_decode),
        (codecs.alaw_encode, codecs.alaw_decode),
    ):
        y = decode(encode(x))
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.all(np.abs(y - q) <= _g711_bound(q) + 1e-7)


@given(st.binary(max_size=400))
def test_g711_decode_encode_is_identity_on_codes_except_negative_zero(data):
    # Decoding then encoding returns the code; µ-law's two zeros (0x7F, 0xFF) both encode as 0xFF.
    assert codecs.alaw_encode(codecs.alaw_decode(data)) == data
    expected = data.replace(b"\x7f", b"\xff")
    assert codecs.mulaw_encode(codecs.mulaw_decode(data)) == expected


@given(arrays(np.int16, st.integers(0, 300)))
def test_pcm16_round_trip_is_exact(x):
    f = codecs.pcm16_to_float32(x.tobytes())
    assert f.dtype == np.float32
    assert codecs.float32_to_pcm16(f) == x.tobytes()
    np.testing.assert_array_equal(codecs.pcm16_to_float32(x), f)


def test_float32_to_pcm16_clips_and_defines_non_finite():
    x = np.array([2.0, -2.0, np.nan, np.inf, -np.inf, 0.5], dtype=np.float32)
    assert np.frombuffer(codecs.float32_to_pcm16(x), "<i2").tolist() == [
        32767,
        -32768,
        0,
        32767,
        -32768,
        16384,
    ]


def test_pcm16_odd_length_is_an_error():
    with pytest.raises(AudioError, match="even number of bytes"):
        codecs.pcm16_to_float32(b"\x00\x01\x02")
    with pytest.raises(AudioError):
        codecs.pcm16_to_float32(np.zeros(3, np.float32))
    with pytest.raises(AudioError):
        codecs.mulaw_decode("not bytes")  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_base64_round_trip(data):
    assert codecs.b64decode(codecs.b64encode(data)) == data


@pytest.mark.parametrize("bad", ["abc", "!!!!", "YWJj\n", "YW=Jj", "ÿÿÿÿ"])
def test_bad_base64_raises_audio_error(bad):
    with pytest.raises(AudioError, match="invalid base64"):
        codecs.b64decode(bad)
