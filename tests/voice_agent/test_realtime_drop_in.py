"""The official openai SDK against the real server (fake speech models): the agent speaks first,
system items mid-call, retrieve, usage, and a function-call round trip with the local LLM client
(a fake that makes the call) and with the OpenAI-compatible client against a stub backend."""

from __future__ import annotations

import asyncio
import json

from openai import AsyncOpenAI
from openai_stub import stub_backend
from va_fakes import FakeLLM, FakeServices
from va_server import make_config, running

from voice_agent.config import LlmConfig
from voice_agent.llm import OpenAICompatibleLLM, ToolCall

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
LIMIT = 200  # events read per response at most: a broken server fails, never hangs


async def until_done(conn) -> list:
    events = []
    for _ in range(LIMIT):
        event = await asyncio.wait_for(conn.recv(), 10)
        events.append(event)
        assert event.type != "error", event
        if event.type == "response.done":
            return events
    raise AssertionError("no response.done")


def text_of(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_the_agent_greets_first_and_takes_system_items_mid_call():
    async def main():
        llm = FakeLLM("Hello, Sam's office.")
        async with running(services=FakeServices(llm)) as server:
            client = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.port}/v1")
            async with client.realtime.connect(model="voice-agent") as conn:
                await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                                   "instructions": "Greet the caller as Sam's office."})
                await conn.response.create()
                events = await until_done(conn)
                assert text_of(events).strip() == "Hello, Sam's office."
                done = events[-1].response
                assert done.status == "completed" and done.usage.output_tokens == 3 and done.usage.input_tokens > 0
                assert llm.requests[-1] == [{"role": "system", "content": "Greet the caller as Sam's office."}]
                await conn.conversation.item.create(item={"type": "message", "role": "system", "id": "ctx_1",
                                                          "content": [{"type": "input_text", "text": "The caller is Ana."}]})
                await conn.response.create()
                await until_done(conn)
                assert [m["role"] for m in llm.requests[-1]] == ["system", "assistant", "system"]
                await conn.conversation.item.retrieve(item_id="ctx_1")
                event = await asyncio.wait_for(conn.recv(), 10)
                while event.type in ("voice_agent.metrics", "conversation.item.added", "conversation.item.done"):
                    event = await asyncio.wait_for(conn.recv(), 10)
                assert event.type == "conversation.item.retrieved" and event.item.content[0].text == "The caller is Ana."

    asyncio.run(main())


async def tool_round_trip(port: int) -> tuple[object, str, list[str]]:
    """A text session with one tool: ask, get the call, answer it, get the words. Returns the
    arguments-done event, the final text and the event types of the call's response."""
    client = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1")
    async with client.realtime.connect(model="voice-agent") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"], "tools": [WEATHER],
                                           "tool_choice": "auto"})
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Weather in Oslo?"}]})
        await conn.response.create()
        events = await until_done(conn)
        (call,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert [o.type for o in events[-1].response.output] == ["function_call"]
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                  "output": json.dumps({"temp_c": 4})})
        await conn.response.create()
        final = await until_done(conn)
        return call, text_of(final), [e.type for e in events]


def test_a_function_call_round_trip_with_the_local_client():
    async def main():
        llm = FakeLLM()
        # The call alone, then the answer.
        llm.script = [("", [ToolCall("get_weather", '{"city": "Oslo"}', "call_local")]), ("It is 4 degrees in Oslo.", [])]
        async with running(services=FakeServices(llm)) as server:
            call, text, kinds = await tool_round_trip(server.port)
            assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
            assert "response.output_text.delta" not in kinds
            assert text.strip() == "It is 4 degrees in Oslo."
            assert llm.requests[-1][-1] == {"role": "tool", "tool_call_id": "call_local", "content": '{"temp_c": 4}'}

    asyncio.run(main())


def test_a_function_call_round_trip_through_an_openai_compatible_backend():
    async def main(stub):
        config = make_config()
        config.llm = LlmConfig(backend="openai", base_url=stub.url, api_model="stub")
        llm = OpenAICompatibleLLM(config.llm)
        async with running(config, services=FakeServices(llm)) as server:
            call, text, _ = await tool_round_trip(server.port)
        assert call.call_id == "call_stub_1" and json.loads(call.arguments) == {"city": "Oslo"}
        assert text.strip() == 'The result is {"temp_c": 4}.'
        first, second = stub.requests
        assert first["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
        assert second["messages"][-2]["tool_calls"][0]["id"] == "call_stub_1"
        assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_stub_1", "content": '{"temp_c": 4}'}

    with stub_backend() as stub:
        asyncio.run(main(stub))
