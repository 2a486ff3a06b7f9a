"""Resampling: tones kept and removed, streaming equals one-shot, bad rates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.errors import AudioError
from audio.resample import LIVE_QUALITY, Resampler, ResampleStream, resample

RATES_HZ = (8000, 16000, 22050, 24000, 48000)


def _amplitude_at(x: np.ndarray, freq_hz: float, rate_hz: int) -> float:
    """Amplitude of one frequency (windowed DFT of the steady middle of the signal)."""
    mid = x[len(x) // 4 : 3 * len(x) // 4]
    w = np.hanning(mid.size)
    t = np.arange(mid.size) / rate_hz
    return float(2 * np.abs(np.sum(mid * w * np.exp(-2j * np.pi * freq_hz * t))) / np.sum(w))


@pytest.mark.parametrize("from_hz", RATES_HZ)
@pytest.mark.parametrize("to_hz", RATES_HZ)
def test_1khz_tone_is_kept(tone, from_hz, to_hz):
    y = resample(tone(1000, from_hz, 0.5), from_hz, to_hz)
    assert y.dtype == np.float32
    assert abs(y.size - round(0.5 * to_hz)) <= 1
    assert _amplitude_at(y, 1000, to_hz) == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize(
    ("from_hz", "to_hz", "freq_hz"),
    [
        (48000, 16000, 10000),
        (48000, 8000, 6000),
        (24000, 16000, 9000),
        (22050, 8000, 5000),
        (16000, 8000, 6000),
    ],
)
def test_tone_above_target_nyquist_is_attenuated_40_db(tone, from_hz, to_hz, freq_hz):
    y = resample(tone(freq_hz, from_hz, 0.5), from_hz, to_hz)
    rms = float(np.sqrt(np.mean(y[y.size // 4 : 3 * y.size // 4] ** 2)))
    assert 20 * np.log10(rms / (0.5 / np.sqrt(2)) + 1e-12) < -40


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(48000, 16000), (8000, 24000), (22050, 16000), (16000, 48000), (24000, 8000)]),
    st.lists(st.integers(1, 1500), min_size=1, max_size=40),
)
def test_streaming_equals_one_shot(rates, chunk_sizes):
    from_hz, to_hz = rates
    x = np.random.default_rng(0).standard_normal(sum(chunk_sizes)).astype(np.float32) * 0.1
    stream = Resampler(from_hz, to_hz)
    parts, pos = [], 0
    for n in chunk_sizes:
        parts.append(stream.process(x[pos : pos + n]))
        pos += n
    parts.append(stream.flush())
    streamed = np.concatenate(parts)
    one_shot = resample(x, from_hz, to_hz)
    assert streamed.size == one_shot.size
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)


def test_same_rate_is_a_copy_and_flush_is_idempotent():
    x = np.arange(10, dtype=np.float32)
    y = resample(x, 16000, 16000)
    assert y is not x and np.array_equal(x, y)
    s = ResampleStream(16000, 16000)
    assert np.array_equal(s.process(x), x)
    assert s.flush().size == 0 and s.flush().size == 0
    with pytest.raises(AudioError, match="after flush"):
        s.process(x)


@pytest.mark.parametrize(("from_hz", "to_hz"), [(0, 16000), (16000, -1), (16000, 10**7), (16000.5, 8000)])
def test_bad_rates_raise(from_hz, to_hz):
    with pytest.raises(AudioError):
        resample(np.zeros(10, np.float32), from_hz, to_hz)


def test_bad_shapes_and_types_raise():
    with pytest.raises(AudioError, match="mono"):
        resample(np.zeros((100, 2), np.float32), 16000, 8000)
    with pytest.raises(AudioError, match="float"):
        resample(np.zeros(100, np.int16), 16000, 8000)
    assert resample(np.zeros(0, np.float32), 16000, 8000).size == 0


@pytest.mark.parametrize(("from_hz", "held_hq_ms", "held_live_ms"), [(8000, 60, 30), (24000, 19, 17), (48000, 19, 17)])
def test_a_live_stream_holds_back_less_with_the_same_passband(tone, from_hz, held_hq_ms, held_live_ms):
    """A call's audio is resampled as it comes: what the filter holds back is latency."""

    def held_back_ms(quality: str) -> float:
        stream, n = Resampler(from_hz, 16000, quality), from_hz // 50
        out = sum(stream.process(np.zeros(n, np.float32)).size for _ in range(50))
        return (50 * 320 - out) / 16

    assert held_back_ms("HQ") > held_hq_ms and held_back_ms(LIVE_QUALITY) < held_live_ms
    top = 0.92 * min(from_hz, 16000) / 2  # 3.7 kHz of a phone line
    stream = Resampler(from_hz, 16000, LIVE_QUALITY)
    x = tone(top, from_hz, 1.0)
    y = np.concatenate([stream.process(x[i : i + from_hz // 50]) for i in range(0, x.size, from_hz // 50)])
    assert _amplitude_at(y, top, 16000) > 0.5 * 10 ** (-0.6 / 20)
    with pytest.raises(AudioError):
        Resampler(8000, 16000, "best")
