"""No LLM work outlives its call, and one call's requests are bounded (issue: hostile client).

Sessions driven with the fake models of va_fakes: the fake LLM counts the streams it holds open,
as an engine holds requests, so a request that nobody will ever read shows up as `llm.open > 0`.
"""

from __future__ import annotations

import asyncio

from va_fakes import FakeClock, FakeLLM, FakeServices, drain, settle

from voice_agent.config import AgentConfig, ConfigError
from voice_agent.events import ConfigureSession, CreateResponse, ErrorEvent, UserText
from voice_agent.session import RateLimit, Session


def make(llm: FakeLLM, **agent):
    clock = FakeClock()
    config = AgentConfig(speculative_start=False, sample_rate_hz=16_000, **agent)
    session = Session(FakeServices(llm), config, clock=clock, wall_clock=lambda: 1.0)
    return session, clock


def errors(session) -> list[str]:
    return [e.code for e in drain(session.outbox) if isinstance(e, ErrorEvent)]


def test_a_reply_superseded_before_it_started_is_aborted():
    """The path the hostile client found: response.create, then a new item before the reply
    task ran. The interruption must abort the request it had already submitted."""

    async def main():
        llm = FakeLLM(hold=True)
        session, _ = make(llm, max_responses_per_minute=600, max_items_per_minute=600)
        await session.handle(UserText(text="one", respond=False))
        for i in range(20):
            await session.handle(CreateResponse())
            await session.handle(UserText(text=f"item {i}", respond=False))  # interrupts at once
            await settle(1)  # the request's task may start; the reply task has not run yet
        await settle()
        assert llm.open == 0, f"{llm.open} requests of superseded replies still held"
        assert llm.aborted == len(llm.requests)
        await session.close()

    asyncio.run(main())


def test_close_ends_every_request_of_the_call_and_tells_the_client():
    async def main():
        llm = FakeLLM(hold=True)
        session, _ = make(llm)
        await session.handle(UserText(text="hello"))  # a reply in progress, held by the LLM
        await settle()
        assert llm.open == 1
        await session.close()
        assert llm.open == 0 and llm.aborted == 1
        assert llm.owners == [session.call_id]
        assert llm.aborted_owners == [session.call_id]  # what the client still holds, if anything

    asyncio.run(main())


def test_close_right_after_a_response_create_leaves_nothing_behind():
    async def main():
        llm = FakeLLM(hold=True)
        session, _ = make(llm)
        await session.handle(UserText(text="hello", respond=False))
        await session.handle(CreateResponse())
        await session.close()  # before any task ran
        await settle()
        assert llm.open == 0

    asyncio.run(main())


def test_one_reply_at_a_time():
    async def main():
        llm = FakeLLM(hold=True)
        session, _ = make(llm)
        await session.handle(UserText(text="hello"))
        await settle()
        drain(session.outbox)
        await session.handle(CreateResponse())
        assert errors(session) == ["conversation_already_has_active_response"]
        assert len(llm.requests) == 1
        await session.close()

    asyncio.run(main())


def test_response_create_rate_is_limited_and_refills():
    async def main():
        llm = FakeLLM()
        session, clock = make(llm, max_responses_per_minute=12)  # bursts of 2, one per 5 s
        await session.handle(ConfigureSession(audio_output=False))  # a reply ends with its text
        await session.handle(UserText(text="hello", respond=False))
        codes = []
        for _ in range(4):
            await session.handle(CreateResponse())
            await settle()
            codes += errors(session)
        assert codes == ["rate_limit_exceeded", "rate_limit_exceeded"]
        assert len(llm.requests) == 2
        clock.t += 5.0
        await session.handle(CreateResponse())
        await settle()
        assert errors(session) == [] and len(llm.requests) == 3
        await session.close()

    asyncio.run(main())


def test_item_rate_is_limited():
    async def main():
        llm = FakeLLM()
        session, _ = make(llm, max_items_per_minute=6)  # bursts of 1
        await session.handle(UserText(text="a", respond=False))
        await session.handle(UserText(text="b", respond=False))
        assert errors(session) == ["rate_limit_exceeded"]
        assert [m["content"] for _, m in session.history] == ["a"]
        await session.close()

    asyncio.run(main())


def test_the_prompt_stays_within_the_history_budget_however_long_the_message():
    async def main():
        llm = FakeLLM()  # counts words as tokens
        session, _ = make(llm, history_tokens=20, system_prompt="Be brief.")
        words = [f"w{i}" for i in range(100)]
        session._add_history(1, "user", " ".join(words))
        messages = session._messages()
        assert messages[0] == {"role": "system", "content": "Be brief."}
        assert len(messages) == 2
        kept = messages[1]["content"].split()
        assert 0 < len(kept) <= 20 - 4 and kept == words[-len(kept):]  # the end of the message
        await session.close()

    asyncio.run(main())


def test_history_keeps_the_newest_max_items_messages():
    async def main():
        session, _ = make(FakeLLM(), max_items=3)
        for i in range(5):
            session._add_history(i, "user", f"m{i}")
        assert [m["content"] for _, m in session.history] == ["m2", "m3", "m4"]
        await session.close()

    asyncio.run(main())


def test_rate_limit_bucket():
    clock = FakeClock()
    limit = RateLimit(60, clock)  # 1 a second, bursts of 10
    assert sum(limit.allow() for _ in range(20)) == 10
    clock.t += 2.5
    assert sum(limit.allow() for _ in range(20)) == 2


def test_limits_must_be_positive():
    try:
        AgentConfig(max_items=0)
    except ConfigError as e:
        assert "agent.max_items" in str(e)
    else:
        raise AssertionError("max_items = 0 was accepted")
