"""`/twilio`: Twilio Media Streams, bidirectional (`<Connect><Stream url="wss://HOST/twilio">`).

Contract (docs/protocol.md has example exchanges):
- In: `connected` (ignored), `start` (streamSid, callSid, customParameters -> `CallStarted`),
  `media` (base64 µ-law 8 kHz -> `AudioIn`; only the inbound track), `dtmf` (-> `Dtmf`),
  `mark` (the echo of a mark we sent, once the audio before it has played -> `PlaybackMark`),
  `stop` (-> `CallEnded`). Twilio cannot receive errors, so a malformed or out-of-order message
  (media before start, an unknown mark) is counted in `errors` and logged by the server; the call
  goes on.
- Out: each reply chunk becomes `media` messages of 20 ms (the writer paces them in real time),
  then a `mark` named `r<turn>.<chunk>`; a `Flush` becomes `clear`. Nothing else goes to Twilio.
"""

from __future__ import annotations

import binascii
import json
from typing import Any

from audio.codecs import b64decode, b64encode, mulaw_decode, mulaw_encode
from audio.errors import AudioError
from audio.resample import resample
from voice_agent.events import (
    AudioIn,
    CallEnded,
    CallStarted,
    ConfigureSession,
    Dtmf,
    Event,
    Flush,
    InputEvent,
    PlaybackMark,
    ReplyAudio,
)
from voice_agent.transports import OutMessage

__all__ = ["TWILIO_RATE_HZ", "TwilioProtocol", "mark_name", "parse_mark_name"]

TWILIO_RATE_HZ = 8000
FRAME_MS = 20
_FRAME_BYTES = TWILIO_RATE_HZ * FRAME_MS // 1000  # µ-law: one byte per sample


def mark_name(turn_id: int, chunk_index: int) -> str:
    return f"r{turn_id}.{chunk_index}"


def parse_mark_name(name: str) -> tuple[int, int] | None:
    if not name.startswith("r"):
        return None
    turn, _, chunk = name[1:].partition(".")
    if not (turn.isdigit() and chunk.isdigit()):
        return None
    return int(turn), int(chunk)


class TwilioProtocol:
    """Framing of one `/twilio` connection (see the module docstring)."""

    def __init__(self, *, max_message_bytes: int = 1_048_576) -> None:
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.errors: list[str] = []  # problems with received messages, for the server's log
        self._max_message_bytes = max_message_bytes
        self.stopped = False

    def start(self) -> list[str]:
        return []  # Twilio speaks first

    def take_outgoing(self) -> list[str]:
        return []  # nothing is ever answered directly

    def _bad(self, why: str) -> list[InputEvent]:
        self.errors.append(why)
        return []

    def feed(self, message: str | bytes) -> list[InputEvent]:
        if isinstance(message, bytes):
            return self._bad("binary message")
        if len(message) > self._max_message_bytes:
            return self._bad(f"message of {len(message)} bytes is over the limit")
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError):
            return self._bad("not JSON")
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            return self._bad("not an object with a string 'event'")
        kind = msg["event"]
        if kind == "connected":
            return []
        if kind == "start":
            return self._on_start(msg)
        if self.stream_sid is None:
            return self._bad(f"{kind!r} before 'start'")
        if kind == "media":
            return self._on_media(msg)
        if kind == "mark":
            name = _field(msg, "mark", "name")
            parsed = parse_mark_name(name) if isinstance(name, str) else None
            if parsed is None:
                return self._bad(f"mark with an unknown name {name!r}")
            return [PlaybackMark(turn_id=parsed[0], chunk_index=parsed[1])]
        if kind == "dtmf":
            digit = _field(msg, "dtmf", "digit")
            if not isinstance(digit, str) or not digit:
                return self._bad("dtmf without a digit")
            return [Dtmf(digit=digit)]
        if kind == "stop":
            self.stopped = True
            return [CallEnded()]
        return self._bad(f"unknown event {kind!r}")

    def _on_start(self, msg: dict[str, Any]) -> list[InputEvent]:
        start = msg.get("start")
        if not isinstance(start, dict):
            return self._bad("start without a 'start' object")
        stream_sid = msg.get("streamSid") or start.get("streamSid")
        if not isinstance(stream_sid, str) or not stream_sid:
            return self._bad("start without a streamSid")
        if self.stream_sid is not None:
            return self._bad("a second 'start'")
        media_format = start.get("mediaFormat") or {}
        if isinstance(media_format, dict) and media_format.get("encoding", "audio/x-mulaw") != "audio/x-mulaw":
            self.errors.append(f"unexpected encoding {media_format.get('encoding')!r}; decoding as µ-law")
        self.stream_sid = stream_sid
        call_sid = start.get("callSid")
        self.call_sid = call_sid if isinstance(call_sid, str) else ""
        params = start.get("customParameters")
        params = {str(k): str(v) for k, v in params.items()} if isinstance(params, dict) else {}
        return [
            CallStarted(call_sid=self.call_sid, stream_sid=stream_sid, parameters=params),
            ConfigureSession(input_rate_hz=TWILIO_RATE_HZ, output_rate_hz=TWILIO_RATE_HZ),
        ]

    def _on_media(self, msg: dict[str, Any]) -> list[InputEvent]:
        media = msg.get("media")
        if not isinstance(media, dict):
            return self._bad("media without a 'media' object")
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return []
        payload = media.get("payload")
        if not isinstance(payload, str):
            return self._bad("media without a string payload")
        try:
            samples = mulaw_decode(b64decode(payload))
        except (AudioError, binascii.Error, ValueError) as e:
            return self._bad(f"media payload: {e}")
        if samples.size == 0:
            return []
        return [AudioIn(samples=samples, sample_rate_hz=TWILIO_RATE_HZ)]

    def encode(self, event: Event) -> list[OutMessage]:
        if self.stream_sid is None or self.stopped:
            return []
        match event:
            case ReplyAudio():
                samples = event.samples
                if event.sample_rate_hz != TWILIO_RATE_HZ:
                    samples = resample(samples, event.sample_rate_hz, TWILIO_RATE_HZ)
                data = mulaw_encode(samples)
                out = []
                for start in range(0, len(data), _FRAME_BYTES):
                    frame = data[start : start + _FRAME_BYTES]
                    message = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": b64encode(frame)}}
                    out.append(OutMessage(json.dumps(message), audio_s=len(frame) / TWILIO_RATE_HZ, turn_id=event.turn_id))
                mark = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": mark_name(event.turn_id, event.chunk_index)}}
                out.append(OutMessage(json.dumps(mark), turn_id=event.turn_id))
                return out
            case Flush():
                return [OutMessage(json.dumps({"event": "clear", "streamSid": self.stream_sid}), turn_id=event.turn_id)]
        return []


def _field(msg: dict[str, Any], obj: str, key: str) -> Any:
    inner = msg.get(obj)
    return inner.get(key) if isinstance(inner, dict) else None
