"""The labelled turn set of `voice-agent bench turns`, and the endpointing run over it.

Contract:
- `SENTENCES`: complete requests a caller would say; `VOICES`: the embedded piper voice at three
  speeds and five espeak-ng voices. Sentence i is spoken by `voices_per_sentence` voices
  (i, i+1, ... modulo the list), and each recording gives two items:
  "complete": the whole sentence, then `TRAIL_S` of silence;
  "paused": the same recording cut at a word boundary inside it (at least two words before and
  after), with `PAUSES_MS[k % 5]` (400-1200 ms) of silence spliced in, then the rest and the
  trailing silence. The audio before the cut is the whole sentence's, so it carries
  mid-sentence prosody (a fragment synthesized alone would end like a finished sentence).
  Word boundaries come from whisper's word timestamps (`Transcriber.words`), moved to the quietest
  10 ms within 60 ms.
- `build_turn_set(cache_dir, piper_voice_path, transcriber_factory, voices_per_sentence=2)`:
  the items, synthesized once and cached under `cache_dir` (WAV plus a JSON of the labels, keyed
  by a hash of what shapes them); `transcriber_factory()` is only called on a cache miss. A
  missing espeak-ng raises `UserError`.
- `first_end_s(item, ...)`: the stream time at which an endpointer ends the item's first turn,
  run exactly as a call runs it (20 ms chunks): silence alone (`check_ms=0`), or pause checks
  whose verdict `verdict(k, audio) -> (over, seconds, unsure_ms)` on the k-th check arrives
  `seconds` later in stream time and ends the turn if over and the pause still goes on; if not
  over, a non-zero `unsure_ms` (an unsure transcript: turn.unsure_silence_ms) lets that pause end
  the turn after that much silence (`Endpointer.shorten_pause`). None: no turn ended.
- `outcome(item, end_s)`: "cut" (the turn ended before the caller's last word), "missed" (no
  end) or the wait in ms from the end of the speech to the end of the turn.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from voice_agent.bench.prompts import PIPER, PROMPT_RATE_HZ, espeak, voiced_bounds
from voice_agent.errors import UserError

__all__ = [
    "PAUSES_MS",
    "SENTENCES",
    "TRAIL_S",
    "VOICES",
    "TurnItem",
    "build_turn_set",
    "first_end_s",
    "outcome",
]

RATE = PROMPT_RATE_HZ
TRAIL_S = 2.0
PAUSES_MS = (400, 600, 800, 1000, 1200)
CHUNK_S = 0.02
_GENERATOR_VERSION = "1"  # bump when the synthesis or the cutting below changes

SENTENCES: tuple[str, ...] = (
    "What time does the pharmacy on Main Street open tomorrow morning?",
    "I would like to book a table for four people at seven tonight.",
    "Can you tell me the weather forecast for Boston this weekend?",
    "My order number is four five seven two and it has not arrived yet.",
    "Please move my dentist appointment from Tuesday to Thursday afternoon.",
    "How long does it take to drive from the airport to the city center?",
    "I need to cancel my subscription before the end of the month.",
    "Do you have any vegetarian dishes on the dinner menu?",
    "Could you remind me to call my sister at six thirty this evening?",
    "The heating in my apartment stopped working last night.",
    "What is the best way to get to the train station from here?",
    "I am calling about the invoice I received for the last two months.",
    "Can I pay my electricity bill with a credit card over the phone?",
    "We are looking for a hotel room near the beach for three nights.",
    "Is the swimming pool open to visitors on Sunday afternoons?",
    "I would like to speak with someone about changing my delivery address.",
    "How much does a return ticket to Chicago cost next Friday?",
    "Please send the documents to my email address instead of my home.",
    "What are your opening hours during the Christmas holidays?",
    "My flight was delayed and I missed my connection in Denver.",
    "Can you recommend a good Italian restaurant that is open late?",
    "I want to add my daughter as a second driver on my car insurance.",
    "Where can I find the nearest charging station for an electric car?",
    "The package was left at the wrong door and my neighbor has it.",
)

# (voice, speed): piper speed is 1 / length_scale, espeak-ng speed is words per minute.
VOICES: tuple[tuple[str, float], ...] = (
    (PIPER, 1.0),
    ("en-us", 160),
    (PIPER, 0.9),
    ("en-gb", 150),
    (PIPER, 1.1),
    ("en-gb-scotland", 155),
    ("en-029", 150),
    ("en-gb-x-rp", 165),
)


@dataclass
class TurnItem:
    item_id: str
    kind: str  # "complete" | "paused"
    text: str
    voice: str
    speed: float
    audio: np.ndarray = field(repr=False)  # float32 16 kHz
    speech_end_s: float  # end of the last voiced audio (the caller's last word)
    pause_ms: int = 0  # paused: the silence spliced in
    cut_after: str = ""  # paused: the words before the pause

    @property
    def label(self) -> dict:
        d = asdict(self)
        d.pop("audio")
        return d


def _synthesize(text: str, voice: str, speed: float, piper_voice_path: Path, cache: dict) -> np.ndarray:
    if voice == PIPER:
        if speed not in cache:
            from audio.tts import Synthesizer

            cache[speed] = Synthesizer(piper_voice_path, length_scale=1.0 / speed)
        audio = cache[speed].synthesize(text, sample_rate_hz=RATE)
    else:
        audio = espeak(text, voice=voice, words_per_minute=int(speed))
    start, end = voiced_bounds(audio, RATE)
    if end <= start:
        raise UserError(f"{voice} synthesized {text!r} to silence")
    return audio[start:end].astype(np.float32)


def _cut_sample(audio: np.ndarray, words, k: int) -> tuple[int, str]:
    """A cut between two words inside the sentence (k picks which), at the quietest 10 ms."""
    inner = list(range(2, len(words) - 1))  # cut before word j: >= 2 words before, >= 2 after
    if not inner:
        raise UserError(f"whisper found too few words to cut ({len(words)}) in a sentence of the turn set")
    j = inner[(k * 7) % len(inner)]
    boundary_s = (words[j - 1].end_s + words[j].start_s) / 2
    frame = RATE // 100
    lo = max(frame, int((boundary_s - 0.06) * RATE))
    hi = min(audio.size - frame, int((boundary_s + 0.06) * RATE))
    starts = np.arange(lo, max(lo + 1, hi - frame), frame // 2)
    energy = [float(np.mean(np.square(audio[s : s + frame], dtype=np.float64))) for s in starts]
    cut = int(starts[int(np.argmin(energy))] + frame // 2)
    return cut, " ".join(w.text for w in words[:j])


def _key(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, (_GENERATOR_VERSION, *parts))).encode()).hexdigest()[:16]


def build_turn_set(
    cache_dir: Path,
    piper_voice_path: Path,
    transcriber_factory: Callable[[], object],
    voices_per_sentence: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[TurnItem]:
    """The labelled items (see the module docstring)."""
    from audio.io import read_wav, write_wav

    if not 1 <= voices_per_sentence <= len(VOICES):
        raise UserError(f"voices per sentence must be 1..{len(VOICES)}, got {voices_per_sentence}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    pipers: dict = {}
    transcriber = None
    items: list[TurnItem] = []
    total = len(SENTENCES) * voices_per_sentence
    k = 0
    for i, text in enumerate(SENTENCES):
        for v in range(voices_per_sentence):
            voice, speed = VOICES[(i + v) % len(VOICES)]
            voice_id = f"piper:{piper_voice_path.name}" if voice == PIPER else f"espeak-ng:{voice}"
            pause_ms = PAUSES_MS[k % len(PAUSES_MS)]
            key = _key(voice_id, speed, text, pause_ms, k, TRAIL_S)
            wav, meta = cache_dir / f"{key}.paused.wav", cache_dir / f"{key}.json"
            if wav.exists() and meta.exists():
                labels = json.loads(meta.read_text())
                sentence, _ = read_wav(cache_dir / f"{key}.complete.wav", RATE)
                paused, _ = read_wav(wav, RATE)
            else:
                if transcriber is None:
                    transcriber = transcriber_factory()
                speech = _synthesize(text, voice, speed, piper_voice_path, pipers)
                cut, before = _cut_sample(speech, transcriber.words(speech), k)
                trail = np.zeros(int(TRAIL_S * RATE), np.float32)
                sentence = np.concatenate([speech, trail])
                paused = np.concatenate([speech[:cut], np.zeros(RATE * pause_ms // 1000, np.float32), speech[cut:], trail])
                labels = {"cut_after": before}
                for name, audio in (("complete", sentence), ("paused", paused)):
                    write_wav(cache_dir / f"{key}.{name}.wav", audio, RATE)
                meta.write_text(json.dumps(labels))  # last: its presence says the entry is whole
            for kind, audio in (("complete", sentence), ("paused", paused)):
                end = voiced_bounds(audio, RATE)[1] / RATE
                items.append(TurnItem(
                    item_id=f"{key}-{kind}", kind=kind, text=text, voice=voice, speed=float(speed),
                    audio=audio, speech_end_s=end,
                    pause_ms=pause_ms if kind == "paused" else 0,
                    cut_after=labels["cut_after"] if kind == "paused" else "",
                ))
            k += 1
            if progress is not None:
                progress(k, total)
    return items


def first_end_s(
    item: TurnItem,
    make_endpointer: Callable[..., object],
    *,
    end_silence_ms: int,
    check_ms: int = 0,
    verdict: Callable[[int, np.ndarray], tuple[bool, float, int]] | None = None,
) -> float | None:
    """When the item's first turn ends (see the module docstring)."""
    from audio.vad import PauseCheck, SpeechEnded

    endpointer = make_endpointer(end_silence_ms=end_silence_ms, check_silence_ms=check_ms)
    chunk = int(CHUNK_S * RATE)
    pending: tuple[float, int, bool, int] | None = None  # the newest pause's verdict: (due, pause_id, over, unsure_ms)
    checks = 0
    for start in range(0, item.audio.size, chunk):
        t0 = start / RATE
        if pending is not None and pending[0] < t0 + CHUNK_S:  # the verdict arrives within this chunk
            (due, pause_id, over, unsure_ms), pending = pending, None
            if over and endpointer.end_turn(pause_id):
                return max(due, t0)
            if not over and unsure_ms and endpointer.shorten_pause(pause_id, unsure_ms):
                return max(due, t0)
        for ev in endpointer.feed(item.audio[start : start + chunk]):
            if isinstance(ev, SpeechEnded):
                return ev.t_s
            if isinstance(ev, PauseCheck) and verdict is not None:
                over, seconds, unsure_ms = verdict(checks, ev.audio)
                checks += 1
                pending = (ev.t_s + seconds, ev.pause_id, over, unsure_ms)  # a newer pause replaces the older one
    return None


def outcome(item: TurnItem, end_s: float | None) -> str | float:
    """"cut", "missed" or the wait in ms after the last word (see the module docstring)."""
    if end_s is None:
        return "missed"
    if end_s < item.speech_end_s:
        return "cut"
    return (end_s - item.speech_end_s) * 1000
