"""One port for the `websockets` server and an ASGI app (the chat API on `voice-agent serve`).

websockets answers only GET requests without a body (the WebSocket handshake and the server's
own pages); `POST /v1/chat/completions` needs a real HTTP/1.1 server. Rather than a second port,
each TCP connection is routed by its request line, before websockets parses anything:

- `SharedPortConnection` is the websockets connection class given to `serve(create_connection=)`.
  It holds back the connection's first bytes until the request line is complete (at most
  `MAX_REQUEST_LINE` bytes). A request for the ASGI app (`is_app_request`: any method but GET,
  or a GET under `/v1/` other than the WebSocket routes) is handed over, bytes included, to an
  HTTP/1.1 protocol object (uvicorn's h11 protocol running the app); the socket is then the
  app's for the rest of the connection (keep-alive included). Anything else goes on as websockets'.
- `AsgiHandover(app)` makes those protocol objects and shuts them down with the server.
- After a hand-over, websockets' own handshake task sees a lost connection at once and ends: its
  connection object keeps a detached stand-in for the transport, so nothing it does on the way
  out (`abort()`) reaches the socket now served by uvicorn.

This relies on the documented protocol interfaces of asyncio (`transport.set_protocol`) and on
websockets' `ServerConnection` being the asyncio protocol of its connections (websockets >= 14);
tests/voice_agent/test_chat_api_serve.py holds both sides to it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Collection
from typing import Any

from websockets.asyncio.server import ServerConnection

__all__ = ["MAX_REQUEST_LINE", "AsgiHandover", "SharedPortConnection", "is_app_request"]

MAX_REQUEST_LINE = 8192  # websockets' own limit on a request line


def is_app_request(request_line: bytes, websocket_paths: Collection[str]) -> bool:
    """Whether a request line (`METHOD PATH VERSION`) is the ASGI app's."""
    method, _, rest = request_line.partition(b" ")
    path = rest.partition(b" ")[0].split(b"?", 1)[0].decode("latin-1")
    if method != b"GET":
        return True
    return path.startswith("/v1/") and path not in websocket_paths


class _DetachedTransport:
    """What websockets' connection object holds once its socket has gone to the ASGI app:
    closing or aborting it does nothing; questions about the socket are still answered."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._extra = {name: transport.get_extra_info(name) for name in ("peername", "sockname")}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return True

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass


class AsgiHandover:
    """Serves an ASGI app on connections handed over by `SharedPortConnection`, with uvicorn's
    HTTP/1.1 (h11) protocol; no listening socket of its own."""

    def __init__(self, app: Any, *, max_request_line: int = MAX_REQUEST_LINE) -> None:
        from uvicorn.config import Config
        from uvicorn.protocols.http.h11_impl import H11Protocol
        from uvicorn.server import ServerState

        # No lifespan (the app has no startup work), no access log (the server logs each request
        # itself, without its query string), uvicorn leaves logging alone (log_config=None).
        self._config = Config(app, lifespan="off", access_log=False, log_config=None, http="h11",
                              h11_max_incomplete_event_size=max_request_line * 2)
        self._config.load()
        self._state = ServerState()
        self._protocol = functools.partial(H11Protocol, config=self._config, server_state=self._state, app_state={})

    def protocol(self) -> asyncio.Protocol:
        return self._protocol()

    @property
    def busy(self) -> int:
        """Requests being answered now."""
        return sum(not task.done() for task in self._state.tasks)

    async def shutdown(self, grace_s: float) -> None:
        """Close idle connections now and the others after their current response; after
        `grace_s`, cancel what is still running (an engine request is aborted with its task)."""
        for connection in list(self._state.connections):
            connection.shutdown()
        tasks = [task for task in self._state.tasks if not task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for connection in list(self._state.connections):
            connection.transport.close()


class SharedPortConnection(ServerConnection):
    """websockets' connection class for a port it shares with an ASGI app (module docstring).
    `handover`: the app's `AsgiHandover`, or None to route nothing (plain websockets)."""

    def __init__(self, *args: Any, handover: AsgiHandover | None, websocket_paths: Collection[str],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handover = handover
        self._websocket_paths = websocket_paths
        self._head: bytearray | None = bytearray() if handover is not None else None

    @classmethod
    def factory(cls, handover: AsgiHandover | None, websocket_paths: Collection[str]) -> Callable[..., ServerConnection]:
        return functools.partial(cls, handover=handover, websocket_paths=websocket_paths)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            super().data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n")
        if end < 0 and len(self._head) < MAX_REQUEST_LINE:
            return  # wait for the whole request line
        head, self._head = bytes(self._head), None
        line = head[:end] if end >= 0 else head
        if self._handover is not None and is_app_request(line, self._websocket_paths):
            self._hand_over(head)
        else:
            super().data_received(head)

    def eof_received(self) -> bool | None:
        if self._head:
            head, self._head = bytes(self._head), None
            super().data_received(head)
        self._head = None
        return super().eof_received()

    def _hand_over(self, head: bytes) -> None:
        assert self._handover is not None
        transport = self.transport
        http = self._handover.protocol()
        self.transport = _DetachedTransport(transport)  # type: ignore[assignment]
        transport.set_protocol(http)
        http.connection_made(transport)
        http.data_received(head)
        # websockets' handshake waits for a request that will never reach it: end that wait now.
        self.connection_lost(None)
