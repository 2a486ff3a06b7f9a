"""Function calls with the embedded SmolLM2 through the chat API (`serve-llm`, the official openai
SDK as the client, streamed and not), and a Realtime call whose frontend's LLM is that tier: the
model's call reaches the Realtime client, its result goes back through the tier, and the answer
comes in words."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from test_realtime_drop_in import tool_round_trip
from tier_helpers import TOKEN, RunningTier
from va_fakes import FakeServices
from va_server import make_config, running

from voice_agent.bench.tool_cases import TOOLS
from voice_agent.config import Config, LlmConfig
from voice_agent.llm import OpenAICompatibleLLM

pytestmark = pytest.mark.slow
SYSTEM = {"role": "system", "content": "You are a helpful phone assistant."}


@pytest.fixture(scope="module")
def tier():
    config = Config()  # the embedded default model
    config.server.token = TOKEN
    config.store.path = ""
    with RunningTier(config) as running_tier:
        yield running_tier


def test_the_chat_api_returns_a_valid_call_streamed_and_not(tier):
    client = openai.OpenAI(base_url=tier.url, api_key=TOKEN, max_retries=0, timeout=120)
    messages = [SYSTEM, {"role": "user", "content": "What's the weather like in Paris today?"}]
    done = client.chat.completions.create(model=tier.service.model_id, messages=messages, tools=TOOLS, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    # Streamed: the same call, whole in one chunk.
    pieces = list(client.chat.completions.create(model=tier.service.model_id, messages=messages, tools=TOOLS,
                                                 temperature=0, stream=True))
    streamed = [c for p in pieces for c in (p.choices[0].delta.tool_calls or [])] if pieces else []
    assert [(c.function.name, c.function.arguments) for c in streamed] == [(call.function.name, call.function.arguments)]
    assert pieces[-1].choices[0].finish_reason == "tool_calls"
    # The result goes back; the model answers in words.
    follow = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees"}]
    answer = client.chat.completions.create(model=tier.service.model_id, messages=follow, tools=TOOLS, temperature=0)
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content.strip()
    # tool_choice "none": words, whatever the request.
    words = client.chat.completions.create(model=tier.service.model_id, messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0)
    assert words.choices[0].message.tool_calls is None and words.choices[0].message.content.strip()


def test_a_realtime_call_through_the_tier_makes_the_call_and_answers(tier):
    async def main():
        config = make_config()
        config.llm = LlmConfig(backend="openai", base_url=tier.url, api_model=tier.service.model_id)
        async with running(config, services=FakeServices(OpenAICompatibleLLM(config.llm, api_key=TOKEN))) as server:
            return await tool_round_trip(server.port)

    call, text, _ = asyncio.run(main())
    assert call.name == "get_weather" and json.loads(call.arguments)["city"].lower() == "oslo"
    assert text.strip()


@pytest.fixture(scope="module")
def local_llm():
    from voice_agent.llm import build_llm

    llm = build_llm(Config().llm)  # the embedded default model, in this process
    yield llm
    asyncio.run(llm.aclose())


def test_the_openai_sdk_round_trip_with_the_local_model(local_llm):
    async def main():
        async with running(services=FakeServices(local_llm)) as server:
            return await tool_round_trip(server.port)

    call, text, _ = asyncio.run(main())
    assert call.name == "get_weather" and json.loads(call.arguments)["city"].lower() == "oslo"
    assert text.strip()


def test_pipecat_round_trip_with_the_local_model(local_llm):
    pytest.importorskip("pipecat", reason="pipecat-ai is a dev dependency")
    from test_pipecat_client import weather_call

    async def main():
        async with running(services=FakeServices(local_llm)) as server:
            return await weather_call(server.port)

    calls, recorder = asyncio.run(main())
    assert [c["city"].lower() for c in calls] == ["oslo"]
    assert recorder.spoken().strip() and recorder.audio_bytes() > 0
