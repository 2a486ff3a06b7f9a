"""Speech synthesis with piper (piper-tts 1.x, ONNX): text in, float32 audio out, one chunk per sentence.

Contract:
- `Synthesizer(voice_path, length_scale=1.0, *, speaker_id=None, use_cuda=False, noise_scale=None,
  noise_w_scale=None)`: a piper voice `.onnx` with its `.onnx.json` beside it. A missing file raises
  `AudioModelNotFoundError`. The noise scales (None: the voice's own) set how much random variation
  piper adds to each utterance; 0 and 0 give the same samples for the same text every time.
  `.sample_rate_hz` is the voice's own rate (22050 Hz for the medium voices).
- `.synthesize(text, sample_rate_hz=None, length_scale=None) -> ndarray`: the whole text as
  float32 mono at the voice's rate, or at `sample_rate_hz` (resampled with soxr); `length_scale`
  for this text only (> 1 slower). Empty text gives an empty array.
- `.stream(text_or_sentences, sample_rate_hz=None, cancel=None) -> Iterator[SpeechChunk]`: a
  generator that synthesizes one sentence at a time, so the caller can play the first sentence
  while the next is computed. A string is split into sentences with `SentenceChunker`; an iterable
  of strings is taken as streamed text deltas (an LLM's output: concatenated as given, consumed
  lazily, so synthesis of the first sentence starts before the LLM has finished).
  Cancellation: when `cancel` (a `threading.Event`) is set, the generator stops before the next
  sentence; closing the generator (`.close()`) also stops it. One sentence being synthesized is
  not interrupted (piper runs it in one ONNX call, ~0.1-0.5 s on a CPU).
- Each chunk is peak-normalized by piper (its default) and clipped to [-1, 1].
- On CPU the voice's onnxruntime session is made here, not by piper: its threads (one per core,
  onnxruntime's default) do not spin-wait between operators. Spinning, a synthesis took 2.2x as
  long beside one other busy thread on the 2-core machine (132 against 59 ms for a 4-word first
  chunk), as in a call where the LLM, the ASR or the event loop hold a core; without it 70 against
  52 ms (docs/audio.md "tts").
The ONNX session is thread-safe; the piper voice object keeps no per-call state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audio.errors import AudioError, AudioModelNotFoundError
from audio.resample import resample
from audio.text import SentenceChunker

__all__ = ["SpeechChunk", "Synthesizer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechChunk:
    """The audio of one sentence."""

    text: str  # the sentence as given to piper
    audio: np.ndarray = field(repr=False)  # float32 mono
    sample_rate_hz: int
    synth_s: float  # seconds spent synthesizing (and resampling) this sentence

    @property
    def duration_s(self) -> float:
        return self.audio.size / self.sample_rate_hz


def _cpu_session(path: Path) -> Any:
    """The voice's onnxruntime session on CPU: onnxruntime's default threads, not spinning (see
    the module docstring)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class Synthesizer:
    """A loaded piper voice (see the module docstring)."""

    def __init__(
        self,
        voice_path: str | os.PathLike[str],
        length_scale: float = 1.0,
        *,
        speaker_id: int | None = None,
        use_cuda: bool = False,
        max_sentence_chars: int = 160,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
    ) -> None:
        from piper import PiperConfig, PiperVoice, SynthesisConfig

        path = Path(voice_path)
        config_path = Path(str(path) + ".json")
        if not path.is_file():
            raise AudioModelNotFoundError(f"piper voice {str(path)!r} not found")
        if not config_path.is_file():
            raise AudioModelNotFoundError(f"piper voice {path.name} has no {config_path.name} beside it")
        if length_scale <= 0:
            raise AudioError(f"length_scale must be > 0, got {length_scale}")
        for name, value in (("noise_scale", noise_scale), ("noise_w_scale", noise_w_scale)):
            if value is not None and not value >= 0:
                raise AudioError(f"{name} must be >= 0 (or None: the voice's own), got {value}")
        started = time.perf_counter()
        try:
            if use_cuda:
                self._voice = PiperVoice.load(path, config_path=config_path, use_cuda=True)
            else:
                config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
                self._voice = PiperVoice(config=config, session=_cpu_session(path))
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise AudioModelNotFoundError(f"cannot load piper voice {str(path)!r}: {e}") from e
        self.load_s = time.perf_counter() - started
        self.voice_path = path
        self.sample_rate_hz = int(self._voice.config.sample_rate)
        self.max_sentence_chars = int(max_sentence_chars)
        self._syn_config = SynthesisConfig(speaker_id=speaker_id, length_scale=float(length_scale),
                                           noise_scale=noise_scale, noise_w_scale=noise_w_scale)

    def _piper(self, text: str, length_scale: float | None = None) -> np.ndarray:
        """One piece of text -> float32 at the voice's rate (piper may split it further)."""
        config = self._syn_config
        if length_scale is not None:
            if not length_scale > 0:
                raise AudioError(f"length_scale must be > 0, got {length_scale}")
            config = dataclasses.replace(config, length_scale=float(length_scale))
        parts = [c.audio_float_array for c in self._voice.synthesize(text, syn_config=config)]
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _to_rate(self, audio: np.ndarray, sample_rate_hz: int | None) -> np.ndarray:
        if sample_rate_hz is None or sample_rate_hz == self.sample_rate_hz or audio.size == 0:
            return audio
        return np.clip(resample(audio, self.sample_rate_hz, sample_rate_hz), -1.0, 1.0)

    def synthesize(self, text: str, sample_rate_hz: int | None = None, length_scale: float | None = None) -> np.ndarray:
        """The whole text as one float32 array (at `sample_rate_hz`, default the voice's rate)."""
        if not isinstance(text, str):
            raise AudioError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            return np.zeros(0, dtype=np.float32)
        return self._to_rate(self._piper(text, length_scale), sample_rate_hz)

    def stream(
        self,
        text: str | Iterable[str],
        sample_rate_hz: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[SpeechChunk]:
        """Synthesize sentence by sentence (see the module docstring)."""
        out_rate_hz = self.sample_rate_hz if sample_rate_hz is None else int(sample_rate_hz)
        for sentence in self._sentences(text):
            if cancel is not None and cancel.is_set():
                return
            started = time.perf_counter()
            audio = self._to_rate(self._piper(sentence), out_rate_hz)
            if audio.size == 0:
                continue
            yield SpeechChunk(sentence, audio, out_rate_hz, time.perf_counter() - started)

    def _sentences(self, text: str | Iterable[str]) -> Iterator[str]:
        chunker = SentenceChunker(self.max_sentence_chars)
        pieces = [text] if isinstance(text, str) else text
        for piece in pieces:
            if not isinstance(piece, str):
                raise AudioError(f"text must be strings, got {type(piece).__name__}")
            yield from chunker.push(piece)
        yield from chunker.flush()
