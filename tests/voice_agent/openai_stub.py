"""A stub OpenAI-compatible chat backend on 127.0.0.1, for `llm.backend = "openai"` tests: a real
HTTP server (uvicorn, Starlette) that streams as OpenAI does. Where the request has tools and the
conversation holds no function result yet, it calls the first tool with `arguments`; after a
result it answers in words that quote the result. Every request body is kept in `requests`."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


class StubBackend:
    def __init__(self, arguments: str = '{"city": "Oslo"}') -> None:
        self.arguments = arguments
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    def _chunks(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        messages = body["messages"]
        result = next((m["content"] for m in reversed(messages) if m["role"] == "tool"), None)
        if body.get("tools") and result is None and body.get("tool_choice") != "none":
            name = body["tools"][0]["function"]["name"]
            yield {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_stub_1", "type": "function", "function": {"name": name, "arguments": ""}}]},
                "finish_reason": None}]}
            half = len(self.arguments) // 2
            for piece in (self.arguments[:half], self.arguments[half:]):
                yield {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                                    "finish_reason": None}]}
            yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
            return
        text = f"The result is {result}." if result is not None else "Hello from the stub."
        for word in text.split(" "):
            yield {"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    async def _completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.requests.append(body)

        def stream() -> Iterator[str]:
            for chunk in self._chunks(body):
                yield f"data: {json.dumps({'object': 'chat.completion.chunk', **chunk})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"]),
                                 Route("/v1/models", self._models)])


@contextmanager
def stub_backend(arguments: str = '{"city": "Oslo"}') -> Iterator[StubBackend]:
    """The stub, serving in a thread for the duration of the block."""
    stub = StubBackend(arguments)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(stub.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the stub backend did not start")
        time.sleep(0.01)
    stub.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield stub
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
