"""One conversation: turn taking, barge-in, memory, speculative start, per-turn metrics.

Contract:
- A `Session` is driven by `await session.handle(event)` with the `Input*` events of
  `voice_agent.events` (the transport's framing makes them) and by `session.audio_sent(turn_id)`
  from the transport's writer. It emits output events into `session.outbox`; the writer drains it.
- States: LISTENING -> USER_SPEAKING (VAD heard speech) -> THINKING (final transcript, LLM
  running) -> SPEAKING (first reply chunk out) -> LISTENING (the reply has been played).
- Barge-in: speech or typed text while THINKING or SPEAKING aborts the LLM request, drops the
  turn's queued reply events from the outbox, emits `Flush` (urgent) and `ResponseDone(cancelled)`.
  What enters the history is what the caller heard: the chunks whose playback marks came back,
  or the prefix given by a `PlaybackTruncate`; not what was generated.
- Speech recognition (`voice_agent.transcription.TranscriptStream` over the shared model):
  partial transcripts every `partial_interval_ms` of audio, adaptively: at most one decode per
  call in flight, the next partial only once the previous one finished and the interval passed
  since, none for audio already decoded (only quiet audio added) and none after the endpoint.
  The final transcript goes before every queued partial or speculative decode of every call,
  cancels this call's queued partial, and reuses a decode whose audio differs only by trailing
  silence (then the endpoint costs no decode at all).
- End of turn: the endpointer reports each pause of `turn.check_silence_ms` in the caller's turn
  (`PauseCheck`); `services.end_of_turn` judges it (the text detector on a speculative decode of
  the utterance, which the final transcript then reuses) and a verdict of "over" ends the turn
  at once, if the caller has not spoken since; else the turn ends after `services.end_silence_ms`
  of silence, or after `turn.unsure_silence_ms` where whisper was unsure of the transcript it
  read (`services.unsure_silence_ms`: garbled words, which the text detector cannot judge; the
  turn's `end_of_turn` metric says "unsure"). docs/turn-taking.md.
- Echo gate (`agent.echo_gate_ratio`; 0 is off): while a reply plays (from the writer's first
  byte) and for 0.8 s after, caller audio that is only the reply's echo is silenced before the
  VAD and ASR, so a speakerphone does not interrupt the agent. The call's echo path
  (`audio.echo.EchoPath`: delay and gain, learnt from the 20 ms levels of the reply and of what
  comes back, over all its replies) predicts each frame's echo: a frame at most ECHO_MARGIN_DB
  above it is echo; on a line that carries no echo nothing is gated; until the path is known
  (about the first second of the call's first reply), a frame quieter than the ratio x the
  reply's loudest level in the 0.8 s before it is. A caller talking over the reply louder than
  its echo barges in. Off after a barge-in (the client stops playing). `echo_gated_s` in the turn
  metrics.
- Speculative start: a second endpointer with a short silence (`agent.speculative_pause_ms`)
  marks pauses; at a pause the utterance so far is transcribed (speculative priority: after
  finals, before partials) and the LLM starts on it, its output held back. A pause judged by the
  text detector starts it too, as soon as the transcript it reads is there (the LLM runs while
  the verdict is computed); one pause's two requests share the decode and the request. If the final
  transcript matches (case and punctuation aside) the held output is adopted ("hit"; the final
  usually reuses that same decode), else the request is aborted and restarted ("miss").
  `speculative_saved_ms`: how much earlier the adopted request started than the final transcript.
  Where one decode takes longer than the window between the pause and the endpoint
  (`services.asr_decode_s`), a pause only starts the LLM on a decode already made (a partial that
  covers the speech): a fresh decode could not finish sooner than the final's and would hold the model.
- Heavy work never runs on the event loop: `services` wraps ASR and TTS in threads and the LLM
  client streams asynchronously. The session itself never sleeps; time comes from `clock`.
- Faults: an ASR, LLM or TTS failure fails that turn only: an `ErrorEvent` (`asr_error`,
  `llm_error`, `tts_error`), `ResponseDone(failed)` where a reply had started, and the call goes
  on listening. A failing partial or speculative transcription is logged once per turn and skipped.
- Memory per call is bounded however long the call runs: the newest `MAX_RECORDS` turn records,
  `agent.max_items` history messages, and the reply chunks of the newest
  `MAX_TRUNCATABLE_TURNS` turns (for a late `PlaybackTruncate`).
- The prompt of every LLM request is the system prompt plus at most `agent.history_tokens` of
  history (counted with the LLM's tokenizer): the newest messages that fit, and of a newest
  message longer than the whole budget, its end. The history holds user messages (spoken or
  typed), the replies as heard, and what the client adds (`AddItem`: system and assistant
  messages, function calls and results), in order; `DeleteItem` removes one.
- Replies: `CreateResponse` answers the conversation as it stands, with no user message too (the
  agent speaks first, from the instructions). A reply's `ReplyOptions` (instructions, modality,
  `max_output_tokens`, tools) override the session's for that reply. Where the session has tools
  (`ConfigureSession.tools`), the LLM may answer with function calls: each becomes a
  `FunctionCall` event after the reply's words and enters the history with them; the client
  sends the result (`AddItem`) and a new `CreateResponse`. `ResponseDone.usage` counts the
  prompt (the LLM's tokenizer, plus `MESSAGE_OVERHEAD_TOKENS` per message) and the reply's tokens.
- Session settings: `ConfigureSession.vad` (the client's turn detection) takes effect between
  turns (a new endpointer from `services.make_endpointer(vad=...)`); `speed` is the TTS rate.
- Errors the session raises while applying an input echo its `client_event_id`.
- Per-call limits (docs/reliability.md): one reply at a time (a `CreateResponse` while one is in
  progress is refused with `conversation_already_has_active_response`, as OpenAI's Realtime API
  does); `CreateResponse` and `UserText` beyond `agent.max_responses_per_minute` /
  `max_items_per_minute` are refused with `rate_limit_exceeded` (a token bucket holding a sixth of
  the per-minute figure); caller audio beyond `max_audio_speed` x real time (after a burst of
  `max_audio_burst_s`) is dropped and counted in `dropped_audio_s`, so no call makes the shared
  VAD and ASR work faster than a talking person needs. A call refused or dropped so is over a
  limit for the fair share (`share.over_limit`: it runs in the background for a while).
- No work outlives the call: every LLM request the session starts (replies, speculative starts,
  replies superseded before they began) is an `LlmRun` the session keeps until it ends; `close()`
  cancels them all and then asks the LLM client to abort whatever it still holds for this call
  (`abort_owner(call_id)`). Queued ASR decodes are dropped; one already running on the model
  finishes (it cannot be interrupted) and its result is discarded.
- Fair share: the call joins `services.share` (voice_agent/fair_share.py) at construction and
  leaves it in `close()`; every ASR, TTS and end-of-turn job and LLM request names the call id as
  its owner, so a call that keeps the models busy far beyond a conversation's needs runs behind
  the others; the caller's speech (VAD start to end) counts as a job in flight, so a background
  call's work pauses before the turn's end needs the models.
- `close()` is idempotent: it cancels the tasks, stores the unfinished turn and the call's end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from audio.echo import EchoPath, level_db
from audio.vad import PauseCheck
from audio.vad import SpeechStarted as VadSpeechStarted
from voice_agent.config import AgentConfig
from voice_agent.events import (
    DROPPED_ON_INTERRUPT,
    AddItem,
    AudioIn,
    CallEnded,
    CallStarted,
    CancelResponse,
    ClearAudio,
    CommitAudio,
    ConfigureSession,
    CreateResponse,
    DeleteItem,
    DenoiseStep,
    Dtmf,
    ErrorEvent,
    Event,
    Flush,
    FunctionCall,
    InputEvent,
    PlaybackMark,
    PlaybackTruncate,
    ReplyAudio,
    ReplyOptions,
    ReplyStarted,
    ReplyTextDelta,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptFinal,
    TurnMetrics,
    Usage,
    UserText,
    VadSettings,
)
from voice_agent.fair_share import CallShare
from voice_agent.llm import LlmClient, LlmDelta, LlmError, LlmOptions, ToolCall
from voice_agent.transcription import AsrPriority, TranscriptStream, normalize_transcript

__all__ = ["HistoryEntry", "Outbox", "RateLimit", "Services", "Session", "State", "TokenBucket", "TurnRecord",
           "normalize_transcript"]

log = logging.getLogger(__name__)

ASR_RATE_HZ = 16_000
# Limits on what one call keeps in memory (see the module docstring).
MAX_RECORDS = 256
MAX_TRUNCATABLE_TURNS = 8
MESSAGE_OVERHEAD_TOKENS = 4  # a message's role and separators in the chat template
# Token counts a session remembers: the messages of a reply's window (history_tokens) are a few
# dozen; texts longer than MAX_COUNTED_CHARS are counted each time (kept, a flood of long
# instructions or items would hold memory the history already dropped).
MAX_COUNTED_TEXTS = 64
MAX_COUNTED_CHARS = 2000
# The echo gate: reply audio levels per 20 ms, compared with the caller's audio that arrives up
# to this many frames (0.8 s: the transport's lead, the network both ways, the room) after it.
ECHO_FRAME_S = 0.02
ECHO_WINDOW_FRAMES = 40
ECHO_FLOOR_RMS = 1e-3  # -60 dBFS: a frame this quiet is silence, not echo (echo_gated_s)
ECHO_FLOOR_DB = float(20 * np.log10(ECHO_FLOOR_RMS))
ECHO_MARGIN_DB = 6.0  # a caller's frame up to this far above the echo the call's echo path predicts is that echo


class State(enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"


class Services(Protocol):
    """The models a session uses; shared by every call of the process (see voice_agent.services)."""

    llm: LlmClient
    partial_interval_ms: int  # 0: no partial transcripts
    end_silence_ms: int  # silence after which a turn ends without an end-of-turn verdict
    asr_decode_s: float  # recent time of one ASR decode (0.0: not known yet)
    share: CallShare  # fair share between calls: each call joins it, and names itself as `owner`

    async def transcribe(
        self, audio_16k: np.ndarray, *, priority: AsrPriority = ..., on_start: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> str: ...

    async def synthesize(self, text: str, speed: float = 1.0, *, owner: str | None = None) -> tuple[np.ndarray, int]: ...

    async def end_of_turn(self, audio_16k: np.ndarray, transcript: Callable[[], Awaitable[str]], *,
                          owner: str | None = None) -> Any: ...

    def make_endpointer(self, end_silence_ms: int | None = None, *, vad: VadSettings | None = None) -> Any: ...

    def turn_silence_ms(self, vad: VadSettings | None) -> int: ...

    def make_chunker(self) -> Any: ...

    def make_resampler(self, from_hz: int, to_hz: int) -> Any: ...


class TurnSink(Protocol):
    """Where finished turns go (the call store, the metrics registry); must not block."""

    def turn_finished(self, call_id: str, record: TurnRecord) -> None: ...


# The outbox -----------------------------------------------------------------------------------


class Outbox:
    """Session -> transport writer: ordered, bounded, with an urgent lane.

    Overflow policy: `put` waits while `max_items` events are queued (backpressure on the reply
    pipeline; reply text and audio are never dropped for lack of room). `put_urgent` never waits:
    urgent events (speech started, flush) go into their own lane, read before the ordered one.
    `drop_turn(turn_id)` discards the turn's droppable events (see `events.DROPPED_ON_INTERRUPT`)
    and remembers the turn as flushed, so that the writer stops sending what it already holds.
    """

    def __init__(self, max_items: int = 64) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._urgent: collections.deque[Event] = collections.deque()
        self._max_items = max_items
        self._changed = asyncio.Event()
        self._closed = False
        self.flushed_turns: set[int] = set()

    def __len__(self) -> int:
        return len(self._items) + len(self._urgent)

    def backlog(self) -> int:
        """Events queued past the ordered lane's bound: urgent ones and the kept end-of-turn events
        of `put_nowait`. A transport stops reading its client while this is high (see
        `wait_backlog`), so a client that floods requests without reading the answers is held back
        by TCP instead of growing this queue."""
        return len(self._urgent) + max(0, len(self._items) - self._max_items)

    async def wait_backlog(self, limit: int) -> None:
        """Return once `backlog() <= limit` (or the outbox is closed). Cancelling it is safe."""
        while self.backlog() > limit and not self._closed:
            self._changed.clear()
            await self._changed.wait()

    async def put(self, event: Event) -> None:
        """Queue `event`; waits while the queue is full. Cancelling it is safe (nothing queued)."""
        while len(self._items) >= self._max_items and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        if self._closed:
            return
        self._items.append(event)
        self._changed.set()

    def put_urgent(self, event: Event) -> None:
        if not self._closed:
            self._urgent.append(event)
            self._changed.set()

    def has_urgent(self) -> bool:
        return bool(self._urgent)

    def get_urgent_nowait(self) -> Event | None:
        if not self._urgent:
            return None
        self._changed.set()
        return self._urgent.popleft()

    def drop_turn(self, turn_id: int) -> int:
        """Discard the turn's droppable events; returns how many were dropped."""
        self.flushed_turns.add(turn_id)
        before = len(self._items)
        self._items = collections.deque(
            e for e in self._items if not (e.turn_id == turn_id and isinstance(e, DROPPED_ON_INTERRUPT))
        )
        self._changed.set()
        return before - len(self._items)

    def put_nowait(self, event: Event) -> None:
        """Queue a small kept event in order, past the bound if need be (a few per turn at most:
        a turn's end of speech, a reply's end and its metrics must neither wait nor jump ahead of
        what came before; and the transport's read path must never wait on the writer)."""
        if not self._closed:
            self._items.append(event)
            self._changed.set()

    def get_nowait(self) -> Event | None:
        if self._urgent:
            event = self._urgent.popleft()
        elif self._items:
            event = self._items.popleft()
        else:
            return None
        self._changed.set()
        return event

    async def get(self) -> Event | None:
        """The next event, urgent ones first; None once closed and empty. Cancelling is safe."""
        while True:
            event = self.get_nowait()
            if event is not None or self._closed:
                return event
            self._changed.clear()
            await self._changed.wait()

    async def wait_changed(self) -> None:
        """Returns at the next put, get or flush (for a writer pacing audio)."""
        self._changed.clear()
        await self._changed.wait()

    def close(self) -> None:
        """Idempotent. Queued events stay readable; puts are ignored from now on."""
        self._closed = True
        self._changed.set()


