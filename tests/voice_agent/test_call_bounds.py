"""No LLM work outlives its call, and one call's requests are bounded (issue: hostile client).

Sessions driven with the fake models of va_fakes: the fake LLM counts the streams it holds open,
as an engine holds requests, so a request that nobody will ever read shows up as `llm.open > 0`.
"""

from __future__ import annotations

import asyncio

import numpy as np
from va_fakes import FakeClock, FakeLLM, FakeServices, bursts, drain, settle

from voice_agent.config import AgentConfig, ConfigError
from voice_agent.events import AudioIn, CommitAudio, ConfigureSession, CreateResponse, ErrorEvent, UserText
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
        assert [e.message["content"] for e in session.history] == ["a"]
        await session.close()

    asyncio.run(main())


def test_the_prompt_stays_within_the_history_budget_however_long_the_message():
    async def main():
        llm = FakeLLM()  # counts words as tokens
        session, _ = make(llm, history_tokens=20, system_prompt="Be brief.")
        words = [f"w{i}" for i in range(100)]
        session._add_history(1, {"role": "user", "content": " ".join(words)})
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
            session._add_history(i, {"role": "user", "content": f"m{i}"})
        assert [e.message["content"] for e in session.history] == ["m2", "m3", "m4"]
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


class GatedAsr(FakeServices):
    """Transcription waits until the test opens the gate (a slow or busy ASR model)."""

    def __init__(self, llm: FakeLLM) -> None:
        super().__init__(llm)
        self.gate = asyncio.Event()

    async def transcribe(self, audio_16k, *, priority=None, on_start=None, owner=None):
        await self.gate.wait()
        return await super().transcribe(audio_16k, on_start=on_start)


def test_a_manual_commit_does_not_hold_up_the_call_and_the_reply_follows_its_transcript():
    """The transport's read loop never waits for a commit's transcription (a hang-up is seen at
    once); a response.create sent right after the commit waits for the transcript instead."""

    async def main():
        llm = FakeLLM()
        services = GatedAsr(llm)
        session = Session(services, AgentConfig(speculative_start=False, sample_rate_hz=16_000), clock=FakeClock(), wall_clock=lambda: 1.0)
        await session.handle(ConfigureSession(server_vad=False, audio_output=False))
        await session.handle(AudioIn(samples=bursts(3), sample_rate_hz=16_000))
        await settle()
        await asyncio.wait_for(session.handle(CommitAudio()), 1.0)  # returns with the ASR still busy
        await asyncio.wait_for(session.handle(CreateResponse()), 1.0)
        await session.handle(CreateResponse())  # a second one while the first waits
        await settle()
        assert errors(session) == ["conversation_already_has_active_response"]
        assert llm.requests == []
        services.gate.set()
        await settle()
        assert llm.requests and llm.requests[0][-1] == {"role": "user", "content": "what is the"}
        await session.close()

    asyncio.run(main())


def test_hanging_up_during_a_manual_commit_leaves_nothing_behind():
    async def main():
        llm = FakeLLM()
        services = GatedAsr(llm)
        session = Session(services, AgentConfig(speculative_start=False, sample_rate_hz=16_000), clock=FakeClock(), wall_clock=lambda: 1.0)
        await session.handle(ConfigureSession(server_vad=False))
        await session.handle(AudioIn(samples=bursts(2), sample_rate_hz=16_000))
        await settle()
        await session.handle(CommitAudio())
        await session.handle(CreateResponse())
        await session.close()
        services.gate.set()
        await settle()
        assert llm.requests == [] and llm.open == 0

    asyncio.run(main())


def test_audio_faster_than_real_time_is_dropped_beyond_the_burst():
    async def main():
        session, clock = make(FakeLLM(), max_audio_speed=2.0, max_audio_burst_s=10.0, max_inbox_audio_s=100.0)
        quiet = np.zeros(16_000, np.float32)  # 1 s
        for _ in range(14):  # 14 s at once: 10 s of burst pass
            await session.handle(AudioIn(samples=quiet, sample_rate_hz=16_000))
        assert abs(session.dropped_audio_s - 4.0) < 1e-6
        clock.t += 1.5  # 3 s more at 2x real time
        for _ in range(4):
            await session.handle(AudioIn(samples=quiet, sample_rate_hz=16_000))
        assert abs(session.dropped_audio_s - 5.0) < 1e-6
        await session.close()

    asyncio.run(main())


def test_a_call_the_rate_limits_refuse_runs_in_the_background_of_the_fair_share():
    """Refused items or responses, or audio dropped for its speed, put the call behind the
    others at once (voice_agent/fair_share.py); a call within its limits stays in front."""

    async def main():
        services = FakeServices(FakeLLM())
        config = AgentConfig(speculative_start=False, sample_rate_hz=16_000, max_items_per_minute=6,
                             max_audio_speed=2.0, max_audio_burst_s=1.0)
        sessions = [Session(services, config, clock=FakeClock(), wall_clock=lambda: 1.0) for _ in range(3)]
        honest, texter, streamer = sessions
        await honest.handle(UserText(text="hello", respond=False))
        await texter.handle(UserText(text="a", respond=False))
        assert services.share.background() == frozenset()
        await texter.handle(UserText(text="b", respond=False))  # over max_items_per_minute
        assert errors(texter) == ["rate_limit_exceeded"]
        assert services.share.background() == {texter.call_id}
        await streamer.handle(AudioIn(samples=np.zeros(16_000, np.float32), sample_rate_hz=16_000))  # the burst
        assert services.share.background() == {texter.call_id}
        await streamer.handle(AudioIn(samples=np.zeros(16_000, np.float32), sample_rate_hz=16_000))  # dropped
        assert services.share.background() == {texter.call_id, streamer.call_id}
        for session in sessions:
            await session.close()
        assert services.share.background() == frozenset()

    asyncio.run(main())
