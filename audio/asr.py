"""Speech recognition with faster-whisper (CTranslate2): whole utterances and streaming partials.

Contract:
- `Transcriber(model, device="cpu", compute_type="int8", language="en", beam_size=1,
  cpu_threads=0, audio_context="utterance")`: `model` is a CTranslate2 Whisper folder (the embedded tiny.en is one) or a
  faster-whisper size name ("base.en", "small", ...) already in the Hugging Face cache. Nothing is
  ever downloaded (`local_files_only=True`); a model that is not on disk raises
  `AudioModelNotFoundError`. `language` "" or "auto" lets a multilingual model detect it.
- `audio_context`: "full" runs whisper as trained, on a 30 s window (the utterance padded with
  silence): every decode costs the same, about 0.55 s for tiny.en on this 2-core CPU however short
  the utterance. "utterance" encodes only the utterance plus `CONTEXT_MARGIN_S` of padding (the
  encoder takes a shorter input, as whisper.cpp's `audio_ctx`), about 4x faster on short turns,
  and guards against the loops whisper falls into on a short window: at most `MAX_TOKENS_PER_S`
  tokens per second of audio, and the text stops where a sentence repeats (`_drop_repeats`).
  Measured on 72 spoken prompts (`voice-agent bench audio --wer`, docs/audio.md): word error rate
  0.130 against 0.136 for "full", decode p50 144 against 565 ms. Utterances too long for the
  margin, and `language="auto"` on a multilingual model, always use "full".
- `.transcribe(audio, sample_rate_hz=16000) -> Transcript`: float32 (or int16) mono audio. A
  `Transcript` is the text (a `str`) carrying whisper's mean log-probability per token,
  `.avg_logprob` (None where no model ran): how sure whisper was of it. Garbled speech reads
  lower (the e2e bench's spoken prompts, read by a throwaway script in session 20: -0.6 to -1.0
  where the words came out wrong, -0.05 to -0.4 where they came out right). Defined
  behaviour for awkward input: other rates are resampled to 16 kHz; empty or near-silent audio
  (peak below -60 dBFS) gives "" without running the model; samples beyond [-1, 1] are clipped.
  Errors (`AudioError`, raised before the model runs): more than one channel, NaN or infinite
  samples, a non-numeric dtype, a non-positive rate.
- `.words(audio, sample_rate_hz=16000) -> list[Word]`: the words with whisper's word timestamps
  (seconds from the start of `audio`; roughly +-50 ms with tiny.en), for tools that cut speech at
  word boundaries (the turn benchmark's labelled set). Same input rules as `.transcribe`.
- `StreamingTranscriber(transcriber, partial_interval_ms=400)`: `.partial(audio)` takes the whole
  growing utterance (e.g. `Endpointer.utterance_audio()`) and returns a hypothesis when at least
  `partial_interval_ms` of new audio arrived since the last partial, else None; it never decodes
  the same audio twice. `.final(audio)` returns the transcript of the finished utterance and
  resets for the next utterance. It reuses the last partial, without decoding, when one of the two
  audios is a prefix of the other and the rest is only quiet trailing audio (RMS at least 20 dB
  below the speech): the endpointer's silence after the last word changes nothing, so a partial
  taken during that silence is already the final and the endpoint costs no decode.
  The interval is measured in audio time, so results do not depend on the machine's speed.
Not thread-safe: one Transcriber per thread, or a lock around it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from audio.errors import AudioError, AudioModelNotFoundError
from audio.resample import resample

__all__ = ["ASR_SAMPLE_RATE_HZ", "StreamingTranscriber", "Transcriber", "Transcript", "Word", "prepare_audio"]

log = logging.getLogger(__name__)

ASR_SAMPLE_RATE_HZ = 16000
# Below this peak (-60 dBFS) there is nothing to recognize; whisper would hallucinate "you".
_SILENCE_PEAK = 1e-3
# Trailing audio this much quieter than the speech (RMS ratio, -20 dB) cannot change a transcript.
_QUIET_TAIL_RATIO = 0.1
AUDIO_CONTEXTS = ("utterance", "full")
CONTEXT_MARGIN_S = 1.0
MAX_TOKENS_PER_S = 8
_WINDOW_FRAMES = 3000  # whisper's 30 s window, in 10 ms feature frames
# faster-whisper's rule for a window without speech: skip it when both hold.
_NO_SPEECH_PROB = 0.6
_NO_SPEECH_LOGPROB = -1.0


def prepare_audio(audio: np.ndarray, sample_rate_hz: int = ASR_SAMPLE_RATE_HZ) -> np.ndarray:
    """Validate and convert any mono audio to float32 16 kHz in [-1, 1] (see the module docstring)."""
    a = np.asarray(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.ravel()
    if a.ndim != 1:
        raise AudioError(
            f"ASR expects mono audio (a 1-D array), got shape {a.shape}: mix the channels down first"
        )
    if a.dtype == np.int16:
        a = a.astype(np.float32) / np.float32(32768.0)
    elif a.dtype.kind != "f":
        raise AudioError(f"ASR expects float32 or int16 audio, got dtype {a.dtype}")
    if (
        isinstance(sample_rate_hz, bool)
        or not isinstance(sample_rate_hz, int | np.integer)
        or sample_rate_hz <= 0
    ):
        raise AudioError(f"invalid sample rate {sample_rate_hz!r}")
    a = a.astype(np.float32, copy=False)
    if a.size and not np.isfinite(a).all():
        raise AudioError("audio contains NaN or infinite samples")
    a = np.clip(a, -1.0, 1.0)
    if a.size and sample_rate_hz != ASR_SAMPLE_RATE_HZ:
        a = resample(a, int(sample_rate_hz), ASR_SAMPLE_RATE_HZ)
    return a


class Transcript(str):
    """A transcript's text, with whisper's mean log-probability per token (None: no model ran).
    A `str` everywhere else, so that code that only needs the text is unchanged."""

    avg_logprob: float | None

    def __new__(cls, text: str = "", avg_logprob: float | None = None) -> Transcript:
        self = super().__new__(cls, text)
        self.avg_logprob = avg_logprob
        return self


class Transcriber:
    """A loaded faster-whisper model (see the module docstring)."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        device: str = "cpu",
        compute_type: str = "int8",
        language: str = "en",
        beam_size: int = 1,
        cpu_threads: int = 0,
        audio_context: str = "utterance",
    ) -> None:
        from faster_whisper import WhisperModel

        if beam_size < 1:
            raise AudioError(f"beam_size must be >= 1, got {beam_size}")
        if audio_context not in AUDIO_CONTEXTS:
            raise AudioError(f"audio_context must be one of {AUDIO_CONTEXTS}, got {audio_context!r}")
        self.audio_context = audio_context
        self.model_name = os.fspath(model)
        self.language = None if language in ("", "auto") else language
        self.beam_size = int(beam_size)
        started = time.perf_counter()
        try:
            self._model = WhisperModel(
                self.model_name,
                device=device,
                compute_type=compute_type,
                cpu_threads=int(cpu_threads),
                local_files_only=True,  # never download
            )
        except FileNotFoundError as e:  # huggingface_hub's LocalEntryNotFoundError
            raise AudioModelNotFoundError(
                f"whisper model {self.model_name!r} is not on disk and downloads are off: "
                "give a CTranslate2 model folder, or a size name already in the Hugging Face cache"
            ) from e
        except ValueError as e:  # not a size name and not a folder
            raise AudioModelNotFoundError(f"whisper model {self.model_name!r} not found: {e}") from e
        except RuntimeError as e:  # a folder without model.bin, a bad device or compute type
            raise AudioModelNotFoundError(f"cannot load whisper model {self.model_name!r}: {e}") from e
        self.load_s = time.perf_counter() - started
        self._short: tuple | None = None  # (tokenizer, prompt, suppressed ids) for "utterance"
        log.debug("loaded whisper %s on %s/%s in %.2f s", self.model_name, device, compute_type, self.load_s)

    def transcribe(self, audio: np.ndarray, sample_rate_hz: int = ASR_SAMPLE_RATE_HZ) -> Transcript:
        """The text of one utterance ("" for empty or silent audio), with whisper's confidence."""
        a = prepare_audio(audio, sample_rate_hz)
        if a.size == 0 or float(np.max(np.abs(a))) < _SILENCE_PEAK:
            return Transcript()
        if self.audio_context == "utterance" and (self.language is not None or not self._model.model.is_multilingual):
            frames = a.size // 160 + int(CONTEXT_MARGIN_S * 100)
            if frames < _WINDOW_FRAMES:
                return self._transcribe_short(a, -(-frames // 100) * 100)
        segments, _info = self._model.transcribe(
            a,
            language=self.language,
            beam_size=self.beam_size,
            temperature=0.0,  # one greedy pass; the fallback schedule multiplies the worst case
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,  # the Endpointer already cut the utterance
        )
        segments = list(segments)
        logprob = float(np.mean([s.avg_logprob for s in segments])) if segments else None
        return Transcript(" ".join(s.text.strip() for s in segments).strip(), logprob)

    def _transcribe_short(self, a: np.ndarray, frames: int) -> Transcript:
        """Whisper on a window of `frames` feature frames instead of 30 s (audio_context="utterance")."""
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        if self._short is None:
            tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=self.language or "en")
            self._short = (tokenizer, model.get_prompt(tokenizer, [], without_timestamps=True),
                           get_suppressed_tokens(tokenizer, [-1]))
        tokenizer, prompt, suppressed = self._short
        features = model.feature_extractor(a)[:, :frames]
        # Zero features beyond the audio, as faster-whisper pads its 30 s window.
        features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
        encoded = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32)),
                                     to_cpu=False)
        max_length = min(model.max_length, len(prompt) + int(a.size / ASR_SAMPLE_RATE_HZ * MAX_TOKENS_PER_S) + 10)
        result = model.model.generate(encoded, [prompt], beam_size=self.beam_size, max_length=max_length, return_scores=True,
                                      return_no_speech_prob=True, suppress_blank=True, suppress_tokens=suppressed)[0]
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if result.no_speech_prob > _NO_SPEECH_PROB and avg_logprob < _NO_SPEECH_LOGPROB:
            return Transcript("", avg_logprob)
        return Transcript(_drop_repeats(tokenizer.decode(tokens).strip()), avg_logprob)

    def words(self, audio: np.ndarray, sample_rate_hz: int = ASR_SAMPLE_RATE_HZ) -> list[Word]:
        """The words of `audio` with their times (see the module docstring)."""
        a = prepare_audio(audio, sample_rate_hz)
        if a.size == 0 or float(np.max(np.abs(a))) < _SILENCE_PEAK:
            return []
        segments, _info = self._model.transcribe(
            a, language=self.language, beam_size=self.beam_size, temperature=0.0,
            condition_on_previous_text=False, word_timestamps=True, vad_filter=False,
        )
        return [Word(w.word.strip(), float(w.start), float(w.end)) for s in segments for w in (s.words or [])]


