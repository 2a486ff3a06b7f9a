"""OpenAICompatibleLLM against a mock transport: SSE parsing, errors, the bearer key."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest

from voice_agent.config import LlmConfig
from voice_agent.llm import LlmError, LlmOptions, OpenAICompatibleLLM, ToolCall


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


def test_a_stream_cut_before_done_or_carrying_an_error_raises_llm_error():
    cut = sse("Hel", "lo.").replace(b"data: [DONE]\n\n", b"")  # the server died mid-reply
    with pytest.raises(LlmError, match="ended before the reply"):
        collect(client(lambda r: httpx2.Response(200, content=cut)))
    error = b'data: {"error": {"message": "The engine failed this request", "type": "server_error"}}\n\n'
    with pytest.raises(LlmError, match="engine failed"):
        collect(client(lambda r: httpx2.Response(200, content=sse("Hel").replace(b"data: [DONE]\n\n", error))))


def test_forwards_and_tokens_reported_by_a_voice_agent_tier_reach_the_last_delta():
    chunk = {"choices": [{"delta": {}, "finish_reason": "length"}], "voice_agent": {"forwards": 7, "completion_tokens": 9}}
    body = sse("Hi", " there").replace(b"data: [DONE]", f"data: {json.dumps(chunk)}\n\ndata: [DONE]".encode())
    deltas = collect(client(lambda r: httpx2.Response(200, content=body)))
    assert deltas[-1].finished and deltas[-1].finish_reason == "length" and deltas[-1].steps == 7
    assert deltas[-1].tokens == 9  # the tier's count, not the 2 chunks
    plain = collect(client(lambda r: httpx2.Response(200, content=sse("Hi", " there"))))
    assert plain[-1].tokens == 2 and plain[-1].steps is None  # elsewhere: one token per chunk


def test_health_asks_the_models_route_and_caches_the_answer():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        return httpx2.Response(503 if len(calls) == 1 else 200, json={"data": []})

    llm = client(handler)

    async def main():
        first = await llm.health()
        again = await llm.health()  # within HEALTH_CACHE_S: not asked again
        llm._health_at -= 10  # as if the cache had expired
        later = await llm.health()
        return first, again, later

    first, again, later = asyncio.run(main())
    assert first == again == {"reachable": False, "error": "http://llm.test/v1/models: HTTP 503"}
    assert later == {"reachable": True}
    assert calls == ["/v1/models", "/v1/models"]

    def down(request):
        raise httpx2.ConnectError("connection refused")

    health = asyncio.run(client(down).health())
    assert health["reachable"] is False and "ConnectError" in health["error"] and "sk-secret" not in health["error"]


def test_tools_pass_through_and_streamed_calls_are_joined():
    seen = {}
    chunks = [
        {"choices": [{"delta": {"content": "Checking."}, "finish_reason": None}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}, "finish_reason": None}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}, "finish_reason": None}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ]

    def handler(request):
        seen["body"] = json.loads(request.content)
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx2.Response(200, content=body.encode(), headers={"Content-Type": "text/event-stream"})

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

    async def main():
        llm = client(handler)
        options = LlmOptions(max_tokens=7, tools=[tool], tool_choice="auto")
        return [d async for d in llm.stream([{"role": "user", "content": "hi"}], options=options)]

    deltas = asyncio.run(main())
    assert seen["body"]["tools"] == [tool] and seen["body"]["tool_choice"] == "auto" and seen["body"]["max_tokens"] == 7
    assert "".join(d.text for d in deltas) == "Checking."
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].tool_calls == [ToolCall("get_weather", '{"city": "Oslo"}', "call_9")]


def test_a_tool_call_without_a_name_is_an_error():
    chunk = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, "finish_reason": None}]}

    def handler(request):
        return httpx2.Response(200, content=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(),
                               headers={"Content-Type": "text/event-stream"})

    with pytest.raises(LlmError, match="without a function name"):
        collect(client(handler))
