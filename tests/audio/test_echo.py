"""The echo path learnt from levels (audio/echo.py), on speech-like level tracks."""

import numpy as np
import pytest

from audio.echo import ECHO_FRAMES, MIN_FRAMES, NONE_SEEN_FRAMES, EchoPath, Estimate, level_db

FLOOR = -60.0
DELAYS = 40


def reply_levels(frames: int, seed: int = 0) -> np.ndarray:
    """A reply's 20 ms levels in dBFS: syllables of 3-8 frames between -30 and -12 dB, short pauses."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    while len(out) < frames:
        out += list(rng.uniform(-30, -12) + rng.normal(0, 3, rng.integers(3, 9)))
        out += [FLOOR] * int(rng.integers(0, 4))
    return np.array(out[:frames])


def run(path: EchoPath, far: np.ndarray, near: np.ndarray) -> list[Estimate]:
    """Feed frame t: the caller's level and the reply levels 0..DELAYS frames before it."""
    estimates = []
    for t in range(near.size):
        lags = t - np.arange(DELAYS + 1)
        played = np.where(lags >= 0, far[np.clip(lags, 0, None)], FLOOR)
        path.observe(near[t], played)
        estimates.append(path.estimate())
    return estimates


def echoed(far: np.ndarray, delay: int, gain_db: float) -> np.ndarray:
    near = np.full(far.size, FLOOR)
    near[delay:] = np.maximum(far[: far.size - delay] + gain_db, FLOOR)
    return near


@pytest.mark.parametrize(("delay", "gain_db"), [(5, -10.0), (15, -6.0), (32, -20.0)])
def test_an_echo_is_found_at_its_delay_and_gain_and_predicted(delay, gain_db):
    far = reply_levels(300)
    path = EchoPath(DELAYS, FLOOR)
    estimates = run(path, far, echoed(far, delay, gain_db))
    final = estimates[-1]
    assert final.kind == "echo" and final.delay_frames == delay and final.gain_db == pytest.approx(gain_db, abs=0.5)
    first = next(t for t, e in enumerate(estimates) if e.kind == "echo")
    assert first <= delay + 3 * ECHO_FRAMES, "learnt within the first seconds"
    if delay <= NONE_SEEN_FRAMES:  # a longer delay is "none" until its echo has come back
        assert {e.kind for e in estimates[:first]} == {"unknown"}
    # Each frame's echo is predicted within a few dB above it (the prediction is the loudest nearby).
    t = np.arange(delay + 10, far.size)
    lags = t[:, None] - np.arange(DELAYS + 1)
    predicted = np.array([path.echo_db(far[row], final) for row in lags])
    actual = echoed(far, delay, gain_db)[t]
    heard = actual > FLOOR + 1
    assert np.all(predicted[heard] >= actual[heard] - 0.5)


def test_half_a_frame_off_is_an_echo_too():
    far = reply_levels(300, seed=1)
    power = 10 ** (far / 10)
    near = np.full(far.size, FLOOR)
    near[8:] = np.maximum(10 * np.log10((power[:-8] + np.r_[power[1:-7]]) / 2) - 10, FLOOR)  # between delays 7 and 8
    final = run(EchoPath(DELAYS, FLOOR), far, near)[-1]
    assert final.kind == "echo" and final.delay_frames == DELAYS + 1 + 7 and final.gain_db == pytest.approx(-10, abs=0.5)


def test_a_silent_line_is_no_echo_soon_and_a_caller_talking_over_keeps_it():
    far = reply_levels(300, seed=2)
    near = np.full(far.size, FLOOR)
    rng = np.random.default_rng(3)
    near[100:160] = rng.uniform(-35, -15, 60)  # the caller talks over the reply after 2 s
    estimates = run(EchoPath(DELAYS, FLOOR), far, near)
    first = next(t for t, e in enumerate(estimates) if e.kind != "unknown")
    assert estimates[first].kind == "none" and first < 60
    assert {e.kind for e in estimates[first:]} == {"none"}


def test_a_caller_talking_from_the_start_is_not_taken_for_an_echo():
    far = reply_levels(300, seed=4)
    rng = np.random.default_rng(5)
    near = rng.uniform(-40, -15, far.size)  # the caller's own speech, unrelated to the reply
    assert {e.kind for e in run(EchoPath(DELAYS, FLOOR), far, near)} == {"unknown"}


def test_nothing_is_said_before_enough_has_been_heard_and_bad_settings_are_refused():
    path = EchoPath(DELAYS, FLOOR)
    assert path.estimate().kind == "unknown"
    for _ in range(MIN_FRAMES - 1):
        path.observe(-20.0, np.full(DELAYS + 1, -15.0))
    assert path.estimate().kind == "unknown"
    assert path.echo_db(np.full(DELAYS + 1, -15.0), Estimate("unknown")) is None
    with pytest.raises(ValueError):
        EchoPath(0)
    with pytest.raises(ValueError):
        EchoPath(DELAYS, history_frames=MIN_FRAMES - 1)
    assert level_db(0.0) == -60.0 and level_db(1.0) == pytest.approx(0.0)
