"""The session's side of issue 20: greetings, items the client adds, function calls, usage, and
the session settings that Realtime clients set. Fake models, fake clock."""

from __future__ import annotations

import asyncio

from va_fakes import RATE, FakeClock, FakeLLM, FakeServices, bursts, drain, feed, settle, silence

from voice_agent.config import AgentConfig
from voice_agent.events import (
    AddItem,
    ConfigureSession,
    CreateResponse,
    DeleteItem,
    ErrorEvent,
    FunctionCall,
    ReplyOptions,
    ReplyTextDelta,
    ResponseDone,
    UserText,
    VadSettings,
)
from voice_agent.llm import ToolCall
from voice_agent.session import MESSAGE_OVERHEAD_TOKENS, Session

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def make(llm: FakeLLM | None = None, **agent) -> tuple[Session, FakeServices, FakeClock]:
    clock = FakeClock()
    services = FakeServices(llm or FakeLLM("Hello! How can I help?"))
    config = AgentConfig(speculative_start=False, sample_rate_hz=RATE, system_prompt="You are Sam's phone agent.", **agent)
    return Session(services, config, clock=clock, wall_clock=lambda: 1.0), services, clock


async def text_session(session: Session) -> None:
    await session.handle(ConfigureSession(audio_output=False))


def test_the_agent_speaks_first_from_its_instructions():
    async def main():
        session, services, _ = make()
        await text_session(session)
        await session.handle(CreateResponse(client_event_id="evt_1"))
        await settle()
        events = drain(session.outbox)
        assert not [e for e in events if isinstance(e, ErrorEvent)]
        assert services.llm.requests == [[{"role": "system", "content": "You are Sam's phone agent."}]]
        (done,) = [e for e in events if isinstance(e, ResponseDone)]
        assert done.status == "completed" and done.text.strip() == "Hello! How can I help?"
        # The greeting is in the history: the next request sees it before the caller's words.
        await session.handle(UserText(text="Hi, is Sam in?"))
        await settle()
        assert [m["role"] for m in services.llm.requests[-1]] == ["system", "assistant", "user"]
        await session.close()

    asyncio.run(main())


def test_a_response_may_bring_its_own_instructions_and_limit():
    async def main():
        session, services, _ = make()
        await text_session(session)
        await session.handle(CreateResponse(options=ReplyOptions(instructions="Say goodbye.", max_output_tokens=2)))
        await settle()
        assert services.llm.requests[-1][0] == {"role": "system", "content": "Say goodbye."}
        assert services.llm.options[-1].max_tokens == 2
        text = "".join(e.text for e in drain(session.outbox) if isinstance(e, ReplyTextDelta))
        assert text.split() == ["Hello!", "How"]
        await session.close()

    asyncio.run(main())


def test_system_and_assistant_items_enter_the_prompt_in_order_and_can_be_deleted():
    async def main():
        session, services, _ = make()
        await text_session(session)
        await session.handle(AddItem(message={"role": "system", "content": "The caller's name is Ana."}, item_id="ctx"))
        await session.handle(UserText(text="Who am I?", respond=False, item_id="u1"))
        await session.handle(AddItem(message={"role": "assistant", "content": "You are Ana."}, item_id="a1"))
        await session.handle(CreateResponse())
        await settle()
        assert [(m["role"], m["content"]) for m in services.llm.requests[-1]] == [
            ("system", "You are Sam's phone agent."), ("system", "The caller's name is Ana."), ("user", "Who am I?"),
            ("assistant", "You are Ana."),
        ]
        await session.handle(DeleteItem(item_id="ctx"))
        assert [e.item_id for e in session.history][:2] == ["u1", "a1"]
        # The reply (made by the server, no client id) is deleted by its turn.
        reply_turn = session.history[-1].turn_id
        await session.handle(DeleteItem(turn_id=reply_turn, role="assistant"))
        assert [e.item_id for e in session.history] == ["u1", "a1"]
        await session.close()

    asyncio.run(main())


