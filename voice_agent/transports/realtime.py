"""`/v1/realtime`: the OpenAI Realtime API (GA event names, `openai.types.realtime`): every client
event of the GA API, what a text-and-speech server cannot do refused as OpenAI refuses it.

Contract (docs/protocol.md has the full list and example exchanges):
- `RealtimeProtocol.start()` returns the `session.created` message.
- `feed(message)` takes one WebSocket message and returns the input events it carries. Anything
  wrong with a message (not JSON, not an object, unknown `type`, a field of the wrong type, an
  oversized message, bad base64, an unknown item, instructions (in the LLM's tokens) or a message
  text over its limit: `string_above_max_length`; a bug while reading it: `server_error`) queues
  an `error` event for `take_outgoing()` and the call continues. Acknowledgements (`session.updated`, `input_audio_buffer.cleared`,
  `conversation.item.added` for typed text, `conversation.item.truncated`,
  `conversation.item.retrieved`, `conversation.item.deleted`) are queued the same way. Every input
  event carries the client's `event_id` (`client_event_id`), and so does every error about it.
- Conversation items: the framing remembers the newest `MAX_REMEMBERED_ITEMS` items as the client
  sees them (its own, spoken turns with their transcripts, replies, function calls) for
  `conversation.item.retrieve` and `.delete`. Messages of any role, `function_call` and
  `function_call_output` items can be created; an `input_image` part is kept in the item but the
  LLM (which cannot see) reads a note in its place.
- A response's output items open when they have something: the assistant message at its first
  text or audio (or at the end, empty, where the reply said nothing and called nothing), each
  function call as a `function_call` item with `response.function_call_arguments.delta/.done`.
  `response.done` carries `usage` (input, output and total tokens).
- `encode(event)` turns one session output event into messages. Audio deltas carry about
  `delta_ms` of audio each. The vendor events `voice_agent.metrics` (on unless the client turns it
  off) and `voice_agent.denoise_step` (off unless asked) are only sent where enabled with
  `session.update` `{"session": {"voice_agent": {"metrics": bool, "denoise_steps": bool}}}`.
- The session object (`session.created`, `session.updated`) validates as the openai SDK's models:
  a PCM rate other than 24 kHz is left out of the format and stated in `voice_agent.input_rate_hz`
  / `output_rate_hz` (see docs/protocol.md, "Sample rates").
- Client playback is acknowledged with `conversation.item.truncate`; without it the server
  assumes the audio it paced out was heard (`OutMessage.played_chunk`).
"""

from __future__ import annotations

import binascii
import collections
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audio.codecs import (
    alaw_decode,
    alaw_encode,
    b64decode,
    b64encode,
    float32_to_pcm16,
    mulaw_decode,
    mulaw_encode,
    pcm16_to_float32,
)
from audio.errors import AudioError
from audio.resample import resample
from voice_agent.events import (
    AddItem,
    AudioIn,
    CancelResponse,
    ClearAudio,
    CommitAudio,
    ConfigureSession,
    CreateResponse,
    DeleteItem,
    DenoiseStep,
    ErrorEvent,
    Event,
    Flush,
    FunctionCall,
    InputEvent,
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
from voice_agent.llm import estimate_tokens
from voice_agent.tools import ToolSpecError, chat_tool, chat_tool_choice, parse_tool_choice, parse_tools
from voice_agent.transports import OutMessage

__all__ = ["SUPPORTED_CLIENT_EVENTS", "RealtimeProtocol"]

SUPPORTED_CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.delete",
    "conversation.item.truncate",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)

log = logging.getLogger(__name__)

# Rates accepted for "audio/pcm" (the OpenAI service takes 24 kHz only; we take these).
PCM_RATES_HZ = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
STANDARD_PCM_RATE_HZ = 24000  # the only PCM rate of the OpenAI Realtime API
# Error codes that are the server's fault, not the client's.
_SERVER_ERRORS = ("llm_error", "asr_error", "tts_error", "audio_error", "server_error")
# Responses remembered for `conversation.item.truncate` (older items get `item_not_found`).
MAX_REMEMBERED_RESPONSES = 64
# Items remembered for `conversation.item.retrieve` / `.delete` (older ones are gone).
MAX_REMEMBERED_ITEMS = 256
SPEED_RANGE = (0.25, 1.5)  # audio.output.speed, as OpenAI bounds it
EAGERNESS = ("low", "medium", "high", "auto")
# What the LLM reads in place of an image (it cannot see).
IMAGE_NOTE = "[The user sent an image here. You cannot see images: say so if it matters.]"
_BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


class _BadEvent(Exception):
    """A client event that cannot be applied; becomes an `error` event."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass
class AudioFormat:
    type: str = "audio/pcm"  # "audio/pcm" (PCM16 LE) | "audio/pcmu" (µ-law) | "audio/pcma" (A-law)
    rate_hz: int = 24000

    def to_json(self) -> dict[str, Any]:
        """The format as the GA API writes it. The API knows PCM at 24 kHz only, and the openai
        SDK's models reject any other `rate`: another rate is left out here (it is optional) and
        reported in the session's vendor field `voice_agent.input_rate_hz` / `output_rate_hz`."""
        if self.type != "audio/pcm":
            return {"type": self.type}
        return {"type": self.type, "rate": self.rate_hz} if self.rate_hz == STANDARD_PCM_RATE_HZ else {"type": self.type}


@dataclass
class _Response:
    response_id: str
    item_id: str
    audio_output: bool
    audio_s: float = 0.0
    message_open: bool = False  # the assistant message item was announced
    outputs: list[str] = field(default_factory=list)  # item ids in output order
    calls: list[dict[str, Any]] = field(default_factory=list)  # its function_call items, done


