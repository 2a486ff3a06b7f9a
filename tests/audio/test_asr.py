"""ASR: TTS -> ASR round trip, streaming partials without repeated work, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest

from audio.asr import StreamingTranscriber, Transcriber, prepare_audio
from audio.errors import AudioError, AudioModelNotFoundError

SR = 16000

ROUND_TRIP_SENTENCES = [
    "The weather is nice today.",
    "Please call my mother tomorrow morning.",
    "I would like a cup of coffee.",
    "The train leaves at seven o'clock.",
    "Turn off the lights in the kitchen.",
    "What time does the store open?",
    "My favorite color is green.",
    "Can you play some music?",
    "We went to the beach last summer.",
    "Thank you very much for your help.",
]

_NUMBER_WORDS = {"seven": "7", "o'clock": "oclock"}


def normalize(text: str) -> str:
    words = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace(":00", " oclock")).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words).replace("'", "")


def test_piper_to_whisper_round_trip(synthesizer, transcriber):
    matches = []
    for sentence in ROUND_TRIP_SENTENCES:
        audio = synthesizer.synthesize(sentence, sample_rate_hz=SR)
        heard = transcriber.transcribe(audio)
        matches.append(normalize(heard) == normalize(sentence))
        print(f"{matches[-1]!s:5} {sentence!r} -> {heard!r}")
    assert sum(matches) >= 9, matches


def test_espeak_at_its_own_rate_is_resampled(espeak, transcriber):
    audio = espeak("Open the door please.", sample_rate_hz=22050)
    assert "door" in transcriber.transcribe(audio, sample_rate_hz=22050).lower()


def test_clipped_and_int16_input_is_defined(espeak, transcriber):
    # espeak-ng: the same samples every run (piper's voice adds random noise, and a clipped
    # variant of it was once heard as "bit").
    audio = espeak("Good morning everyone.")
    loud = audio * 4.0  # far beyond full scale: clipped to [-1, 1], still recognized
    assert "morning" in transcriber.transcribe(loud).lower()
    pcm = np.round(audio * 32767).astype(np.int16)
    assert "morning" in transcriber.transcribe(pcm).lower()


def test_empty_and_silent_audio_give_empty_text(transcriber):
    assert transcriber.transcribe(np.zeros(0, np.float32)) == ""
    assert transcriber.transcribe(np.zeros(SR, np.float32)) == ""


def test_a_transcript_says_how_sure_whisper_was(synthesizer, transcriber):
    """avg_logprob: high for clear speech, low for speech whisper cannot make out (the same
    audio reversed), None where no model ran; the transcript is the text either way."""
    for sentence in ROUND_TRIP_SENTENCES[1:3]:  # about -0.15 each (the first: -0.4, too near the bound)
        audio = synthesizer.synthesize(sentence, sample_rate_hz=SR)
        clear, garbled = transcriber.transcribe(audio), transcriber.transcribe(audio[::-1].copy())
        print(f"{sentence!r}: {clear.avg_logprob:.3f}; reversed {str(garbled)!r}: {garbled.avg_logprob:.3f}")
        assert isinstance(clear, str) and normalize(clear) == normalize(sentence)
        assert -0.5 < clear.avg_logprob <= 0.0
        assert garbled.avg_logprob < -0.8
    assert transcriber.transcribe(np.zeros(SR, np.float32)).avg_logprob is None


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.zeros((SR, 2), np.float32), SR, "mono"),
        (np.array([0.1, np.nan], np.float32), SR, "NaN"),
        (np.array([0.1, np.inf], np.float32), SR, "NaN"),
        (np.array(["a", "b"]), SR, "dtype"),
        (np.zeros(100, np.float32), 0, "sample rate"),
    ],
)
def test_bad_input_raises_before_the_model_runs(audio, rate, message):
    with pytest.raises(AudioError, match=message):
        prepare_audio(audio, rate)


def test_missing_models_raise_model_not_found(tmp_path):
    with pytest.raises(AudioModelNotFoundError):
        Transcriber(tmp_path)  # a folder without model.bin
    with pytest.raises(AudioModelNotFoundError, match="not on disk"):
        Transcriber("large-v3")  # a size name that is not in the cache: never downloaded
    with pytest.raises(AudioModelNotFoundError):
        Transcriber("no-such-model")


class CountingTranscriber:
    """Stands in for a Transcriber: records what it decodes."""

    def __init__(self):
        self.calls: list[int] = []

    def transcribe(self, audio, sample_rate_hz=SR):
        self.calls.append(audio.size)
        return f"{audio.size} samples"


def test_partials_follow_the_interval_and_never_repeat_work():
    fake = CountingTranscriber()
    streaming = StreamingTranscriber(fake, partial_interval_ms=400)
    speech = (np.random.default_rng(0).standard_normal(3 * SR) * 0.3).astype(np.float32)
    assert streaming.partial(speech[: SR // 4]) is None  # less than 400 ms so far
    assert streaming.partial(speech[: int(0.4 * SR)]) == "6400 samples"
    assert streaming.partial(speech[: int(0.4 * SR)]) is None  # unchanged: no work
    assert streaming.partial(speech[: int(0.7 * SR)]) is None  # only 300 ms new
    assert streaming.partial(speech[: int(0.8 * SR)]) == "12800 samples"
    assert fake.calls == [6400, 12800]
    # More speech after the last partial: the final decodes again.
    assert streaming.final(speech[:SR]) == "16000 samples"
    assert streaming.decodes == 3


def test_final_reuses_a_partial_that_differs_only_by_trailing_silence():
    fake = CountingTranscriber()
    streaming = StreamingTranscriber(fake, partial_interval_ms=400)
    speech = (np.random.default_rng(0).standard_normal(SR) * 0.3).astype(np.float32)
    with_silence = np.concatenate([speech, np.zeros(SR // 2, np.float32)])
    assert streaming.partial(with_silence) == "24000 samples"
    # The endpointer's utterance keeps less trailing silence than the partial saw: same speech.
    assert streaming.final(with_silence[: SR + SR // 5]) == "24000 samples"
    assert streaming.reused_finals == 1 and fake.calls == [24000]
    # After final() the next utterance starts from scratch.
    assert streaming.partial(speech[: SR // 2]) == "8000 samples"


def test_streaming_on_real_speech(synthesizer, transcriber):
    from audio.vad import Endpointer, SpeechEnded

    speech = synthesizer.synthesize("Set an alarm for six thirty tomorrow.", sample_rate_hz=SR)
    stream = np.concatenate([np.zeros(SR // 2, np.float32), speech, np.zeros(SR, np.float32)])
    endpointer, streaming = Endpointer(SR), StreamingTranscriber(transcriber, partial_interval_ms=1000)
    partials, final = [], None
    for i in range(0, stream.size, 320):
        for event in endpointer.feed(stream[i : i + 320]):
            if isinstance(event, SpeechEnded):
                final = streaming.final(event.audio)
        if endpointer.in_speech and (p := streaming.partial(endpointer.utterance_audio())) is not None:
            partials.append(p)
    assert partials, "no partial hypothesis during a 2 s utterance"
    assert final is not None and "alarm" in final.lower()


def test_the_full_window_agrees_with_the_utterance_window(synthesizer, transcriber):
    from voice_agent.models import resolve_asr_model

    assert transcriber.audio_context == "utterance"  # the default
    full = Transcriber(resolve_asr_model("tiny.en"), cpu_threads=2, audio_context="full")
    agree = 0
    for sentence in ROUND_TRIP_SENTENCES[:5]:
        audio = synthesizer.synthesize(sentence, sample_rate_hz=SR)
        agree += normalize(full.transcribe(audio)) == normalize(transcriber.transcribe(audio))
    assert agree >= 4
    # An utterance too long for the short window takes the full path, and stays correct.
    long = synthesizer.synthesize(" ".join(ROUND_TRIP_SENTENCES[:4]), sample_rate_hz=SR)
    long = np.concatenate([long, np.zeros(30 * SR - long.size - SR // 2, np.float32)])
    assert "coffee" in transcriber.transcribe(long).lower()
    with pytest.raises(AudioError, match="audio_context"):
        Transcriber(resolve_asr_model("tiny.en"), audio_context="short")


@pytest.mark.parametrize(
    ("looped", "kept"),
    [
        ("Tell me a short joke. Tell me a short", "Tell me a short joke."),
        ("What is it? What is it? What is it?", "What is it?"),
        ("Hi there. Can you help me? Hi", "Hi there. Can you help me?"),
        ("My right right right right right right", "My right"),
        ("Yes. Yes, I do. No no no.", "Yes. Yes, I do. No no no."),  # not a loop
    ],
)
def test_loops_over_the_padding_are_cut(looped, kept):
    from audio.asr import _drop_repeats

    assert _drop_repeats(looped) == kept
