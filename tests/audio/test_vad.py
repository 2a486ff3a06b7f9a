"""Endpointer on real speech (espeak-ng): turns, pre-roll, coughs, chunking, backends."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from audio.errors import AudioError
from audio.vad import Endpointer, PauseCheck, SpeechEnded, SpeechStarted

SR = 16000
HAS_SILERO = importlib.util.find_spec("silero_vad") is not None
BACKENDS = [
    "webrtc",
    pytest.param("silero", marks=pytest.mark.skipif(not HAS_SILERO, reason="silero-vad is not installed")),
]


def feed_all(endpointer: Endpointer, audio: np.ndarray, chunk_samples: int = 320) -> list:
    events = []
    for i in range(0, audio.size, chunk_samples):
        events += endpointer.feed(audio[i : i + chunk_samples])
    return events


@pytest.fixture(scope="module")
def two_utterances(espeak, speech_bounds_s):
    """0.5 s silence, utterance, 1.0 s silence, utterance, 1.0 s silence; with the truth."""
    a = espeak("Hello there, how are you doing today?")
    b = espeak("Please book a table for two at seven.")
    silence = np.zeros(SR // 2, np.float32)
    scene = np.concatenate([silence, a, silence, silence, b, silence, silence])
    a0, a1 = speech_bounds_s(a)
    b0, b1 = speech_bounds_s(b)
    offset_b = (silence.size + a.size + 2 * silence.size) / SR
    truth = [(0.5 + a0, 0.5 + a1), (offset_b + b0, offset_b + b1)]
    return scene, truth


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_utterances_give_exactly_two_turns_without_clipping(two_utterances, backend):
    scene, truth = two_utterances
    events = feed_all(Endpointer(SR, backend=backend), scene)
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded, SpeechStarted, SpeechEnded]
    for ended, (start_s, end_s) in zip(events[1::2], truth, strict=True):
        audio_end_s = ended.audio_start_s + ended.audio.size / SR
        assert ended.audio_start_s <= start_s - 0.1, "the start of the first word was cut"
        assert audio_end_s >= end_s, "the end of the last word was cut"
        # The audio really is that stretch of the scene.
        i = round(ended.audio_start_s * SR)
        np.testing.assert_array_equal(ended.audio, scene[i : i + ended.audio.size])
        assert ended.t_s >= ended.speech_end_s + 0.6 - 1e-9


def test_events_do_not_depend_on_chunk_size(two_utterances):
    scene, _ = two_utterances
    scene = scene[: int(3.5 * SR)]  # the first turn is enough, and chunks of 7 samples are slow
    reference = feed_all(Endpointer(SR), scene, 320)
    for chunk in (7, 77, 480, 4000, scene.size):
        events = feed_all(Endpointer(SR), scene, chunk)
        assert [(type(e), e.t_s) for e in events] == [(type(e), e.t_s) for e in reference]
        assert len(events) == 2 and np.array_equal(events[1].audio, reference[1].audio)


def test_utterance_audio_grows_during_a_turn_and_is_empty_between(espeak):
    speech = espeak("One two three four five.")
    endpointer = Endpointer(SR)
    assert endpointer.utterance_audio().size == 0
    sizes = []
    for i in range(0, speech.size, 320):
        endpointer.feed(speech[i : i + 320])
        if endpointer.in_speech:
            sizes.append(endpointer.utterance_audio().size)
    assert sizes and sizes == sorted(sizes) and sizes[-1] > sizes[0]
    events = endpointer.feed(np.zeros(SR, np.float32))
    assert isinstance(events[-1], SpeechEnded)
    assert endpointer.utterance_audio().size == 0 and not endpointer.in_speech


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cough_is_not_a_turn(backend):
    rng = np.random.default_rng(1)
    burst = (rng.standard_normal(int(0.12 * SR)) * np.hanning(int(0.12 * SR)) * 0.4).astype(np.float32)
    silence = np.zeros(SR, np.float32)
    events = feed_all(
        Endpointer(SR, backend=backend, min_speech_ms=200), np.concatenate([silence, burst, silence])
    )
    assert events == []


def _noise_burst(rng, seconds: float, peak: float, lowpass: int = 1) -> np.ndarray:
    n = int(seconds * SR)
    x = np.convolve(rng.standard_normal(n + lowpass - 1), np.ones(lowpass) / lowpass, mode="valid") * np.hanning(n)
    return (peak * x / np.abs(x).max()).astype(np.float32)


def _start_chunk(endpointer: Endpointer, audio: np.ndarray, chunk: int = 320) -> int | None:
    """The index of the chunk whose feeding emitted the first SpeechStarted."""
    for k, i in enumerate(range(0, audio.size, chunk)):
        if any(isinstance(e, SpeechStarted) for e in endpointer.feed(audio[i : i + chunk])):
            return k
    return None


@pytest.mark.skipif(not HAS_SILERO, reason="silero-vad is not installed")
def test_knocks_and_a_double_cough_start_a_turn_only_without_the_confirming_model():
    """webrtcvad calls ~100 ms after each knock voiced, so three knocks are a turn (a barge-in on a
    call); silero calls such noises 0.0-0.1 and confirms none of them."""
    rng = np.random.default_rng(7)
    gap, silence = np.zeros(int(0.15 * SR), np.float32), np.zeros(SR, np.float32)
    knocks = np.concatenate([_noise_burst(rng, 0.03, 0.7, 8), gap, _noise_burst(rng, 0.03, 0.7, 8), gap, _noise_burst(rng, 0.03, 0.7, 8)])
    coughs = np.concatenate([_noise_burst(rng, 0.15, 0.4), np.zeros(int(0.1 * SR), np.float32), _noise_burst(rng, 0.15, 0.4)])
    for noise in (knocks, coughs):
        scene = np.concatenate([silence, noise, silence])
        assert any(isinstance(e, SpeechStarted) for e in feed_all(Endpointer(SR), scene))
        assert feed_all(Endpointer(SR, confirm_start="silero"), scene) == []


@pytest.mark.skipif(not HAS_SILERO, reason="silero-vad is not installed")
def test_a_confirmed_start_comes_as_soon_as_without_confirmation(two_utterances):
    scene, _ = two_utterances
    plain, confirmed = Endpointer(SR), Endpointer(SR, confirm_start="silero")
    assert _start_chunk(plain, scene) == _start_chunk(confirmed, scene) is not None
    rest = scene[int(scene.size * 0.2) // 320 * 320 :]  # both endpointers are past the first start here
    assert [(type(e), e.t_s) for e in feed_all(plain, rest)] == [(type(e), e.t_s) for e in feed_all(confirmed, rest)]


@pytest.mark.skipif(not HAS_SILERO, reason="silero-vad is not installed")
def test_a_long_noise_is_no_turn_keeps_no_growing_history_and_speech_after_it_starts_one(espeak):
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(8 * SR) * 0.2).astype(np.float32)  # webrtcvad calls it voiced throughout
    endpointer = Endpointer(SR, confirm_start="silero")
    assert feed_all(Endpointer(SR), noise[: SR // 2]) != []  # (webrtcvad alone starts a turn)
    longest = 0
    for i in range(0, noise.size, 320):
        assert endpointer.feed(noise[i : i + 320]) == []
        longest = max(longest, len(endpointer._history))
    assert longest <= (3000 + 300) // 20 + 2  # the candidate gives up after 3 s; plus the pre-roll
    speech = espeak("Hello there, how are you doing today?")
    events = feed_all(endpointer, np.concatenate([np.zeros(SR // 2, np.float32), speech, np.zeros(SR, np.float32)]))
    assert [type(e) for e in events] == [SpeechStarted, SpeechEnded]


def test_confirm_start_checks_its_setting():
    with pytest.raises(AudioError, match="confirm_start"):
        Endpointer(SR, confirm_start="smart-turn")
    if HAS_SILERO:
        with pytest.raises(AudioError, match="8000"):
            Endpointer(48000, confirm_start="silero")


def test_silence_and_noise_floor_give_no_turn():
    rng = np.random.default_rng(2)
    quiet = (rng.standard_normal(3 * SR) * 0.001).astype(np.float32)
    assert feed_all(Endpointer(SR, aggressiveness=3), quiet) == []


def test_max_utterance_ends_a_turn_and_speech_goes_on_in_a_new_one(espeak):
    speech = np.concatenate([espeak("This is a rather long sentence that keeps on going for a while.")] * 2)
    events = feed_all(
        Endpointer(SR, max_utterance_ms=2000), np.concatenate([speech, np.zeros(SR, np.float32)])
    )
    ended = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(ended) >= 3
    assert all(e.audio.size <= 2.0 * SR + 320 for e in ended)


def test_reset_restarts_stream_time(two_utterances):
    scene, _ = two_utterances
    endpointer = Endpointer(SR)
    first = feed_all(endpointer, scene)
    endpointer.reset()
    assert endpointer.time_s == 0
    assert [e.t_s for e in feed_all(endpointer, scene)] == [e.t_s for e in first]


def test_bad_input_and_settings():
    with pytest.raises(AudioError, match="needs"):
        Endpointer(22050)
    with pytest.raises(AudioError, match="frames"):
        Endpointer(SR, frame_ms=25)
    with pytest.raises(AudioError, match="aggressiveness"):
        Endpointer(SR, aggressiveness=4)
    with pytest.raises(AudioError, match="unknown VAD backend"):
        Endpointer(SR, backend="nope")
    with pytest.raises(AudioError, match="mono"):
        Endpointer(SR).feed(np.zeros((320, 2), np.float32))
    with pytest.raises(AudioError, match="dtype"):
        Endpointer(SR).feed(np.zeros(320, np.int32))
    # NaN samples are treated as silence, int16 chunks are accepted.
    endpointer = Endpointer(SR)
    assert endpointer.feed(np.full(640, np.nan, np.float32)) == []
    assert endpointer.feed(np.zeros(640, np.int16)) == []
    assert endpointer.time_s == pytest.approx(0.08)


def test_pause_checks_come_once_per_pause_and_end_turn_closes_the_turn_early(two_utterances):
    scene, truth = two_utterances
    first_turn = scene[: int((truth[0][1] + 0.9) * SR)]
    endpointer = Endpointer(SR, end_silence_ms=600, check_silence_ms=200)
    events = feed_all(endpointer, first_turn)
    checks = [e for e in events if isinstance(e, PauseCheck)]
    assert checks, "the pause after the sentence reaches 200 ms"
    assert len({c.pause_id for c in checks}) == len(checks), "one check per pause"
    final = checks[-1]
    assert final.t_s == pytest.approx(final.speech_end_s + 0.2, abs=0.021)
    assert abs(final.speech_end_s - truth[0][1]) < 0.25
    # A check is a snapshot of the turn so far, trailing silence included.
    assert final.audio.size / SR >= final.t_s - truth[0][0]
    # Without a verdict the turn ends on the fallback silence, at the same speech end.
    ended = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(ended) == 1 and not ended[0].early and ended[0].speech_end_s == final.speech_end_s
    assert endpointer.end_turn(final.pause_id) == [], "that turn is over already"

    # The same audio, but the last pause is judged complete when it is reported.
    endpointer = Endpointer(SR, end_silence_ms=600, check_silence_ms=200)
    early = None
    for i in range(0, first_turn.size, 320):
        for e in endpointer.feed(first_turn[i : i + 320]):
            if isinstance(e, PauseCheck) and e.pause_id == final.pause_id:
                (early,) = endpointer.end_turn(e.pause_id)
                assert endpointer.end_turn(e.pause_id) == [], "a pause ends a turn once"
            assert not isinstance(e, SpeechEnded), "nothing more after the early end"
    assert early is not None and early.early and not endpointer.in_speech
    assert early.t_s == pytest.approx(final.t_s)
    assert early.speech_end_s == final.speech_end_s
    np.testing.assert_array_equal(early.audio, ended[0].audio[: early.audio.size])


def test_a_shortened_pause_ends_the_turn_at_its_own_silence_and_only_that_pause(espeak):
    """shorten_pause: the pause ends the turn after its shorter silence (early), at once if it is
    already that long; speech after it, or another turn, keeps the full end silence."""
    words = espeak("Book a table")
    lead = np.zeros(SR * 3 // 10, np.float32)
    silence = np.zeros(SR, np.float32)

    def run(shorten_ms: int, at_check: bool = True):
        endpointer = Endpointer(SR, end_silence_ms=900, check_silence_ms=100)
        events = []
        for chunk in np.array_split(np.concatenate([lead, words, silence]), 80):
            for e in endpointer.feed(chunk):
                events.append(e)
                if isinstance(e, PauseCheck) and at_check:
                    events += endpointer.shorten_pause(e.pause_id, shorten_ms)
        return endpointer, events

    _, full = run(0, at_check=False)
    (plain,) = [e for e in full if isinstance(e, SpeechEnded)]
    assert not plain.early and plain.t_s - plain.speech_end_s == pytest.approx(0.9, abs=0.021)
    _, events = run(400)
    (short,) = [e for e in events if isinstance(e, SpeechEnded)]
    assert short.early and short.speech_end_s == plain.speech_end_s
    assert short.t_s - short.speech_end_s == pytest.approx(0.4, abs=0.021)
    # Shortened to less than the pause already lasts: the turn ends at once, from the call.
    endpointer = Endpointer(SR, end_silence_ms=900, check_silence_ms=100)
    events = feed_all(endpointer, np.concatenate([lead, words, silence[: SR // 2]]))
    (check,) = [e for e in events if isinstance(e, PauseCheck)]
    (now,) = endpointer.shorten_pause(check.pause_id, 200)
    assert now.early and not endpointer.in_speech and now.speech_end_s == plain.speech_end_s
    assert endpointer.shorten_pause(check.pause_id, 200) == [], "that turn is over already"
    # The caller speaks again: the next pause has the full end silence.
    endpointer = Endpointer(SR, end_silence_ms=900, check_silence_ms=100)
    events = feed_all(endpointer, np.concatenate([lead, words, silence[: SR // 5]]))
    (check,) = [e for e in events if isinstance(e, PauseCheck)]
    assert endpointer.shorten_pause(check.pause_id, 400) == []
    more = espeak("for two")
    more = more[np.flatnonzero(np.abs(more) > 0.01)[0]:]  # espeak's own lead silence would lengthen the pause
    events = feed_all(endpointer, np.concatenate([more, silence]))
    (ended,) = [e for e in events if isinstance(e, SpeechEnded)]
    assert not ended.early and ended.t_s - ended.speech_end_s == pytest.approx(0.9, abs=0.021)
    with pytest.raises(AudioError, match="silence_ms"):
        endpointer.shorten_pause(1, -1)


def test_a_pause_check_goes_stale_when_speech_resumes(espeak):
    words = espeak("Book a table")
    pause = np.zeros(SR * 3 // 10, np.float32)
    endpointer = Endpointer(SR, end_silence_ms=600, check_silence_ms=200)
    events = feed_all(endpointer, np.concatenate([pause, words, pause]))
    (check,) = [e for e in events if isinstance(e, PauseCheck)]
    feed_all(endpointer, espeak("for two"))
    assert endpointer.in_speech
    assert endpointer.end_turn(check.pause_id) == [], "the caller spoke again after that pause"
    assert endpointer.in_speech


def test_no_pause_checks_unless_asked(two_utterances):
    scene, _ = two_utterances
    assert not [e for e in feed_all(Endpointer(SR), scene) if isinstance(e, PauseCheck)]
    with pytest.raises(AudioError, match="check_silence_ms"):
        Endpointer(SR, check_silence_ms=-1)


def test_quiet_frames_end_the_speech_where_it_ends_on_a_quiet_line(two_utterances):
    """webrtcvad calls ~100 ms of silence after speech voiced; with quiet_db the pause counts
    from the speech's own end. Over a background less than quiet_db below the voice, the
    classifier alone decides, as without the rule."""
    scene, truth = two_utterances

    def ends(audio: np.ndarray, quiet_db: float) -> list[float]:
        events = feed_all(Endpointer(SR, check_silence_ms=100, quiet_db=quiet_db), audio)
        assert [type(e) for e in events if not isinstance(e, PauseCheck)] == [SpeechStarted, SpeechEnded] * 2
        return [e.speech_end_s for e in events if isinstance(e, SpeechEnded)]

    plain, quiet = ends(scene, 0.0), ends(scene, 30.0)
    for (_, true_end), p, q in zip(truth, plain, quiet, strict=True):
        assert p - true_end >= 0.06, "the hangover this rule is for"
        assert abs(q - true_end) <= 0.03
    noisy = scene + np.random.default_rng(0).normal(0.0, 10 ** (-45 / 20), scene.size).astype(np.float32)
    assert ends(noisy, 30.0) == ends(noisy, 0.0)
    with pytest.raises(AudioError, match="quiet_db"):
        Endpointer(SR, quiet_db=-1)
