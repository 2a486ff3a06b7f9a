"""Simulated callers: spoken prompts streamed in real time, the silence until the reply timed.

Contract:
- `run_callers(base_url, route, prompts, callers=..., turns_per_call=..., ...)` runs `callers`
  concurrent callers against one server and returns one `TurnResult` per prompt (the prompts are
  dealt round-robin to the callers; each caller hangs up and calls again every `turns_per_call`
  prompts, so conversations have the same depth at every concurrency). Never raises for a
  server problem: a refused connection, a closed call, an error event or a reply that does not
  come within `reply_timeout_s` becomes a failed `TurnResult` with its reason.
- A caller behaves like a microphone or a phone line: it sends a 20 ms frame every 20 ms, always
  (silence between prompts), waits `prompt.pause_before_ms` before each prompt, and listens to the
  whole reply (until the reply audio it received has had time to play) before the next one.
- Routes: "realtime" sends `input_audio_buffer.append` in the session's input format (from
  `session.created`) and reads `response.output_audio.delta`, `input_audio_buffer.speech_stopped`,
  `response.done` and the vendor `voice_agent.metrics` event; "twilio" speaks Twilio Media
  Streams (`connected`, `start`, µ-law 8 kHz `media`, `stop`), reads outbound `media`, and echoes
  each `mark` once the audio before it has played, as Twilio does.
- Voice-to-voice latency: from the moment the frame holding the last voiced sample of the prompt
  (found by energy, `prompts.voiced_bounds`) was sent, to the arrival of the first reply audio
  message after it. Frames are sent when they have been "recorded" (a frame covering
  [t, t + 20 ms] leaves at t + 20 ms), so the measure includes at most one frame of capture delay,
  as a real microphone does.
- `attach_store_metrics(results, store_path)` fills `TurnResult.server` from the server's call
  store where no metrics event carried them (the Twilio route), matching turns by call and time.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audio.codecs import (
    alaw_decode,
    alaw_encode,
    float32_to_pcm16,
    mulaw_decode,
    mulaw_encode,
    pcm16_to_float32,
)
from audio.resample import resample
from voice_agent.bench.prompts import PROMPT_RATE_HZ, SpokenPrompt, voiced_bounds

__all__ = ["BARGE_IN_KINDS", "ROUTES", "BargeInResult", "BargeInSound", "TurnResult", "attach_store_metrics", "run_barge_ins", "run_callers"]

ROUTES = {"realtime": "/v1/realtime", "twilio": "/twilio"}
FRAME_MS = 20
TWILIO_RATE_HZ = 8000
_QUIET_AFTER_REPLY_S = 0.8  # Twilio has no "reply done": a reply is over after this much silence
_METRICS_WAIT_S = 3.0  # the metrics event follows response.done at once; wait at most this long


@dataclass
class TurnResult:
    """One prompt spoken by one caller and what came back."""

    route: str  # "realtime" | "twilio"
    config: str  # the configuration under test ("dllm", "ar", "target")
    callers: int  # concurrent callers in this run
    caller: int  # which of them
    call_index: int  # which call of this caller (a call holds up to turns_per_call prompts)
    prompt_id: int
    voice: str
    text: str
    ok: bool = False
    error: str | None = None  # why the turn failed: "timeout: ...", "server error: ...", ...
    # Client side, from the send time of the frame with the last voiced sample.
    voice_to_voice_ms: float | None = None  # to the first reply audio received
    endpoint_ms: float | None = None  # to `speech_stopped` (Realtime only)
    reply_audio_s: float = 0.0  # seconds of reply audio received
    transcript: str | None = None  # the server's final transcript of the prompt (Realtime only)
    response_id: str | None = None  # Realtime: the response whose audio came first
    # The server's per-turn metrics (voice_agent.metrics / the call store): ms from its end of speech.
    server: dict[str, Any] = field(default_factory=dict)
    # Wall-clock bounds of the spoken prompt, to find the turn in the call store.
    speech_start_wall_s: float | None = None
    voice_end_wall_s: float | None = None
    call_sid: str | None = None  # Twilio: the callSid this bench gave the call


@dataclass
class _In:
    """One message from the server, reduced to what the measures need."""

    t_s: float  # time.monotonic() at arrival
    kind: str  # "audio" | "endpoint" | "transcript" | "done" | "metrics" | "error" | "mark" | "clear"
    response_id: str | None = None
    audio_s: float = 0.0  # "audio": seconds of reply audio
    data: Any = None  # "audio": the base64 payload; "transcript": text; "done": status; "metrics": dict; "error": message; "mark": name


class _Inbound:
    """Everything the server sent on one call, in arrival order, with a playback clock."""

    def __init__(self) -> None:
        self.items: list[_In] = []
        self.closed: str | None = None  # why the connection ended, once it has
        self.play_end_s = 0.0  # monotonic time at which the reply audio received so far has played
        self._changed = asyncio.Event()

    def add(self, item: _In) -> None:
        if item.kind == "audio":
            self.play_end_s = max(self.play_end_s, item.t_s) + item.audio_s
        elif item.kind == "clear":
            self.play_end_s = item.t_s
        self.items.append(item)
        self._changed.set()

    def close(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        self._changed.set()

    async def wait(self, match: Callable[[_In], bool], start: int, deadline_s: float) -> int | None:
        """Index of the first item from `start` that matches, or None at the deadline / on close.

        Cancelling it is safe."""
        i = start
        while True:
            while i < len(self.items):
                if match(self.items[i]):
                    return i
                i += 1
            if self.closed is not None:
                return None
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining_s):
                    await self._changed.wait()


@dataclass
class _Speech:
    frames: list[bytes]  # encoded frames at the wire rate
    mark_frame: int  # index of the frame whose send time is reported (e.g. the last voiced sample's)
    done: asyncio.Future[tuple[float, float, float]]  # (mono mark, wall start, wall mark)


class _Mic:
    """Sends one frame every FRAME_MS, in real time: the prompt being spoken, else `idle(t_s)`
    (silence, or what else the line carries between prompts, e.g. an echo) for the frame recorded
    until monotonic time `t_s` (its nominal time: a late loop catches up, sending several frames at
    once, but each still holds its own 20 ms)."""

    def __init__(self, send: Callable[[bytes], Any], silence_frame: bytes, idle: Callable[[float], bytes] | None = None) -> None:
        self._send = send
        self._idle = idle or (lambda t_s: silence_frame)
        self._speech: _Speech | None = None
        self._index = 0
        self._wall_start_s = 0.0

    def say(self, frames: list[bytes], mark_frame: int) -> asyncio.Future[tuple[float, float, float]]:
        """Speak `frames`; the future gets (monotonic and wall send time of frame `mark_frame`, wall
        time of the first frame)."""
        future = asyncio.get_running_loop().create_future()
        self._speech = _Speech(frames, mark_frame, future)
        self._index = 0
        return future

    async def run(self) -> None:
        """Until cancelled (cancelling it is safe)."""
        frame_s = FRAME_MS / 1000
        t0 = time.monotonic()
        k = 0
        while True:
            k += 1
            # A frame leaves once it has been recorded; when late (a busy machine), catch up.
            await asyncio.sleep(max(0.0, t0 + k * frame_s - time.monotonic()))
            speech = self._speech
            if speech is None:
                await self._send(self._idle(t0 + k * frame_s))
                continue
            if self._index == 0:
                self._wall_start_s = time.time()
            await self._send(speech.frames[self._index])
            if self._index == speech.mark_frame and not speech.done.done():
                speech.done.set_result((time.monotonic(), self._wall_start_s, time.time()))
            self._index += 1
            if self._index >= len(speech.frames):
                self._speech = None


# --- wire formats ----------------------------------------------------------------------------------


class _Wire:
    """How one route frames caller audio and reads server messages."""

    rate_hz: int

    def encode(self, samples: np.ndarray) -> str: ...

    def start(self) -> list[str]:
        return []

    def stop(self) -> list[str]:
        return []

    def parse(self, message: str | bytes, t_s: float) -> list[_In]: ...

    def reply_samples(self, item: _In) -> np.ndarray:
        """An "audio" item's samples, float32 at `rate_hz` (as the caller's microphone would hear them)."""
        ...


class _RealtimeWire(_Wire):
    def __init__(self, session_created: dict[str, Any]) -> None:
        session = session_created.get("session") or {}
        audio = session.get("audio") or {}
        vendor = session.get("voice_agent") or {}  # states PCM rates other than 24 kHz (protocol.md)
        fmt = (audio.get("input") or {}).get("format") or {}
        self.format = fmt.get("type", "audio/pcm")
        if self.format not in ("audio/pcm", "audio/pcmu", "audio/pcma"):
            raise ValueError(f"unsupported input format {self.format!r} in session.created")
        pcm_in_hz = int(vendor.get("input_rate_hz") or fmt.get("rate") or 24000)
        self.rate_hz = pcm_in_hz if self.format == "audio/pcm" else 8000
        out = (audio.get("output") or {}).get("format") or {}
        self._out_format = out.get("type", "audio/pcm")
        self._out_hz = int(vendor.get("output_rate_hz") or out.get("rate") or 24000) if self._out_format == "audio/pcm" else 8000
        self._out_bytes_per_s = self._out_hz * 2 if self._out_format == "audio/pcm" else 8000

    def encode(self, samples: np.ndarray) -> str:
        if self.format == "audio/pcmu":
            data = mulaw_encode(samples)
        elif self.format == "audio/pcma":
            data = alaw_encode(samples)
        else:
            data = float32_to_pcm16(samples)
        return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()})

    def parse(self, message: str | bytes, t_s: float) -> list[_In]:
        event = json.loads(message)
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            delta = event.get("delta", "")
            return [_In(t_s, "audio", event.get("response_id"), len(delta) * 3 // 4 / self._out_bytes_per_s, data=delta)]
        if kind == "input_audio_buffer.speech_stopped":
            return [_In(t_s, "endpoint")]
        if kind == "conversation.item.input_audio_transcription.completed":
            return [_In(t_s, "transcript", data=event.get("transcript"))]
        if kind == "response.done":
            response = event.get("response") or {}
            return [_In(t_s, "done", response.get("id"), data=response.get("status"))]
        if kind == "voice_agent.metrics":
            return [_In(t_s, "metrics", data=event.get("metrics") or {})]
        if kind == "error":
            error = event.get("error") or {}
            return [_In(t_s, "error", data=f"{error.get('code')}: {error.get('message')}")]
        if kind == "output_audio_buffer.cleared":
            return [_In(t_s, "clear", event.get("response_id"))]
        return []

    def reply_samples(self, item: _In) -> np.ndarray:
        data = base64.b64decode(item.data or "")
        decode = {"audio/pcmu": mulaw_decode, "audio/pcma": alaw_decode}.get(self._out_format, pcm16_to_float32)
        return resample(decode(data), self._out_hz, self.rate_hz)


class _TwilioWire(_Wire):
    rate_hz = TWILIO_RATE_HZ

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self._sequence = 0
        self._chunk = 0

    def _seq(self) -> str:
        self._sequence += 1
        return str(self._sequence)

    def start(self) -> list[str]:
        start = {
            "accountSid": "AC" + "0" * 32,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": TWILIO_RATE_HZ, "channels": 1},
            "customParameters": {"client": "voice-agent bench e2e"},
        }
        return [
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            json.dumps({"event": "start", "sequenceNumber": self._seq(), "start": start, "streamSid": self.stream_sid}),
        ]

    def encode(self, samples: np.ndarray) -> str:
        self._chunk += 1
        media = {
            "track": "inbound",
            "chunk": str(self._chunk),
            "timestamp": str(self._chunk * FRAME_MS),
            "payload": base64.b64encode(mulaw_encode(samples)).decode(),
        }
        return json.dumps({"event": "media", "sequenceNumber": self._seq(), "media": media, "streamSid": self.stream_sid})

    def mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "sequenceNumber": self._seq(), "streamSid": self.stream_sid, "mark": {"name": name}})

    def stop(self) -> list[str]:
        stop = {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}
        return [json.dumps({"event": "stop", "sequenceNumber": self._seq(), "streamSid": self.stream_sid, "stop": stop})]

    def parse(self, message: str | bytes, t_s: float) -> list[_In]:
        event = json.loads(message)
        kind = event.get("event")
        if kind == "media":
            payload = (event.get("media") or {}).get("payload", "")
            return [_In(t_s, "audio", audio_s=len(payload) * 3 // 4 / TWILIO_RATE_HZ, data=payload)]
        if kind == "mark":
            return [_In(t_s, "mark", data=(event.get("mark") or {}).get("name"))]
        if kind == "clear":
            return [_In(t_s, "clear")]
        return []

    def reply_samples(self, item: _In) -> np.ndarray:
        return mulaw_decode(base64.b64decode(item.data or ""))


def _frames(samples: np.ndarray, rate_hz: int, encode: Callable[[np.ndarray], str]) -> list[str]:
    n = rate_hz * FRAME_MS // 1000
    padded = np.concatenate([samples, np.zeros((-samples.size) % n, dtype=np.float32)])
    return [encode(padded[i : i + n]) for i in range(0, padded.size, n)]


# --- one call --------------------------------------------------------------------------------------


@dataclass
class _Timeouts:
    connect_s: float
    reply_s: float  # no first reply audio within this: the turn fails
    listen_s: float  # a reply longer than this is not waited for to the end


class _NotOpened(Exception):
    pass


async def _open(url: str, route: str, timeouts: _Timeouts) -> tuple[Any, _Wire] | str:
    """A connected call: (websocket, wire) with the route's start messages sent, or why not."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

    try:
        async with asyncio.timeout(timeouts.connect_s):
            ws = await connect(url, open_timeout=timeouts.connect_s, compression=None, max_size=2**22)
    except InvalidStatus as e:
        return f"connection refused: HTTP {e.response.status_code} ({e.response.body.decode(errors='replace').strip()})"
    except (OSError, TimeoutError, InvalidURI, WebSocketException) as e:
        return f"cannot connect to {url}: {type(e).__name__}: {e}"
    try:
        if route == "realtime":
            try:
                async with asyncio.timeout(timeouts.connect_s):
                    first = json.loads(await ws.recv())
            except (TimeoutError, ConnectionClosed, ValueError) as e:
                raise _NotOpened(f"no session.created from {url}: {type(e).__name__}: {e}") from None
            if first.get("type") != "session.created":
                raise _NotOpened(f"expected session.created, got {str(first.get('type'))!r}")
            try:
                wire: _Wire = _RealtimeWire(first)
            except ValueError as e:
                raise _NotOpened(str(e)) from None
        else:
            wire = _TwilioWire("CA" + uuid.uuid4().hex)
        for message in wire.start():
            await ws.send(message)
    except (_NotOpened, ConnectionClosed) as e:
        await ws.close()
        return str(e) if isinstance(e, _NotOpened) else f"connection closed: {e}"
    return ws, wire