def _drop_repeats(text: str) -> str:
    """The text up to the first sentence that says an earlier one again, whole or its start, and
    a word said four or more times in a row once: the loops whisper falls into over the padding
    of a short window (cut off by the token limit)."""
    text = re.sub(r"\b(\w+)(?:[\s,]+\1\b){3,}", r"\1", text, flags=re.IGNORECASE)  # "right right right right ..."
    sentences = re.split(r"(?<=[.?!])\s+", text)
    seen: list[str] = []
    for n, sentence in enumerate(sentences):
        key = sentence.lower().rstrip(".?!")
        if key and any(earlier.startswith(key) for earlier in seen):
            return " ".join(sentences[:n])
        seen.append(key)
    return text


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    end_s: float


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) if a.size else 0.0


@dataclass
class _Decoded:
    audio: np.ndarray  # the 16 kHz audio that was decoded
    text: str

    def same_speech(self, a: np.ndarray) -> bool:
        """True when `a` differs from the decoded audio only by quiet audio at the end."""
        short, long = (a, self.audio) if a.size <= self.audio.size else (self.audio, a)
        if short.size == 0 or not np.array_equal(short, long[: short.size]):
            return False
        return long.size == short.size or _rms(long[short.size :]) <= _QUIET_TAIL_RATIO * _rms(short)


