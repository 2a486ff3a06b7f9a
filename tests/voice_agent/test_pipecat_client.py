"""Pipecat 1.14's `OpenAIRealtimeLLMService` (the GA Realtime service, unmodified) as a client of
our real server, pointed at it by `base_url` alone (issue 20). Pipecat treats every `error` event
as fatal (its receive loop ends) except `response_cancel_not_active` and
`conversation_already_has_active_response`, so each test also checks that none came.

The pipeline is an app's: Pipecat's context aggregators around the service, an app processor
before it (to add context mid-call) and a recorder after it. The speech models are fakes; the
server, the protocol and the session are real."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

pipecat = pytest.importorskip("pipecat", reason="pipecat-ai is a dev dependency (install.sh --dev)")

from openai_stub import stub_backend  # noqa: E402
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema  # noqa: E402
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    ErrorFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMMessagesAppendFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.runner import PipelineRunner  # noqa: E402
from pipecat.pipeline.task import PipelineTask  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.processors.frame_processor import FrameProcessor  # noqa: E402
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService  # noqa: E402
from va_fakes import FakeLLM, FakeServices, bursts, silence  # noqa: E402
from va_server import make_config, running  # noqa: E402

from voice_agent.config import LlmConfig  # noqa: E402
from voice_agent.llm import OpenAICompatibleLLM, ToolCall  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TIMEOUT_S = 20.0


class Injector(FrameProcessor):
    """An app's processor before the LLM: adds context mid-call."""

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)

    async def inject(self, frame) -> None:
        await self.push_frame(frame)