# LLM runs -------------------------------------------------------------------------------------


class TokenBucket:
    """Holds up to `capacity`, refilled at `rate_per_s` on `clock`."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self._rate_per_s = rate_per_s
        self._level = capacity
        self._clock = clock
        self._t = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._t) * self._rate_per_s)
        self._t = now

    def take(self, amount: float) -> float:
        """Take up to `amount`; returns how much was there."""
        self._refill()
        taken = max(0.0, min(amount, self._level))
        self._level -= taken
        return taken

    def borrow(self, amount: float) -> float:
        """Take `amount`, into debt if need be; returns the seconds until the debt is paid."""
        self._refill()
        self._level -= amount
        return max(0.0, -self._level / self._rate_per_s)


class RateLimit(TokenBucket):
    """`per_minute` events a minute on average, bursts of a sixth of that."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        super().__init__(per_minute / 60, max(1.0, per_minute / 6), clock)

    def allow(self) -> bool:
        """Take one event's token if there is a whole one."""
        self._refill()
        if self._level < 1.0:
            return False
        self._level -= 1.0
        return True


def release_cancelled(task: asyncio.Task[Any]) -> None:
    """A done-callback: drop the CancelledError a cancelled task keeps. Its traceback holds the
    task's frames, whose locals hold the object that holds the task: a reference cycle that only
    the cyclic garbage collector frees, and a full collection is rare in a process with a big
    heap, so every ended call's buffers (audio, history) would linger for minutes. Reading the
    result hands the error over (asyncio keeps it only until then) and it dies here."""
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.result()


class LlmRun:
    """One LLM request pumped into a buffer as it streams, so that a speculative start can be
    adopted later and read from the beginning. The buffer holds at most one request's deltas."""

    def __init__(self, llm: LlmClient, messages: list[dict[str, Any]], *, trace_steps: bool,
                 clock: Callable[[], float], owner: str | None = None, options: LlmOptions | None = None):
        self.messages = messages
        self.options = options
        self.t_start = clock()
        self.t_first_text: float | None = None
        self._clock = clock
        self._buffer: list[LlmDelta] = []
        self._done = False
        self.error: str | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._pump(llm, trace_steps, owner), name="llm-run")
        self._task.add_done_callback(release_cancelled)

    async def _pump(self, llm: LlmClient, trace_steps: bool, owner: str | None) -> None:
        try:
            stream_ = llm.stream(self.messages, trace_steps=trace_steps, owner=owner, options=self.options)
            async with contextlib.aclosing(stream_) as stream:
                async for delta in stream:
                    if delta.text and self.t_first_text is None:
                        self.t_first_text = self._clock()
                    self._buffer.append(delta)
                    self._changed.set()
        except LlmError as e:
            self.error = str(e)
        except Exception as e:  # a bug in a client must end this reply, not the call
            log.exception("LLM client failed")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self._done = True
            self._changed.set()

    async def deltas(self) -> AsyncIterator[LlmDelta]:
        """Every delta from the first; raises LlmError if the request failed."""
        i = 0
        while True:
            while i < len(self._buffer):
                yield self._buffer[i]
                i += 1
            if self._done:
                if self.error:
                    raise LlmError(self.error)
                return
            self._changed.clear()
            await self._changed.wait()

    def cancel(self) -> None:
        """Abort the request (the client aborts it in the engine or closes the HTTP stream)."""
        self._task.cancel()

    @property
    def task(self) -> asyncio.Task[None]:
        """The task streaming the request; done once the request ended or was aborted."""
        return self._task


# Turns ----------------------------------------------------------------------------------------


@dataclass
class Chunk:
    text: str
    duration_s: float
    played: bool = False


@dataclass
class TurnRecord:
    """One user turn and the reply to it: what the call store keeps."""

    turn_id: int
    kind: str  # "speech" | "text" | "response" (a reply without new user input)
    started_at: float  # wall clock, seconds since the epoch
    user_text: str = ""
    reply_text: str = ""  # what the LLM generated
    heard: str = ""  # what the caller heard
    status: str = "open"  # "completed" | "cancelled" | "failed" | "no_reply"
    metrics: dict[str, Any] = field(default_factory=dict)