def _listen(ws: Any, wire: _Wire, inbound: _Inbound, tasks: list[asyncio.Task[Any]],
            on_item: Callable[[_In], None] | None = None) -> asyncio.Task[None]:
    """Read the server's messages into `inbound` until the call ends; on Twilio, echo each `mark`
    once the audio before it has played, as Twilio does."""
    from websockets.exceptions import ConnectionClosed

    async def echo_mark(name: str, at_s: float) -> None:
        await asyncio.sleep(max(0.0, at_s - time.monotonic()))
        with contextlib.suppress(ConnectionClosed):
            await ws.send(wire.mark(name))  # type: ignore[attr-defined]

    async def read() -> None:
        try:
            async for message in ws:
                now = time.monotonic()
                try:
                    items = wire.parse(message, now)
                except (ValueError, AttributeError):
                    continue  # not a JSON object: nothing this bench reads
                for item in items:
                    inbound.add(item)
                    if on_item is not None:
                        on_item(item)
                    if item.kind == "mark" and isinstance(wire, _TwilioWire):
                        tasks.append(asyncio.create_task(echo_mark(item.data, inbound.play_end_s)))
            inbound.close(f"the server closed the call ({ws.close_code} {ws.close_reason or ''})".strip())
        except ConnectionClosed as e:
            inbound.close(f"connection closed: {e}")

    return asyncio.create_task(read())


