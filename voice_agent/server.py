"""One `websockets` asyncio server: `/v1/realtime`, `/twilio`, the web demo, `/healthz`,
`/metrics`, and on the same port the OpenAI-compatible chat API (`/v1/chat/completions`,
`/v1/models`: voice_agent/chat_api.py) of the local engine.

Contract:
- HTTP routes are answered in `process_request` (before any WebSocket upgrade): `/` and the
  files of the installed `voice_agent.web` package, `/healthz` (JSON; 503 with `llm_error` while
  the LLM cannot serve, e.g. a remote LLM tier that is unreachable), `/metrics` (Prometheus).
- The chat API's requests (POSTs, and GETs under /v1/ but the realtime route) are handed to its
  ASGI app before websockets parses them (voice_agent/shared_port.py). With a remote LLM, or
  `api.enabled = false`, its routes answer 404 saying why. Same access token as the calls.
- WebSocket routes check the access token first (`Authorization: Bearer <token>`, which the
  openai SDK sends, or `?token=` for browsers): a wrong or missing token gets HTTP 401 and no
  upgrade, so no audio is ever read. Beyond `server.max_calls` a call is accepted and closed at
  once with 1013 ("try again later") and a reason. Messages over `max_message_bytes` close
  the call with 1009 (websockets does it). A call idle for `idle_timeout_s` is closed with 1000;
  a `/twilio` connection without `start` within `start_timeout_s` with 1008.
- Backpressure: the reader stops reading the client while the session's outbox holds more than
  `max_queued_messages` events past its ordered lane (errors and other answers the client has
  not taken), and every send waits at most `send_timeout_s`: a client that never reads holds a
  bounded backlog, then is closed with 1008 "client is not reading".
- Faults: an exception while applying one client message is logged and answered with an
  `error` (`server_error`); the call goes on. A writer that fails closes its call with 1011.
  Messages the Twilio framing ignores are counted; the first few of each call are logged.
- Per call: a reader task (framing -> session) and a writer task (session outbox -> framing ->
  socket) that paces reply audio in real time, `playback_lead_ms` ahead of the client's playback,
  stops sending a turn's audio the moment the turn is flushed, and reports when the first audio
  byte of a turn went out.
- `VoiceServer.serve(stop)` runs until `stop` is set, then drains: it stops accepting, gives the
  replies in progress up to `shutdown_grace_s` to finish, closes every call with 1001 "server
  shutting down" (each stores its last turn) and flushes the store.
- The store is ahead of the client: a turn's `response.done` is sent only once the turn is
  committed, so a killed process loses no turn its caller saw finish.
- Memory: an ended call is freed when it ends (no reference cycle holds it: tests check); when the
  last call ends and the models' work has drained, a full garbage collection runs (a backstop)
  and the C heap's free pages go back to the system (`dlm.memory.release_free_memory`, glibc's
  malloc_trim).
- The token is never logged: websockets' own log lines (DEBUG shows request lines and headers)
  go through a filter that masks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import http
import json
import logging
import mimetypes
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from dlm.memory import release_free_memory
from voice_agent.access import token_ok
from voice_agent.config import Config
from voice_agent.events import (
    DROPPED_ON_INTERRUPT,
    CallStarted,
    ErrorEvent,
    Event,
    Flush,
    ReplyAudio,
    ResponseDone,
)
from voice_agent.metrics import Metrics
from voice_agent.session import Services, Session, TokenBucket, TurnRecord
from voice_agent.shared_port import AsgiHandover, SharedPortConnection
from voice_agent.store import CallStore
from voice_agent.transports import OutMessage
from voice_agent.transports.realtime import RealtimeProtocol
from voice_agent.transports.twilio import TwilioProtocol

__all__ = ["ROUTES", "VoiceServer"]

log = logging.getLogger(__name__)

ROUTES = {"/v1/realtime": "realtime", "/twilio": "twilio"}
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
# Ignored Twilio messages logged per call; the rest are only counted (a flood must not fill the log).
MAX_LOGGED_PROTOCOL_ERRORS = 5
IDLE_TRIM_WAIT_S = 5.0  # after the last call: how long to wait for the models' work to drain before trimming


class _ClientNotReading(Exception):
    """A send to the client did not complete within `server.send_timeout_s`."""


class _RedactToken(logging.Filter):
    """Masks credentials in log records: websockets logs request lines and headers at DEBUG. Any
    `token=` value and any Authorization header is masked, not only the right token: a rejected
    one is often a near miss of it."""

    _CREDENTIALS = re.compile(r"(?i)(token=)[^&\s]*|(authorization: *\S+ +)\S+|(authorization: *)(?!\S+ +\S)\S+")

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self._CREDENTIALS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "<redacted>", message)
        if self.token:
            masked = masked.replace(self.token, "<redacted>")
        if masked != message:
            record.msg, record.args = masked, None
        return True


class _Sink:
    """A finished turn goes to the metrics, the store and the log."""

    def __init__(self, metrics: Metrics, store: CallStore | None) -> None:
        self.metrics = metrics
        self.store = store
        self.turn_ended = asyncio.Event()  # set at every finished turn (the shutdown drain waits on it)

    def turn_finished(self, call_id: str, record: TurnRecord) -> None:
        self.metrics.turn_finished(call_id, record)
        if self.store is not None:
            self.store.turn_finished(call_id, record)
        log.info("call %s turn %d %s: metrics %s", call_id, record.turn_id, record.status, json.dumps(record.metrics))
        self.turn_ended.set()


class VoiceServer:
    def __init__(
        self,
        config: Config,
        services: Services,
        *,
        store: CallStore | None = None,
        metrics: Metrics | None = None,
        model_name: str = "voice-agent",
        model_names: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.services = services
        self.store = store
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        # By role ("asr", "llm", "tts"): reported to Realtime clients in the session object.
        self.model_names = dict(model_names or {"llm": model_name})
        self._sink = _Sink(self.metrics, store)
        self._server: Server | None = None
        self._started = time.monotonic()
        self.port: int | None = None
        # Calls in progress: call id -> (session, connection, writer task).
        self._calls: dict[str, tuple[Session, ServerConnection, asyncio.Task[None]]] = {}
        self._ws_log = logging.getLogger("websockets.server")
        self._ws_log_filter = _RedactToken(config.server.token)
        self._not_reading_calls: set[str] = set()
        self._background_tasks: set[asyncio.Task[Any]] = set()
        self._trimming = False  # a _trim_when_idle is waiting
        self._handover: AsgiHandover | None = None  # the chat API's connections (voice_agent.shared_port)

    @property
    def sessions(self) -> dict[str, Session]:
        """The sessions of the calls in progress, by call id."""
        return {call_id: session for call_id, (session, _, _) in self._calls.items()}

    # --- HTTP ----------------------------------------------------------------------------------

    def _http(self, status: int, body: bytes, content_type: str) -> Response:
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
        query = (parse_qs(urlsplit(request.path).query).get("token") or [""])[0]
        return token_ok(self.config.server.token, request.headers.get("Authorization", ""), query)

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in ROUTES:
            if not self._authorized(request):
                self.metrics.calls_rejected["unauthorized"] += 1
                log.warning("rejected a %s connection from %s: bad or missing token", path, connection.remote_address)
                return self._http(401, b"invalid or missing access token\n", "text/plain; charset=utf-8")
            return None  # upgrade
        return self._http(*await self.answer_get(path))

    async def answer_get(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) of a GET route: /healthz, /metrics, the web page. The chat
        API's app answers with it too, on a kept-alive connection that it took over."""
        if path == "/healthz":
            health = await self._llm_health()
            body = {
                "status": "ok" if health["reachable"] else "degraded",
                "calls_active": self.metrics.calls_active,
                "uptime_s": round(time.monotonic() - self._started, 1),
                "llm": getattr(self.services.llm, "name", "?"),
                "llm_reachable": health["reachable"],
                "work": self._work(),
            }
            if not health["reachable"]:
                body["llm_error"] = health.get("error", "unreachable")
            # 503 takes a frontend whose LLM tier is gone out of a load balancer's rotation.
            return (200 if health["reachable"] else 503), json.dumps(body).encode(), "application/json"
        if path == "/metrics":
            return 200, self.metrics.render(self._work()).encode(), "text/plain; version=0.0.4; charset=utf-8"
        return self._static(path)

    def _work(self) -> dict[str, int]:
        """The work gauges /healthz and /metrics report: the models' (`ModelServices.work()`) and
        the heap trim after the last call (`_trim_when_idle`), so that "idle" means nothing left to
        run, the server's own clean-up included."""
        return {**self.services.work(), "heap_trim": int(self._trimming)}

    async def _llm_health(self) -> dict[str, Any]:
        health = getattr(self.services.llm, "health", None)
        if health is None:
            return {"reachable": True}
        try:
            return await health()
        except Exception as e:  # a health probe must never take /healthz down with it
            log.warning("the LLM's health check failed", exc_info=True)
            return {"reachable": False, "error": f"health check failed: {type(e).__name__}"}

    def _static(self, path: str) -> tuple[int, bytes, str]:
        not_found = 404, b"not found\n", "text/plain; charset=utf-8"
        parts = [p for p in path.split("/") if p]
        if not parts:
            parts = ["index.html"]
        if any(p.startswith(".") or p == "__init__.py" or p.endswith(".pyc") for p in parts) or "__pycache__" in parts:
            return not_found
        node = resources.files("voice_agent.web")
        for part in parts:
            node = node.joinpath(part)
        if not node.is_file():
            if parts == ["index.html"]:
                body = b"voice-agent: the web demo is not installed; the WebSocket routes are /v1/realtime and /twilio\n"
                return 200, body, "text/plain; charset=utf-8"
            return not_found
        content_type = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
        if parts[-1].endswith(".js") or parts[-1].endswith(".mjs"):
            content_type = "text/javascript"
        if content_type.startswith("text/") or content_type == "application/json":
            content_type += "; charset=utf-8"
        return 200, node.read_bytes(), content_type

    # --- the chat API --------------------------------------------------------------------------

    def _chat_app(self) -> Any:
        """The chat API's ASGI app: the local engine's, or one that says why there is none."""
        from voice_agent.chat_api import ChatService, chat_app
        from voice_agent.llm import LocalDLM

        llm = self.services.llm
        service = None
        if not self.config.api.enabled:
            unavailable = "the chat API is off on this server (api.enabled = false)"
        elif not isinstance(llm, LocalDLM):
            unavailable = (f"this server's LLM is not local ({getattr(llm, 'name', '?')}); send chat requests to "
                           "that server itself")
        else:
            unavailable = ""
            service = ChatService.of(llm, self.config)
        return chat_app(service, fallback=self.answer_get, unavailable=unavailable)

    # --- WebSocket calls -----------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        route = ROUTES.get(urlsplit(ws.request.path).path) if ws.request else None
        if route is None:  # process_request answered every other path
            await self._close(ws, 1008, "unknown route")
            return
        if self.metrics.calls_active >= self.config.server.max_calls:
            self.metrics.calls_rejected["max_calls"] += 1
            log.warning("rejected a %s call: %d calls in progress (server.max_calls)", route, self.metrics.calls_active)
            await self._close(ws, CLOSE_TRY_AGAIN_LATER, f"too many calls: the limit is {self.config.server.max_calls}")
            return
        self.metrics.calls_active += 1
        self.metrics.calls_total[route] += 1
        try:
            await self._call(ws, route)
        finally:
            self.metrics.calls_active -= 1
            if self.metrics.calls_active == 0 and not self._trimming:
                self._trimming = True
                self._background(self._trim_when_idle())

    async def _trim_when_idle(self) -> None:
        """Once the models' work has drained (within IDLE_TRIM_WAIT_S) and no call has started,
        hand the C heap's free pages back to the system: a flood of calls leaves tens of MB of
        freed buffers (prompts, audio, tensors) in the process otherwise, a little more each time."""
        try:
            deadline = time.monotonic() + IDLE_TRIM_WAIT_S
            # Polled: the work gauges belong to the models' threads, which signal nothing.
            while any(self.services.work().values()) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            if self.metrics.calls_active == 0:
                gc.collect()  # a backstop for cycles we missed (cheap once serve has frozen the models' objects)
                await asyncio.to_thread(release_free_memory)
        finally:
            self._trimming = False

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close with a code and a reason. A client that does not take the close frame within
        `send_timeout_s` is cut off (TCP abort): websockets' own close waits for the socket to
        drain without a time limit. Idempotent; cancelling it is safe."""
        try:
            async with asyncio.timeout(self.config.server.send_timeout_s):
                await ws.close(code, reason)
        except TimeoutError:
            ws.transport.abort()

    async def _send(self, ws: ServerConnection, data: str) -> None:
        """Send one message; raises _ClientNotReading after `send_timeout_s`. Cancelling it is safe."""
        try:
            async with asyncio.timeout(self.config.server.send_timeout_s):
                await ws.send(data)
        except TimeoutError:
            raise _ClientNotReading from None

    async def _recv(self, ws: ServerConnection, framing: Any, *, start_deadline: float | None) -> str | bytes | None:
        """The next message; None when the call should end (idle, or no Twilio `start` in time),
        after closing it with the reason."""
        server = self.config.server
        loop = asyncio.get_running_loop()
        timeout_s = server.idle_timeout_s
        waiting_start = start_deadline is not None and framing.stream_sid is None
        if waiting_start:
            timeout_s = min(timeout_s, max(0.0, start_deadline - loop.time()))
        try:
            async with asyncio.timeout(timeout_s):
                return await ws.recv()
        except TimeoutError:
            pass
        if waiting_start and loop.time() >= start_deadline:
            log.info("closing a /twilio connection: no 'start' within %.0f s", server.start_timeout_s)
            self.metrics.error("no_start")
            await self._close(ws, CLOSE_POLICY_VIOLATION, f"no 'start' message within {server.start_timeout_s:g} s")
        else:
            await self._close(ws, 1000, "idle timeout")
        return None

    async def _call(self, ws: ServerConnection, route: str) -> None:
        server = self.config.server
        framing: RealtimeProtocol | TwilioProtocol
        if route == "realtime":
            framing = RealtimeProtocol(
                instructions=self.config.agent.system_prompt,
                model=self.model_name,
                models=self.model_names,
                sample_rate_hz=self.config.agent.sample_rate_hz,
                max_message_bytes=server.max_message_bytes,
                max_instructions_tokens=self.config.agent.max_instructions_tokens,
                count_tokens=self.services.llm.count_tokens,
                max_item_chars=self.config.agent.max_item_chars,
            )
        else:
            framing = TwilioProtocol(max_message_bytes=server.max_message_bytes)
        session = Session(
            self.services,
            self.config.agent,
            sink=self._sink,
            max_outbox_events=server.max_queued_messages,
        )
        call_id = session.call_id
        log.info("call %s: %s connected from %s", call_id, route, ws.remote_address)
        if self.store is not None:
            self.store.call_started(call_id, route)
        writer = asyncio.create_task(self._writer(ws, framing, session, local_marks=route == "realtime"), name="writer")
        writer.add_done_callback(lambda task: self._writer_done(task, ws, call_id))
        self._calls[call_id] = (session, ws, writer)
        loop = asyncio.get_running_loop()
        start_deadline = loop.time() + server.start_timeout_s if route == "twilio" else None
        protocol_errors = 0
        closed = asyncio.ensure_future(ws.wait_closed())  # done once the connection is gone
        pacer = TokenBucket(server.max_messages_per_s, server.max_messages_per_s, time.monotonic)
        try:
            for message in framing.start():
                await self._send(ws, message)
            while not session.ended:
                # Every call shares the event loop: a client past max_messages_per_s is read slower.
                if (delay_s := pacer.borrow(1.0)) > 0:
                    await asyncio.sleep(delay_s)
                message = await self._recv(ws, framing, start_deadline=start_deadline)
                if message is None:
                    break
                events = framing.feed(message)
                for out in framing.take_outgoing():
                    await self._send(ws, out)
                if isinstance(framing, TwilioProtocol) and framing.errors:
                    for why in framing.errors:
                        protocol_errors += 1
                        if protocol_errors <= MAX_LOGGED_PROTOCOL_ERRORS:
                            log.warning("call %s: ignored a Twilio message: %s", call_id, why)
                        self.metrics.error("protocol")
                    framing.errors.clear()
                for event in events:
                    if isinstance(event, CallStarted) and self.store is not None:
                        # customParameters may hold anything: only their names are logged.
                        info = {"call_sid": event.call_sid, "stream_sid": event.stream_sid, "parameters": event.parameters}
                        self.store.call_info(call_id, info)
                        log.info("call %s: Twilio call %s, parameters %s", call_id, event.call_sid, sorted(event.parameters))
                    try:
                        await session.handle(event)  # returns at once: heavy work goes to tasks
                    except Exception as e:  # a bug in handling one message must not end the call
                        log.exception("call %s: failed to apply %s", call_id, type(event).__name__)
                        self.metrics.error("session")
                        session.outbox.put_urgent(ErrorEvent(t=time.monotonic(), code="server_error", message=f"{type(e).__name__}: {e}",
                                                             client_event_id=event.client_event_id))
                # Backpressure: stop reading while the client leaves its answers unread. A
                # connection that closes meanwhile (the writer ends) ends the call at once: its
                # work must not wait for send_timeout_s.
                if session.outbox.backlog() > server.max_queued_messages:
                    drained = asyncio.ensure_future(session.outbox.wait_backlog(server.max_queued_messages))
                    try:
                        done, _ = await asyncio.wait({drained, closed, writer}, timeout=server.send_timeout_s,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        drained.cancel()
                    if drained not in done:
                        if done:
                            break  # the connection closed or the writer ended
                        raise _ClientNotReading
        except ConnectionClosed:
            pass
        except _ClientNotReading:
            await self._not_reading(ws, call_id)
        finally:
            closed.cancel()
            await session.close()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, _ClientNotReading):
                await writer
            self._calls.pop(call_id, None)
            if self.store is not None:
                self.store.call_ended(call_id)
            if protocol_errors > MAX_LOGGED_PROTOCOL_ERRORS:
                log.warning("call %s: %d Twilio messages ignored in all", call_id, protocol_errors)
            await self._close(ws, 1000, "call ended")
            log.info("call %s: ended after %d turns", call_id, session.turn_count)

    async def _not_reading(self, ws: ServerConnection, call_id: str) -> None:
        """Close a call whose client takes no messages (once, whoever notices first)."""
        if call_id in self._not_reading_calls or ws.close_code is not None:
            return
        self._not_reading_calls.add(call_id)
        log.warning("call %s: the client took no message for %.0f s, closing", call_id, self.config.server.send_timeout_s)
        self.metrics.error("client_not_reading")
        try:
            # The close frame may not get through either: _close cuts the connection then.
            await self._close(ws, CLOSE_POLICY_VIOLATION, "client is not reading")
        finally:
            self._not_reading_calls.discard(call_id)

    def _writer_done(self, task: asyncio.Task[None], ws: ServerConnection, call_id: str) -> None:
        """A writer that stopped on its own (not cancelled) ends its call."""
        if task.cancelled():
            return
        error = task.exception()
        if error is None or isinstance(error, ConnectionClosed):
            return
        if isinstance(error, _ClientNotReading):
            self._background(self._not_reading(ws, call_id))
            return
        log.error("call %s: the writer failed, closing the call", call_id, exc_info=error)
        self.metrics.error("writer")
        self._background(self._close(ws, CLOSE_INTERNAL_ERROR, "internal error"))

    def _background(self, coro: Any) -> None:
        """Run `coro` without waiting for it; the server keeps a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

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
            if isinstance(event, ResponseDone) and self.store is not None:
                await self.store.barrier()  # the turn is on disk before the client hears it ended
            droppable = isinstance(event, DROPPED_ON_INTERRUPT)
            for message in framing.encode(event):
                if droppable and event.turn_id in outbox.flushed_turns:
                    return
                if message.audio_s:
                    await pace(message, send_event)
                    if droppable and event.turn_id in outbox.flushed_turns:
                        return
                await self._send(ws, message.data)
                if message.audio_s:
                    play_end = max(play_end, loop.time()) + message.audio_s
                    if isinstance(event, ReplyAudio) and event.turn_id not in audio_started:
                        audio_started.add(event.turn_id)
                        session.audio_sent(event.turn_id)
                    if local_marks and message.played_chunk is not None:
                        loop.call_at(play_end, session.playback_mark, event.turn_id, message.played_chunk)

        async def pace(message: OutMessage, send: Callable[[Event], Awaitable[None]]) -> None:
            """Wait until the client holds at most `lead_s` of unplayed audio; urgent events
            (a barge-in's flush) are sent while waiting. `send` is `send_event`, passed in: two
            closures naming each other are a reference cycle, which would keep the session alive
            after the call until a full garbage collection."""
            while True:
                while outbox.has_urgent():
                    urgent = outbox.get_urgent_nowait()
                    if urgent is not None:
                        await send(urgent)
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
        self._ws_log.addFilter(self._ws_log_filter)
        self._handover = AsgiHandover(self._chat_app())
        self._server = await serve(
            self._handler,
            server.host,
            server.port,
            create_connection=SharedPortConnection.factory(self._handover, ROUTES),
            process_request=self.process_request,
            origins=[None, *server.allowed_origins] if server.allowed_origins else None,
            logger=self._ws_log,
            # Limits
            max_size=server.max_message_bytes,
            max_queue=server.max_queued_messages,
            compression=None,  # audio does not compress; deflate only costs CPU
            # Timeouts
            close_timeout=server.send_timeout_s,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self._server

    async def shutdown(self) -> None:
        """Drain (see the module docstring) and flush the store. Idempotent. Takes at most about
        `shutdown_grace_s + send_timeout_s`."""
        if self._server is None:
            return
        server, self._server = self._server, None
        grace_s = self.config.server.shutdown_grace_s
        server.close(close_connections=False)  # stop accepting; the calls go on for now
        busy = sum(session.replying for session, _, _ in self._calls.values())
        log.info("shutting down: %d call(s), %d with a reply in progress (up to %.0f s to finish)", len(self._calls), busy, grace_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        try:
            async with asyncio.timeout(grace_s):
                while any(session.replying for session, _, _ in self._calls.values()):
                    self._sink.turn_ended.clear()
                    await self._sink.turn_ended.wait()
        except TimeoutError:
            log.warning("replies still in progress after %.0f s: closing anyway", grace_s)
        # The writers send what is queued (a finished reply's response.done), then end.
        for session, _, _ in self._calls.values():
            session.outbox.close()
        writers = [writer for _, _, writer in self._calls.values()]
        if writers:
            await asyncio.wait(writers, timeout=max(0.1, deadline - loop.time()))
        for _, ws, _ in list(self._calls.values()):
            self._background(self._close(ws, CLOSE_GOING_AWAY, "server shutting down"))
        try:
            async with asyncio.timeout(self.config.server.send_timeout_s + 1):
                await server.wait_closed()
        except TimeoutError:
            log.warning("calls did not end within %.0f s of their close", self.config.server.send_timeout_s)
        if self._handover is not None:
            # Chat API requests in progress get what is left of the grace period.
            await self._handover.shutdown(max(0.1, deadline - loop.time()))
            self._handover = None
        if self.store is not None:
            await asyncio.to_thread(self.store.flush)
        self._ws_log.removeFilter(self._ws_log_filter)

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down cleanly."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.shutdown()