def _frame_levels(samples: np.ndarray, n: int) -> np.ndarray:
    """The RMS level of each whole frame of n samples."""
    frames = samples[: len(samples) // n * n].reshape(-1, n)
    return np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))


@dataclass
class _Turn:
    record: TurnRecord
    end_verdict: Any = None  # the newest end-of-turn verdict (voice_agent.end_of_turn.TurnVerdict) in this turn
    end_check_ms: float | None = None  # how long that verdict took
    # "model" (a verdict), "unsure" (the shorter silence after an unsure transcript: turn.unsure_*)
    # or "silence" (the fallback); None: not by the VAD
    ended_by: str | None = None
    llm_finish: str | None = None  # why the LLM's reply ended ("eos", "repetition", "length", ...)
    t_speech_end: float | None = None  # monotonic: the reference of the latencies
    t_asr: float | None = None
    t_first_chunk: float | None = None  # the reply's first chunk of text final, handed to TTS
    t_first_audio: float | None = None
    t_first_sent: float | None = None
    stream_first_sent: float = 0.0  # the caller's stream time (s) at t_first_sent
    # The reply's audio level, one RMS per ECHO_FRAME_S from the start of its playback (the echo gate).
    far_end: np.ndarray = field(default_factory=lambda: np.zeros(0))
    far_rest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # a chunk's last partial frame
    speculative: str = "off"  # "off" | "none" | "hit" | "miss"
    speculative_saved_ms: float | None = None
    run: LlmRun | None = None
    reply_task: asyncio.Task[None] | None = None
    chunks: list[Chunk] = field(default_factory=list)
    generation_done: bool = False
    audio_output: bool = True
    steps: int | None = None
    tokens: int | None = None
    truncated_ms: int | None = None
    tts_error: str | None = None
    finished: bool = False
    input_tokens: int | None = None  # the prompt of its LLM request, in the LLM's tokens
    calls: list[FunctionCall] = field(default_factory=list)  # function calls the reply made


@dataclass
class HistoryEntry:
    """One message of the conversation. `turn_id` is that of the turn it belongs to (0 for items
    the client added that are no turn: system and assistant messages, function results);
    `item_id` the client's id for an item it added (None: named by the transport from the turn)."""

    turn_id: int
    message: dict[str, Any]  # a Chat Completions message: role, content (+ tool_calls / tool_call_id)
    item_id: str | None = None


@dataclass
class _Speculation:
    turn_id: int
    text: str
    run: LlmRun


