"""A stand-in /v1/realtime server for testing the page's logic in a fast, model-free way.

It serves the files of web/ and speaks the same events as `voice-agent serve` (docs/protocol.md),
with a loudness gate instead of a VAD, a fixed transcript, a tone instead of speech and a scripted
denoising trace. It can also refuse calls the way the real server does (token required, server
full), which is how the page's error states are tested without touching the real server's limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import mimetypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = ["FakeOptions", "FakeRealtimeServer", "fake_server"]

RATE_HZ = 24000
TRANSCRIPT = "hello there"
REPLY = ["Hi, nice to hear you. ", "This is a fake reply that takes a while to say."]
MASK = "<mask>"
MODELS = {"asr": "fake", "llm": "fake-dllm", "tts": "tone"}
# The scripted denoising trace: two blocks of 8 slots, each filled in over a few forward passes.
TRACE_BLOCKS = [
    (["Hi", ",", " nice", " to", " hear", " you", ".", " This"], [(0, 1), (2, 6), (3, 4, 5), (7,)]),
    (
        [" is", " a", " fake", " reply", ".", "<|eot_id|>", "<|eot_id|>", "<|eot_id|>"],
        [(0, 1, 2), (3, 4, 5, 6, 7)],
    ),
]
STALE_TOKEN = "STALE"  # a late step of the previous reply, sent after the next reply began


@dataclass
class FakeOptions:
    token: str = ""  # required token; empty accepts any call
    full: bool = False  # refuse every call as if the server were at max_calls
    speech_rms: float = 0.02  # the loudness gate
    end_silence_ms: int = 500
    reply_tone_s: float = 1.5  # length of the tone of each reply sentence


@dataclass
class _Call:
    ws: ServerConnection
    trace: bool = False
    server_vad: bool = True
    commits: int = 0
    speaking: bool = False
    speech_ms: int = 0
    silence_ms: int = 0
    audio_ms: int = 0
    turn: int = 0
    reply: asyncio.Task[None] | None = None
    truncates: list[dict[str, Any]] = field(default_factory=list)


class FakeRealtimeServer:
    """`async with FakeRealtimeServer(options) as server:` then open `server.url`."""

    def __init__(self, options: FakeOptions | None = None) -> None:
        self.options = options or FakeOptions()
        self.calls: list[_Call] = []
        self._server: Any = None

    async def __aenter__(self) -> FakeRealtimeServer:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._process_request)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    # HTTP: static files and refusals --------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path != "/v1/realtime":
            return _static(path)
        if self.options.token and f"token={self.options.token}" not in query:
            return _refusal(HTTPStatus.UNAUTHORIZED, "invalid or missing access token")
        return None

    # WebSocket: the call ------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if self.options.full:  # like the real server at max_calls: accept, then close with 1013
            await ws.close(1013, "too many calls: the limit is 0")
            return
        call = _Call(ws)
        self.calls.append(call)
        session = {"id": "sess_fake", "voice_agent": {"models": MODELS}}
        await _send(ws, "session.created", session=session)
        try:
            async for message in ws:
                await self._receive(call, json.loads(message))
        finally:
            if call.reply:
                call.reply.cancel()

    async def _receive(self, call: _Call, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "session.update":
            session = event["session"]
            call.trace = bool(session.get("voice_agent", {}).get("denoise_steps"))
            call.server_vad = session.get("audio", {}).get("input", {}).get("turn_detection") is not None
            # The whole session back, models included, like the real server.
            vendor = {**session.get("voice_agent", {}), "models": MODELS}
            await _send(call.ws, "session.updated", session={**session, "voice_agent": vendor})
        elif kind == "input_audio_buffer.append" and call.server_vad:
            await self._audio(call, base64.b64decode(event["audio"]))
        elif kind == "input_audio_buffer.commit":  # push to talk; the reply waits for response.create
            call.commits += 1
            call.turn += 1
            await self._transcribe(call)
        elif kind == "response.create" and call.commits:
            self._start_reply(call)
        elif kind == "conversation.item.create":
            await self._interrupt(call)
            call.turn += 1
            self._start_reply(call)
        elif kind == "conversation.item.truncate":
            call.truncates.append(event)

    async def _audio(self, call: _Call, data: bytes) -> None:
        pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
        chunk_ms = round(1000 * len(pcm) / RATE_HZ)
        call.audio_ms += chunk_ms
        loud = len(pcm) > 0 and float(np.sqrt(np.mean(pcm**2))) > self.options.speech_rms
        if loud:
            call.speech_ms, call.silence_ms = call.speech_ms + chunk_ms, 0
        else:
            call.silence_ms += chunk_ms
        if not call.speaking and call.speech_ms >= 100:
            call.speaking = True
            call.turn += 1
            await self._interrupt(call)
            await _send(
                call.ws,
                "input_audio_buffer.speech_started",
                audio_start_ms=call.audio_ms,
                item_id=_user_item(call),
            )
        elif call.speaking and call.silence_ms >= self.options.end_silence_ms:
            call.speaking, call.speech_ms = False, 0
            await self._end_of_turn(call)
        elif not call.speaking and not loud:
            call.speech_ms = 0

    async def _end_of_turn(self, call: _Call) -> None:
        await _send(
            call.ws, "input_audio_buffer.speech_stopped", audio_end_ms=call.audio_ms, item_id=_user_item(call)
        )
        await self._transcribe(call)
        self._start_reply(call)

    async def _transcribe(self, call: _Call) -> None:
        item_id = _user_item(call)
        first, _, rest = TRANSCRIPT.partition(" ")
        for delta in (first, " " + rest):
            await _send(
                call.ws,
                "conversation.item.input_audio_transcription.delta",
                item_id=item_id,
                content_index=0,
                delta=delta,
            )
        await _send(
            call.ws,
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=TRANSCRIPT,
        )

    async def _interrupt(self, call: _Call) -> None:
        if call.reply and not call.reply.done():
            call.reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call.reply
            await _send(call.ws, "output_audio_buffer.cleared", response_id=f"resp_{call.turn - 1}")
            await _send(
                call.ws, "response.done", response={"id": f"resp_{call.turn - 1}", "status": "cancelled"}
            )

    def _start_reply(self, call: _Call) -> None:
        call.reply = asyncio.create_task(self._reply(call, call.turn))

    async def _reply(self, call: _Call, turn: int) -> None:
        with contextlib.suppress(ConnectionClosed):  # the page went away mid-reply
            await self._reply_events(call, turn)

    async def _reply_events(self, call: _Call, turn: int) -> None:
        ids = {"response_id": f"resp_{turn}", "item_id": f"item_out_{turn}"}
        await _send(call.ws, "response.created", response={"id": ids["response_id"], "status": "in_progress"})
        if call.trace:
            if turn > 1:  # vendor events name their response, so the page can drop this one
                previous = {"response_id": f"resp_{turn - 1}", "item_id": f"item_out_{turn - 1}"}
                await _send(call.ws, "voice_agent.denoise_step", turn_id=turn - 1, **previous, step=99,
                            block_start=0, tokens=[STALE_TOKEN] * 8, mask=MASK)  # fmt: skip
            await self._trace(call, turn, ids)
        tone = _tone(self.options.reply_tone_s)
        for sentence in REPLY:
            await _send(call.ws, "response.output_audio_transcript.delta", **ids, delta=sentence)
            for start in range(0, len(tone), 4800):
                chunk = base64.b64encode(tone[start : start + 4800]).decode()
                await _send(call.ws, "response.output_audio.delta", **ids, delta=chunk)
                await asyncio.sleep(0.05)  # faster than real time, like TTS
        await _send(call.ws, "response.output_audio.done", **ids)
        await _send(call.ws, "response.done", response={"id": ids["response_id"], "status": "completed"})
        metrics = {
            "asr_final_ms": 120.0,
            "llm_first_text_ms": 260.0,
            "tts_first_audio_ms": 380.0,
            "voice_to_voice_ms": 390.0,
        }
        await _send(call.ws, "voice_agent.metrics", turn_id=turn, **ids, metrics=metrics)

    async def _trace(self, call: _Call, turn: int, ids: dict[str, str]) -> None:
        step, block_start = 0, 0
        for words, orders in TRACE_BLOCKS:
            slots = [MASK] * len(words)
            for order in orders:
                for i in order:
                    slots[i] = words[i]
                step += 1
                await _send(
                    call.ws,
                    "voice_agent.denoise_step",
                    turn_id=turn,
                    **ids,
                    step=step,
                    block_start=block_start,
                    tokens=list(slots),
                    mask=MASK,
                )
            block_start += len(words)


def _user_item(call: _Call) -> str:
    return f"item_in_{call.turn}"


def _tone(seconds: float) -> bytes:
    t = np.arange(int(RATE_HZ * seconds)) / RATE_HZ
    wave = 0.2 * np.sin(2 * np.pi * 330 * t) * np.minimum(1, np.minimum(t, seconds - t) * 20)
    return (wave * 32767).astype("<i2").tobytes()


async def _send(ws: ServerConnection, kind: str, **fields: Any) -> None:
    await ws.send(json.dumps({"type": kind, **fields}))


def _static(path: str) -> Response:
    name = path.lstrip("/") or "index.html"
    web = resources.files("voice_agent.web")
    resource = web.joinpath(name)
    if "/" in name or not resource.is_file():
        return _response(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith(".js"):
        kind = "text/javascript"
    return _response(HTTPStatus.OK, resource.read_bytes(), kind)


def _refusal(status: HTTPStatus, message: str) -> Response:
    return _response(status, f"{message}\n".encode(), "text/plain")


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        {"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store"}
    )
    return Response(status.value, status.phrase, headers, body)


@contextlib.contextmanager
def fake_server(options: FakeOptions | None = None) -> Iterator[FakeRealtimeServer]:
    """The fake server on its own event loop in a thread, for a synchronous test."""
    loop = asyncio.new_event_loop()
    server = FakeRealtimeServer(options)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.__aenter__(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
