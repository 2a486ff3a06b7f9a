"""One `websockets` asyncio server: `/v1/realtime`, `/twilio`, the web demo, `/healthz`, `/metrics`.

Contract:
- HTTP routes are answered in `process_request` (before any WebSocket upgrade): `/` and the
  files of the installed `voice_agent.web` package, `/healthz` (JSON), `/metrics` (Prometheus).
- WebSocket routes check the access token first (`Authorization: Bearer <token>`, which the
  openai SDK sends, or `?token=` for browsers): a wrong or missing token gets HTTP 401 and no
  upgrade, so no audio is ever read. Beyond `server.max_calls` a call is accepted and closed at
  once with code 1013 ("try again later") and a reason. Messages over `max_message_bytes` close
  the call with 1009 (websockets does it). A call idle for `idle_timeout_s` is closed with 1000.
- Per call: a reader task (framing -> session) and a writer task (session outbox -> framing ->
  socket) that paces reply audio in real time, `playback_lead_ms` ahead of the client's playback,
  stops sending a turn's audio the moment the turn is flushed, and reports when the first audio
  byte of a turn went out.
- `VoiceServer.serve(stop)` runs until `stop` is set, then stops accepting, closes every call
  with 1001, waits up to `shutdown_grace_s` for the calls to end (each stores its last turn) and
  flushes the store. The token is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hmac
import http
import json
import logging
import mimetypes
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voice_agent.config import Config
from voice_agent.events import DROPPED_ON_INTERRUPT, CallStarted, Event, Flush, ReplyAudio
from voice_agent.metrics import Metrics
from voice_agent.session import Services, Session, TurnRecord
from voice_agent.store import CallStore
from voice_agent.transports import OutMessage
from voice_agent.transports.realtime import RealtimeProtocol
from voice_agent.transports.twilio import TwilioProtocol

__all__ = ["ROUTES", "VoiceServer"]

log = logging.getLogger(__name__)

ROUTES = {"/v1/realtime": "realtime", "/twilio": "twilio"}
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_GOING_AWAY = 1001


class _Sink:
    """A finished turn goes to the metrics, the store and the log."""

    def __init__(self, metrics: Metrics, store: CallStore | None) -> None:
        self.metrics = metrics
        self.store = store

    def turn_finished(self, call_id: str, record: TurnRecord) -> None:
        self.metrics.turn_finished(call_id, record)
        if self.store is not None:
            self.store.turn_finished(call_id, record)
        log.info("call %s turn %d %s: metrics %s", call_id, record.turn_id, record.status, json.dumps(record.metrics))


class VoiceServer:
    def __init__(
        self,
        config: Config,
        services: Services,
        *,
        store: CallStore | None = None,
        metrics: Metrics | None = None,
        model_name: str = "voice-agent",
    ) -> None:
        self.config = config
        self.services = services
        self.store = store
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self._sink = _Sink(self.metrics, store)
        self._server: Server | None = None
        self._started = time.monotonic()
        self.port: int | None = None

    # --- HTTP ----------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-cache"),
            ]
        )
        return Response(status, http.HTTPStatus(status).phrase, headers, body)

    def _authorized(self, request: Request) -> bool:
        token = self.config.server.token
        if not token:
            return True
        given = ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            query = parse_qs(urlsplit(request.path).query)
            given = (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in ROUTES:
            if not self._authorized(request):
                self.metrics.calls_rejected["unauthorized"] += 1
                log.warning("rejected a %s connection from %s: bad or missing token", path, connection.remote_address)
                return self._http(connection, 401, b"invalid or missing access token\n", "text/plain; charset=utf-8")
            return None  # upgrade
        if path == "/healthz":
            body = json.dumps(
                {
                    "status": "ok",
                    "calls_active": self.metrics.calls_active,
                    "uptime_s": round(time.monotonic() - self._started, 1),
                    "llm": getattr(self.services.llm, "name", "?"),
                }
            ).encode()
            return self._http(connection, 200, body, "application/json")
        if path == "/metrics":
            return self._http(connection, 200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        return self._static(connection, path)

    def _static(self, connection: ServerConnection, path: str) -> Response:
        parts = [p for p in path.split("/") if p]
        if not parts:
            parts = ["index.html"]
        if any(p.startswith(".") or p == "__init__.py" or p.endswith(".pyc") for p in parts) or "__pycache__" in parts:
            return self._http(connection, 404, b"not found\n", "text/plain; charset=utf-8")
        node = resources.files("voice_agent.web")
        for part in parts:
            node = node.joinpath(part)
        if not node.is_file():
            if parts == ["index.html"]:
                body = b"voice-agent: the web demo is not installed; the WebSocket routes are /v1/realtime and /twilio\n"
                return self._http(connection, 200, body, "text/plain; charset=utf-8")
            return self._http(connection, 404, b"not found\n", "text/plain; charset=utf-8")
        content_type = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
        if parts[-1].endswith(".js") or parts[-1].endswith(".mjs"):
            content_type = "text/javascript"
        if content_type.startswith("text/") or content_type == "application/json":
            content_type += "; charset=utf-8"
        return self._http(connection, 200, node.read_bytes(), content_type)

    # --- WebSocket calls -----------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        route = ROUTES.get(urlsplit(ws.request.path).path) if ws.request else None
        if route is None:  # process_request answered every other path
            await ws.close(1008, "unknown route")
            return
        if self.metrics.calls_active >= self.config.server.max_calls:
            self.metrics.calls_rejected["max_calls"] += 1
            log.warning("rejected a %s call: %d calls in progress (server.max_calls)", route, self.metrics.calls_active)
            await ws.close(CLOSE_TRY_AGAIN_LATER, f"too many calls: the limit is {self.config.server.max_calls}")
            return
        self.metrics.calls_active += 1
        self.metrics.calls_total[route] += 1
        try:
            await self._call(ws, route)
        finally:
            self.metrics.calls_active -= 1

    async def _call(self, ws: ServerConnection, route: str) -> None:
        server = self.config.server
        framing: RealtimeProtocol | TwilioProtocol
        if route == "realtime":
            framing = RealtimeProtocol(
                instructions=self.config.agent.system_prompt,
                model=self.model_name,
                sample_rate_hz=self.config.agent.sample_rate_hz,
                max_message_bytes=server.max_message_bytes,
            )
        else:
            framing = TwilioProtocol(max_message_bytes=server.max_message_bytes)
        session = Session(
            self.services,
            self.config.agent,
            sink=self._sink,
            max_outbox_events=server.max_queued_messages,
        )
        log.info("call %s: %s connected from %s", session.call_id, route, ws.remote_address)
        if self.store is not None:
            self.store.call_started(session.call_id, route)
        writer = asyncio.create_task(self._writer(ws, framing, session, local_marks=route == "realtime"), name="writer")
        try:
            for message in framing.start():
                await ws.send(message)
            while not session.ended:
                try:
                    async with asyncio.timeout(server.idle_timeout_s):
                        message = await ws.recv()
                except TimeoutError:
                    log.info("call %s: idle for %.0f s, closing", session.call_id, server.idle_timeout_s)
                    await ws.close(1000, "idle timeout")
                    break
                events = framing.feed(message)
                for out in framing.take_outgoing():
                    await ws.send(out)
                if isinstance(framing, TwilioProtocol) and framing.errors:
                    for why in framing.errors:
                        log.warning("call %s: ignored a Twilio message: %s", session.call_id, why)
                        self.metrics.error("protocol")
                    framing.errors.clear()
                for event in events:
                    if isinstance(event, CallStarted) and self.store is not None:
                        # customParameters may hold anything: only their names are logged.
                        info = {"call_sid": event.call_sid, "stream_sid": event.stream_sid, "parameters": event.parameters}
                        self.store.call_info(session.call_id, info)
                        log.info("call %s: Twilio call %s, parameters %s", session.call_id, event.call_sid, sorted(event.parameters))
                    await session.handle(event)
        except ConnectionClosed:
            pass
        finally:
            await session.close()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await writer
            if self.store is not None:
                self.store.call_ended(session.call_id)
            await ws.close(1000, "call ended")
            log.info("call %s: ended after %d turns", session.call_id, len(session.records))

    async def _writer(self, ws: ServerConnection, framing: Any, session: Session, *, local_marks: bool) -> None:
        """Outbox -> messages, with real-time pacing of the audio. Cancelling it is safe."""
        loop = asyncio.get_running_loop()
        lead_s = self.config.server.playback_lead_ms / 1000
        outbox = session.outbox
        play_end = 0.0  # loop time at which the audio sent so far will have played
        audio_started: set[int] = set()

        async def send_event(event: Event) -> None:
            nonlocal play_end
            if isinstance(event, Flush):
                play_end = loop.time()  # the client drops what it holds
            droppable = isinstance(event, DROPPED_ON_INTERRUPT)
            for message in framing.encode(event):
                if droppable and event.turn_id in outbox.flushed_turns:
                    return
                if message.audio_s:
                    await pace(message)
                    if droppable and event.turn_id in outbox.flushed_turns:
                        return
                await ws.send(message.data)
                if message.audio_s:
                    play_end = max(play_end, loop.time()) + message.audio_s
                    if isinstance(event, ReplyAudio) and event.turn_id not in audio_started:
                        audio_started.add(event.turn_id)
                        session.audio_sent(event.turn_id)
                    if local_marks and message.played_chunk is not None:
                        loop.call_at(play_end, session.playback_mark, event.turn_id, message.played_chunk)

        async def pace(message: OutMessage) -> None:
            """Wait until the client holds at most `lead_s` of unplayed audio; urgent events
            (a barge-in's flush) are sent while waiting."""
            while True:
                while outbox.has_urgent():
                    urgent = outbox.get_urgent_nowait()
                    if urgent is not None:
                        await send_event(urgent)
                wait_s = play_end - lead_s - loop.time()
                if wait_s <= 0 or message.turn_id in outbox.flushed_turns:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await outbox.wait_changed()

        while (event := await outbox.get()) is not None:
            await send_event(event)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> Server:
        """Listen (port 0 picks a free port: see `self.port`)."""
        server = self.config.server
        self._server = await serve(
            self._handler,
            server.host,
            server.port,
            process_request=self.process_request,
            origins=[None, *server.allowed_origins] if server.allowed_origins else None,
            # Limits
            max_size=server.max_message_bytes,
            max_queue=server.max_queued_messages,
            compression=None,  # audio does not compress; deflate only costs CPU
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self._server

    async def shutdown(self) -> None:
        """Stop accepting, close every call with 1001, wait for them, flush the store. Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        log.info("shutting down: closing %d call(s)", self.metrics.calls_active)
        server.close(close_connections=True)
        try:
            async with asyncio.timeout(self.config.server.shutdown_grace_s):
                await server.wait_closed()
        except TimeoutError:
            log.warning("calls did not end within %.0f s", self.config.server.shutdown_grace_s)
        if self.store is not None:
            await asyncio.to_thread(self.store.flush)

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down cleanly."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.shutdown()