class StreamingTranscriber:
    """Partial hypotheses of a growing utterance and its final transcript (see the module docstring)."""

    def __init__(self, transcriber: Transcriber, partial_interval_ms: int = 400) -> None:
        if partial_interval_ms <= 0:
            raise AudioError(f"partial_interval_ms must be > 0, got {partial_interval_ms}")
        self.transcriber = transcriber
        self.partial_interval_ms = int(partial_interval_ms)
        self._interval_samples = ASR_SAMPLE_RATE_HZ * self.partial_interval_ms // 1000
        self.decodes = 0  # model calls since creation: for tests and benchmarks
        self.reused_finals = 0  # finals answered with the last partial, without a decode
        self.reset()

    def reset(self) -> None:
        """Start a new utterance."""
        self._last: _Decoded | None = None
        self._last_partial_samples = 0
        self.last_partial: str | None = None

    def partial(self, audio: np.ndarray, sample_rate_hz: int = ASR_SAMPLE_RATE_HZ) -> str | None:
        """A hypothesis of the utterance so far, or None when there is nothing new to decode."""
        a = prepare_audio(audio, sample_rate_hz)
        if a.size < self._last_partial_samples:
            # The caller started a new utterance without final(): begin again.
            self._last_partial_samples = 0
            self._last = None
        if a.size - self._last_partial_samples < self._interval_samples:
            return None
        if self._last is not None and self._last.audio.size == a.size and np.array_equal(self._last.audio, a):
            return None
        text = self._decode(a)
        self._last_partial_samples = a.size
        self.last_partial = text
        return text

    def final(self, audio: np.ndarray, sample_rate_hz: int = ASR_SAMPLE_RATE_HZ) -> str:
        """The transcript of the finished utterance; resets for the next one."""
        a = prepare_audio(audio, sample_rate_hz)
        if self._last is not None and self._last.same_speech(a):
            text = self._last.text
            self.reused_finals += 1
        else:
            text = self._decode(a)
        self.reset()
        return text

    def _decode(self, a: np.ndarray) -> str:
        text = self.transcriber.transcribe(a)
        self.decodes += 1
        self._last = _Decoded(a.copy(), text)
        return text
