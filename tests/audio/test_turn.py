"""Smart Turn v3.2 (audio/turn.py): its features against transformers' own, its verdicts on real speech."""

from __future__ import annotations

import numpy as np
import pytest

from audio.errors import AudioError, AudioModelNotFoundError
from audio.turn import SAMPLE_RATE_HZ, WINDOW_S, SmartTurn, smart_turn_model_path, whisper_log_mel

SR = SAMPLE_RATE_HZ


@pytest.fixture(scope="module")
def smart_turn():
    try:
        smart_turn_model_path()
    except AudioModelNotFoundError as e:
        pytest.skip(str(e))
    return SmartTurn()


def test_features_match_the_whisper_feature_extractor_of_transformers():
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(7)
    audio = np.zeros(SR * WINDOW_S, np.float32)
    audio[SR * 3 :] = rng.normal(0, 0.1, SR * 5).astype(np.float32) * np.sin(np.arange(SR * 5) / 900.0).astype(np.float32)
    reference = WhisperFeatureExtractor(chunk_length=WINDOW_S)(
        audio, sampling_rate=SR, padding="max_length", max_length=SR * WINDOW_S, truncation=True,
        do_normalize=True, return_tensors="np",
    ).input_features[0]
    ours = whisper_log_mel(audio)
    assert ours.shape == reference.shape == (80, 800) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    with pytest.raises(AudioError, match="samples"):
        whisper_log_mel(audio[:-1])


def test_a_finished_question_scores_high_and_a_sentence_cut_mid_way_low(smart_turn, synthesizer):
    pause = np.zeros(SR // 5, np.float32)  # the 200 ms pause after which the session asks
    done = synthesizer.synthesize("What time does the pharmacy open tomorrow?", sample_rate_hz=SR)
    p_done = smart_turn.probability(np.concatenate([done, pause]))
    sentence = synthesizer.synthesize("My name is John and I want to book a table for two people tonight.", sample_rate_hz=SR)
    loud = np.flatnonzero(np.abs(sentence) > 0.02 * np.abs(sentence).max())
    middle = (loud[0] + loud[-1]) // 2  # "... I want to | book ...": mid-sentence prosody
    p_cut = smart_turn.probability(np.concatenate([sentence[:middle], pause]))
    assert p_done > 0.8 and p_cut < 0.2, (p_done, p_cut)
    # Deterministic, and only the last 8 s count.
    assert smart_turn.probability(np.concatenate([done, pause])) == p_done
    long = np.concatenate([np.full(SR * 20, 0.3, np.float32), np.zeros(SR, np.float32), done, pause])
    assert smart_turn.probability(long) == pytest.approx(smart_turn.probability(long[-SR * WINDOW_S :]), abs=1e-6)


def test_a_missing_or_foreign_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(AudioModelNotFoundError, match="no Smart Turn model file"):
        SmartTurn(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(AudioError, match="cannot load the turn model"):
        SmartTurn(junk)
    with pytest.raises(AudioError, match="thread"):
        SmartTurn(junk, threads=0)


def test_another_onnx_model_is_refused_by_its_inputs():
    from audio.vad import silero_model_path

    try:
        other = silero_model_path()
    except AudioModelNotFoundError as e:
        pytest.skip(str(e))
    with pytest.raises(AudioError, match="is not a Smart Turn v3 model"):
        SmartTurn(other)