@dataclass
class RealtimeSettings:
    instructions: str
    model: str = "voice-agent"
    voice: str = "default"
    input_format: AudioFormat = field(default_factory=AudioFormat)
    output_format: AudioFormat = field(default_factory=AudioFormat)
    server_vad: bool = True
    audio_output: bool = True
    metrics: bool = True
    denoise_steps: bool = False
    # The models in use by role ("asr", "llm", "tts"), shown by clients such as the web demo.
    models: dict[str, str] = field(default_factory=dict)
    # The client's turn detection as it sent it (type, threshold, ...), echoed in the session.
    turn_detection: dict[str, Any] = field(default_factory=lambda: {"type": "server_vad"})
    max_output_tokens: int | str = "inf"
    speed: float = 1.0
    tools: list[dict[str, Any]] = field(default_factory=list)  # Realtime form
    tool_choice: str | dict[str, Any] = "auto"
    transcription: dict[str, Any] = field(default_factory=lambda: {"model": "whisper"})


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], param: str, *, required: bool = False) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise _BadEvent(f"missing required parameter {param!r}", code="missing_required_parameter", param=param)
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _BadEvent(f"{param} must be {names}, got {type(value).__name__}", code="invalid_type", param=param)
    return value


def _parse_turn_detection(td: Any, param: str) -> tuple[bool, VadSettings | None, dict[str, Any] | None]:
    """(server VAD on, its settings, the object echoed in the session). `null` or `false` (as
    Pipecat sends it) turns it off: the client commits turns."""
    if td is None or td is False:
        return False, None, None
    if td is True:
        td = {}
    if not isinstance(td, dict):
        raise _BadEvent("turn_detection must be null or an object", code="invalid_type", param=param)
    type_ = _get(td, "type", str, f"{param}.type") or "server_vad"
    if type_ not in ("server_vad", "semantic_vad"):
        raise _BadEvent(f"turn_detection.type must be 'server_vad' or 'semantic_vad', not {type_!r}", param=f"{param}.type")
    threshold = _get(td, "threshold", (int, float), f"{param}.threshold")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise _BadEvent("threshold must lie in [0, 1]", param=f"{param}.threshold")
    prefix = _get(td, "prefix_padding_ms", int, f"{param}.prefix_padding_ms")
    if prefix is not None and not 0 <= prefix <= 5000:
        raise _BadEvent("prefix_padding_ms must lie in [0, 5000]", param=f"{param}.prefix_padding_ms")
    silence = _get(td, "silence_duration_ms", int, f"{param}.silence_duration_ms")
    if silence is not None and not 0 <= silence <= 10_000:
        raise _BadEvent("silence_duration_ms must lie in [0, 10000]", param=f"{param}.silence_duration_ms")
    eagerness = _get(td, "eagerness", str, f"{param}.eagerness")
    if eagerness is not None and eagerness not in EAGERNESS:
        raise _BadEvent(f"eagerness must be one of {list(EAGERNESS)}", param=f"{param}.eagerness")
    create_response = _get(td, "create_response", bool, f"{param}.create_response")
    interrupt_response = _get(td, "interrupt_response", bool, f"{param}.interrupt_response")
    _get(td, "idle_timeout_ms", int, f"{param}.idle_timeout_ms")  # accepted, ignored (docs/protocol.md)
    if type_ == "semantic_vad":
        vad = VadSettings(eagerness=eagerness or "auto", create_response=create_response)
        echo: dict[str, Any] = {"type": type_, "eagerness": eagerness or "auto"}
    else:
        vad = VadSettings(silence_duration_ms=silence, threshold=threshold, prefix_padding_ms=prefix,
                          create_response=create_response)
        echo = {"type": type_}
        echo.update({k: v for k, v in (("threshold", threshold), ("prefix_padding_ms", prefix),
                                       ("silence_duration_ms", silence)) if v is not None})
    for key, value in (("create_response", create_response), ("interrupt_response", interrupt_response)):
        if value is not None:
            echo[key] = value
    return True, vad, echo


def _parse_max_output_tokens(obj: dict[str, Any], param: str) -> int | str | None:
    value = obj.get("max_output_tokens", obj.get("max_response_output_tokens"))  # GA / beta name
    if value is None or value == "inf":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
        raise _BadEvent("max_output_tokens must be an integer in [1, 4096] or 'inf'", param=param)
    return value


def _parse_tools(tools: Any, param: str) -> list[dict[str, Any]]:
    """Function tools in Realtime form (`{"type": "function", "name", "description",
    "parameters"}`; the Chat Completions form with a nested `function` is taken too)."""
    try:
        return [{"type": "function", **spec} for spec in parse_tools(tools, param)]
    except ToolSpecError as e:
        raise _BadEvent(str(e), param=e.param) from None