def test_a_function_call_round_trip():
    async def main():
        llm = FakeLLM("Let me check.")
        llm.tool_calls = [ToolCall("get_weather", '{"city": "Oslo"}', "call_1")]
        session, services, _ = make(llm)
        await text_session(session)
        await session.handle(ConfigureSession(tools=[TOOL], tool_choice="auto"))
        await session.handle(UserText(text="Weather in Oslo?"))
        await settle()
        assert services.llm.options[-1].tools == [TOOL] and services.llm.options[-1].tool_choice == "auto"
        events = drain(session.outbox)
        kinds = [type(e).__name__ for e in events]
        assert kinds.index("FunctionCall") < kinds.index("ResponseDone")
        (call,) = [e for e in events if isinstance(e, FunctionCall)]
        assert (call.call_id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Oslo"}')
        (done,) = [e for e in events if isinstance(e, ResponseDone)]
        assert done.usage.output_tokens == 3 and done.usage.input_tokens > 0
        # The call is in the history with the words before it; the result follows; the model goes on.
        assert session.history[-1].message == {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
        await session.handle(AddItem(message={"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4}'}))
        llm.tool_calls = []
        llm.reply = "It is 4 degrees in Oslo."
        await session.handle(CreateResponse())
        await settle()
        assert [m["role"] for m in services.llm.requests[-1]] == ["system", "user", "assistant", "tool"]
        events = drain(session.outbox)
        (done,) = [e for e in events if isinstance(e, ResponseDone)]
        assert done.text.strip() == "It is 4 degrees in Oslo." and not [e for e in events if isinstance(e, FunctionCall)]
        await session.close()

    asyncio.run(main())


def test_no_tools_no_calls_and_a_cut_window_never_starts_at_a_result():
    async def main():
        llm = FakeLLM("Sure.")
        llm.tool_calls = [ToolCall("get_weather", "{}", "c")]
        session, services, _ = make(llm, history_tokens=12)
        await text_session(session)
        await session.handle(UserText(text="hello"))
        await settle()
        assert services.llm.options[-1].tools is None
        assert not [e for e in drain(session.outbox) if isinstance(e, FunctionCall)]
        session.history.clear()
        session._add_history(0, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]})
        session._add_history(0, {"role": "tool", "tool_call_id": "c", "content": "sunny " * 3})
        session._add_history(1, {"role": "user", "content": "and tomorrow"})
        assert [m["role"] for m in session._messages()] == ["system", "user"]
        await session.close()

    asyncio.run(main())


def test_speed_and_turn_detection_settings():
    async def main():
        session, services, clock = make(FakeLLM("One two three."))
        await session.handle(ConfigureSession(speed=1.5, vad=VadSettings(silence_duration_ms=300)))
        await feed(session, clock, bursts(2))
        # The new endpointer is made between turns: this one ends on 300 ms of silence.
        await feed(session, clock, silence(400))
        await settle()
        assert services.endpointers[-1] == VadSettings(silence_duration_ms=300)
        assert services.speeds and set(services.speeds) == {1.5}
        assert session.end_silence_ms == 300
        await session.close()

    asyncio.run(main())


def test_create_response_false_leaves_the_reply_to_the_client():
    async def main():
        session, services, clock = make()
        await session.handle(ConfigureSession(vad=VadSettings(create_response=False)))
        await feed(session, clock, bursts(2))
        await feed(session, clock, silence(800))
        await settle()
        assert services.llm.requests == [] and session.history[-1].message["role"] == "user"
        await session.handle(CreateResponse())
        await settle()
        assert len(services.llm.requests) == 1
        await session.close()

    asyncio.run(main())


def test_the_prompt_pairs_every_call_with_its_result():
    from voice_agent.session import _paired_calls

    def call(cid):
        return {"id": cid, "type": "function", "function": {"name": "f", "arguments": "{}"}}

    messages = [
        {"role": "user", "content": "two things"},
        {"role": "assistant", "content": None, "tool_calls": [call("a")]},  # added by the client, one item per call
        {"role": "assistant", "content": None, "tool_calls": [call("b")]},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("c")]},  # never answered: the caller spoke
        {"role": "user", "content": "never mind"},
        {"role": "tool", "tool_call_id": "zzz", "content": "orphan"},  # its call was deleted
    ]
    assert _paired_calls(messages) == [
        {"role": "user", "content": "two things"},
        {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b")]},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "assistant", "content": "Checking."},
        {"role": "user", "content": "never mind"},
    ]
    assert messages[1]["tool_calls"] == [call("a")]  # the history itself is left alone

    # Words with a call, then more calls (a reply's own words and call, then a client's item):
    # one message with both, its results after it.
    spoken = [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("d")]},
        {"role": "assistant", "content": None, "tool_calls": [call("e")]},
        {"role": "assistant", "content": "And this.", "tool_calls": [call("f")]},
        {"role": "tool", "tool_call_id": "d", "content": "D"},
        {"role": "tool", "tool_call_id": "e", "content": "E"},
        {"role": "tool", "tool_call_id": "f", "content": "F"},
    ]
    assert _paired_calls(spoken) == [
        {"role": "assistant", "content": "Let me check. And this.", "tool_calls": [call("d"), call("e"), call("f")]},
        *spoken[3:],
    ]


def test_each_message_is_counted_once_however_many_replies_read_it():
    async def main():
        llm = FakeLLM("Sure.")
        counted: list[str] = []
        words = llm.count_tokens
        llm.count_tokens = lambda text: counted.append(text) or words(text)
        session, services, _ = make(llm)
        await text_session(session)
        for question in ("Is Sam in?", "When is he back?", "Can I leave a message?"):
            await session.handle(UserText(text=question))
            await settle()
        dones = [e for e in drain(session.outbox) if isinstance(e, ResponseDone)]
        # The third reply read the system prompt, three questions and two answers: its usage
        # counts them all, yet no text was tokenized twice over the three replies.
        assert len(services.llm.requests) == 3 and len(services.llm.requests[-1]) == 6
        assert dones[-1].usage.input_tokens == sum(words(m["content"]) + MESSAGE_OVERHEAD_TOKENS
                                                   for m in services.llm.requests[-1])
        assert sorted(counted) == sorted(set(counted))
        await session.close()

    asyncio.run(main())
