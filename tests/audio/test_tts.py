"""TTS: per-sentence streaming, output rate, cancellation, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from audio.errors import AudioError, AudioModelNotFoundError
from audio.tts import Synthesizer


def test_voice_rate_and_whole_text(synthesizer):
    assert synthesizer.sample_rate_hz == 22050
    audio = synthesizer.synthesize("Hello world.")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.3 < audio.size / 22050 < 3
    assert np.max(np.abs(audio)) <= 1.0


def test_stream_yields_one_chunk_per_sentence_at_the_requested_rate(synthesizer):
    chunks = list(synthesizer.stream("Dr. Smith paid $3.50. He left early! Did he?", sample_rate_hz=24000))
    assert [c.text for c in chunks] == ["Dr. Smith paid $3.50.", "He left early!", "Did he?"]
    for c in chunks:
        assert c.sample_rate_hz == 24000 and c.audio.dtype == np.float32
        assert c.duration_s > 0.3 and c.synth_s > 0


def test_resampled_output_has_the_same_duration(synthesizer):
    native = synthesizer.synthesize("Testing one two three.")
    at_8k = synthesizer.synthesize("Testing one two three.", sample_rate_hz=8000)
    # piper's duration predictor adds noise, so compare loosely.
    assert at_8k.size / 8000 == pytest.approx(native.size / 22050, rel=0.2)


def test_stream_consumes_text_deltas_lazily(synthesizer):
    consumed = []

    def deltas():
        for piece in ["Hel", "lo there. ", "How are", " you?"]:
            consumed.append(piece)
            yield piece

    stream = synthesizer.stream(deltas())
    first = next(stream)
    assert first.text == "Hello there."
    assert consumed == ["Hel", "lo there. "]  # spoken before the LLM sent the rest
    assert [c.text for c in stream] == ["How are you?"]


def test_cancel_stops_between_sentences(synthesizer):
    cancel = threading.Event()
    stream = synthesizer.stream("One. Two. Three. Four.", cancel=cancel)
    assert next(stream).text == "One."
    cancel.set()
    assert list(stream) == []


def test_empty_text_and_bad_input(synthesizer):
    assert synthesizer.synthesize("").size == 0
    assert synthesizer.synthesize("  \n ").size == 0
    assert list(synthesizer.stream("")) == []
    with pytest.raises(AudioError):
        synthesizer.synthesize(None)  # type: ignore[arg-type]


def test_missing_voice(tmp_path):
    with pytest.raises(AudioModelNotFoundError, match="not found"):
        Synthesizer(tmp_path / "nope.onnx")
    onnx = tmp_path / "voice.onnx"
    onnx.write_bytes(b"not a model")
    with pytest.raises(AudioModelNotFoundError, match="json"):
        Synthesizer(onnx)


def test_without_noise_the_same_text_gives_the_same_samples(synthesizer):
    # The fixture's voice has noise_scale = noise_w_scale = 0 (what every audio test relies on).
    first = synthesizer.synthesize("Your table is booked for seven.")
    assert np.array_equal(first, synthesizer.synthesize("Your table is booked for seven."))
    with pytest.raises(AudioError, match="noise_scale"):
        Synthesizer(synthesizer.voice_path, noise_scale=-1.0)


def test_the_cpu_session_does_not_spin_between_operators(synthesizer):
    """Spinning threads doubled a synthesis beside one busy core (audio/tts.py's docstring): the
    voice's session is ours, with onnxruntime's spinning off."""
    options = synthesizer._voice.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