def _parse_tool_choice(choice: Any, tools: list[dict[str, Any]], param: str) -> str | dict[str, Any] | None:
    try:
        parsed = parse_tool_choice(choice, tools, param)
    except ToolSpecError as e:
        raise _BadEvent(str(e), param=e.param) from None
    return {"type": "function", "name": parsed["name"]} if isinstance(parsed, dict) else parsed


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Realtime function tool -> its Chat Completions form (what LLM clients take)."""
    return chat_tool({k: tool[k] for k in ("name", "description", "parameters")})


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    return chat_tool_choice({"name": choice["name"]} if isinstance(choice, dict) else choice)


class RealtimeProtocol:
    """Framing of one `/v1/realtime` connection (see the module docstring)."""

    def __init__(
        self,
        *,
        instructions: str,
        model: str = "voice-agent",
        models: dict[str, str] | None = None,
        sample_rate_hz: int = 24000,
        # Limits
        max_message_bytes: int = 1_048_576,
        max_instructions_tokens: int = 1024,
        max_item_chars: int = 4000,
        delta_ms: int = 100,
        count_tokens: Callable[[str], int] = estimate_tokens,
    ) -> None:
        """`count_tokens`: the LLM's token count, for `max_instructions_tokens`."""
        self.settings = RealtimeSettings(
            instructions=instructions,
            model=model,
            models=dict(models or {}),
            input_format=AudioFormat("audio/pcm", sample_rate_hz),
            output_format=AudioFormat("audio/pcm", sample_rate_hz),
        )
        self.session_id = "sess_" + uuid.uuid4().hex[:20]
        self._prefix = uuid.uuid4().hex[:8]
        self._max_message_bytes = max_message_bytes
        self._max_instructions_tokens = max_instructions_tokens
        self._count_tokens = count_tokens
        self._max_item_chars = max_item_chars
        self._delta_ms = delta_ms
        self._outgoing: list[str] = []
        self._event_counter = 0
        self._responses: dict[int, _Response] = {}
        self._assistant_items: dict[str, int] = {}  # item id -> turn id (for truncate)
        self._transcripts: dict[int, str] = {}  # partial transcript text already sent, per turn
        self._last_item_id: str | None = None
        self._current_event_id: str | None = None
        self._items: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._turn_items: dict[str, tuple[int, str]] = {}  # item id -> (turn id, role), server-made items

    # --- ids -----------------------------------------------------------------------------------

    def _event_id(self) -> str:
        self._event_counter += 1
        return f"event_{self._prefix}{self._event_counter:06d}"

    def _user_item(self, turn_id: int) -> str:
        return f"item_{self._prefix}_{turn_id:04d}_user"

    def _message(self, type_: str, **fields: Any) -> str:
        return json.dumps({"type": type_, "event_id": self._event_id(), **fields}, separators=(",", ":"))

    def _queue(self, type_: str, **fields: Any) -> None:
        self._outgoing.append(self._message(type_, **fields))

    def take_outgoing(self) -> list[str]:
        """Messages the framing answers by itself (errors, acknowledgements), oldest first."""
        out, self._outgoing = self._outgoing, []
        return out

    def _error(self, message: str, *, code: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        error: dict[str, Any] = {"type": kind, "code": code, "message": message, "param": param}
        error["event_id"] = self._current_event_id
        self._queue("error", error=error)

    # --- session -------------------------------------------------------------------------------

    def session_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": s.model,
            "instructions": s.instructions,
            "output_modalities": ["audio"] if s.audio_output else ["text"],
            "audio": {
                "input": {
                    "format": s.input_format.to_json(),
                    "transcription": s.transcription,
                    "turn_detection": dict(s.turn_detection) if s.server_vad else None,
                },
                "output": {"format": s.output_format.to_json(), "voice": s.voice, "speed": s.speed},
            },
            "tools": s.tools,
            "tool_choice": s.tool_choice,
            "max_output_tokens": s.max_output_tokens,
            "voice_agent": {
                "metrics": s.metrics,
                "denoise_steps": s.denoise_steps,
                "input_rate_hz": s.input_format.rate_hz,
                "output_rate_hz": s.output_format.rate_hz,
                "models": s.models,
            },
        }

    def start(self) -> list[str]:
        return [self._message("session.created", session=self.session_json())]

    # --- client -> server ----------------------------------------------------------------------

    def feed(self, message: str | bytes) -> list[InputEvent]:
        """One client message -> the input events it carries (errors go to take_outgoing())."""
        self._current_event_id = None
        if isinstance(message, bytes):
            self._error("binary messages are not part of this protocol; send JSON text", code="invalid_message")
            return []
        if len(message) > self._max_message_bytes:
            self._error(f"message of {len(message)} bytes exceeds the limit of {self._max_message_bytes}", code="message_too_large")
            return []
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            self._error("the message is not valid JSON", code="invalid_json")
            return []
        if not isinstance(event, dict):
            self._error("an event must be a JSON object", code="invalid_event")
            return []
        event_id = event.get("event_id")
        self._current_event_id = event_id if isinstance(event_id, str) else None
        type_ = event.get("type")
        if not isinstance(type_, str):
            self._error("the event has no string 'type'", code="invalid_event", param="type")
            return []
        handler = _HANDLERS.get(type_)
        if handler is None:
            self._error(f"unknown or unsupported event type {type_!r}", code="unknown_event_type", param="type")
            return []
        try:
            events = handler(self, event)
        except _BadEvent as e:
            self._error(str(e), code=e.code, param=e.param)
            return []
        except Exception as e:  # a bug in reading one message must not end the call
            log.exception("realtime: failed to read a %s event", type_)
            self._error(f"{type(e).__name__}: {e}", code="server_error", kind="server_error")
            return []
        for input_event in events:
            input_event.client_event_id = self._current_event_id
        return events

    def _parse_format(self, value: Any, param: str) -> AudioFormat:
        if isinstance(value, str):  # beta API: "pcm16", "g711_ulaw", "g711_alaw"
            if value not in _BETA_FORMATS:
                raise _BadEvent(f"unsupported audio format {value!r}", param=param)
            type_ = _BETA_FORMATS[value]
            return AudioFormat(type_, 24000 if type_ == "audio/pcm" else 8000)
        if not isinstance(value, dict):
            raise _BadEvent(f"{param} must be an object", code="invalid_type", param=param)
        type_ = _get(value, "type", str, f"{param}.type") or "audio/pcm"
        if type_ in ("audio/pcmu", "audio/pcma"):
            return AudioFormat(type_, 8000)
        if type_ != "audio/pcm":
            raise _BadEvent(f"unsupported audio format {type_!r}", param=f"{param}.type")
        rate = _get(value, "rate", int, f"{param}.rate") or 24000
        if rate not in PCM_RATES_HZ:
            raise _BadEvent(f"unsupported rate {rate}; supported: {list(PCM_RATES_HZ)}", param=f"{param}.rate")
        return AudioFormat("audio/pcm", rate)

    def _instructions(self, holder: dict[str, Any], param: str) -> str | None:
        """`holder`'s instructions, refused (string_above_max_length) beyond max_instructions_tokens
        of the LLM's tokens: a session's and a single response's alike."""
        instructions = _get(holder, "instructions", str, param)
        if instructions is not None and len(instructions) > self._max_instructions_tokens:  # else it fits: a token has a character
            # Counting costs time on the event loop: far too long is refused uncounted.
            tokens = None if len(instructions) > 8 * self._max_instructions_tokens else self._count_tokens(instructions)
            if tokens is None or tokens > self._max_instructions_tokens:
                raise _BadEvent(f"instructions of {tokens or 'far more than'} tokens exceed the limit of {self._max_instructions_tokens}",
                                code="string_above_max_length", param=param)
        return instructions

    def _on_session_update(self, event: dict[str, Any]) -> list[InputEvent]:
        session = _get(event, "session", dict, "session", required=True)
        s = self.settings
        # Validate everything before changing anything.
        instructions = self._instructions(session, "session.instructions")
        modalities = _get(session, "output_modalities", list, "session.output_modalities")
        if modalities is None:
            modalities = _get(session, "modalities", list, "session.modalities")  # beta name
        audio = _get(session, "audio", dict, "session.audio") or {}
        audio_in = _get(audio, "input", dict, "session.audio.input") or {}
        audio_out = _get(audio, "output", dict, "session.audio.output") or {}
        in_format = out_format = None
        if "format" in audio_in:
            in_format = self._parse_format(audio_in["format"], "session.audio.input.format")
        elif "input_audio_format" in session:
            in_format = self._parse_format(session["input_audio_format"], "session.input_audio_format")
        if "format" in audio_out:
            out_format = self._parse_format(audio_out["format"], "session.audio.output.format")
        elif "output_audio_format" in session:
            out_format = self._parse_format(session["output_audio_format"], "session.output_audio_format")
        server_vad = vad = turn_detection = None
        for container, key, param in (
            (audio_in, "turn_detection", "session.audio.input.turn_detection"),
            (session, "turn_detection", "session.turn_detection"),
        ):
            if key in container:
                server_vad, vad, turn_detection = _parse_turn_detection(container[key], param)
                break
        max_output_tokens = _parse_max_output_tokens(session, "session.max_output_tokens")
        speed = _get(audio_out, "speed", (int, float), "session.audio.output.speed")
        if speed is not None and not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise _BadEvent(f"speed must lie in [{SPEED_RANGE[0]}, {SPEED_RANGE[1]}]", param="session.audio.output.speed")
        speed = float(speed) if speed is not None else None
        tools = _parse_tools(session["tools"], "session.tools") if session.get("tools") is not None else None
        tool_choice = _parse_tool_choice(session.get("tool_choice"), tools if tools is not None else s.tools, "session.tool_choice")
        if (tool_choice is None and tools is not None and isinstance(s.tool_choice, dict)
                and not any(t["name"] == s.tool_choice["name"] for t in tools)):
            tool_choice = "auto"  # the function it named is gone with the old tools
        transcription = _get(audio_in, "transcription", dict, "session.audio.input.transcription")
        audio_output = None
        if modalities is not None:
            if not modalities or not all(m in ("text", "audio") for m in modalities):
                raise _BadEvent("output_modalities must be ['audio'] or ['text']", param="session.output_modalities")
            audio_output = "audio" in modalities
        vendor = _get(session, "voice_agent", dict, "session.voice_agent") or {}
        metrics = _get(vendor, "metrics", bool, "session.voice_agent.metrics")
        denoise = _get(vendor, "denoise_steps", bool, "session.voice_agent.denoise_steps")
        voice = _get(audio_out, "voice", str, "session.audio.output.voice")
        # Apply: every field was validated above, so nothing changes where one was invalid.
        changes = {
            "instructions": instructions,
            "input_format": in_format,
            "output_format": out_format,
            "server_vad": server_vad,
            "turn_detection": turn_detection,
            "audio_output": audio_output,
            "metrics": metrics,
            "denoise_steps": denoise,
            "voice": voice,
            "max_output_tokens": max_output_tokens,
            "speed": speed,
            "tools": tools,
            "tool_choice": tool_choice,
            # Kept and echoed; whisper takes no options here (docs/protocol.md lists what is ignored).
            "transcription": transcription,
        }
        for name, value in changes.items():
            if value is not None:
                setattr(s, name, value)
        self._queue("session.updated", session=self.session_json())
        return [
            ConfigureSession(
                instructions=instructions,
                input_rate_hz=s.input_format.rate_hz,
                output_rate_hz=s.output_format.rate_hz,
                server_vad=server_vad,
                audio_output=audio_output,
                trace_steps=denoise,
                vad=vad,
                max_output_tokens=(0 if max_output_tokens == "inf" else max_output_tokens),
                speed=speed,
                tools=[_chat_tool(t) for t in tools] if tools is not None else None,
                tool_choice=_chat_tool_choice(tool_choice) if tool_choice is not None else None,
            )
        ]

    def _decode_audio(self, data: bytes) -> np.ndarray:
        fmt = self.settings.input_format
        if fmt.type == "audio/pcmu":
            return mulaw_decode(data)
        if fmt.type == "audio/pcma":
            return alaw_decode(data)
        return pcm16_to_float32(data)

    def _on_append(self, event: dict[str, Any]) -> list[InputEvent]:
        audio = _get(event, "audio", str, "audio", required=True)
        try:
            samples = self._decode_audio(b64decode(audio))
        except (AudioError, binascii.Error, ValueError) as e:
            raise _BadEvent(f"audio: {e}", code="invalid_audio", param="audio") from None
        if samples.size == 0:
            return []
        return [AudioIn(samples=samples, sample_rate_hz=self.settings.input_format.rate_hz)]

    def _on_commit(self, event: dict[str, Any]) -> list[InputEvent]:
        return [CommitAudio(respond=False)]

    def _on_clear(self, event: dict[str, Any]) -> list[InputEvent]:
        self._queue("input_audio_buffer.cleared")
        return [ClearAudio()]

    # --- conversation items --------------------------------------------------------------------

    def _remember(self, item: dict[str, Any], turn: tuple[int, str] | None = None) -> None:
        """Keep `item` (a new one, or a newer state of one) for retrieve and delete; `turn`:
        (turn id, role) of an item the server made from a turn (the session's key for it)."""
        self._items[item["id"]] = item
        if turn is not None:
            self._turn_items[item["id"]] = turn
        while len(self._items) > MAX_REMEMBERED_ITEMS:
            old_id, _ = self._items.popitem(last=False)
            self._turn_items.pop(old_id, None)

    def _new_item_id(self, item: dict[str, Any]) -> str:
        item_id = item.get("id")
        if item_id is None:
            return f"item_{self._prefix}_{uuid.uuid4().hex[:8]}"
        if not isinstance(item_id, str) or not 1 <= len(item_id) <= 64:
            raise _BadEvent("item.id must be a string of 1 to 64 characters", param="item.id")
        if item_id in self._items or item_id in self._assistant_items:
            raise _BadEvent(f"an item with id {item_id!r} already exists", code="item_already_exists", param="item.id")
        return item_id

    def _message_text(self, item: dict[str, Any], role: str) -> tuple[str, list[dict[str, Any]]]:
        """(the text the LLM reads, the content parts as the item keeps them)."""
        content = _get(item, "content", list, "item.content", required=True)
        texts, parts = [], []
        for i, part in enumerate(content):
            where = f"item.content[{i}]"
            if not isinstance(part, dict):
                raise _BadEvent(f"{where} must be an object", code="invalid_type", param=where)
            kind = part.get("type")
            if kind in ("input_text", "text", "output_text"):
                text = _get(part, "text", str, f"{where}.text", required=True)
                texts.append(text)
                # As the GA API writes them: assistants' parts are output, the others' input.
                parts.append({"type": "output_text" if role == "assistant" else "input_text", "text": text})
            elif kind in ("input_audio", "output_audio", "audio") and role != "system":
                transcript = _get(part, "transcript", str, f"{where}.transcript")
                if transcript is None:
                    raise _BadEvent("audio content needs its 'transcript' here (audio items are not transcribed)",
                                    code="unsupported_content", param=where)
                texts.append(transcript)
                parts.append({"type": "output_audio" if role == "assistant" else "input_audio", "transcript": transcript})
            elif kind == "input_image" and role == "user":
                detail = part.get("detail") or "auto"
                if detail not in ("auto", "low", "high"):
                    raise _BadEvent("detail must be 'auto', 'low' or 'high'", param=f"{where}.detail")
                texts.append(IMAGE_NOTE)
                parts.append({"type": "input_image", "detail": detail})  # the image is not kept
            else:
                raise _BadEvent(f"content parts of type {kind!r} are not supported in a {role} message", param=f"{where}.type")
        text = " ".join(t.strip() for t in texts if t.strip())
        if len(text) > self._max_item_chars:
            raise _BadEvent(f"a message of {len(text)} characters exceeds the limit of {self._max_item_chars}",
                            code="string_above_max_length", param="item.content")
        return text, parts

    def _on_item_create(self, event: dict[str, Any]) -> list[InputEvent]:
        item = _get(event, "item", dict, "item", required=True)
        _get(event, "previous_item_id", str, "previous_item_id")  # items go at the end (docs/protocol.md)
        kind = item.get("type", "message")
        full: dict[str, Any] = {"object": "realtime.item", "type": kind, "status": "completed"}
        if kind == "message":
            role = _get(item, "role", str, "item.role", required=True)
            if role not in ("user", "system", "assistant"):
                raise _BadEvent("item.role must be 'user', 'system' or 'assistant'", param="item.role")
            text, parts = self._message_text(item, role)
            if not text:
                raise _BadEvent("the message has no text", param="item.content")
            item_id = self._new_item_id(item)
            full.update(id=item_id, role=role, content=parts)
            if role == "user":
                result: InputEvent = UserText(text=text, respond=False, item_id=item_id)
            else:
                result = AddItem(message={"role": role, "content": text}, item_id=item_id)
        elif kind == "function_call":
            call_id = _get(item, "call_id", str, "item.call_id", required=True)
            name = _get(item, "name", str, "item.name", required=True)
            arguments = _get(item, "arguments", str, "item.arguments") or "{}"
            if len(arguments) > self._max_item_chars:
                raise _BadEvent("the arguments exceed the item limit", code="string_above_max_length", param="item.arguments")
            item_id = self._new_item_id(item)
            full.update(id=item_id, call_id=call_id, name=name, arguments=arguments)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            result = AddItem(message={"role": "assistant", "content": None, "tool_calls": [call]}, item_id=item_id)
        elif kind == "function_call_output":
            call_id = _get(item, "call_id", str, "item.call_id", required=True)
            output = _get(item, "output", str, "item.output", required=True)
            if len(output) > self._max_item_chars:
                raise _BadEvent(f"an output of {len(output)} characters exceeds the limit of {self._max_item_chars}",
                                code="string_above_max_length", param="item.output")
            item_id = self._new_item_id(item)
            full.update(id=item_id, call_id=call_id, output=output)
            result = AddItem(message={"role": "tool", "tool_call_id": call_id, "content": output}, item_id=item_id)
        else:
            raise _BadEvent(f"items of type {kind!r} are not supported", param="item.type")
        self._queue("conversation.item.added", previous_item_id=self._last_item_id, item=full)
        self._queue("conversation.item.done", previous_item_id=self._last_item_id, item=full)
        self._last_item_id = item_id
        self._remember(full)
        return [result]

    def _on_item_retrieve(self, event: dict[str, Any]) -> list[InputEvent]:
        item_id = _get(event, "item_id", str, "item_id", required=True)
        item = self._items.get(item_id)
        if item is None:
            raise _BadEvent(f"no item {item_id!r} in the conversation", code="item_retrieve_invalid_item_id", param="item_id")
        self._queue("conversation.item.retrieved", item=item)
        return []

    def _on_item_delete(self, event: dict[str, Any]) -> list[InputEvent]:
        item_id = _get(event, "item_id", str, "item_id", required=True)
        item = self._items.pop(item_id, None)
        if item is None:
            raise _BadEvent(f"no item {item_id!r} in the conversation", code="item_delete_invalid_item_id", param="item_id")
        self._queue("conversation.item.deleted", item_id=item_id)
        if item_id in self._turn_items:
            turn_id, role = self._turn_items.pop(item_id)
            self._assistant_items.pop(item_id, None)  # no truncate brings it back
            return [DeleteItem(turn_id=turn_id, role=role)]
        return [DeleteItem(item_id=item_id)]

    def _on_truncate(self, event: dict[str, Any]) -> list[InputEvent]:
        item_id = _get(event, "item_id", str, "item_id", required=True)
        audio_end_ms = _get(event, "audio_end_ms", int, "audio_end_ms", required=True)
        content_index = _get(event, "content_index", int, "content_index") or 0
        if audio_end_ms < 0:
            raise _BadEvent("audio_end_ms must be >= 0", param="audio_end_ms")
        turn_id = self._assistant_items.get(item_id)
        if turn_id is None:
            raise _BadEvent(f"no assistant item {item_id!r}", code="item_not_found", param="item_id")
        response = self._responses.get(turn_id)
        if response is not None and audio_end_ms > response.audio_s * 1000 + 1:
            raise _BadEvent(
                f"audio_end_ms {audio_end_ms} is past the end of the item's audio ({response.audio_s * 1000:.0f} ms)",
                param="audio_end_ms",
            )
        self._queue("conversation.item.truncated", item_id=item_id, content_index=content_index, audio_end_ms=audio_end_ms)
        return [PlaybackTruncate(turn_id=turn_id, audio_end_ms=audio_end_ms)]

    def _on_response_create(self, event: dict[str, Any]) -> list[InputEvent]:
        response = _get(event, "response", dict, "response") or {}
        if response.get("conversation", "auto") != "auto" or response.get("input") is not None:
            raise _BadEvent("out-of-band responses (conversation 'none', custom input) are not supported",
                            code="unsupported_feature", param="response.conversation")
        instructions = self._instructions(response, "response.instructions")
        modalities = _get(response, "output_modalities", list, "response.output_modalities")
        if modalities is None:
            modalities = _get(response, "modalities", list, "response.modalities")  # beta name
        if modalities is not None and (not modalities or not all(m in ("text", "audio") for m in modalities)):
            raise _BadEvent("output_modalities must be ['audio'] or ['text']", param="response.output_modalities")
        max_tokens = _parse_max_output_tokens(response, "response.max_output_tokens")
        tools = _parse_tools(response["tools"], "response.tools") if response.get("tools") is not None else None
        choice = _parse_tool_choice(response.get("tool_choice"), tools if tools is not None else self.settings.tools,
                                    "response.tool_choice")
        _get(response, "metadata", dict, "response.metadata")  # accepted, not echoed
        options = ReplyOptions(
            instructions=instructions,
            audio_output=("audio" in modalities) if modalities is not None else None,
            max_output_tokens=None if max_tokens in (None, "inf") else max_tokens,
            tools=[_chat_tool(t) for t in tools] if tools is not None else None,
            tool_choice=_chat_tool_choice(choice) if choice is not None else None,
        )
        return [CreateResponse(options=options)]

    def _on_response_cancel(self, event: dict[str, Any]) -> list[InputEvent]:
        _get(event, "response_id", str, "response_id")
        return [CancelResponse()]

    # --- server -> client ----------------------------------------------------------------------

    def encode(self, event: Event) -> list[OutMessage]:
        """One session output event -> the messages to send (possibly none)."""
        match event:
            case SpeechStarted():
                if not self.settings.server_vad:
                    return []
                return self._out("input_audio_buffer.speech_started", audio_start_ms=event.audio_start_ms, item_id=self._user_item(event.turn_id))
            case SpeechStopped():
                return self._speech_stopped(event)
            case TranscriptDelta():
                sent = self._transcripts.get(event.turn_id, "")
                if not event.text.startswith(sent) or event.text == sent:
                    return []  # a revised hypothesis: deltas only ever append
                self._transcripts[event.turn_id] = event.text
                delta = event.text[len(sent) :]
                return self._out(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=self._user_item(event.turn_id),
                    content_index=0,
                    delta=delta,
                )
            case TranscriptFinal():
                self._transcripts.pop(event.turn_id, None)
                item = self._items.get(self._user_item(event.turn_id))
                if item is not None:
                    item["content"] = [{"type": "input_audio", "transcript": event.text}]
                return self._out(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=self._user_item(event.turn_id),
                    content_index=0,
                    transcript=event.text,
                    usage={"type": "duration", "seconds": round(event.audio_s, 3)},
                )
            case ReplyStarted():
                return self._response_created(event)
            case ReplyTextDelta():
                r = self._responses.get(event.turn_id)
                if r is None:
                    return []
                return self._open_message(r) + self._out("response.output_text.delta", **self._where(r), delta=event.text)
            case FunctionCall():
                r = self._responses.get(event.turn_id)
                return self._function_call(r, event) if r is not None else []
            case ReplyAudio():
                return self._reply_audio(event)
            case DenoiseStep():
                if not self.settings.denoise_steps:
                    return []
                return self._out(
                    "voice_agent.denoise_step",
                    **self._vendor_ids(event.turn_id),
                    step=event.step,
                    block_start=event.block_start,
                    tokens=event.tokens,
                    mask=event.mask,
                )
            case Flush():
                r = self._responses.get(event.turn_id)
                return self._out("output_audio_buffer.cleared", response_id=r.response_id) if r else []
            case ResponseDone():
                return self._response_done(event)
            case TurnMetrics():
                if not self.settings.metrics:
                    return []
                return self._out("voice_agent.metrics", **self._vendor_ids(event.turn_id), metrics=event.values)
            case ErrorEvent():
                kind = "server_error" if event.code in _SERVER_ERRORS else "invalid_request_error"
                return self._out(
                    "error", error={"type": kind, "code": event.code, "message": event.message, "param": None, "event_id": event.client_event_id}
                )
        return []

    def _out(self, type_: str, **fields: Any) -> list[OutMessage]:
        return [OutMessage(self._message(type_, **fields))]

    def _speech_stopped(self, event: SpeechStopped) -> list[OutMessage]:
        item_id = self._user_item(event.turn_id)
        out = []
        if self.settings.server_vad:
            out += self._out("input_audio_buffer.speech_stopped", audio_end_ms=event.audio_end_ms, item_id=item_id)
        out += self._out("input_audio_buffer.committed", previous_item_id=self._last_item_id, item_id=item_id)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        out += self._out("conversation.item.added", previous_item_id=self._last_item_id, item=item)
        self._last_item_id = item_id
        self._remember(item, (event.turn_id, "user"))
        return out

    def _vendor_ids(self, turn_id: int) -> dict[str, Any]:
        """turn_id, plus response_id and item_id where the turn has a response: vendor events name
        the response they belong to, so a client need not rely on their order."""
        r = self._responses.get(turn_id)
        ids: dict[str, Any] = {"turn_id": turn_id}
        if r is not None:
            ids.update(response_id=r.response_id, item_id=r.item_id)
        return ids

    @staticmethod
    def _where(r: _Response) -> dict[str, Any]:
        return {"response_id": r.response_id, "item_id": r.item_id, "output_index": r.outputs.index(r.item_id), "content_index": 0}

    def _response_json(self, r: _Response, status: str, output: list[dict[str, Any]], reason: str | None = None,
                       usage: Usage | None = None) -> dict[str, Any]:
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": reason or "client_cancelled"}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": "server_error", "code": "llm_error", "message": reason}}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": reason}
        return {
            "id": r.response_id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output,
            "output_modalities": ["audio"] if r.audio_output else ["text"],
            "conversation_id": self.session_id,
            "usage": None if usage is None else {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": usage.input_tokens + usage.output_tokens,
                "input_token_details": {"text_tokens": usage.input_tokens, "audio_tokens": 0, "cached_tokens": 0},
                "output_token_details": {"text_tokens": usage.output_tokens, "audio_tokens": 0},
            },
        }

    def _assistant_item(self, r: _Response, status: str, text: str | None) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_audio", "transcript": text} if r.audio_output else {"type": "output_text", "text": text}
        return {
            "id": r.item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [part] if text is not None else [],
        }

    def _response_created(self, event: ReplyStarted) -> list[OutMessage]:
        r = _Response(
            response_id=f"resp_{self._prefix}_{event.turn_id:04d}",
            item_id=f"item_{self._prefix}_{event.turn_id:04d}_assistant",
            audio_output=event.audio_output,
        )
        self._responses[event.turn_id] = r
        self._assistant_items[r.item_id] = event.turn_id
        while len(self._responses) > MAX_REMEMBERED_RESPONSES:  # a long call stays bounded
            old = self._responses.pop(min(self._responses))
            self._assistant_items.pop(old.item_id, None)
        return self._out("response.created", response=self._response_json(r, "in_progress", []))

    def _open_message(self, r: _Response) -> list[OutMessage]:
        """Announce the reply's assistant message item (at its first words)."""
        if r.message_open:
            return []
        r.message_open = True
        r.outputs.append(r.item_id)
        item = self._assistant_item(r, "in_progress", None)
        index = r.outputs.index(r.item_id)
        out = self._out("response.output_item.added", response_id=r.response_id, output_index=index, item=item)
        out += self._out("conversation.item.added", previous_item_id=self._last_item_id, item=item)
        self._last_item_id = r.item_id
        part = {"type": "audio", "transcript": ""} if r.audio_output else {"type": "text", "text": ""}
        out += self._out("response.content_part.added", response_id=r.response_id, item_id=r.item_id, output_index=index,
                         content_index=0, part=part)
        return out

    def _function_call(self, r: _Response, call: FunctionCall) -> list[OutMessage]:
        """One function call of the reply, whole: its item, its arguments (one delta), done."""
        item_id = f"item_{self._prefix}_{call.turn_id:04d}_call{len(r.outputs)}"
        r.outputs.append(item_id)
        index = len(r.outputs) - 1
        item = {"id": item_id, "object": "realtime.item", "type": "function_call", "status": "in_progress",
                "call_id": call.call_id, "name": call.name, "arguments": ""}
        ids = {"response_id": r.response_id, "item_id": item_id, "output_index": index, "call_id": call.call_id}
        out = self._out("response.output_item.added", response_id=r.response_id, output_index=index, item=item)
        out += self._out("conversation.item.added", previous_item_id=self._last_item_id, item=item)
        self._last_item_id = item_id
        out += self._out("response.function_call_arguments.delta", **ids, delta=call.arguments)
        out += self._out("response.function_call_arguments.done", **ids, name=call.name, arguments=call.arguments)
        done = {**item, "status": "completed", "arguments": call.arguments}
        out += self._out("response.output_item.done", response_id=r.response_id, output_index=index, item=done)
        out += self._out("conversation.item.done", previous_item_id=None, item=done)
        self._remember(done, (call.turn_id, "assistant"))
        r.calls.append(done)
        return out

    def _encode_audio(self, samples: np.ndarray, rate_hz: int) -> tuple[bytes, int, int]:
        """(bytes, bytes per sample, output rate) in the session's output format."""
        fmt = self.settings.output_format
        out = resample(samples, rate_hz, fmt.rate_hz) if rate_hz != fmt.rate_hz else samples
        if fmt.type == "audio/pcmu":
            return mulaw_encode(out), 1, fmt.rate_hz
        if fmt.type == "audio/pcma":
            return alaw_encode(out), 1, fmt.rate_hz
        return float32_to_pcm16(out), 2, fmt.rate_hz

    def _reply_audio(self, event: ReplyAudio) -> list[OutMessage]:
        r = self._responses.get(event.turn_id)
        if r is None:
            return []
        out = self._open_message(r)
        out += [
            OutMessage(
                self._message("response.output_audio_transcript.delta", **self._where(r), delta=event.text + " "),
                turn_id=event.turn_id,
            )
        ]
        data, width, rate = self._encode_audio(event.samples, event.sample_rate_hz)
        step = max(width, rate * self._delta_ms // 1000 * width)
        pieces = range(0, len(data), step)
        for i, start in enumerate(pieces):
            piece = data[start : start + step]
            seconds = len(piece) / width / rate
            r.audio_s += seconds
            last = i == len(pieces) - 1
            out.append(
                OutMessage(
                    self._message("response.output_audio.delta", **self._where(r), delta=b64encode(piece)),
                    audio_s=seconds,
                    turn_id=event.turn_id,
                    played_chunk=event.chunk_index if last else None,
                )
            )
        return out

    def _response_done(self, event: ResponseDone) -> list[OutMessage]:
        r = self._responses.get(event.turn_id)
        if r is None:
            return []  # interrupted before the reply started: nothing was announced
        status = {"completed": "completed", "cancelled": "cancelled", "failed": "failed"}.get(event.status, "incomplete")
        text = event.heard if status != "completed" else event.text.strip()
        if status == "completed" and event.reason == "length":
            status = "incomplete"  # the reply reached its token limit (OpenAI: max_output_tokens)
        item_status = "completed" if status == "completed" else "incomplete"
        reason = event.error if status == "failed" else ("turn_detected" if event.reason in ("speech", "text") else
                                                         "max_output_tokens" if event.reason == "length" else "client_cancelled")
        if not r.message_open and (r.calls or (status != "completed" and not text)):
            # Nothing was said: the response holds its function calls, or nothing.
            return self._out("response.done", response=self._response_json(r, status, list(r.calls), reason, event.usage))
        out: list[OutMessage] = self._open_message(r)
        index = r.outputs.index(r.item_id)
        if r.audio_output:
            out += self._out("response.output_audio.done", **self._where(r))
            out += self._out("response.output_audio_transcript.done", **self._where(r), transcript=text)
            part = {"type": "audio", "transcript": text}
        else:
            out += self._out("response.output_text.done", **self._where(r), text=text)
            part = {"type": "text", "text": text}
        out += self._out("response.content_part.done", response_id=r.response_id, item_id=r.item_id, output_index=index,
                         content_index=0, part=part)
        item = self._assistant_item(r, item_status, text)
        out += self._out("response.output_item.done", response_id=r.response_id, output_index=index, item=item)
        out += self._out("conversation.item.done", previous_item_id=None, item=item)
        self._remember(item, (event.turn_id, "assistant"))
        output = [item if item_id == r.item_id else next(c for c in r.calls if c["id"] == item_id) for item_id in r.outputs]
        out += self._out("response.done", response=self._response_json(r, status, output, reason, event.usage))
        return out


_HANDLERS = {
    "session.update": RealtimeProtocol._on_session_update,
    "input_audio_buffer.append": RealtimeProtocol._on_append,
    "input_audio_buffer.commit": RealtimeProtocol._on_commit,
    "input_audio_buffer.clear": RealtimeProtocol._on_clear,
    "conversation.item.create": RealtimeProtocol._on_item_create,
    "conversation.item.retrieve": RealtimeProtocol._on_item_retrieve,
    "conversation.item.delete": RealtimeProtocol._on_item_delete,
    "conversation.item.truncate": RealtimeProtocol._on_truncate,
    "response.create": RealtimeProtocol._on_response_create,
    "response.cancel": RealtimeProtocol._on_response_cancel,
    "output_audio_buffer.clear": RealtimeProtocol._on_response_cancel,
}
assert set(_HANDLERS) == set(SUPPORTED_CLIENT_EVENTS)
