"""OpenAICompatibleLLM against a mock transport: SSE parsing, errors, the bearer key."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest

from voice_agent.config import LlmConfig
from voice_agent.llm import LlmError, OpenAICompatibleLLM


def sse(*chunks: str) -> bytes:
    lines = [f"data: {json.dumps({'choices': [{'delta': {'content': c}, 'finish_reason': None}]})}\n\n" for c in chunks]
    return ("".join(lines) + ": keep-alive\n\ndata: [DONE]\n\n").encode()


def client(handler) -> OpenAICompatibleLLM:
    config = LlmConfig(backend="openai", base_url="http://llm.test/v1", api_model="mercury")
    return OpenAICompatibleLLM(config, api_key="sk-secret", transport=httpx2.MockTransport(handler))


def collect(llm) -> list:
    async def main():
        return [d async for d in llm.stream([{"role": "user", "content": "hi"}])]

    return asyncio.run(main())


def test_streams_deltas_and_sends_the_key_and_model():
    seen = {}

    def handler(request):
        seen["auth"] = request.headers["Authorization"]
        seen["body"] = json.loads(request.content)
        return httpx2.Response(200, content=sse("Hel", "lo."), headers={"Content-Type": "text/event-stream"})

    deltas = collect(client(handler))
    assert "".join(d.text for d in deltas) == "Hello."
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert seen["auth"] == "Bearer sk-secret"
    assert seen["body"]["model"] == "mercury" and seen["body"]["stream"] is True


def test_http_errors_and_malformed_chunks_raise_llm_error_without_the_key():
    with pytest.raises(LlmError) as info:
        collect(client(lambda r: httpx2.Response(401, content=b"bad key")))
    assert "401" in str(info.value) and "sk-secret" not in str(info.value)
    with pytest.raises(LlmError):
        collect(client(lambda r: httpx2.Response(200, content=b"data: {nope\n\n")))
