"""Resampling: tones kept and removed, streaming equals one-shot, bad rates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audio.errors import AudioError
from audio.resample import LiveResampler, Resampler, ResampleStream, resample

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


def _live(x: np.ndarray, from_hz: int, to_hz: int, chunk: int) -> tuple[np.ndarray, list[int]]:
    """The live stream's output for `x` in chunks of `chunk`, and its length after each chunk."""
    stream, parts, lengths = LiveResampler(from_hz, to_hz), [], []
    for i in range(0, x.size, chunk):
        parts.append(stream.process(x[i : i + chunk]))
        lengths.append(sum(p.size for p in parts))
    parts.append(stream.flush())
    return np.concatenate(parts), lengths


@pytest.mark.parametrize(("from_hz", "held_ms"), [(8000, 8.0), (24000, 4.0), (48000, 4.0), (22050, 4.0)])
def test_a_live_stream_holds_back_only_its_filter_after_every_chunk(from_hz, held_ms):
    """A call's audio is resampled as it comes, and what the filter holds back is latency before
    the VAD hears the caller: the same few ms after every 20 ms chunk (soxr's streams release
    their output in blocks of up to ~110 ms)."""
    x = np.random.default_rng(0).standard_normal(2 * from_hz).astype(np.float32) * 0.1
    chunk = from_hz // 50
    _, lengths = _live(x, from_hz, 16000, chunk)
    held_ms_after = [((k + 1) * 320 - n) / 16 for k, n in enumerate(lengths)]
    assert max(held_ms_after) <= held_ms
    assert max(held_ms_after) - min(held_ms_after) <= 1 / 16  # one output sample of rounding
    assert LiveResampler(from_hz, 16000).held_back_s * 1000 == pytest.approx(held_ms_after[-1], abs=0.1)


@pytest.mark.parametrize("from_hz", [8000, 22050, 24000, 48000])
def test_a_live_stream_keeps_the_passband_and_removes_what_would_fold_back(tone, from_hz):
    top = 0.92 * min(from_hz, 16000) / 2  # 3.7 kHz of a phone line
    for freq_hz, amplitude in ((1000, 0.5 * 0.99), (top, 0.5 * 10 ** (-0.5 / 20))):
        y, _ = _live(tone(freq_hz, from_hz, 1.0), from_hz, 16000, from_hz // 50)
        assert _amplitude_at(y, freq_hz, 16000) > amplitude
    if from_hz > 16000:  # 9 kHz is above the new Nyquist: it must not fold back to 7 kHz
        y, _ = _live(tone(9000, from_hz, 1.0), from_hz, 16000, from_hz // 50)
        assert 20 * np.log10(float(np.sqrt(np.mean(y[4000:-4000] ** 2))) / (0.5 / np.sqrt(2))) < -70
    else:  # upsampling: a 3 kHz tone leaves no image at 5 kHz
        y, _ = _live(tone(3000, from_hz, 1.0), from_hz, 16000, from_hz // 50)
        assert 20 * np.log10(_amplitude_at(y, from_hz - 3000, 16000) / 0.5) < -70


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(48000, 16000), (8000, 16000), (22050, 16000), (24000, 16000), (16000, 8000), (8000, 24000)]),
    st.lists(st.integers(1, 1500), min_size=1, max_size=40),
)
def test_a_live_stream_is_the_same_in_any_chunks_and_lines_up_with_resample(rates, chunk_sizes):
    from_hz, to_hz = rates
    n = sum(chunk_sizes)
    x = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / from_hz)).astype(np.float32)
    whole, _ = _live(x, from_hz, to_hz, n)
    stream, parts, pos = LiveResampler(from_hz, to_hz), [], 0
    for size in chunk_sizes:
        parts.append(stream.process(x[pos : pos + size]))
        pos += size
    parts.append(stream.flush())
    assert stream.flush().size == 0
    streamed = np.concatenate(parts)
    one_shot, edge = resample(x, from_hz, to_hz), to_hz // 100
    assert streamed.size == whole.size == one_shot.size
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    # sample for sample where soxr's one-shot output is (away from the edges, where each sees silence)
    if whole.size > 4 * edge:
        np.testing.assert_allclose(whole[edge:-edge], one_shot[edge:-edge], atol=2e-3)


def test_a_live_stream_at_the_same_rate_is_a_copy_and_checks_its_input():
    x = np.arange(10, dtype=np.float32)
    s = LiveResampler(16000, 16000)
    assert s.held_back_s == 0 and np.array_equal(s.process(x), x) and s.flush().size == 0
    with pytest.raises(AudioError, match="after flush"):
        s.process(x)
    with pytest.raises(AudioError, match="mono"):
        LiveResampler(8000, 16000).process(np.zeros((100, 2), np.float32))
    with pytest.raises(AudioError):
        LiveResampler(0, 16000)