async def _hang_up(ws: Any, wire: _Wire, tasks: list[asyncio.Task[Any]]) -> None:
    from websockets.exceptions import ConnectionClosed

    for message in wire.stop():
        with contextlib.suppress(ConnectionClosed):
            await ws.send(message)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task
    await ws.close()


async def _call(
    url: str,
    route: str,
    turns: list[tuple[SpokenPrompt, TurnResult]],
    timeouts: _Timeouts,
    on_turn: Callable[[TurnResult], None],
) -> None:
    """One call holding `turns`; fills each TurnResult and reports it through `on_turn`."""
    from websockets.exceptions import ConnectionClosed

    def fail_rest(start: int, why: str) -> None:
        for _, result in turns[start:]:
            if not result.ok and result.error is None:
                result.error = why
                on_turn(result)

    opened = await _open(url, route, timeouts)
    if isinstance(opened, str):
        fail_rest(0, opened)
        return
    ws, wire = opened
    if isinstance(wire, _TwilioWire):
        for result in (r for _, r in turns):
            result.call_sid = wire.call_sid
    inbound = _Inbound()
    tasks: list[asyncio.Task[Any]] = []
    done_turns = 0
    try:
        silence = wire.encode(np.zeros(wire.rate_hz * FRAME_MS // 1000, dtype=np.float32))
        mic = _Mic(ws.send, silence)
        tasks += [_listen(ws, wire, inbound, tasks), asyncio.create_task(mic.run())]
        for spoken, result in turns:
            await asyncio.sleep(spoken.prompt.pause_before_ms / 1000)
            if inbound.closed:
                break
            await _one_turn(spoken, result, wire, mic, inbound, timeouts)
            done_turns += 1
            on_turn(result)
            if inbound.closed:
                break
        fail_rest(done_turns, inbound.closed or "the call ended early")
        if isinstance(wire, _RealtimeWire):
            # Replies cut short by the next prompt (--listen-s) report their metrics when
            # cancelled. A last reply still playing is cancelled before hanging up, so that its
            # metrics come too (a hang-up would end the turn without them).
            last = turns[-1][1] if turns else None
            if last is not None and last.ok and not any(x.kind == "done" and x.response_id == last.response_id for x in inbound.items):
                await ws.send(json.dumps({"type": "response.cancel"}))
            await _collect_metrics(inbound, [r for _, r in turns], time.monotonic() + max(_METRICS_WAIT_S, timeouts.listen_s))
    except ConnectionClosed as e:
        fail_rest(done_turns, f"connection closed: {e}")
    finally:
        await _hang_up(ws, wire, tasks)


async def _collect_metrics(inbound: _Inbound, results: list[TurnResult], deadline_s: float) -> None:
    """Fill `server` from the `voice_agent.metrics` event that follows each reply's `response.done`
    (the server sends them back to back)."""
    for result in results:
        if not result.ok or result.server or result.response_id is None:
            continue
        done = await inbound.wait(lambda x, rid=result.response_id: x.kind == "done" and x.response_id == rid, 0, deadline_s)
        if done is None:
            continue
        metrics = await inbound.wait(lambda x: x.kind == "metrics", done, time.monotonic() + _METRICS_WAIT_S)
        if metrics is not None:
            result.server = dict(inbound.items[metrics].data)


def _wire_audio(audio_16k: np.ndarray, wire: _Wire) -> tuple[list[str], Callable[[int], int]]:
    """Prompt-rate audio as the wire's frames, and the index of the frame holding a prompt-rate sample."""
    audio = audio_16k if wire.rate_hz == PROMPT_RATE_HZ else resample(audio_16k, PROMPT_RATE_HZ, wire.rate_hz)
    frames = _frames(audio, wire.rate_hz, wire.encode)
    per_frame = wire.rate_hz * FRAME_MS // 1000
    return frames, lambda sample: min(len(frames) - 1, max(0, sample * wire.rate_hz // PROMPT_RATE_HZ) // per_frame)


async def _say(mic: _Mic, frames: list[str], mark_frame: int, inbound: _Inbound) -> tuple[float, float, float] | str:
    """Speak `frames` to the end of frame `mark_frame`: its send times (`_Mic.say`), or why not."""
    said = mic.say(frames, mark_frame)
    closed_wait = asyncio.create_task(inbound.wait(lambda _: False, len(inbound.items), float("inf")))
    await asyncio.wait([said, closed_wait], return_when=asyncio.FIRST_COMPLETED)
    closed_wait.cancel()
    if not said.done():
        said.cancel()
        return inbound.closed or "the call ended while the prompt was being spoken"
    return said.result()


async def _first_reply(inbound: _Inbound, start: int, t_end_s: float, timeouts: _Timeouts) -> int | str:
    """Index of the first reply audio after `t_end_s`, or why none came."""

    def reply_or_failure(item: _In) -> bool:
        return (item.kind == "audio" and item.t_s >= t_end_s) or item.kind == "error" or (item.kind == "done" and item.data == "failed")

    i = await inbound.wait(reply_or_failure, start, t_end_s + timeouts.reply_s)
    if i is None:
        return inbound.closed or f"timeout: no reply audio within {timeouts.reply_s:.0f} s"
    first = inbound.items[i]
    if first.kind != "audio":
        return f"server error: {first.data}" if first.kind == "error" else "server error: the reply failed"
    return i


async def _one_turn(
    spoken: SpokenPrompt, result: TurnResult, wire: _Wire, mic: _Mic, inbound: _Inbound, timeouts: _Timeouts
) -> None:
    frames, frame_of = _wire_audio(spoken.audio, wire)
    start = len(inbound.items)
    said = await _say(mic, frames, frame_of(spoken.voiced_end_sample - 1), inbound)
    if isinstance(said, str):
        result.error = said
        return
    t_end_s, result.speech_start_wall_s, result.voice_end_wall_s = said
    i = await _first_reply(inbound, start, t_end_s, timeouts)
    endpoint = next((x for x in inbound.items[start:] if x.kind == "endpoint" and x.t_s >= t_end_s), None)
    if endpoint is not None:
        result.endpoint_ms = (endpoint.t_s - t_end_s) * 1000
    if isinstance(i, str):
        result.error = i
        return
    first = inbound.items[i]
    result.ok = True
    result.voice_to_voice_ms = (first.t_s - t_end_s) * 1000
    result.response_id = first.response_id
    # Listen to the whole reply before the next prompt.
    listen_deadline_s = first.t_s + timeouts.listen_s
    if isinstance(wire, _RealtimeWire):
        await _collect_metrics(inbound, [result], listen_deadline_s)
    while time.monotonic() < listen_deadline_s and inbound.closed is None:
        last_audio_s = max((x.t_s for x in inbound.items[i:] if x.kind == "audio"), default=first.t_s)
        quiet_until_s = max(inbound.play_end_s, last_audio_s + _QUIET_AFTER_REPLY_S if isinstance(wire, _TwilioWire) else 0.0)
        if time.monotonic() >= quiet_until_s:
            break
        await asyncio.sleep(min(0.1, quiet_until_s - time.monotonic()))
    reply = [x for x in inbound.items[i:] if x.kind == "audio" and (x.response_id == first.response_id)]
    result.reply_audio_s = round(sum(x.audio_s for x in reply), 3)
    result.transcript = next((x.data for x in inbound.items[start:] if x.kind == "transcript" and x.t_s >= t_end_s), None)


async def run_callers(
    base_url: str,
    route: str,
    prompts: list[SpokenPrompt],
    *,
    config_name: str,
    callers: int,
    turns_per_call: int,
    on_turn: Callable[[TurnResult], None] = lambda result: None,
    # Timeouts
    connect_timeout_s: float = 10.0,
    reply_timeout_s: float = 30.0,
    listen_timeout_s: float = 60.0,
) -> list[TurnResult]:
    """Run `callers` concurrent callers over `prompts` (see the module docstring)."""
    url = base_url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + ROUTES[route]
    timeouts = _Timeouts(connect_timeout_s, reply_timeout_s, listen_timeout_s)
    results: list[TurnResult] = []
    per_caller: list[list[list[tuple[SpokenPrompt, TurnResult]]]] = []
    for caller in range(callers):
        mine = prompts[caller::callers]
        calls = []
        for call_index, at in enumerate(range(0, len(mine), turns_per_call)):
            turns = []
            for spoken in mine[at : at + turns_per_call]:
                result = TurnResult(route, config_name, callers, caller, call_index, spoken.prompt_id, spoken.prompt.voice, spoken.prompt.text)
                results.append(result)
                turns.append((spoken, result))
            calls.append(turns)
        per_caller.append(calls)

    async def caller_loop(calls: list[list[tuple[SpokenPrompt, TurnResult]]]) -> None:
        for turns in calls:
            await _call(url, route, turns, timeouts, on_turn)

    await asyncio.gather(*(caller_loop(calls) for calls in per_caller))
    return results


# --- barge-in --------------------------------------------------------------------------------------

BARGE_IN_KINDS = ("speech", "echo", "noise")
_FLUSH_WAIT_S = 3.0  # no flush this long after the caller's first voiced sample: the barge-in was missed
_AFTER_REPLY_S = 0.5  # echo and noise trials: a flush up to this long after the reply played still counts
_JUDGED_S = 0.5  # speech trials: a reply that ends sooner after the caller's first voiced sample cannot be interrupted


@dataclass
class BargeInSound:
    """What the caller's line carries over a reply."""

    kind: str  # "speech": the caller talks over it; "noise": a short noise; "echo": the reply itself, coming back
    name: str  # the voice, the noise, or the echo's delay and level
    audio: np.ndarray | None = None  # 16 kHz float32 ("speech", "noise")


@dataclass
class BargeInResult:
    """One reply and the sound over it (see `run_barge_ins`)."""

    route: str
    kind: str
    sound: str
    trial: int
    prompt_id: int  # the question that was asked
    ok: bool = False  # the trial ran: a reply came and was still playing when the sound began
    error: str | None = None
    flush_ms: float | None = None  # the sound's first voiced sample (its frame's send time) -> the flush; None: no flush
    played_s: float | None = None  # reply audio played before the flush, or before the reply ended


class _EchoLine:
    """The reply as a speakerphone plays it, back in the caller's microphone `delay_s` later at
    `gain`: `hear(item)` takes the server's messages (audio is played in arrival order, a flush
    stops playback), `frame(t_s)` is the microphone's frame recorded until `t_s`."""

    def __init__(self, wire: _Wire, delay_s: float, gain: float) -> None:
        self._wire = wire
        self._delay_s = delay_s
        self._gain = gain
        # (playback start, samples at the wire rate), in playback order; dropped once played and heard
        self._chunks: collections.deque[tuple[float, np.ndarray]] = collections.deque()
        self._end_s = 0.0

    def hear(self, item: _In) -> None:
        if item.kind == "audio":
            samples = self._wire.reply_samples(item)
            start_s = max(self._end_s, item.t_s)
            self._chunks.append((start_s, samples))
            self._end_s = start_s + samples.size / self._wire.rate_hz
        elif item.kind == "clear":
            rate = self._wire.rate_hz
            self._chunks = collections.deque((t, x[: max(0, int((item.t_s - t) * rate))]) for t, x in self._chunks if t < item.t_s)
            self._end_s = min(self._end_s, item.t_s)

    def frame(self, t_s: float) -> str:
        """The microphone's frame recorded until monotonic time `t_s`."""
        rate = self._wire.rate_hz
        n = rate * FRAME_MS // 1000
        t0 = t_s - FRAME_MS / 1000 - self._delay_s  # what played delay_s before that frame
        out = np.zeros(n, dtype=np.float32)
        # Frames come in time order: a chunk that ended before this one's window is never heard again.
        while self._chunks and self._chunks[0][0] + self._chunks[0][1].size / rate <= t0:
            self._chunks.popleft()
        for start_s, samples in self._chunks:
            lo = round((t0 - start_s) * rate)
            if lo >= samples.size or lo + n <= 0:
                continue
            a, b = max(lo, 0), min(lo + n, samples.size)
            out[a - lo : b - lo] = samples[a:b]
        return self._wire.encode(self._gain * out)


async def _barge_in_trial(url: str, route: str, question: SpokenPrompt, sound: BargeInSound, result: BargeInResult,
                          timeouts: _Timeouts, after_s: float, echo_delay_s: float, echo_gain: float) -> None:
    from websockets.exceptions import ConnectionClosed

    opened = await _open(url, route, timeouts)
    if isinstance(opened, str):
        result.error = opened
        return
    ws, wire = opened
    inbound = _Inbound()
    tasks: list[asyncio.Task[Any]] = []
    echo = _EchoLine(wire, echo_delay_s, echo_gain) if sound.kind == "echo" else None
    try:
        silence = wire.encode(np.zeros(wire.rate_hz * FRAME_MS // 1000, dtype=np.float32))
        mic = _Mic(ws.send, silence, idle=echo.frame if echo else None)
        tasks += [_listen(ws, wire, inbound, tasks, echo.hear if echo else None), asyncio.create_task(mic.run())]
        await asyncio.sleep(question.prompt.pause_before_ms / 1000)  # as run_callers: the line is open before the caller speaks
        frames, frame_of = _wire_audio(question.audio, wire)
        start = len(inbound.items)
        said = await _say(mic, frames, frame_of(question.voiced_end_sample - 1), inbound)
        i = await _first_reply(inbound, start, said[0], timeouts) if not isinstance(said, str) else said
        if isinstance(i, str):
            result.error = i
            return
        first = inbound.items[i]
        if sound.audio is None:  # the echo: the line has carried the reply since its first audio
            started_s = voiced_s = first.t_s
        else:
            await asyncio.sleep(max(0.0, first.t_s + after_s - time.monotonic()))
            if inbound.closed or inbound.play_end_s <= time.monotonic():
                result.error = inbound.closed or f"the reply was over before {after_s:.1f} s of it had played"
                return
            started_s = time.monotonic()
            frames, frame_of = _wire_audio(sound.audio, wire)
            said = await _say(mic, frames, frame_of(voiced_bounds(sound.audio, PROMPT_RATE_HZ)[0]), inbound)
            if isinstance(said, str):
                result.error = said
                return
            voiced_s = said[0] - FRAME_MS / 1000  # the frame holding the first voiced sample was recorded from here
        result.ok = True

        def flush(item: _In) -> bool:
            return item.kind == "clear" and item.t_s >= started_s

        while True:  # until a flush, or the end of the reply (and after it, a grace for a late flush)
            deadline_s = voiced_s + _FLUSH_WAIT_S if sound.kind == "speech" else inbound.play_end_s + _AFTER_REPLY_S
            j = await inbound.wait(flush, i, min(deadline_s, time.monotonic() + 0.5))
            if j is not None or inbound.closed or time.monotonic() >= deadline_s:
                break
        end_s = inbound.items[j].t_s if j is not None else inbound.play_end_s
        result.played_s = round(max(0.0, end_s - first.t_s), 3)
        if j is not None:
            result.flush_ms = (end_s - voiced_s) * 1000
        elif sound.kind == "speech" and end_s < voiced_s + _JUDGED_S:
            result.ok = False  # the reply ended on its own before the caller had said enough to barge in
            result.error = f"the reply ended {1000 * (end_s - voiced_s):.0f} ms after the caller started talking: too short to judge"
    except ConnectionClosed as e:
        result.error = f"connection closed: {e}"
    finally:
        await _hang_up(ws, wire, tasks)


async def run_barge_ins(
    base_url: str,
    route: str,
    questions: list[SpokenPrompt],
    sounds: list[BargeInSound],
    *,
    after_s: float = 1.0,
    echo_delay_s: float = 0.1,
    echo_gain: float = 10 ** (-10 / 20),
    on_trial: Callable[[BargeInResult], None] = lambda result: None,
    connect_timeout_s: float = 10.0,
    reply_timeout_s: float = 30.0,
) -> list[BargeInResult]:
    """One call per trial, one after the other: the caller asks `questions[k]`, and `after_s` into
    the reply's first audio its line carries `sounds[k]` (speech and noise: once; an echo: the
    reply itself from the start, `echo_delay_s` late at `echo_gain`). A flush answers speech
    (`flush_ms`: from the send of the frame holding the sound's first voiced sample, i.e. that
    sample plus at most one frame of capture, to the flush's arrival); after an echo or a noise a
    flush before the reply has played out is a false barge-in. Never raises for a server problem:
    a failed trial carries its reason."""
    url = base_url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + ROUTES[route]
    timeouts = _Timeouts(connect_timeout_s, reply_timeout_s, listen_s=0.0)
    results = []
    for k, (question, sound) in enumerate(zip(questions, sounds, strict=True)):
        result = BargeInResult(route, sound.kind, sound.name, k, question.prompt_id)
        await _barge_in_trial(url, route, question, sound, result, timeouts, after_s, echo_delay_s, echo_gain)
        results.append(result)
        on_trial(result)
    return results


def attach_store_metrics(results: list[TurnResult], store_path: str) -> int:
    """Fill `server` of the Twilio results from the call store; returns how many were matched."""
    from voice_agent.store import get_call, list_calls

    by_sid: dict[str, list[dict[str, Any]]] = {}
    for call in list_calls(store_path, limit=100_000):
        sid = (call.get("info") or {}).get("call_sid")
        if sid:
            full = get_call(store_path, call["call_id"])
            by_sid[sid] = full["turns"] if full else []
    matched = 0
    for result in results:
        if result.server or result.call_sid not in by_sid or result.speech_start_wall_s is None:
            continue
        # The turn that started while this prompt was being spoken (its VAD start), replied to.
        lo_s, hi_s = result.speech_start_wall_s - 0.5, (result.voice_end_wall_s or result.speech_start_wall_s) + 0.5
        candidates = [t for t in by_sid[result.call_sid] if lo_s <= t["started_at"] <= hi_s and t["status"] != "no_reply"]
        if candidates:
            result.server = dict(candidates[-1]["metrics"])
            matched += 1
    return matched
