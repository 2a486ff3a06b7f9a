"""The fixed spoken prompts of the end-to-end benchmark, synthesized at bench time.

Contract:
- `PROMPTS` is the fixed set (24 prompts): text phrases, the voice that speaks them (the embedded
  piper voice or an espeak-ng voice, with its speed) and the pause the caller leaves before
  speaking. A prompt of two phrases has a short natural pause inside it (shorter than the
  server's end-of-turn silence, longer than its speculative-start pause).
- `load_prompts(n, cache_dir, piper_voice_path)` returns `SpokenPrompt`s at 16 kHz: the audio is
  synthesized once and cached as WAV files under `cache_dir` (keyed by a hash of everything that
  shapes the audio), so a second run plays exactly the same samples. Nothing is written to the
  repository. A missing `espeak-ng` binary or piper voice raises `UserError`.
- `voiced_bounds(audio, rate_hz)` finds the first and last voiced sample by frame energy, so the
  latency is measured from the end of the caller's own speech, not from the end of the file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audio.vad import voiced_bounds
from voice_agent.errors import UserError

__all__ = ["PROMPTS", "PROMPT_RATE_HZ", "Prompt", "SpokenPrompt", "espeak", "load_prompts", "voiced_bounds"]

PROMPT_RATE_HZ = 16_000
PIPER = "piper"  # the `voice` of prompts spoken by the piper voice
_GENERATOR_VERSION = "2"  # bump when the synthesis below changes, to invalidate cached audio
# 2: each piper prompt at its own speed (1 spoke every piper prompt at the first one's speed)


@dataclass(frozen=True)
class Prompt:
    phrases: tuple[str, ...]  # spoken in order, with `inner_pause_ms` of silence between them
    voice: str  # "piper" or an espeak-ng voice name ("en-us", "en-gb-scotland", ...)
    speed: float  # piper: 1 / length_scale; espeak-ng: words per minute
    pause_before_ms: int  # silence the caller leaves before speaking (after the previous reply)
    inner_pause_ms: int = 350

    @property
    def text(self) -> str:
        return " ".join(self.phrases)


@dataclass
class SpokenPrompt:
    prompt_id: int  # index into PROMPTS
    prompt: Prompt
    audio: np.ndarray = field(repr=False)  # float32 mono at PROMPT_RATE_HZ, trimmed to the voice
    voiced_start_sample: int  # first voiced sample
    voiced_end_sample: int  # one past the last voiced sample

    @property
    def duration_s(self) -> float:
        return self.audio.size / PROMPT_RATE_HZ


def _p(text: str, voice: str, speed: float, pause_ms: int) -> Prompt:
    return Prompt(tuple(t.strip() for t in text.split("|")), voice, speed, pause_ms)


# "|" marks a natural pause inside a prompt. Voices alternate between piper and espeak-ng.
PROMPTS: tuple[Prompt, ...] = (
    _p("What's the weather usually like in Paris in spring?", PIPER, 1.0, 800),
    _p("Set a timer for ten minutes.", "en-us", 160, 1000),
    _p("Hi there. | Can you give me a quick recipe for pancakes?", PIPER, 0.95, 700),
    _p("What's the capital of Australia?", "en-gb", 150, 900),
    _p("Tell me a short joke.", PIPER, 1.1, 1200),
    _p("How do I reset my wifi router?", "en-gb-scotland", 155, 800),
    _p("Okay, so | what does a healthy breakfast look like?", PIPER, 1.0, 1000),
    _p("What time zone is Tokyo in?", "en-029", 150, 700),
    _p("How long should I boil an egg?", PIPER, 1.05, 900),
    _p("Can you recommend a good book for a long flight?", "en-gb-x-rp", 165, 1100),
    _p("Hmm, let me think. | How far is the moon from the earth?", PIPER, 0.9, 800),
    _p("Why is the sky blue?", "en-us", 145, 1000),
    _p("What should I pack for a weekend of hiking?", PIPER, 1.0, 700),
    _p("Give me one tip to sleep better.", "en-gb", 160, 900),
    _p("How many minutes are there in a day?", PIPER, 1.1, 1200),
    _p("Well, | I need a name for my new puppy.", "en-us", 150, 800),
    _p("What is a good way to learn a new language?", PIPER, 0.95, 1000),
    _p("Translate good morning into Spanish.", "en-gb-scotland", 150, 700),
    _p("What's the difference between a virus and a bacterium?", PIPER, 1.0, 900),
    _p("Remind me how to make a cup of green tea.", "en-029", 155, 1100),
    _p("So tell me, | which planet is the largest?", PIPER, 1.05, 800),
    _p("How do I say thank you in Japanese?", "en-gb-x-rp", 150, 1000),
    _p("What are three things to see in Rome?", PIPER, 1.0, 700),
    _p("Can you explain what a leap year is?", "en-us", 165, 900),
)


def _trim(audio: np.ndarray) -> np.ndarray:
    start, end = voiced_bounds(audio, PROMPT_RATE_HZ)
    return audio[start:end]


class _Synth:
    """Phrase -> 16 kHz float32 audio, with piper loaded lazily (only on a cache miss)."""

    def __init__(self, piper_voice_path: Path) -> None:
        self._piper_voice_path = piper_voice_path
        self._piper = None

    def phrase(self, text: str, voice: str, speed: float) -> np.ndarray:
        if voice == PIPER:
            if self._piper is None:
                from audio.tts import Synthesizer

                self._piper = Synthesizer(self._piper_voice_path)
            return self._piper.synthesize(text, sample_rate_hz=PROMPT_RATE_HZ, length_scale=1.0 / speed)
        return espeak(text, voice=voice, words_per_minute=int(speed))


def espeak(
    text: str, *, voice: str | None = None, words_per_minute: int | None = None, sample_rate_hz: int = PROMPT_RATE_HZ
) -> np.ndarray:
    """espeak-ng speech as float32 mono at `sample_rate_hz` (espeak's own voice and speed where None).

    Raises UserError where espeak-ng is missing or fails. The benchmarks' one espeak-ng path."""
    from audio.io import read_wav

    binary = shutil.which("espeak-ng")
    if binary is None:
        raise UserError("the benchmarks need espeak-ng for part of their speech: apt-get install espeak-ng")
    options = [*(["-v", voice] if voice else []), *(["-s", str(words_per_minute)] if words_per_minute else [])]
    with tempfile.TemporaryDirectory(prefix="voice-agent-espeak-") as tmp:
        path = Path(tmp) / "phrase.wav"
        done = subprocess.run([binary, *options, "-w", str(path), text], capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.exists():
            raise UserError(f"espeak-ng failed for voice {voice!r}: {done.stderr.strip() or done.returncode}")
        audio, _ = read_wav(path, sample_rate_hz)
    return audio


def _cache_key(prompt: Prompt, piper_voice_path: Path) -> str:
    voice_id = f"piper:{piper_voice_path.name}" if prompt.voice == PIPER else f"espeak-ng:{prompt.voice}"
    parts = [_GENERATOR_VERSION, voice_id, repr(prompt.speed), str(prompt.inner_pause_ms), *prompt.phrases]
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def load_prompts(n: int, cache_dir: Path, piper_voice_path: Path) -> list[SpokenPrompt]:
    """The first `n` prompts as audio (cycling through PROMPTS where n > len(PROMPTS))."""
    from audio.io import read_wav, write_wav

    cache_dir.mkdir(parents=True, exist_ok=True)
    synth = _Synth(piper_voice_path)
    spoken = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        path = cache_dir / f"{_cache_key(prompt, piper_voice_path)}.wav"
        if path.exists():
            audio, _ = read_wav(path, PROMPT_RATE_HZ)
        else:
            pause = np.zeros(PROMPT_RATE_HZ * prompt.inner_pause_ms // 1000, dtype=np.float32)
            pieces: list[np.ndarray] = []
            for phrase in prompt.phrases:
                if pieces:
                    pieces.append(pause)
                pieces.append(_trim(synth.phrase(phrase, prompt.voice, prompt.speed)))
            audio = np.concatenate(pieces).astype(np.float32)
            tmp = path.with_suffix(".tmp")
            write_wav(tmp, audio, PROMPT_RATE_HZ)
            tmp.replace(path)  # atomic: a concurrent run never reads half a file
        start, end = voiced_bounds(audio, PROMPT_RATE_HZ)
        if end <= start:
            raise UserError(f"prompt {i} ({prompt.text!r}) synthesized to silence; delete {path} and retry")
        spoken.append(SpokenPrompt(i % len(PROMPTS), prompt, audio, start, end))
    return spoken