class Recorder(FrameProcessor):
    """After the LLM: keeps what the service sends down the pipeline."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list = []
        self.responses: asyncio.Queue = asyncio.Queue()

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        self.frames.append(frame)
        if isinstance(frame, LLMFullResponseEndFrame):
            self.responses.put_nowait(frame)
        await self.push_frame(frame, direction)

    def audio_bytes(self) -> int:
        return sum(len(f.audio) for f in self.frames if isinstance(f, TTSAudioRawFrame))

    def errors(self) -> list:
        return [f for f in self.frames if isinstance(f, ErrorFrame)]

    def spoken(self) -> str:
        return "".join(f.text for f in self.frames if isinstance(f, TTSTextFrame))


class PipecatCall:
    """One Pipecat pipeline talking to our server for the duration of the block."""

    def __init__(self, port: int, context: LLMContext, service_kwargs: dict | None = None) -> None:
        self.llm = OpenAIRealtimeLLMService(api_key="unused", base_url=f"ws://127.0.0.1:{port}/v1/realtime",
                                            **(service_kwargs or {}))
        self.context = context
        pair = LLMContextAggregatorPair(context)
        self.injector, self.recorder = Injector(), Recorder()
        self.task = PipelineTask(Pipeline([pair.user(), self.injector, self.llm, self.recorder, pair.assistant()]))
        self._run: asyncio.Task | None = None

    async def __aenter__(self) -> PipecatCall:
        self._run = asyncio.create_task(PipelineRunner(handle_sigint=False).run(self.task))
        await self.task.queue_frame(LLMContextFrame(self.context))  # the first context runs the model
        return self

    async def response(self) -> None:
        """Wait for the end of the next response."""
        await asyncio.wait_for(self.recorder.responses.get(), TIMEOUT_S)

    async def __aexit__(self, *exc) -> None:
        await self.task.queue_frame(EndFrame())
        await asyncio.wait_for(self._run, TIMEOUT_S)


@pytest.fixture(autouse=True)
def quiet_pipecat():
    from loguru import logger

    logger.remove()
    logging.getLogger("websockets").setLevel(logging.WARNING)


def test_pipecat_greets_from_a_system_only_context_and_takes_a_system_message_midway():
    async def main():
        llm = FakeLLM("Hello, this is Sam's office. How can I help?")
        async with running(services=FakeServices(llm)) as server:
            context = LLMContext(messages=[{"role": "system", "content": "Greet the caller as Sam's office."}])
            async with PipecatCall(server.port, context) as call:
                await call.response()
                greeting_audio = call.recorder.audio_bytes()
                assert greeting_audio > 0 and "Sam's office" in call.recorder.spoken()
                await call.injector.inject(LLMMessagesAppendFrame(
                    [{"role": "system", "content": "The caller is Ana: greet her by name."}], run_llm=True))
                await call.response()
                assert call.recorder.audio_bytes() > greeting_audio
                assert not call.recorder.errors()
        # The greeting came from the instructions alone; the second reply saw the system message.
        assert llm.requests[0] == [{"role": "system", "content": "Greet the caller as Sam's office."}]
        assert llm.requests[1][-1] == {"role": "system", "content": "The caller is Ana: greet her by name."}

    asyncio.run(main())


WEATHER = FunctionSchema(name="get_weather", description="The weather in a city.",
                         properties={"city": {"type": "string"}}, required=["city"])


async def weather_call(port: int) -> tuple[list[dict], Recorder]:
    """A Pipecat call whose first reply calls get_weather; the app's handler answers it and the
    model goes on. Returns the arguments the handler got and the recorder."""
    calls: list[dict] = []
    context = LLMContext(messages=[{"role": "system", "content": "You tell the weather."},
                                   {"role": "user", "content": "What is the weather in Oslo?"}],
                         tools=ToolsSchema(standard_tools=[WEATHER]))
    async with PipecatCall(port, context) as call:
        async def get_weather(params) -> None:
            calls.append(dict(params.arguments))
            await params.result_callback({"temp_c": 4})

        call.llm.register_function("get_weather", get_weather)
        await call.response()  # the call
        await call.response()  # the answer, after the result
        assert not call.recorder.errors()
        return calls, call.recorder


def test_pipecat_function_call_round_trip_with_the_local_client():
    async def main():
        llm = FakeLLM()
        llm.script = [("", [ToolCall("get_weather", '{"city": "Oslo"}', "call_1")]), ("It is 4 degrees in Oslo.", [])]
        async with running(services=FakeServices(llm)) as server:
            calls, recorder = await weather_call(server.port)
        assert calls == [{"city": "Oslo"}]
        assert "4 degrees" in recorder.spoken() and recorder.audio_bytes() > 0
        tool_message = llm.requests[-1][-1]
        assert tool_message["role"] == "tool" and json.loads(tool_message["content"]) == {"temp_c": 4}
        assert llm.options[0].tools[0]["function"]["name"] == "get_weather"

    asyncio.run(main())


def test_pipecat_function_call_round_trip_through_an_openai_compatible_backend():
    async def main(stub):
        config = make_config()
        config.llm = LlmConfig(backend="openai", base_url=stub.url, api_model="stub")
        async with running(config, services=FakeServices(OpenAICompatibleLLM(config.llm))) as server:
            calls, recorder = await weather_call(server.port)
        assert calls == [{"city": "Oslo"}]
        assert "temp_c" in recorder.spoken() and recorder.audio_bytes() > 0
        assert stub.requests[-1]["messages"][-1]["role"] == "tool"

    with stub_backend() as stub:
        asyncio.run(main(stub))


def test_pipecat_barge_in_with_server_vad():
    """The caller talks over the greeting: the server cancels it (speech_started first), Pipecat
    truncates what it played, and the caller's turn gets its own spoken reply."""
    from pipecat.frames.frames import InputAudioRawFrame

    from audio.codecs import float32_to_pcm16
    from audio.resample import resample

    async def main():
        greeting = " ".join(["Welcome to Sam's office, we are glad you called."] * 6)
        llm = FakeLLM()
        llm.script = [(greeting, []), ("Sure, let me help.", [])]
        async with running(services=FakeServices(llm)) as server:
            context = LLMContext(messages=[{"role": "system", "content": "Greet the caller."}])
            async with PipecatCall(server.port, context) as call:
                for _ in range(int(TIMEOUT_S / 0.01)):
                    if call.recorder.audio_bytes():
                        break
                    await asyncio.sleep(0.01)
                speech = resample(np.concatenate([bursts(3), silence(900)]), 16_000, 24_000)
                pcm = float32_to_pcm16(speech)
                step = 24_000 * 2 // 50  # 20 ms frames, in real time
                for start in range(0, len(pcm), step):
                    await call.injector.inject(InputAudioRawFrame(audio=pcm[start : start + step], sample_rate=24_000, num_channels=1))
                    await asyncio.sleep(0.02)
                await call.response()  # the greeting, cut short
                await call.response()  # the reply to the caller
                assert not call.recorder.errors()
        assert len(llm.requests) == 2 and llm.requests[1][-1] == {"role": "user", "content": "what is the"}
        # The history keeps what was heard of the greeting: its beginning, not all of it.
        heard = llm.requests[1][-2]
        assert heard["role"] == "assistant" and greeting.startswith(heard["content"]) and len(heard["content"]) < len(greeting)

    asyncio.run(main())
