"""WAV reading and writing: every common encoding, resampling on read, unreadable files."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import numpy as np
import pytest

from audio.errors import AudioError
from audio.io import read_wav, to_mono, write_wav


def _wav_bytes(
    payload: bytes,
    *,
    fmt: int,
    channels: int,
    rate_hz: int,
    bits: int,
    extensible: bool = False,
    data_size: int | None = None,
) -> bytes:
    block_align = channels * ((bits + 7) // 8)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt_body = struct.pack("<HHIIHH", 0xFFFE, channels, rate_hz, rate_hz * block_align, block_align, bits)
        fmt_body += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", fmt) + guid_tail
    else:
        fmt_body = struct.pack("<HHIIHH", fmt, channels, rate_hz, rate_hz * block_align, block_align, bits)
    size = len(payload) if data_size is None else data_size
    chunks = b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body
    chunks += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # an odd-sized chunk to skip, padded
    chunks += b"data" + struct.pack("<I", size) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


SIGNAL = (0.5 * np.sin(2 * np.pi * 440 * np.arange(800) / 8000)).astype(np.float32)


def _encode(x: np.ndarray, kind: str) -> tuple[bytes, int, int]:
    """(payload, format tag, bits) for a mono signal."""
    if kind == "u8":
        return np.round(x * 127 + 128).astype(np.uint8).tobytes(), 1, 8
    if kind == "s16":
        return np.round(x * 32767).astype("<i2").tobytes(), 1, 16
    if kind == "s24":
        v = np.round(x * 8388607).astype(np.int32)
        return (
            np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes(),
            1,
            24,
        )
    if kind == "s32":
        return np.round(x.astype(np.float64) * 2147483647).astype("<i4").tobytes(), 1, 32
    if kind == "f32":
        return x.astype("<f4").tobytes(), 3, 32
    if kind == "f64":
        return x.astype("<f8").tobytes(), 3, 64
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["u8", "s16", "s24", "s32", "f32", "f64"])
@pytest.mark.parametrize("extensible", [False, True])
def test_reads_every_common_encoding(kind, extensible):
    payload, fmt, bits = _encode(SIGNAL, kind)
    audio, rate = read_wav(
        io.BytesIO(_wav_bytes(payload, fmt=fmt, channels=1, rate_hz=8000, bits=bits, extensible=extensible))
    )
    assert rate == 8000 and audio.dtype == np.float32 and audio.shape == SIGNAL.shape
    np.testing.assert_allclose(audio, SIGNAL, atol=1.5 / 128 if kind == "u8" else 1e-4)


def test_stereo_is_mixed_down_and_resampled_on_request():
    stereo = np.stack([SIGNAL, -SIGNAL * 0.5], axis=1)
    payload = np.round(stereo * 32767).astype("<i2").tobytes()
    wav = _wav_bytes(payload, fmt=1, channels=2, rate_hz=8000, bits=16)
    audio, rate = read_wav(io.BytesIO(wav), sample_rate_hz=16000)
    assert rate == 16000 and audio.size == 2 * SIGNAL.size
    mono, _ = read_wav(io.BytesIO(wav))
    np.testing.assert_allclose(mono, SIGNAL * 0.25, atol=1e-4)


def test_g711_wav_and_streamed_data_size():
    from audio.codecs import mulaw_encode

    wav = _wav_bytes(mulaw_encode(SIGNAL), fmt=7, channels=1, rate_hz=8000, bits=8, data_size=0xFFFFFFFF)
    audio, _ = read_wav(io.BytesIO(wav))
    np.testing.assert_allclose(audio, SIGNAL, atol=0.02)


def test_float_nan_and_overrange_are_defined():
    x = np.array([np.nan, 2.0, -3.0, 0.25], dtype=np.float32)
    audio, _ = read_wav(io.BytesIO(_wav_bytes(x.tobytes(), fmt=3, channels=1, rate_hz=8000, bits=32)))
    assert audio.tolist() == [0.0, 1.0, -1.0, 0.25]


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "x.wav"
    write_wav(path, SIGNAL, 8000)
    audio, rate = read_wav(path)
    assert rate == 8000
    np.testing.assert_allclose(audio, SIGNAL, atol=1 / 32768)


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
@pytest.mark.parametrize(
    "args",
    [
        ["-b", "24", "-c", "2", "-r", "44100"],
        ["-e", "floating-point", "-b", "32", "-r", "48000"],
        ["-b", "8", "-r", "11025"],
    ],
)
def test_reads_files_written_by_sox(tmp_path, args):
    path = tmp_path / "sox.wav"
    subprocess.run(["sox", "-n", *args, str(path), "synth", "0.3", "sine", "1000", "vol", "0.5"], check=True)
    audio, rate = read_wav(path, sample_rate_hz=16000)
    assert rate == 16000 and abs(audio.size - 4800) <= 2
    assert np.max(np.abs(audio[500:-500])) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a WAV"),
        (b"hello world, not audio at all", "not a WAV"),
        (b"RIFF\x00\x00\x00\x00WAVE", "fmt"),
        (
            b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00"
            + struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16),
            "data",
        ),
        (_wav_bytes(b"\x00" * 8, fmt=0x55, channels=1, rate_hz=8000, bits=16), "unsupported"),
        (_wav_bytes(b"\x00" * 8, fmt=1, channels=0, rate_hz=8000, bits=16), "channel"),
    ],
)
def test_unreadable_files_raise_audio_error(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        read_wav(path)


def test_missing_file_and_bad_writes():
    with pytest.raises(AudioError, match="cannot read"):
        read_wav("/nonexistent/file.wav")
    with pytest.raises(AudioError, match="mono"):
        write_wav(io.BytesIO(), np.zeros((10, 2), np.float32), 8000)
    with pytest.raises(AudioError, match="cannot write"):
        write_wav("/nonexistent/dir/x.wav", SIGNAL, 8000)
    assert to_mono(np.ones((4, 3), np.float32)).tolist() == [1.0] * 4
