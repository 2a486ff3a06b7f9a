"""Typed events between the transports and the per-call session.

Contract:
- Every event carries `turn_id` (0 before the first turn; a turn is one user utterance or text
  message and the reply to it) and `t`, a monotonic timestamp in seconds from the session's clock.
- `Input*` events flow from a transport's framing into the session; the others flow from the
  session to the transport. The core dispatches on the class, never on strings.
- Each class's docstring says what happens to it on an interruption (barge-in): *dropped* means
  the outbox discards it when the session flushes the turn; *kept* means it is delivered anyway.
- Audio is float32 mono in [-1, 1] with its rate in the event (`sample_rate_hz`).
- `client_event_id`: on an input, the id of the client's message that carried it (Realtime's
  `event_id`); an `ErrorEvent` the session raises while applying that input echoes it.
- Conversation items (Realtime): messages and function calls enter the session's history under
  the client's item id where the client named it (`item_id`); items the server makes (spoken user
  turns, replies) are named by the transport from their turn ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AddItem",
    "AudioIn",
    "AudioSent",
    "CallEnded",
    "CallStarted",
    "CancelResponse",
    "ClearAudio",
    "CommitAudio",
    "ConfigureSession",
    "CreateResponse",
    "DeleteItem",
    "DenoiseStep",
    "Dtmf",
    "ErrorEvent",
    "Flush",
    "FunctionCall",
    "InputEvent",
    "OutputEvent",
    "PlaybackMark",
    "PlaybackTruncate",
    "ReplyAudio",
    "ReplyOptions",
    "ReplyStarted",
    "ReplyTextDelta",
    "ResponseDone",
    "SpeechStarted",
    "SpeechStopped",
    "TranscriptDelta",
    "TranscriptFinal",
    "TurnMetrics",
    "Usage",
    "UserText",
    "VadSettings",
]


@dataclass(kw_only=True)
class Event:
    turn_id: int = 0
    t: float = 0.0  # monotonic seconds from the session's clock; 0.0 where the framing cannot know
    client_event_id: str | None = None  # the client message it came from / an error answers


# Inputs: transport framing -> session ---------------------------------------------------------


@dataclass(kw_only=True)
class AudioIn(Event):
    """Caller audio. Never interrupted; under overload the session drops the *oldest* audio."""

    samples: np.ndarray  # float32 mono
    sample_rate_hz: int


@dataclass(kw_only=True)
class CommitAudio(Event):
    """The client ends the user's turn by hand (no server VAD): transcribe what was appended."""

    respond: bool = False  # also start a reply (False for Realtime: the client sends response.create)


@dataclass(kw_only=True)
class ClearAudio(Event):
    """Discard caller audio not yet committed."""


@dataclass(kw_only=True)
class UserText(Event):
    """A typed user message; interrupts a reply in progress like speech does."""

    text: str
    respond: bool = True
    item_id: str | None = None


@dataclass(kw_only=True)
class AddItem(Event):
    """A conversation item the client adds that is no user turn: a system or assistant message
    (context, a scripted line), a function call, or a function's result (`{"role": "tool",
    "tool_call_id", "content"}`). `message` is in Chat Completions form. It enters the history
    the LLM sees; it interrupts nothing and asks for no reply (the client sends `CreateResponse`)."""

    message: dict[str, Any]
    item_id: str | None = None


@dataclass(kw_only=True)
class DeleteItem(Event):
    """Remove a conversation item from the history: one the client named (`item_id`), or the
    message of `role` ("user" | "assistant") of turn `turn_id`."""

    item_id: str | None = None
    role: str | None = None


@dataclass
class ReplyOptions:
    """How one reply is made; None: the session's setting. Tools are in Chat Completions form
    (`{"type": "function", "function": {"name", "description", "parameters"}}`)."""

    instructions: str | None = None
    audio_output: bool | None = None
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}


@dataclass(kw_only=True)
class CreateResponse(Event):
    """Start a reply to the conversation as it stands (with only the instructions, the model
    speaks first: a greeting)."""

    options: ReplyOptions = field(default_factory=ReplyOptions)


@dataclass(kw_only=True)
class CancelResponse(Event):
    """Stop the reply in progress (LLM, queued TTS) and flush the client's playback."""


@dataclass(kw_only=True)
class PlaybackMark(Event):
    """The client has played reply chunk `chunk_index` of turn `turn_id` to its end."""

    chunk_index: int


@dataclass(kw_only=True)
class PlaybackTruncate(Event):
    """The client played only the first `audio_end_ms` of the reply of turn `turn_id`."""

    audio_end_ms: int


@dataclass
class VadSettings:
    """The client's turn detection; None: the server's configuration."""

    silence_duration_ms: int | None = None  # silence that ends a turn
    threshold: float | None = None  # speech probability in [0, 1]
    prefix_padding_ms: int | None = None  # audio kept before the detected start of speech
    eagerness: str | None = None  # semantic VAD: "low" | "medium" | "high" | "auto"
    create_response: bool | None = None  # False: a spoken turn gets no reply until the client asks


@dataclass(kw_only=True)
class ConfigureSession(Event):
    """Session settings from the client; None leaves a setting unchanged."""

    instructions: str | None = None
    input_rate_hz: int | None = None
    output_rate_hz: int | None = None
    server_vad: bool | None = None  # False: the client commits turns itself
    audio_output: bool | None = None  # False: text-only replies (no TTS)
    trace_steps: bool | None = None  # vendor extension: voice_agent.denoise_step events
    vad: VadSettings | None = None  # replaces the whole turn detection where given
    max_output_tokens: int | None = None  # 0: back to the server's limit
    speed: float | None = None  # speech rate of the replies (1.0: normal)
    tools: list[dict[str, Any]] | None = None  # [] removes them (Chat Completions form)
    tool_choice: str | dict[str, Any] | None = None


