"""Fakes for driving sessions without models: a fake clock, endpointer, ASR, TTS and LLM.

Audio convention: a 20 ms frame whose peak exceeds 0.1 is speech. The fake ASR hears one word
per burst of speech (a run of voiced frames), so a test writes an utterance as bursts and gaps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np

from audio.asr import Transcript
from audio.resample import Resampler
from audio.text import SentenceChunker
from audio.vad import PauseCheck, SpeechEnded, SpeechStarted
from voice_agent.events import AudioIn, PlaybackMark, ReplyAudio
from voice_agent.fair_share import CallShare
from voice_agent.llm import BlockTrace, LlmDelta
from voice_agent.transcription import AsrPriority

RATE = 16_000
FRAME = RATE // 50  # 20 ms
WORDS = ["what", "is", "the", "weather", "like", "today", "in", "paris"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def speech(ms: int) -> np.ndarray:
    return np.full(RATE * ms // 1000, 0.5, dtype=np.float32)


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, dtype=np.float32)


def bursts(n: int, word_ms: int = 240, gap_ms: int = 100) -> np.ndarray:
    parts = []
    for i in range(n):
        parts.append(speech(word_ms))
        if i < n - 1:
            parts.append(silence(gap_ms))
    return np.concatenate(parts)


class FakeEndpointer:
    """Frame energy VAD with the Endpointer's interface and event types."""

    def __init__(self, end_silence_ms: int = 600, min_speech_ms: int = 100, check_silence_ms: int = 0) -> None:
        self.end_frames = end_silence_ms // 20
        self.min_frames = min_speech_ms // 20
        self.check_frames = check_silence_ms // 20
        self._pauses = 0
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, np.float32)
        self._frames = 0
        self.in_speech = False
        self._utt: list[np.ndarray] = []
        self._voiced_run = 0
        self._silence_run = 0
        self._first_voiced = 0
        self._open_pause = -1
        self._pause_end = 0  # shorten_pause's frames for the open pause, 0: end_frames

    def time_s(self) -> float:
        return self._frames * 0.02

    def utterance_audio(self) -> np.ndarray:
        return np.concatenate(self._utt) if self._utt else np.zeros(0, np.float32)

    def feed(self, chunk: np.ndarray) -> list:
        audio = np.concatenate([self._pending, np.asarray(chunk, np.float32)])
        n = len(audio) // FRAME
        self._pending = audio[n * FRAME :]
        events = []
        for i in range(n):
            frame = audio[i * FRAME : (i + 1) * FRAME]
            voiced = float(np.max(np.abs(frame))) > 0.1
            self._frames += 1
            if not self.in_speech:
                if voiced:
                    if self._voiced_run == 0:
                        self._first_voiced = self._frames - 1
                        self._utt = []
                    self._voiced_run += 1
                    self._utt.append(frame)
                    if self._voiced_run >= self.min_frames:
                        self.in_speech = True
                        self._silence_run = 0
                        events.append(SpeechStarted(t_s=self._first_voiced * 0.02))
                else:
                    self._voiced_run = 0
                continue
            self._utt.append(frame)
            self._silence_run = 0 if voiced else self._silence_run + 1
            if voiced:
                self._open_pause = -1
                self._pause_end = 0
            if self._silence_run >= self.end_frames:
                events.append(self._close())
            elif self._pause_end and self._silence_run >= self._pause_end:
                events.append(self._close(early=True))
            elif self.check_frames and self._silence_run == self.check_frames:
                self._pauses += 1
                self._open_pause = self._pauses
                events.append(PauseCheck(t_s=self.time_s(), audio=self.utterance_audio(), pause_id=self._pauses))
        return events

    def end_turn(self, pause_id: int) -> list:
        if not self.in_speech or pause_id != self._open_pause:
            return []
        return [self._close(early=True)]

    def shorten_pause(self, pause_id: int, silence_ms: int) -> list:
        if not self.in_speech or pause_id != self._open_pause:
            return []
        self._pause_end = max(1, silence_ms // 20)
        return [self._close(early=True)] if self._silence_run >= self._pause_end else []

    def _close(self, early: bool = False) -> SpeechEnded:
        ended = SpeechEnded(t_s=self.time_s(), audio=self.utterance_audio(),
                            speech_end_s=self.time_s() - self._silence_run * 0.02, early=early)
        self.in_speech = False
        self._voiced_run = 0
        self._utt = []
        self._open_pause = -1
        self._pause_end = 0
        return ended


def count_bursts(audio: np.ndarray) -> int:
    n = len(audio) // FRAME
    voiced = [float(np.max(np.abs(audio[i * FRAME : (i + 1) * FRAME]))) > 0.1 for i in range(n)]
    return sum(1 for i, v in enumerate(voiced) if v and (i == 0 or not voiced[i - 1]))


class FakeLLM:
    """Replies with `reply` in word pieces; `hold=True` keeps each request open until released.
    `tool_calls` (ToolCalls) come on its last delta (tools offered or not). `script`: (reply,
    tool calls) for the next requests in turn, before `reply` and `tool_calls` apply."""

    name = "fake"

    def __init__(self, reply: str = "It is sunny. Take a hat. Have fun!", *, hold: bool = False, piece_delay_s: float = 0.0,
                 finish_reason: str = "eos") -> None:
        self.finish_reason = finish_reason
        self.reply = reply
        self.hold = hold
        self.piece_delay_s = piece_delay_s  # a real (not fake-clock) wait between pieces, for server tests
        self.requests: list[list[dict[str, str]]] = []
        self.owners: list[str | None] = []  # the owner of each request, in order
        self.open = 0  # streams started and not yet ended (an engine's held requests)
        self.aborted_owners: list[str] = []
        self.aborted = 0
        self.completed = 0
        self.release = asyncio.Event()
        self.fail: str | None = None
        self.options: list = []  # the LlmOptions of each request, in order
        self.tool_calls: list = []
        self.script: list[tuple[str, list]] = []
        self.holds: list[tuple[str, bool]] = []  # hold_owner(owner, held) calls, in order

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def abort_owner(self, owner: str) -> None:
        self.aborted_owners.append(owner)

    def hold_owner(self, owner: str, held: bool) -> None:
        self.holds.append((owner, held))

    def load(self) -> None:
        return None

    async def stream(
        self, messages: list[dict], *, trace_steps: bool = False, owner: str | None = None, options=None
    ) -> AsyncIterator[LlmDelta]:
        from voice_agent.llm import LlmError

        self.requests.append(messages)
        self.owners.append(owner)
        self.options.append(options)
        self.open += 1
        finished = False
        try:
            if self.hold:
                await self.release.wait()
            if self.fail:
                raise LlmError(self.fail)
            reply, calls = self.script.pop(0) if self.script else (self.reply, self.tool_calls)
            calls = list(calls)  # also where no tools were offered: a backend that misbehaves
            pieces = [w + " " for w in reply.split(" ")] if reply else []
            if options is not None and options.max_tokens:
                pieces = pieces[: options.max_tokens]
            tokens = 0
            for i, piece in enumerate(pieces):
                tokens += 1
                if trace_steps:
                    yield LlmDelta(text="", trace=BlockTrace(i + 1, 2 * i, [piece.strip(), "<mask>"]))
                yield LlmDelta(text=piece if i < len(pieces) - 1 else piece.rstrip(), steps=(tokens + 1) // 2, tokens=tokens)
                await asyncio.sleep(self.piece_delay_s)
            finished = True
            self.completed += 1
            yield LlmDelta(text="", finished=True, finish_reason=self.finish_reason, steps=(tokens + 1) // 2, tokens=tokens,
                           tool_calls=calls or None)
        finally:
            self.open -= 1
            if not finished:
                self.aborted += 1

    async def aclose(self) -> None:
        pass


class FakeServices:
    def __init__(
        self, llm: FakeLLM | None = None, *, end_silence_ms: int = 600, partial_interval_ms: int = 0, first_chunk_min_words: int = 0
    ) -> None:
        self.llm = llm or FakeLLM()
        self.holds_at_synthesis: list[list[tuple[str, bool]]] = []  # the LLM's hold_owner() calls so far, at each synthesis
        self.first_chunk_min_words = first_chunk_min_words
        self.end_silence_ms = end_silence_ms
        self.partial_interval_ms = partial_interval_ms
        self.asr_decode_s = 0.0
        self.share = CallShare()  # the sessions join and leave it; the fakes charge nothing
        # Transcript of an utterance: by default one word per burst.
        self.asr: Callable[[np.ndarray], str] = lambda a: " ".join(WORDS[: count_bursts(a)])
        self.transcribed: list[str] = []
        self.priorities: list[AsrPriority] = []
        self.tts_rate = 16_000
        self.tts_level = 0.05  # quiet enough not to count as speech if echoed (the fake VAD's 0.1)
        self.synthesized: list[str] = []
        self.speeds: list[float] = []
        self.endpointers: list = []  # the VadSettings of each main endpointer made (None: the server's)
        # The end-of-turn model: None = silence alone; else P(turn over) of an utterance (a coroutine
        # function may stand in, to hold the verdict back). With turn_reads_text, it gets the
        # transcript the session hands over instead of the audio.
        self.turn_p: Callable[[object], object] | None = None
        self.turn_reads_text = False
        self.check_silence_ms = 200
        # Whisper's confidence in every transcript (audio.asr.Transcript.avg_logprob), and the
        # shorter silence for a pause whose transcript is below -0.5 (0: off; turn.unsure_*).
        self.asr_logprob: float | None = None
        self.unsure_ms = 0

    async def transcribe(self, audio_16k: np.ndarray, *, priority: AsrPriority = AsrPriority.FINAL, on_start=None,
                         owner=None) -> str:
        if on_start is not None:
            on_start()
        text = Transcript(self.asr(audio_16k), self.asr_logprob)
        self.transcribed.append(text)
        self.priorities.append(priority)
        return text

    async def synthesize(self, text: str, speed: float = 1.0, *, owner=None) -> tuple[np.ndarray, int]:
        self.synthesized.append(text)
        self.holds_at_synthesis.append(list(getattr(self.llm, "holds", [])))
        self.speeds.append(speed)
        # 50 ms per word at speed 1
        return np.full(int(len(text.split()) * self.tts_rate / 20 / speed), self.tts_level, np.float32), self.tts_rate

    async def end_of_turn(self, audio_16k: np.ndarray, transcript, *, owner=None) -> float:
        assert self.turn_p is not None, "no end-of-turn model in these services"
        from voice_agent.end_of_turn import TurnVerdict

        p = self.turn_p(await transcript() if self.turn_reads_text else audio_16k)
        p = await p if asyncio.iscoroutine(p) else p
        return TurnVerdict(p >= 0.5, None if self.turn_reads_text else p, p if self.turn_reads_text else None)

    def work(self) -> dict[str, int]:
        load = self.llm.load()  # a real LocalDLM says what its engine holds; FakeLLM counts streams
        if load is not None:
            return {"llm_rows": load.rows, "llm_queued": load.queued}
        return {"llm_streams": getattr(self.llm, "open", 0)}  # a remote LLM holds nothing here

    def unsure_silence_ms(self, transcript: str) -> int:
        from voice_agent.end_of_turn import unsure_silence_ms

        return unsure_silence_ms(getattr(transcript, "avg_logprob", None), -0.5, self.unsure_ms)

    def turn_silence_ms(self, vad) -> int:
        return vad.silence_duration_ms if vad is not None and vad.silence_duration_ms is not None else self.end_silence_ms

    def make_endpointer(self, end_silence_ms: int | None = None, *, vad=None) -> FakeEndpointer:
        if end_silence_ms is not None:
            return FakeEndpointer(end_silence_ms)
        self.endpointers.append(vad)
        return FakeEndpointer(self.turn_silence_ms(vad), check_silence_ms=self.check_silence_ms if self.turn_p else 0)

    def make_chunker(self) -> SentenceChunker:
        return SentenceChunker(160, first_chunk_min_words=self.first_chunk_min_words)

    def make_resampler(self, from_hz: int, to_hz: int) -> Resampler:
        return Resampler(from_hz, to_hz)

    async def aclose(self) -> None:
        await self.llm.aclose()


async def settle(rounds: int = 200) -> None:
    """Let every ready task run (no time passes: this is not a sleep)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def feed(session, clock: FakeClock, audio: np.ndarray, chunk_ms: int = 20) -> None:
    """Hand a session `audio` in chunk_ms AudioIn events, advancing the fake clock by each chunk."""
    n = RATE * chunk_ms // 1000
    for i in range(0, len(audio), n):
        clock.t += chunk_ms / 1000
        await session.handle(AudioIn(samples=audio[i : i + n], sample_rate_hz=RATE))
        await settle(10)
    await settle()


def drain(outbox) -> list:
    out = []
    while (event := outbox.get_nowait()) is not None:
        out.append(event)
    return out


async def play_all(session, events) -> None:
    """Acknowledge every reply chunk as played, as a client would."""
    for e in events:
        if isinstance(e, ReplyAudio):
            await session.handle(PlaybackMark(turn_id=e.turn_id, chunk_index=e.chunk_index))
    await settle()
