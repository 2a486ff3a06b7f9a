"""The prosody end-of-turn model (audio/prosody.py): its window, its head, its verdicts on real speech."""

from __future__ import annotations

import numpy as np
import pytest

from audio.errors import AudioError, AudioModelNotFoundError
from audio.prosody import (
    DEFAULT_HEAD,
    SAMPLE_RATE_HZ,
    TAIL_S,
    WINDOW_S,
    ProsodyHead,
    ProsodyTurn,
    WindowEncoder,
    fit_head,
    pool,
    prosody_window,
)

SR = SAMPLE_RATE_HZ
BEFORE, AFTER = int(WINDOW_S * SR), int(TAIL_S * SR)


def _tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * 220 * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def test_the_window_ends_where_the_voice_ends_and_shows_no_more_of_a_long_utterance():
    voice = _tone(3.0)
    voice[: SR] *= 0.5  # an older part of the utterance, outside the window
    window = prosody_window(np.concatenate([voice, np.zeros(SR // 2, np.float32)]))
    assert window.shape == (BEFORE + AFTER,) and window.dtype == np.float32
    np.testing.assert_array_equal(window[:BEFORE], voice[-BEFORE:])
    assert not window[BEFORE:].any()  # the tail after the voice: the pause's silence
    # The same utterance with a quiet noise floor after it: the window still ends at the voice.
    noisy_pause = np.full(SR // 2, 1e-4, np.float32)
    np.testing.assert_array_equal(prosody_window(np.concatenate([voice, noisy_pause]))[:BEFORE], voice[-BEFORE:])


def test_a_short_utterance_is_padded_in_front_and_audio_stopping_early_at_the_back():
    short = _tone(0.4)
    window = prosody_window(np.concatenate([short, np.zeros(SR // 20, np.float32)]))
    assert not window[: BEFORE - short.size].any()
    np.testing.assert_array_equal(window[BEFORE - short.size : BEFORE], short)
    assert not window[BEFORE:].any()  # 50 ms of pause, then zeros where the audio stopped
    assert not prosody_window(np.zeros(SR, np.float32)).any()
    assert not prosody_window(np.zeros(0, np.float32)).any()


def test_pool_averages_three_spans_of_encoder_positions():
    positions = 100
    encoded = np.repeat(np.arange(positions, dtype=np.float32)[:, None], 4, axis=1)  # position index in every column
    features = pool(encoded)
    assert features.shape == (12,)
    end = round(WINDOW_S / 0.02)
    np.testing.assert_allclose(features, np.repeat([np.mean(np.arange(end - 25, end)), np.mean(np.arange(end - 8, end)),
                                                    np.mean(np.arange(end, end + 5))], 4))
    with pytest.raises(AudioError, match="encoder positions"):
        pool(encoded[:50])


def test_fit_head_separates_two_classes_weights_them_equally_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    over = rng.normal(1.0, 1.0, (40, 6))
    goes_on = rng.normal(-1.0, 1.0, (400, 6))  # ten times as many, as cuts outnumber whole sentences
    features = np.vstack([over, goes_on])
    labels = np.array([1] * 40 + [0] * 400)
    head = fit_head(features, labels, l2=1.0, meta={"note": "test"})
    p = head.probability(features)
    assert p[:40].mean() > 0.8 and p[40:].mean() < 0.2
    # Equal class weights: where the classes overlap, the boundary sits half way between them,
    # not pushed into the rare one (unweighted, nearly every point would be called the common class).
    over = rng.normal(0.5, 1.0, (200, 2))
    goes_on = rng.normal(-0.5, 1.0, (2000, 2))
    overlapping = fit_head(np.vstack([over, goes_on]), np.array([1] * 200 + [0] * 2000), l2=1.0)
    assert overlapping.probability(np.zeros(2)) == pytest.approx(0.5, abs=0.05)
    recall, specificity = (overlapping.probability(over) >= 0.5).mean(), (overlapping.probability(goes_on) < 0.5).mean()
    assert abs(recall - specificity) < 0.05 and recall > 0.7
    path = tmp_path / "head.npz"
    head.save(path)
    loaded = ProsodyHead.load(path)
    np.testing.assert_allclose(loaded.probability(features), p, atol=1e-5)
    assert loaded.meta == {"note": "test"}
    assert isinstance(loaded.probability(features[0]), float)


def test_bad_training_input_and_bad_head_files_are_clear_errors(tmp_path):
    with pytest.raises(AudioError, match="both present"):
        fit_head(np.zeros((4, 3)), np.ones(4))
    with pytest.raises(AudioError, match="one label per sample"):
        fit_head(np.zeros((4, 3)), np.ones(3))
    with pytest.raises(AudioModelNotFoundError, match="no prosody turn head"):
        ProsodyHead.load(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a head")
    with pytest.raises(AudioError, match="not a prosody turn head"):
        ProsodyHead.load(junk)
    with pytest.raises(AudioError, match="takes 3 features"):
        ProsodyHead(np.zeros(3), np.ones(3), np.ones(3), 0.0).probability(np.zeros(4))
    with pytest.raises(AudioError, match="scale must be positive"):
        ProsodyHead(np.zeros(3), np.zeros(3), np.ones(3), 0.0)
    with pytest.raises(AudioError, match="must be finite"):
        ProsodyHead(np.zeros(3), np.ones(3), np.array([1.0, np.nan, 1.0]), 0.0)
    with pytest.raises(AudioError, match="features must be finite"):
        fit_head(np.array([[0.0], [np.nan]]), np.array([0, 1]))
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(AudioError, match="not a prosody turn head"):
        ProsodyHead.load(npy)
    odd_meta = tmp_path / "odd.npz"
    with open(odd_meta, "wb") as f:
        np.savez(f, mean=np.zeros(3), scale=np.ones(3), weights=np.ones(3), bias=np.float32(0), meta=np.array("[1, 2]"))
    with pytest.raises(AudioError, match="not a JSON object"):
        ProsodyHead.load(odd_meta)
    assert not prosody_window(np.full(SR, np.nan, np.float32)).any()


def test_the_shipped_head_is_in_the_package_and_matches_the_encoder():
    head = ProsodyHead.load(DEFAULT_HEAD)
    assert head.weights.size == 3 * 384  # whisper tiny's width, three spans
    assert head.meta["held_out"]["auc"] > 0.9  # what `voice-agent train-turn` measured on sentences it left out
    assert DEFAULT_HEAD.stat().st_size < 100_000


@pytest.fixture(scope="module")
def prosody(transcriber):
    from voice_agent.models import resolve_asr_model

    return ProsodyTurn(resolve_asr_model("tiny.en"))


@pytest.mark.parametrize("text", [
    "My name is John and I want to book a table for two people tonight.",
    "Could you tell me when the next bus to the airport leaves?",
])
def test_a_finished_sentence_scores_over_and_the_same_recording_cut_between_words_does_not(prosody, synthesizer,
                                                                                           transcriber, text):
    pause = np.zeros(SR // 10, np.float32)  # the 100 ms pause after which the session asks
    sentence = synthesizer.synthesize(text, sample_rate_hz=SR)
    words = transcriber.words(sentence)
    assert len(words) >= 8
    p_done = prosody.probability(np.concatenate([sentence, pause]))
    from voice_agent.config import TurnConfig

    threshold = TurnConfig().threshold
    assert p_done >= threshold, p_done
    # Cut at each word boundary of the middle of the sentence (mid-sentence prosody), as a caller
    # who pauses there: most must read as going on.
    cuts = [int((words[j - 1].end_s + words[j].start_s) / 2 * SR) for j in range(3, len(words) - 2)]
    p_cut = [prosody.probability(np.concatenate([sentence[:c], pause])) for c in cuts]
    assert sum(p < threshold for p in p_cut) >= 0.75 * len(p_cut), p_cut
    assert prosody.probability(np.concatenate([sentence, pause])) == p_done  # deterministic


def test_a_missing_whisper_folder_or_head_is_a_clear_error(tmp_path):
    from voice_agent.models import resolve_asr_model

    with pytest.raises(AudioModelNotFoundError, match="CTranslate2 whisper folder"):
        WindowEncoder(tmp_path)
    with pytest.raises(AudioModelNotFoundError, match="no prosody turn head"):
        ProsodyTurn(resolve_asr_model("tiny.en"), tmp_path / "none.npz")
    with pytest.raises(AudioError, match="at least one thread"):
        WindowEncoder(resolve_asr_model("tiny.en"), threads=0)
    foreign = tmp_path / "foreign.npz"
    ProsodyHead(np.zeros(5), np.ones(5), np.ones(5), 0.0).save(foreign)  # trained on another encoder
    with pytest.raises(AudioError, match="takes 5 features; this whisper encoder gives 1152"):
        ProsodyTurn(resolve_asr_model("tiny.en"), foreign)