@dataclass(kw_only=True)
class Dtmf(Event):
    """A key pressed on a phone keypad. Logged and stored with the call; not an interruption."""

    digit: str


@dataclass(kw_only=True)
class CallStarted(Event):
    """The call's metadata (Twilio `start`); kept."""

    call_sid: str = ""
    stream_sid: str = ""
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class CallEnded(Event):
    """The caller hung up (Twilio `stop`); the session finishes and stores the call."""


InputEvent = (
    AudioIn
    | CommitAudio
    | ClearAudio
    | UserText
    | AddItem
    | DeleteItem
    | CreateResponse
    | CancelResponse
    | PlaybackMark
    | PlaybackTruncate
    | ConfigureSession
    | Dtmf
    | CallStarted
    | CallEnded
)


# Outputs: session -> transport ----------------------------------------------------------------


@dataclass(kw_only=True)
class SpeechStarted(Event):
    """The VAD heard the caller start speaking. Kept, and urgent: it jumps the outbox queue."""

    audio_start_ms: int  # position in the caller's audio stream


@dataclass(kw_only=True)
class SpeechStopped(Event):
    """The endpointer decided the caller's turn has ended. Kept."""

    audio_end_ms: int


@dataclass(kw_only=True)
class TranscriptDelta(Event):
    """A partial transcript of the utterance in progress (the whole hypothesis so far). Kept."""

    text: str


@dataclass(kw_only=True)
class TranscriptFinal(Event):
    """The final transcript of the user's spoken turn. Kept."""

    text: str
    audio_s: float = 0.0  # duration of the utterance


@dataclass(kw_only=True)
class ReplyStarted(Event):
    """A reply for turn `turn_id` begins. Kept."""

    audio_output: bool


@dataclass(kw_only=True)
class ReplyTextDelta(Event):
    """New reply text from the LLM (text-only sessions), dropped on interruption."""

    text: str


@dataclass(kw_only=True)
class ReplyAudio(Event):
    """One synthesized reply chunk (one sentence) and its text. Dropped on interruption.

    The transport sends `text` as transcript and `samples` as audio, then marks the end of the
    chunk so that the client's playback position comes back as `PlaybackMark(chunk_index)`.
    """

    chunk_index: int
    text: str
    samples: np.ndarray  # float32 mono
    sample_rate_hz: int


@dataclass(kw_only=True)
class DenoiseStep(Event):
    """A snapshot of the block being denoised (vendor extension, opt-in). Dropped on interruption."""

    step: int
    block_start: int  # absolute position of the block's first slot: a new value starts a new block
    tokens: list[str]  # the block's slots; masked slots hold `mask`
    mask: str = "<mask>"


@dataclass(kw_only=True)
class Flush(Event):
    """Barge-in or cancel: the client must drop the reply audio it holds. Urgent; kept.

    The outbox discards the turn's queued droppable events before delivering it.
    """

    reason: str  # "speech" | "text" | "cancel"


@dataclass(kw_only=True)
class FunctionCall(Event):
    """The model calls a function the client declared; after the reply's text, before its
    `ResponseDone`. Kept. `arguments` is a JSON object's text."""

    call_id: str
    name: str
    arguments: str


@dataclass
class Usage:
    """Tokens of one reply: the prompt the LLM read and what it generated."""

    input_tokens: int
    output_tokens: int


@dataclass(kw_only=True)
class ResponseDone(Event):
    """The reply of turn `turn_id` ended. Kept.

    `status`: "completed", "cancelled" (barge-in or cancel) or "failed" (`error` says why).
    `text` is what was generated; `heard` what the caller heard (what goes into the history).
    `reason` of a completed reply: "length" where it stopped at its token limit.
    """

    status: str
    text: str
    heard: str
    audio_output: bool
    reason: str | None = None  # for "cancelled": "speech" | "text" | "cancel" | "hangup"
    error: str | None = None
    usage: Usage | None = None


@dataclass(kw_only=True)
class TurnMetrics(Event):
    """Latencies of one turn, in milliseconds from the end of the user's speech. Kept.

    None where a stage did not happen (typed text has no transcript stage, a cancelled reply may
    have no audio). `speculative` is "hit", "miss" or "off".
    """

    values: dict[str, Any]


@dataclass(kw_only=True)
class ErrorEvent(Event):
    """Something the client did wrong or a failure it should know of; the call goes on. Kept."""

    code: str
    message: str


OutputEvent = (
    SpeechStarted
    | SpeechStopped
    | TranscriptDelta
    | TranscriptFinal
    | ReplyStarted
    | ReplyTextDelta
    | ReplyAudio
    | DenoiseStep
    | Flush
    | FunctionCall
    | ResponseDone
    | TurnMetrics
    | ErrorEvent
)


@dataclass(kw_only=True)
class AudioSent(Event):
    """Writer -> session: the first byte of the reply audio of `turn_id` went out on the wire."""


DROPPED_ON_INTERRUPT: tuple[type, ...] = (ReplyTextDelta, ReplyAudio, DenoiseStep)
URGENT: tuple[type, ...] = (SpeechStarted, Flush)