def _paired_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as a strict Chat Completions server takes them: every function call answered
    by its result right after it. Consecutive assistant messages with calls are merged into one
    (their words joined, their calls together); a call with no result (the caller spoke before the
    client answered it) is left out, and so is a result whose call is gone (deleted, or out of the
    window)."""
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    out: list[dict[str, Any]] = []
    open_calls: set[str] = set()
    for m in messages:
        if m["role"] == "tool":
            if m.get("tool_call_id") in open_calls:
                out.append(m)
            continue
        open_calls = set()
        calls = [c for c in m.get("tool_calls") or () if c["id"] in answered]
        if m["role"] == "assistant" and m.get("tool_calls"):
            previous = out[-1] if out else None
            if previous is not None and previous["role"] == "assistant" and previous.get("tool_calls"):
                words = " ".join(t for t in (previous.get("content"), m.get("content")) if t)
                previous.update(content=words or None, tool_calls=[*previous["tool_calls"], *calls])
                open_calls = {c["id"] for c in previous["tool_calls"]}
                continue
            m = {k: v for k, v in m.items() if k != "tool_calls"} | ({"tool_calls": calls} if calls else {})
            if not calls and not m.get("content"):
                continue
            open_calls = {c["id"] for c in calls}
        out.append(dict(m))
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def heard_prefix(text: str, fraction: float) -> str:
    """The first `fraction` of `text`, cut back to a word boundary."""
    if fraction >= 1.0:
        return text
    if fraction <= 0.0:
        return ""
    cut = int(len(text) * fraction)
    space = text.rfind(" ", 0, cut + 1)
    return text[: space if space > 0 else 0].rstrip()


class Session:
    """One call (see the module docstring)."""

    def __init__(
        self,
        services: Services,
        config: AgentConfig,
        *,
        call_id: str | None = None,
        sink: TurnSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        # Limits
        max_outbox_events: int = 64,
    ) -> None:
        self.services = services
        self.config = config
        # A message's token count, remembered: every reply counts the whole history again (to fit
        # it into history_tokens, then for its usage). Bounded in entries and in text length.
        self._counted = functools.lru_cache(maxsize=MAX_COUNTED_TEXTS)(services.llm.count_tokens)
        self.call_id = call_id or uuid.uuid4().hex[:16]
        services.share.join(self.call_id)  # left in close()
        self.outbox = Outbox(max_outbox_events)
        self._sink = sink
        self._clock = clock
        self._wall_clock = wall_clock
        self.state = State.LISTENING
        # Settings the client may change.
        self.instructions = config.system_prompt
        self.input_rate_hz = config.sample_rate_hz
        self.server_vad = True
        self.audio_output = True
        self.trace_steps = False
        self.vad: VadSettings | None = None  # the client's turn detection (None: the server's)
        self.max_output_tokens: int | None = None  # None: the LLM's own limit
        self.speed = 1.0  # speech rate of the replies
        self.tools: list[dict[str, Any]] = []  # functions the model may call (Chat Completions form)
        self.tool_choice: str | dict[str, Any] = "auto"
        # Conversation memory; the system prompt is added per request.
        self.history: list[HistoryEntry] = []
        self.records: collections.deque[TurnRecord] = collections.deque(maxlen=MAX_RECORDS)
        self.turn_count = 0  # turns started in this call (records keeps the newest only)
        self._chunks_by_turn: dict[int, list[Chunk]] = {}
        self.dtmf: list[str] = []
        self.call_info: CallStarted | None = None
        # Turn bookkeeping.
        self._next_turn_id = 1
        self._user_turn: _Turn | None = None  # the turn whose user speech is in progress
        self._reply_turn: _Turn | None = None  # the turn whose reply is in progress
        self._speculation: _Speculation | None = None
        self._spec_task: asyncio.Task[None] | None = None
        self._partial_task: asyncio.Task[None] | None = None
        self._check_task: asyncio.Task[None] | None = None  # the end-of-turn model's verdict on a pause
        self._turn_check_failed = False  # logged once until it works again
        self._commit_task: asyncio.Task[None] | None = None  # the newest manual commit's transcription
        self._response_waiting = False  # a CreateResponse waits for a commit's transcript
        self._partial_at_s = 0.0  # stream time the last partial finished (inf: no more this turn)
        self._asr = TranscriptStream(functools.partial(services.transcribe, owner=self.call_id))
        # Audio in: drop-oldest inbox, processed by one task.
        self._inbox: collections.deque[AudioIn] = collections.deque()
        self._inbox_s = 0.0
        self._max_inbox_s = config.max_inbox_audio_s
        self.dropped_audio_s = 0.0
        self.echo_gated_s = 0.0  # caller audio silenced by the echo gate
        self._echo_turn: _Turn | None = None  # the reply playing now or last (its echo may still come)
        self._echo_path: EchoPath | None = None  # how the replies come back on this call (the echo gate)
        self._inbox_ready = asyncio.Event()
        self._resampler: Any = None
        self._resampler_rate = 0
        self._endpointer = services.make_endpointer()
        self._vad_changed = False
        self._pause_endpointer = (
            services.make_endpointer(config.speculative_pause_ms) if config.speculative_start else None
        )
        self._manual_audio: collections.deque[np.ndarray] = collections.deque()
        self._manual_s = 0.0
        self._stream_s = 0.0  # seconds of caller audio processed
        self._ep_origin_s = 0.0  # stream time at which the endpointers' own clocks started
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runs: set[LlmRun] = set()  # every LLM request of this call not yet ended
        self._response_rate = RateLimit(config.max_responses_per_minute, clock)
        self._item_rate = RateLimit(config.max_items_per_minute, clock)
        self._audio_rate = TokenBucket(config.max_audio_speed, config.max_audio_burst_s, clock)
        self._audio_rate_logged = False
        self._speech_held = False  # _hold_speech
        self._audio_task = self._spawn(self._audio_loop(), "audio-in")
        self.ended = False
        self._closed = False

    # --- public API ----------------------------------------------------------------------------

    async def handle(self, event: InputEvent) -> None:
        """Apply one input event. Returns at once: it never waits for a model or for the writer
        (the transport goes on reading, so a hang-up is seen at once); heavy work goes to tasks."""
        match event:
            case AudioIn():
                self._push_audio(event)
            case ConfigureSession():
                self._configure(event)
            case UserText():
                await self._on_user_text(event)
            case AddItem():
                await self._on_item(event)
            case DeleteItem():
                self._delete_item(event)
            case CommitAudio():
                await self._on_commit(event)
            case ClearAudio():
                self._manual_audio.clear()
                self._manual_s = 0.0
            case CreateResponse():
                await self._on_create_response(event)
            case CancelResponse():
                if self._reply_turn is None:
                    await self._error("response_cancel_not_active", "there is no reply in progress to cancel", event)
                else:
                    await self._interrupt("cancel")
            case PlaybackMark():
                self.playback_mark(event.turn_id, event.chunk_index)
            case PlaybackTruncate():
                self._on_truncate(event)
            case Dtmf():
                self.dtmf.append(event.digit)
                log.info("call %s: DTMF %s", self.call_id, event.digit)
            case CallStarted():
                self.call_info = event
            case CallEnded():
                self.ended = True
            case _:
                raise TypeError(f"not an input event: {event!r}")

    def audio_sent(self, turn_id: int) -> None:
        """The writer sent the first byte of turn `turn_id`'s reply audio."""
        turn = self._reply_turn
        if turn is not None and turn.record.turn_id == turn_id and turn.t_first_sent is None:
            turn.t_first_sent = self._clock()
            turn.stream_first_sent = self._stream_s + self._inbox_s  # the caller audio received by then
            self._echo_turn = turn

    async def close(self) -> None:
        """End the call: cancel the tasks (its ASR decodes too), record the unfinished turn.
        Idempotent; safe to cancel (the store write is handed to the sink synchronously)."""
        if self._closed:
            return
        self._closed = True
        if self._speculation is not None:
            self._speculation.run.cancel()
            self._speculation = None
        decodes = self._asr.close()
        turn = self._reply_turn
        if turn is not None:
            self._stop_reply(turn)
            self._finish(turn, "cancelled", reason="hangup")
        for task in list(self._tasks):
            task.cancel()
        for run in list(self._runs):
            run.cancel()
        # Before any await: a close cancelled there must not leave the call's jobs counted.
        self.services.share.leave(self.call_id)
        await asyncio.gather(*self._tasks, *(run.task for run in list(self._runs)), *decodes, return_exceptions=True)
        # Whatever the client still holds for this call (nothing, unless a stream was lost).
        self.services.llm.abort_owner(self.call_id)
        self.outbox.close()

    @property
    def turns(self) -> list[TurnRecord]:
        return list(self.records)

    @property
    def replying(self) -> bool:
        """A turn is being transcribed, generated or played (the server's drain waits for it)."""
        return self._reply_turn is not None

    # --- configuration -------------------------------------------------------------------------

    # ConfigureSession fields that are session attributes of the same name (None: unchanged).
    _SETTINGS = ("instructions", "input_rate_hz", "server_vad", "audio_output", "trace_steps", "speed", "tools", "tool_choice")

    def _configure(self, event: ConfigureSession) -> None:
        for name in self._SETTINGS:
            if (value := getattr(event, name)) is not None:
                setattr(self, name, value)
        if event.max_output_tokens is not None:
            self.max_output_tokens = event.max_output_tokens or None  # 0: back to the LLM's own limit
        if not self.server_vad:
            self._hold_speech(False)  # no endpointer will end the speech now
        if event.vad is not None and event.vad != self.vad:
            self.vad = event.vad
            self._vad_changed = True  # the endpointer is rebuilt between turns (_process_audio)

    async def _rebuild_endpointer(self) -> None:
        """The endpointer of the client's turn detection, made between two turns (in a thread:
        the silero backend loads an ONNX session)."""
        self._vad_changed = False
        self._endpointer = await asyncio.to_thread(self.services.make_endpointer, vad=self.vad)
        if self._pause_endpointer is not None:
            self._pause_endpointer.reset()
        self._ep_origin_s = self._stream_s

    @property
    def auto_reply(self) -> bool:
        """Whether a spoken turn gets a reply by itself (Realtime's `create_response`)."""
        return self.vad is None or self.vad.create_response is not False

    @property
    def end_silence_ms(self) -> int:
        """The silence that ends a turn without an end-of-turn verdict, for this call."""
        return self.services.turn_silence_ms(self.vad)

    # --- audio in ------------------------------------------------------------------------------

    def _push_audio(self, event: AudioIn) -> None:
        """Queue caller audio. Overflow policy: audio faster than `max_audio_speed` x real time
        beyond a burst of `max_audio_burst_s` is dropped (the newest part of a chunk is kept);
        past `max_inbox_audio_s` queued, the oldest audio is dropped."""
        duration = len(event.samples) / event.sample_rate_hz
        allowed_s = self._audio_rate.take(duration)
        if allowed_s < duration:
            self.services.share.over_limit(self.call_id)
            keep = int(allowed_s * event.sample_rate_hz)
            self.dropped_audio_s += duration - keep / event.sample_rate_hz
            if not self._audio_rate_logged:
                self._audio_rate_logged = True
                log.warning("call %s: audio arrives faster than %.3gx real time; the excess is dropped (agent.max_audio_speed)",
                            self.call_id, self.config.max_audio_speed)
            if keep == 0:
                return
            event = AudioIn(samples=event.samples[len(event.samples) - keep :], sample_rate_hz=event.sample_rate_hz, t=event.t)
            duration = keep / event.sample_rate_hz
        self._inbox.append(event)
        self._inbox_s += duration
        while self._inbox_s > self._max_inbox_s and self._inbox:
            old = self._inbox[0]
            old_s = len(old.samples) / old.sample_rate_hz
            excess_s = self._inbox_s - self._max_inbox_s
            if old_s > excess_s:
                # Cut the head off this chunk rather than drop it whole: one oversized append
                # must not take the newest audio with it.
                n = int(excess_s * old.sample_rate_hz) + 1
                self._inbox[0] = AudioIn(samples=old.samples[n:], sample_rate_hz=old.sample_rate_hz, t=old.t)
                cut_s = n / old.sample_rate_hz
                self._inbox_s -= cut_s
                self.dropped_audio_s += cut_s
                break
            self._inbox.popleft()
            self._inbox_s -= old_s
            self.dropped_audio_s += old_s
        self._inbox_ready.set()

    async def _audio_loop(self) -> None:
        while True:
            while not self._inbox:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            event = self._inbox.popleft()
            self._inbox_s -= len(event.samples) / event.sample_rate_hz
            try:
                await self._process_audio(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("call %s: audio processing failed", self.call_id)
                await self._error("audio_error", f"{type(e).__name__}: {e}")

    def _to_16k(self, event: AudioIn) -> np.ndarray:
        if event.sample_rate_hz == ASR_RATE_HZ:
            return np.asarray(event.samples, dtype=np.float32)
        if self._resampler is None or self._resampler_rate != event.sample_rate_hz:
            self._resampler = self.services.make_resampler(event.sample_rate_hz, ASR_RATE_HZ)
            self._resampler_rate = event.sample_rate_hz
        return self._resampler.process(event.samples)

    async def _process_audio(self, event: AudioIn) -> None:
        if self._vad_changed and self._user_turn is None:
            await self._rebuild_endpointer()
        audio = self._to_16k(event)
        self._stream_s += len(audio) / ASR_RATE_HZ
        if self.config.echo_gate_ratio > 0 and self._echo_turn is not None:
            audio = self._gate_echo(self._echo_turn, audio)
        if not self.server_vad:
            self._manual_audio.append(audio)
            self._manual_s += len(audio) / ASR_RATE_HZ
            while self._manual_s > self.config.max_manual_audio_s and len(self._manual_audio) > 1:
                self._manual_s -= len(self._manual_audio.popleft()) / ASR_RATE_HZ
            return
        for ev in self._endpointer.feed(audio):
            if isinstance(ev, VadSpeechStarted):
                await self._on_speech_started(self._ep_origin_s + ev.t_s)
            elif isinstance(ev, PauseCheck):
                self._judge_pause(ev)
            else:
                if self._user_turn is not None:
                    # early: a pause the end-of-turn check shortened (an unsure transcript)
                    self._user_turn.ended_by = "unsure" if ev.early else "silence"
                await self._on_speech_ended(self._ep_origin_s + ev.speech_end_s, ev.audio)
        if self._pause_endpointer is not None:
            for ev in self._pause_endpointer.feed(audio):
                if isinstance(ev, VadSpeechStarted):
                    self._drop_speculation("the caller went on speaking")
                elif self.state is State.USER_SPEAKING:
                    # The main endpointer's utterance, not this one's: a pause inside the
                    # sentence already ended a "turn" of the pause endpointer.
                    self._start_speculation(self._endpointer.utterance_audio())
        if self.state is State.USER_SPEAKING:
            self._maybe_partial()

    # --- echo gate -----------------------------------------------------------------------------

    def _add_far_end(self, turn: _Turn, samples: np.ndarray, rate: int) -> None:
        n = int(rate * ECHO_FRAME_S)
        # A chunk plays after the one before it, or, when the reply fell behind (the one before has
        # played out), from now on: the silence between goes into the levels, so that they stay
        # aligned with what the caller hears. Grown once per reply chunk (a sentence), read for
        # every chunk of caller audio.
        gap = 0
        if turn.t_first_sent is not None:
            gap = max(0, int((self._clock() - turn.t_first_sent) / ECHO_FRAME_S) - turn.far_end.size)
        # A chunk's last partial frame plays on into the next chunk: carried over, not dropped (up
        # to 20 ms a chunk, the levels drifted ahead of the playback; a long reply's echo then
        # passed the gate: docs/turn-taking.md, session 26). Where silence comes between, it
        # played before the silence: closed with zeros there, as the first frame of the gap.
        closed = np.zeros(0)
        if gap and turn.far_rest.size:
            closed = _frame_levels(np.concatenate([turn.far_rest, np.zeros(n - turn.far_rest.size, np.float32)]), n)
            turn.far_rest, gap = turn.far_rest[:0], gap - 1
        samples = np.concatenate([turn.far_rest, np.asarray(samples, dtype=np.float32)])
        whole = len(samples) // n * n
        turn.far_rest = samples[whole:]
        turn.far_end = np.concatenate([turn.far_end, closed, np.zeros(gap), _frame_levels(samples[:whole], n)])

    def _gate_echo(self, turn: _Turn, audio: np.ndarray) -> np.ndarray:
        """Silence the caller's frames that are only the reply's own voice coming back. The call's
        echo path (`audio.echo.EchoPath`: delay and gain, learnt from the levels of every frame
        heard while a reply plays) predicts each frame's echo: where there is one, a frame no more
        than ECHO_MARGIN_DB above it is echo; where nothing comes back, nothing is gated; until
        the path is known (about the first second of the first reply), a frame quieter than
        `echo_gate_ratio` x the loudest reply audio played in the echo window before it is (a
        Geigel double-talk test). The caller talking over the reply is louder than the echo of it
        and passes. Frames more than the window after the reply's end pass. Every sample is
        judged (a chunk's last, partial frame too: the VAD's frames straddle chunks)."""
        far = turn.far_end
        if audio.size == 0 or far.size == 0:
            return audio
        n = int(ASR_RATE_HZ * ECHO_FRAME_S)
        starts = np.arange(0, audio.size, n)
        # When each frame was heard, in reply frames since playback began: by the caller's own
        # stream (20 ms of audio is 20 ms of the call, however late this task reads it).
        ends = self._stream_s - (audio.size - np.minimum(starts + n, audio.size)) / ASR_RATE_HZ
        at = np.floor((ends - turn.stream_first_sent) / ECHO_FRAME_S).astype(np.int64)
        heard = np.flatnonzero((at >= 0) & (at - ECHO_WINDOW_FRAMES < far.size))  # frames the reply's echo may be in
        if heard.size == 0:
            return audio
        if self._echo_path is None:
            self._echo_path = EchoPath(ECHO_WINDOW_FRAMES, floor_db=ECHO_FLOOR_DB)
        path = self._echo_path
        far_db = level_db(far, ECHO_FLOOR_DB)
        lags = at[heard, None] - np.arange(ECHO_WINDOW_FRAMES + 1)  # (frames, delays): the reply frame each delay points at
        played = np.where((lags >= 0) & (lags < far.size), far_db[np.clip(lags, 0, far.size - 1)], ECHO_FLOOR_DB)
        levels = np.array([np.sqrt(np.mean(np.square(audio[starts[i] : starts[i] + n], dtype=np.float64))) for i in heard])
        levels_db = level_db(levels, ECHO_FLOOR_DB)
        for i, level, row in zip(heard, levels_db, played, strict=True):
            if audio.size - starts[i] >= n // 2:  # a chunk's last few samples say little of a level
                path.observe(float(level), row)
        estimate = path.estimate()
        gated = audio
        for i, level, level_in_db, row in zip(heard, levels, levels_db, played, strict=True):
            if estimate.kind == "echo":
                is_echo = level_in_db <= path.echo_db(row, estimate) + ECHO_MARGIN_DB
            elif estimate.kind == "none":
                is_echo = False
            else:
                window = far[max(0, at[i] - ECHO_WINDOW_FRAMES) : at[i] + 1]
                is_echo = window.size > 0 and level < self.config.echo_gate_ratio * window.max()
            if is_echo:
                if gated is audio:
                    gated = audio.copy()
                gated[starts[i] : starts[i] + n] = 0.0
                if level > ECHO_FLOOR_RMS:  # silence is not counted as echo
                    self.echo_gated_s += min(n, audio.size - starts[i]) / ASR_RATE_HZ
        return gated

    # --- user speech ---------------------------------------------------------------------------

    def _new_turn(self, kind: str) -> _Turn:
        turn_id = self._next_turn_id
        self._next_turn_id += 1
        self.turn_count += 1
        record = TurnRecord(turn_id=turn_id, kind=kind, started_at=self._wall_clock())
        turn = _Turn(record=record, audio_output=self.audio_output)
        turn.speculative = "none" if (self.config.speculative_start and kind == "speech") else "off"
        return turn

    async def _on_speech_started(self, start_s: float) -> None:
        """`start_s`: stream time of the first voiced frame."""
        turn = self._new_turn("speech")
        # Speech started first, then the interrupted reply's flush (OpenAI's order on barge-in).
        self.outbox.put_urgent(SpeechStarted(turn_id=turn.record.turn_id, t=self._clock(), audio_start_ms=int(start_s * 1000)))
        if self._reply_turn is not None:
            await self._interrupt("speech")
        self._hold_speech(True)
        self._user_turn = turn
        self.state = State.USER_SPEAKING
        self._asr.reset()
        self._partial_at_s = self._stream_s  # (inf during a partial or after a failed one)

    def _hold_speech(self, speaking: bool) -> None:
        """The fair share counts the caller's speech as this call's work in flight: the end of
        the turn needs the models within a second, and a background call's job or step started
        meanwhile would still hold them then. Begun and ended once each, whatever the path
        (speech end, turn detection switched off mid-speech, close)."""
        if speaking != self._speech_held:
            self._speech_held = speaking
            (self.services.share.begin if speaking else self.services.share.end)(self.call_id)

    def _stream_time_to_clock(self, t_s: float) -> float:
        """Map a stream time of the caller's audio onto the monotonic clock."""
        return self._clock() - max(0.0, self._stream_s - t_s)

    async def _on_speech_ended(self, end_s: float, audio: np.ndarray) -> None:
        """`end_s`: stream time at which the caller stopped speaking; `audio`: the utterance."""
        turn = self._user_turn
        self._user_turn = None
        self._hold_speech(False)
        if turn is None:  # speech ended without a start we saw (e.g. after a commit)
            return
        turn.t_speech_end = self._stream_time_to_clock(end_s)
        if self._partial_task is not None:
            self._partial_task.cancel()  # a queued partial never starts; a running one is reused
        # Never waits (see Outbox.put_nowait): this runs on the transport's read path too (a
        # commit), which must go on reading while the writer paces a long reply.
        self.outbox.put_nowait(SpeechStopped(turn_id=turn.record.turn_id, t=self._clock(), audio_end_ms=int(end_s * 1000)))
        self.state = State.THINKING
        self._reply_turn = turn
        turn.reply_task = self._spawn(self._finalize_speech(turn, audio), f"turn-{turn.record.turn_id}")

    def _judge_pause(self, check: PauseCheck) -> None:
        """A pause inside the caller's turn: ask the end-of-turn model whether the turn is over."""
        if self._user_turn is None:
            return
        if self._check_task is not None:
            self._check_task.cancel()  # an older pause's verdict no longer matters
        self._check_task = self._spawn(self._end_turn_if_over(self._user_turn, check), "turn-check")

    async def _end_turn_if_over(self, turn: _Turn, check: PauseCheck) -> None:
        started = self._clock()
        try:
            # A text detector reads the transcript so far: a speculative decode, which the final
            # transcript reuses when the turn ends in this pause (only silence is added). The
            # LLM starts on it meanwhile (the speculative start), while the verdict is computed.
            heard: list[str] = []

            async def transcript() -> str:
                text = await self._asr.hypothesis(check.audio, AsrPriority.SPECULATIVE)
                self._speculate_on(turn, text)
                heard.append(text)
                return text

            verdict = await self.services.end_of_turn(check.audio, transcript, owner=self.call_id)
        except Exception as e:
            # The silence fallback (services.end_silence_ms) ends the turn instead.
            if not self._turn_check_failed:
                log.warning("call %s: the end-of-turn model failed (%s: %s); turns end on silence alone until it works",
                            self.call_id, type(e).__name__, e)
            self._turn_check_failed = True
            return
        self._turn_check_failed = False
        turn.end_verdict = verdict
        turn.end_check_ms = (self._clock() - started) * 1000
        if self._user_turn is not turn:
            return
        if not verdict.over:
            # Whisper unsure of the words: the text score cannot judge them, so this pause ends
            # the turn after turn.unsure_silence_ms instead of the full fallback.
            unsure_ms = self.services.unsure_silence_ms(heard[0]) if heard else 0
            if unsure_ms:
                for ev in self._endpointer.shorten_pause(check.pause_id, unsure_ms):
                    turn.ended_by = "unsure"
                    await self._on_speech_ended(self._ep_origin_s + ev.speech_end_s, ev.audio)
            return
        for ev in self._endpointer.end_turn(check.pause_id):
            turn.ended_by = "model"
            await self._on_speech_ended(self._ep_origin_s + ev.speech_end_s, ev.audio)

    def _maybe_partial(self) -> None:
        """Start a partial transcript if none is in flight and the interval passed since the last
        one finished: on a slow CPU partials come less often instead of queueing up."""
        interval_s = self.services.partial_interval_ms / 1000
        if interval_s <= 0 or self._user_turn is None or self._asr.busy:
            return
        if self._stream_s - self._partial_at_s < interval_s:
            return
        audio = self._endpointer.utterance_audio()
        if self._asr.covered(audio) is not None:
            return  # only silence since the last decode: nothing new to say
        turn_id = self._user_turn.record.turn_id
        self._partial_at_s = float("inf")  # until this one finishes
        self._partial_task = self._spawn(self._partial(turn_id, audio), "asr-partial")

    async def _partial(self, turn_id: int, audio: np.ndarray) -> None:
        failed = False
        try:
            text = await self._asr.partial(audio)
        except Exception as e:
            # Partials are a nicety: skip the rest of this turn's, the final transcript decides.
            log.warning("call %s turn %d: partial transcription failed (%s: %s); no more partials this turn", self.call_id, turn_id, type(e).__name__, e)
            failed = True
            return
        finally:
            # Also when a speculative decode replaced this queued partial (cancelled).
            if not failed and self._user_turn is not None and self._user_turn.record.turn_id == turn_id:
                self._partial_at_s = self._stream_s
        if text and self._user_turn is not None and self._user_turn.record.turn_id == turn_id:
            await self.outbox.put(TranscriptDelta(turn_id=turn_id, t=self._clock(), text=text))

    # --- speculative start ---------------------------------------------------------------------

    def _start_speculation(self, audio: np.ndarray) -> None:
        turn = self._user_turn
        if turn is None or not self.auto_reply or self._speculation is not None or (self._spec_task and not self._spec_task.done()):
            return
        window_s = (self.end_silence_ms - self.config.speculative_pause_ms) / 1000
        if self._asr.covered(audio) is None and self.services.asr_decode_s > window_s:
            # A decode would end after the endpoint: the LLM could not start sooner, and the
            # model would be busy when the final transcript needs it (a slow CPU).
            return
        self._spec_task = self._spawn(self._speculate(turn, audio), "speculate")

    async def _speculate(self, turn: _Turn, audio: np.ndarray) -> None:
        try:
            text = await self._asr.hypothesis(audio, AsrPriority.SPECULATIVE)
        except Exception as e:
            log.warning("call %s turn %d: speculative transcription failed (%s: %s)", self.call_id, turn.record.turn_id, type(e).__name__, e)
            return  # the final transcription decides
        self._speculate_on(turn, text)

    def _speculate_on(self, turn: _Turn, text: str) -> None:
        """Start the LLM on the transcript so far, its output held back, unless it already runs
        on these words; a speculation on other words (an earlier pause's) gives way."""
        if not self.config.speculative_start or not self.auto_reply or not text.strip() or self._user_turn is not turn:
            return  # nothing said, or the turn already ended: the final path starts the LLM
        old = self._speculation
        if old is not None:
            if old.turn_id == turn.record.turn_id and normalize_transcript(old.text) == normalize_transcript(text):
                return
            old.run.cancel()
        run = self._new_run(self._messages(text))
        self._speculation = _Speculation(turn.record.turn_id, text, run)
        log.debug("call %s turn %d: speculative start on %r", self.call_id, turn.record.turn_id, text)

    def _drop_speculation(self, why: str) -> None:
        if self._spec_task is not None and not self._spec_task.done():
            self._spec_task.cancel()
            self._asr.drop_queued()
        if self._speculation is not None:
            log.debug("call %s: speculative start dropped: %s", self.call_id, why)
            self._speculation.run.cancel()
            self._speculation = None

    # --- turns ---------------------------------------------------------------------------------

    async def _finalize_speech(self, turn: _Turn, audio: np.ndarray) -> None:
        spec_task = self._spec_task
        if spec_task is not None and not spec_task.done() and self._asr.running is AsrPriority.SPECULATIVE:
            # The model is busy with the speculative decode: the final waits for it anyway and
            # reuses it; let the speculation start its request first, so that it is judged.
            await asyncio.wait({spec_task})
        text = await self._transcribe_final(turn, audio)
        if text is None:
            if self._spec_task is not None and not self._spec_task.done():
                self._spec_task.cancel()
            if self._speculation is not None:
                self._speculation.run.cancel()
                self._speculation = None
            return
        turn.t_asr = self._clock()
        # A speculation still transcribing is moot now; a finished one is judged.
        if self._spec_task is not None and not self._spec_task.done():
            self._spec_task.cancel()
        spec, self._speculation = self._speculation, None
        turn.record.user_text = text
        await self.outbox.put(TranscriptFinal(turn_id=turn.record.turn_id, t=self._clock(), text=text))
        if not text.strip():
            if spec is not None:
                spec.run.cancel()
            self._finish(turn, "no_reply")
            return
        run = None
        if spec is not None and spec.turn_id == turn.record.turn_id:
            if normalize_transcript(spec.text) == normalize_transcript(text):
                turn.speculative = "hit"
                turn.speculative_saved_ms = (turn.t_asr - spec.run.t_start) * 1000
                run = spec.run
            else:
                turn.speculative = "miss"
                spec.run.cancel()
        elif spec is not None:
            spec.run.cancel()
        self._add_history(turn.record.turn_id, {"role": "user", "content": text})
        if not self.auto_reply:
            if run is not None:
                run.cancel()
            self._finish(turn, "no_reply")
            return
        if run is None:
            run = self._new_run(self._messages())
        await self._reply(turn, run)

    async def _transcribe_final(self, turn: _Turn, audio: np.ndarray, *, streamed: bool = True) -> str | None:
        """The turn's transcript (`streamed`: the utterance of the server VAD, whose partials and
        speculative decode may be reused); on an ASR failure, fail the turn (error event) and
        return None."""
        try:
            if streamed:
                return await self._asr.final(audio)
            return await self.services.transcribe(audio, priority=AsrPriority.FINAL, owner=self.call_id)
        except Exception as e:
            log.error("call %s turn %d: transcription failed: %s: %s", self.call_id, turn.record.turn_id, type(e).__name__, e)
            message = f"transcription failed: {type(e).__name__}: {e}"
            await self._error("asr_error", message)
            self._finish(turn, "failed", error=message, error_code="asr_error")
            return None

    async def _on_user_text(self, event: UserText) -> None:
        if not self._item_rate.allow():
            await self._over_rate(f"more than {self.config.max_items_per_minute} messages a minute (agent.max_items_per_minute)", event)
            return
        if self._reply_turn is not None:
            await self._interrupt("text")
        turn = self._new_turn("text")
        turn.t_speech_end = self._clock()
        turn.record.user_text = event.text
        self._add_history(turn.record.turn_id, {"role": "user", "content": event.text}, event.item_id)
        self._keep_record(turn.record)  # visible at once; finished when its reply is
        if event.respond:
            self._start_reply(turn)
        else:
            self._finish(turn, "no_reply")

    async def _on_item(self, event: AddItem) -> None:
        """A system or assistant message, a function call or result: into the history, no reply."""
        if not self._item_rate.allow():
            await self._over_rate(f"more than {self.config.max_items_per_minute} items a minute (agent.max_items_per_minute)", event)
            return
        self._add_history(0, event.message, event.item_id)

    def _delete_item(self, event: DeleteItem) -> None:
        """Remove the item from the history (the transport checked that it exists)."""
        for i, entry in enumerate(self.history):
            named = event.item_id is not None and entry.item_id == event.item_id
            by_turn = (event.item_id is None and entry.item_id is None and entry.turn_id == event.turn_id
                       and entry.message["role"] == event.role)
            if named or by_turn:
                del self.history[i]
                return

    async def _on_commit(self, event: CommitAudio) -> None:
        if self.server_vad and self._user_turn is not None:
            # Server VAD, but the client ends the turn now: what the endpointer holds is the turn.
            audio = self._endpointer.utterance_audio()
            self._endpointer.reset()
            if self._pause_endpointer is not None:
                self._pause_endpointer.reset()
            self._ep_origin_s = self._stream_s
            await self._on_speech_ended(self._stream_s, audio)
            return
        if not self._manual_audio:
            await self._error("input_audio_buffer_commit_empty", "the input audio buffer is empty", event)
            return
        if not self._item_rate.allow():  # a commit makes a conversation item
            await self._over_rate(f"more than {self.config.max_items_per_minute} items a minute (agent.max_items_per_minute)", event)
            return
        audio = np.concatenate(list(self._manual_audio))
        self._manual_audio.clear()
        self._manual_s = 0.0
        if self._reply_turn is not None:
            await self._interrupt("speech")
        turn = self._new_turn("speech")
        turn.speculative = "off"
        turn.t_speech_end = self._clock()
        self.outbox.put_nowait(SpeechStopped(turn_id=turn.record.turn_id, t=self._clock(), audio_end_ms=int(self._stream_s * 1000)))
        # Transcribed in a task, after the call's earlier commits: `handle` returns at once, so
        # the transport keeps reading (a hang-up is seen at once); see `_on_create_response`.
        self._commit_task = self._spawn(self._commit(turn, audio, event.respond, self._commit_task), f"commit-{turn.record.turn_id}")

    async def _commit(self, turn: _Turn, audio: np.ndarray, respond: bool, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait({previous})  # the call's items stay in the order of the commits
        text = await self._transcribe_final(turn, audio, streamed=False)
        if text is None:
            return
        turn.t_asr = self._clock()
        turn.record.user_text = text
        await self.outbox.put(TranscriptFinal(turn_id=turn.record.turn_id, t=self._clock(), text=text))
        if text.strip():
            self._add_history(turn.record.turn_id, {"role": "user", "content": text})
        if respond and text.strip():
            if self._reply_turn is not None:
                await self._interrupt("speech")
            self._start_reply(turn)
        else:
            self._finish(turn, "no_reply")

    async def _on_create_response(self, event: CreateResponse) -> None:
        """A reply to the conversation as it stands; with no user message yet, to the
        instructions alone (the agent speaks first: a greeting)."""
        if self._reply_turn is not None or self._response_waiting:
            await self._error("conversation_already_has_active_response", "a reply is already in progress", event)
            return
        if not self._response_rate.allow():
            await self._over_rate(f"more than {self.config.max_responses_per_minute} responses a minute (agent.max_responses_per_minute)", event)
            return
        commit = self._commit_task
        if commit is not None and not commit.done():
            # Committed audio is still being transcribed: the reply starts once it is in the history.
            self._response_waiting = True
            self._spawn(self._create_response_after(commit, event), "response-after-commit")
            return
        self._create_response(event.options)

    async def _create_response_after(self, commit: asyncio.Task[None], event: CreateResponse) -> None:
        try:
            await asyncio.wait({commit})
        finally:
            self._response_waiting = False
        if self._reply_turn is not None:  # e.g. the caller spoke meanwhile (server VAD)
            await self._error("conversation_already_has_active_response", "a reply is already in progress", event)
        else:
            self._create_response(event.options)

    def _create_response(self, options: ReplyOptions) -> None:
        turn = self._new_turn("response")
        turn.t_speech_end = self._clock()
        if options.audio_output is not None:
            turn.audio_output = options.audio_output
        self._start_reply(turn, options)

    def _start_reply(self, turn: _Turn, options: ReplyOptions | None = None) -> None:
        self._reply_turn = turn
        self.state = State.THINKING
        # turn.run is set now, not when the task starts: an interruption before then aborts it.
        run = turn.run = self._new_run(self._messages(instructions=options.instructions if options else None), options)
        turn.reply_task = self._spawn(self._reply(turn, run), f"turn-{turn.record.turn_id}")

    # --- the reply pipeline --------------------------------------------------------------------

    async def _reply(self, turn: _Turn, run: LlmRun) -> None:
        """LLM text -> sentences -> TTS -> outbox, with TTS overlapping generation."""
        turn.run = run
        turn.input_tokens = sum(self._cost(m) for m in run.messages)
        turn_id = turn.record.turn_id
        self._reply_turn = turn
        self.state = State.THINKING
        self._keep_record(turn.record)
        await self.outbox.put(ReplyStarted(turn_id=turn_id, t=self._clock(), audio_output=turn.audio_output))
        # Bounded; `put` waits, so no sentence is ever dropped.
        sentences: asyncio.Queue[str | None] = asyncio.Queue(maxsize=16)
        speaker = self._spawn(self._speak(turn, sentences), f"tts-{turn_id}") if turn.audio_output else None
        chunker = self.services.make_chunker()
        calls: list[ToolCall] = []
        try:
            async for delta in run.deltas():
                if delta.finished:
                    turn.llm_finish = delta.finish_reason
                if delta.steps is not None:
                    turn.steps, turn.tokens = delta.steps, delta.tokens
                elif delta.tokens is not None:
                    turn.tokens = delta.tokens
                if delta.tool_calls and run.options is not None and run.options.tools:
                    calls += delta.tool_calls  # (a backend's calls where none was offered are dropped)
                if delta.trace is not None and self.trace_steps:
                    trace = delta.trace
                    await self.outbox.put(
                        DenoiseStep(turn_id=turn_id, t=self._clock(), step=trace.step, block_start=trace.block_start, tokens=trace.slots)
                    )
                if not delta.text:
                    continue
                turn.record.reply_text += delta.text
                if speaker is None:
                    self.state = State.SPEAKING
                    await self.outbox.put(ReplyTextDelta(turn_id=turn_id, t=self._clock(), text=delta.text))
                else:
                    for sentence in chunker.push(delta.text):
                        turn.t_first_chunk = turn.t_first_chunk or self._clock()
                        await sentences.put(sentence)
            if speaker is not None:
                for sentence in chunker.flush():
                    turn.t_first_chunk = turn.t_first_chunk or self._clock()
                    await sentences.put(sentence)
                await sentences.put(None)
                await speaker
            for call in calls:  # after the reply's own words, before its end
                event = self._function_call(turn, call)
                await self.outbox.put(event)
                turn.calls.append(event)  # sent: now it is part of the reply (and of the history)
        except LlmError as e:
            await self._error("llm_error", str(e))
            self._finish(turn, "failed", error=str(e), error_code="llm_error")
            return
        finally:
            # Interrupted (cancelled) or failed: the speaker would wait on `sentences` until the
            # call ends, one stray task per barge-in.
            if speaker is not None and not speaker.done():
                speaker.cancel()
        if turn.tts_error is not None:
            await self._error("tts_error", turn.tts_error)
            self._finish(turn, "failed", error=turn.tts_error, error_code="tts_error")
            return
        turn.generation_done = True
        self._maybe_complete(turn)

    def _function_call(self, turn: _Turn, call: ToolCall) -> FunctionCall:
        call_id = call.call_id or f"call_{uuid.uuid4().hex[:16]}"
        return FunctionCall(turn_id=turn.record.turn_id, t=self._clock(), call_id=call_id, name=call.name, arguments=call.arguments)

    async def _speak(self, turn: _Turn, sentences: asyncio.Queue[str | None]) -> None:
        """Synthesize each sentence in order. On a TTS failure it stops the LLM, sets
        `turn.tts_error` and goes on draining `sentences`, so that the producer never blocks."""
        turn_id = turn.record.turn_id
        while (sentence := await sentences.get()) is not None:
            if turn.tts_error is not None:
                continue
            # The reply's first words are what the caller waits for: the rest of the reply sits
            # out the engine's steps while they are synthesized on the same cores (it has the
            # time they take to play).
            hold = turn.t_first_audio is None
            if hold:
                self.services.llm.hold_owner(self.call_id, True)
            try:
                samples, rate = await self.services.synthesize(sentence, speed=self.speed, owner=self.call_id)
            except Exception as e:
                log.error("call %s turn %d: speech synthesis failed: %s: %s", self.call_id, turn_id, type(e).__name__, e)
                turn.tts_error = f"speech synthesis failed: {type(e).__name__}: {e}"
                if turn.run is not None:
                    turn.run.cancel()
                continue
            finally:
                if hold:
                    self.services.llm.hold_owner(self.call_id, False)
            if turn.t_first_audio is None:
                turn.t_first_audio = self._clock()
            if len(samples) == 0:
                continue
            turn.chunks.append(Chunk(sentence, len(samples) / rate))
            if self.config.echo_gate_ratio > 0:
                self._add_far_end(turn, samples, rate)
            self.state = State.SPEAKING
            await self.outbox.put(
                ReplyAudio(
                    turn_id=turn_id,
                    t=self._clock(),
                    chunk_index=len(turn.chunks) - 1,
                    text=sentence,
                    samples=samples,
                    sample_rate_hz=rate,
                )
            )

    def _maybe_complete(self, turn: _Turn) -> None:
        """Finish the turn once generation is done and (for audio) every chunk has played."""
        if turn.finished or not turn.generation_done:
            return
        if turn.audio_output and not all(c.played for c in turn.chunks):
            return
        self._finish(turn, "completed")

    def playback_mark(self, turn_id: int, chunk_index: int) -> None:
        """The client played chunk `chunk_index` of turn `turn_id` to its end."""
        turn = self._reply_turn
        if turn is None or turn.record.turn_id != turn_id or turn_id in self.outbox.flushed_turns:
            return  # a mark of an interrupted or finished turn: what was heard is already decided
        for chunk in turn.chunks[: chunk_index + 1]:
            chunk.played = True
        self._maybe_complete(turn)

    def _on_truncate(self, event: PlaybackTruncate) -> None:
        """The client says how much of a reply it played; the history keeps that much."""
        record = next((r for r in self.records if r.turn_id == event.turn_id), None)
        if record is None:
            self.outbox.put_urgent(
                ErrorEvent(turn_id=event.turn_id, t=self._clock(), code="item_not_found", message="no such reply",
                           client_event_id=event.client_event_id)
            )
            return
        turn = self._reply_turn
        if turn is not None and turn.record is record:
            turn.truncated_ms = event.audio_end_ms
            self._interrupt_now(turn, "cancel")
            return
        # A turn already finished (typically: interrupted, then truncated by the client).
        chunks = self._chunks_by_turn.get(record.turn_id)
        if chunks:
            record.heard = self._heard_from(chunks, event.audio_end_ms)
            self._replace_history(record.turn_id, record.heard)
            if self._sink is not None:
                self._sink.turn_finished(self.call_id, record)

    @staticmethod
    def _heard_from(chunks: list[Chunk], audio_end_ms: int | None) -> str:
        if audio_end_ms is None:
            return " ".join(c.text for c in chunks if c.played)
        heard, t_ms = [], 0.0
        for chunk in chunks:
            d_ms = chunk.duration_s * 1000
            if t_ms + d_ms <= audio_end_ms:
                heard.append(chunk.text)
            else:
                part = heard_prefix(chunk.text, (audio_end_ms - t_ms) / d_ms if d_ms else 0.0)
                if part:
                    heard.append(part)
                break
            t_ms += d_ms
        return " ".join(heard)

    # --- interruption --------------------------------------------------------------------------

    async def _interrupt(self, reason: str) -> None:
        turn = self._reply_turn
        if turn is not None:
            self._interrupt_now(turn, reason)

    def _interrupt_now(self, turn: _Turn, reason: str) -> None:
        """Barge-in or cancel: abort the LLM, drop queued audio, flush the client, keep what was heard."""
        turn_id = turn.record.turn_id
        self._stop_reply(turn)
        self._echo_turn = None  # the client stops playing it: no more echo to expect
        dropped = self.outbox.drop_turn(turn_id)
        self.outbox.put_urgent(Flush(turn_id=turn_id, t=self._clock(), reason=reason))
        log.info("call %s turn %d: interrupted (%s), %d queued events dropped", self.call_id, turn_id, reason, dropped)
        self._finish(turn, "cancelled", reason=reason)

    def _stop_reply(self, turn: _Turn) -> None:
        if turn.run is not None:
            turn.run.cancel()
        if turn.reply_task is not None and turn.reply_task is not asyncio.current_task():
            turn.reply_task.cancel()

    # --- finishing a turn ----------------------------------------------------------------------

    def _finish(
        self, turn: _Turn, status: str, *, reason: str | None = None, error: str | None = None, error_code: str | None = None
    ) -> None:
        """Record the turn (history, store, metrics) and go back to listening. Synchronous, so
        that an interruption never leaves a turn half-recorded."""
        if turn.finished:
            return
        turn.finished = True
        record = turn.record
        record.status = status
        if status == "completed":
            record.heard = record.reply_text.strip() if not turn.audio_output else " ".join(c.text for c in turn.chunks)
        elif turn.audio_output:
            record.heard = self._heard_from(turn.chunks, turn.truncated_ms)
        else:
            record.heard = record.reply_text.strip()  # text on screen was all shown as it came
        self._chunks_by_turn[record.turn_id] = turn.chunks  # for a later truncate
        while len(self._chunks_by_turn) > MAX_TRUNCATABLE_TURNS:
            del self._chunks_by_turn[min(self._chunks_by_turn)]
        if status != "no_reply" and (record.heard or turn.calls):
            message: dict[str, Any] = {"role": "assistant", "content": record.heard or None}
            if turn.calls:
                message["tool_calls"] = [
                    {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in turn.calls
                ]
            self._add_history(record.turn_id, message)
        record.metrics = self._metrics(turn)
        if error_code is not None:
            record.metrics["error"] = error_code
        self._keep_record(record)
        if self._reply_turn is turn:
            self._reply_turn = None
            if self.state in (State.THINKING, State.SPEAKING):
                self.state = State.LISTENING
        t = self._clock()
        if status == "completed" and turn.llm_finish == "length":
            reason = "length"  # whole as generated, but cut at the token limit
        if status != "no_reply":
            self.outbox.put_nowait(
                ResponseDone(
                    turn_id=record.turn_id,
                    t=t,
                    status=status,
                    text=record.reply_text,
                    heard=record.heard,
                    audio_output=turn.audio_output,
                    reason=reason,
                    error=error,
                    usage=Usage(turn.input_tokens, turn.tokens or 0) if turn.input_tokens is not None else None,
                )
            )
            self.outbox.put_nowait(TurnMetrics(turn_id=record.turn_id, t=t, values=record.metrics))
        if self._sink is not None:
            self._sink.turn_finished(self.call_id, record)

    def _metrics(self, turn: _Turn) -> dict[str, Any]:
        t0 = turn.t_speech_end

        def ms(t: float | None) -> float | None:
            return None if t is None or t0 is None else round((t - t0) * 1000, 1)

        run = turn.run
        return {
            "asr_final_ms": ms(turn.t_asr),
            "llm_first_text_ms": ms(run.t_first_text if run else None),
            "tts_first_chunk_ms": ms(turn.t_first_chunk),
            "tts_first_audio_ms": ms(turn.t_first_audio),
            "voice_to_voice_ms": ms(turn.t_first_sent),
            "tokens": turn.tokens,
            "forward_passes": turn.steps,
            "tokens_per_forward": round(turn.tokens / turn.steps, 3) if turn.tokens and turn.steps else None,
            "llm_finish": turn.llm_finish,
            "end_of_turn": turn.ended_by,
            "end_of_turn_audio_p": _round(getattr(turn.end_verdict, "audio_p", None), 4),
            "end_of_turn_text_p": _round(getattr(turn.end_verdict, "text_p", None), 4),
            "end_of_turn_check_ms": _round(turn.end_check_ms, 1),
            "speculative": turn.speculative,
            "speculative_saved_ms": round(turn.speculative_saved_ms, 1) if turn.speculative_saved_ms else None,
            "interrupted": turn.record.status == "cancelled",
            "dropped_audio_s": round(self.dropped_audio_s, 3),
            "echo_gated_s": round(self.echo_gated_s, 3),
        }

    # --- memory --------------------------------------------------------------------------------

    def _add_history(self, turn_id: int, message: dict[str, Any], item_id: str | None = None) -> None:
        self.history.append(HistoryEntry(turn_id, message, item_id))
        if len(self.history) > self.config.max_items:
            del self.history[: len(self.history) - self.config.max_items]

    def _replace_history(self, turn_id: int, heard: str) -> None:
        """Set the text of the reply of `turn_id` to `heard` (adding or removing its message; a
        message that also holds function calls keeps them)."""
        for i, entry in enumerate(self.history):
            if entry.turn_id == turn_id and entry.item_id is None and entry.message["role"] == "assistant":
                if heard or entry.message.get("tool_calls"):
                    entry.message = {**entry.message, "content": heard or None}
                else:
                    del self.history[i]
                return
        if heard:
            after = max((i for i, e in enumerate(self.history) if e.turn_id == turn_id), default=len(self.history) - 1)
            self.history.insert(after + 1, HistoryEntry(turn_id, {"role": "assistant", "content": heard}))

    def _cost(self, message: dict[str, Any]) -> int:
        """A message's tokens as the LLM counts them, its calls included."""
        text = message.get("content") or ""
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"])
        count = self._counted if len(text) <= MAX_COUNTED_CHARS else self.services.llm.count_tokens
        return count(text) + MESSAGE_OVERHEAD_TOKENS

    def _messages(self, pending_user_text: str | None = None, instructions: str | None = None) -> list[dict[str, Any]]:
        """System prompt (the session's, or this reply's `instructions`) + the newest history that
        fits `history_tokens` (+ a pending user turn). Where older messages were left out, the
        window starts at a user or system message (not at an answer whose question is gone), and
        never at a function's result (whose call is gone)."""
        tail = [e.message for e in self.history]
        if pending_user_text is not None:
            tail.append({"role": "user", "content": pending_user_text})
        budget = self.config.history_tokens
        kept: list[dict[str, Any]] = []
        for message in reversed(tail):
            cost = self._cost(message)
            if cost > budget:
                if not kept and isinstance(message.get("content"), str):  # the newest alone is over the budget: its end
                    kept.append({**message, "content": self._tail_within(message["content"], budget - MESSAGE_OVERHEAD_TOKENS)})
                break
            kept.append(message)
            budget -= cost
        kept.reverse()
        cut = len(kept) < len(tail)
        while len(kept) > 1 and (kept[0]["role"] == "tool" or (cut and kept[0]["role"] not in ("user", "system"))):
            kept.pop(0)
        return [{"role": "system", "content": self.instructions if instructions is None else instructions}, *_paired_calls(kept)]

    def _tail_within(self, text: str, tokens: int) -> str:
        """The longest end of `text` that counts at most `tokens` (binary search on its start)."""
        count = self.services.llm.count_tokens
        lo, hi = 0, len(text)  # text[hi:] fits (empty); find the smallest start that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if count(text[mid:]) <= tokens:
                hi = mid
            else:
                lo = mid + 1
        return text[hi:]

    # --- helpers -------------------------------------------------------------------------------

    def _llm_options(self, options: ReplyOptions | None) -> LlmOptions:
        """The LLM request's options: the reply's, else the session's."""
        options = options or ReplyOptions()
        tools = self.tools if options.tools is None else options.tools
        choice = self.tool_choice if options.tool_choice is None else options.tool_choice
        limit = options.max_output_tokens if options.max_output_tokens is not None else self.max_output_tokens
        return LlmOptions(max_tokens=limit, tools=tools or None, tool_choice=choice if tools else None)

    def _new_run(self, messages: list[dict[str, Any]], options: ReplyOptions | None = None) -> LlmRun:
        """Start an LLM request for this call; the session keeps it until it ends (see close)."""
        run = LlmRun(self.services.llm, messages, trace_steps=self.trace_steps, clock=self._clock, owner=self.call_id,
                     options=self._llm_options(options))
        self._runs.add(run)
        run.task.add_done_callback(lambda _: self._runs.discard(run))
        return run

    def _keep_record(self, record: TurnRecord) -> None:
        if not any(r is record for r in self.records):
            self.records.append(record)

    async def _over_rate(self, message: str, cause: Event) -> None:
        """Refuse `cause` for a per-call rate limit (error `rate_limit_exceeded`); the fair share
        puts the call in the background for a while."""
        self.services.share.over_limit(self.call_id)
        await self._error("rate_limit_exceeded", message, cause)

    async def _error(self, code: str, message: str, cause: Event | None = None) -> None:
        """An error event; `cause`: the input it answers (its client event id is echoed)."""
        self.outbox.put_urgent(ErrorEvent(t=self._clock(), code=code, message=message,
                                          client_event_id=cause.client_event_id if cause else None))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            release_cancelled(task)
        elif task.exception() is not None:
            log.error("call %s: task %s failed", self.call_id, task.get_name(), exc_info=task.exception())

