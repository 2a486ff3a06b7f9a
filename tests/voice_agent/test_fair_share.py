"""voice_agent.fair_share: per-call usage, the background set, and waiting for a turn; the
services' model jobs in that order."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from va_fakes import FakeClock, FakeLLM, FakeServices, settle, silence, speech

from voice_agent.config import AgentConfig, Config, ConfigError
from voice_agent.events import AudioIn, ConfigureSession
from voice_agent.fair_share import CallShare
from voice_agent.services import ModelServices
from voice_agent.session import Session


def test_usage_decays_with_the_half_life_and_counts_only_calls_that_joined():
    clock = FakeClock()
    share = CallShare(busy_cpus=1.0, half_life_s=10.0, clock=clock)
    share.join("a")
    share.charge("a", 20.0)
    share.charge("api-request", 50.0)  # never joined: not counted
    assert share.rate("a") == pytest.approx(20.0 * np.log(2) / 10.0)
    clock.t += 10.0
    assert share.rate("a") == pytest.approx(10.0 * np.log(2) / 10.0)
    assert share.rate("api-request") == 0.0
    share.leave("a")
    assert share.rate("a") == 0.0


def test_a_call_enters_the_background_at_busy_cpus_and_leaves_below_half_of_it():
    clock = FakeClock()
    share = CallShare(busy_cpus=1.0, half_life_s=10.0, clock=clock)
    changes: list[frozenset[str]] = []
    share.on_background = changes.append
    for owner in ("heavy", "light"):
        share.join(owner)
    per_cpu_s = 10.0 / np.log(2)  # decayed seconds of a steady rate of one model-second per second
    share.charge("light", 0.3 * per_cpu_s)
    share.charge("heavy", 0.9 * per_cpu_s)
    assert share.background() == frozenset()
    share.charge("heavy", 0.2 * per_cpu_s)
    assert share.background() == {"heavy"}
    clock.t += 10.0  # rate 0.55: above half of busy_cpus, still in the background
    assert share.background() == {"heavy"}
    clock.t += 2.0  # 0.48
    assert share.background() == frozenset()
    assert changes == [frozenset({"heavy"}), frozenset()]
    share.charge("heavy", 5 * per_cpu_s)
    share.leave("heavy")
    assert share.background() == frozenset() and changes[-1] == frozenset()


def test_equals_stay_equal_and_a_call_alone_is_never_in_the_background():
    """On a crowded CPU every call's job times (wall times) grow: calls alike stay in the
    foreground, whatever their rate; a call alone has nobody to yield to."""
    share = CallShare(busy_cpus=1.0, half_life_s=10.0)
    share.join("a")
    share.charge("a", 100.0)
    assert share.background() == frozenset()
    share.join("b")
    assert share.background() == {"a"}
    share.charge("b", 60.0)
    assert share.background() == {"a"}  # in the background, a stays there while above b's rate
    share.leave("a")
    share.join("a")  # a new call with the same id starts from nothing
    share.charge("a", 100.0)  # 1.67x b's rate: below RELATIVE, so it does not enter
    assert share.background() == frozenset()


def test_a_call_over_a_per_call_limit_is_in_the_background_for_a_half_life_and_is_no_yardstick():
    """A flooding client's model work grows slowly (its history grows); the rate limits it meets
    say what it is at once. The honest call beside it is compared with calls not over a limit."""
    clock = FakeClock()
    share = CallShare(busy_cpus=1.0, half_life_s=10.0, clock=clock)
    share.join("flood")
    share.over_limit("flood")
    assert share.background() == frozenset()  # alone: nobody to yield to
    share.join("honest")
    assert share.background() == {"flood"}  # at once, at a rate of 0
    share.charge("honest", 10.0)  # 0.69 model-s/s: below busy_cpus
    assert share.background() == {"flood"}
    share.charge("honest", 90.0)  # 6.9 model-s/s, far above the flood's 0: the flood is no yardstick
    assert share.background() == {"flood"}
    clock.t += 9.0
    share.over_limit("ghost")  # never joined: nothing
    assert share.background() == {"flood"}
    clock.t += 1.0  # a half-life after the refusal the flood is back, a yardstick again
    assert share.background() == {"honest"}  # 3.5 model-s/s against its 0
    share.leave("honest")
    share.join("honest")
    share.over_limit("flood")
    share.charge("flood", 100.0)
    clock.t += 10.0  # the refusal has expired; its rate (3.5) is still above half of busy_cpus and honest's (0)
    assert share.background() == {"flood"}
    share.over_limit("honest")  # calls over a limit go behind those within them, whatever their rates
    assert share.background() == {"honest"}
    share.leave("flood")
    assert share.background() == frozenset()


def test_a_caller_speaking_counts_as_work_in_flight():
    """From the VAD's start of speech to its end the call has a job in flight: a background
    call's work pauses before the end of the turn needs the models."""

    async def main():
        services = FakeServices(FakeLLM())
        told: list[bool] = []
        services.share.on_foreground_jobs = told.append
        config = AgentConfig(speculative_start=False, sample_rate_hz=16_000)
        session = Session(services, config, clock=FakeClock(), wall_clock=lambda: 1.0)
        await session.handle(AudioIn(samples=silence(300), sample_rate_hz=16_000))
        await settle()
        assert told == []
        await session.handle(AudioIn(samples=speech(400), sample_rate_hz=16_000))
        await settle()
        assert told == [True] and services.share.foreground_busy({})
        await session.handle(AudioIn(samples=silence(800), sample_rate_hz=16_000))  # the turn ends
        await settle()
        assert told == [True, False]
        await session.handle(AudioIn(samples=speech(400), sample_rate_hz=16_000))
        await settle()
        await session.handle(ConfigureSession(server_vad=False))  # no endpointer will end it now
        assert told == [True, False, True, False]
        await session.handle(ConfigureSession(server_vad=True))
        services.share.begin(session.call_id)  # another job of the call in flight
        await session.handle(AudioIn(samples=silence(800), sample_rate_hz=16_000))  # the old turn ends
        await settle()
        assert services.share._calls[session.call_id].jobs == 1  # the speech was ended once, not twice
        services.share.end(session.call_id)
        assert told == [True, False, True, False, True, False]
        await session.handle(AudioIn(samples=speech(400), sample_rate_hz=16_000))
        await settle()
        await session.close()  # mid-speech: leaving the share ends it
        assert told == [True, False, True, False, True, False, True, False]

    asyncio.run(main())


def test_the_engine_is_told_when_a_call_outside_the_background_has_a_job_in_flight():
    """on_foreground_jobs (the engine's pause_background): True while a foreground call's ASR,
    TTS or end-of-turn job is in flight, False once none is; a background call's own jobs and
    jobs of nobody's do not count; a call entering the background, or leaving, updates it."""
    share = CallShare(busy_cpus=1.0, half_life_s=10.0)
    told: list[bool] = []
    share.on_foreground_jobs = told.append
    for owner in ("heavy", "light"):
        share.join(owner)
    share.begin(None)
    share.begin("heavy")
    assert told == [True]  # heavy is not in the background yet
    share.end("heavy")
    assert told == [True, False]
    share.charge("heavy", 100.0)
    assert share.background() == {"heavy"}
    share.begin("heavy")  # in the background: its jobs do not pause anything
    assert told == [True, False]
    share.begin("light")
    share.begin("light")
    assert told == [True, False, True]
    share.end("light")
    assert told == [True, False, True]  # one still in flight
    share.leave("light")  # a call that ends takes its jobs with it; heavy, alone, leaves the
    assert told == [True, False, True, False, True]  # background, and its job now counts
    share.join("light")
    share.charge("light", 1000.0)
    assert share.background() == {"light"}
    share.begin("light")
    share.end("heavy")
    assert told[-1] is False  # only a background call's job is left


def test_busy_cpus_zero_puts_no_call_in_the_background():
    share = CallShare(busy_cpus=0.0)
    share.join("a")
    share.charge("a", 1e6)
    assert share.background() == frozenset()
    with pytest.raises(ConfigError):
        AgentConfig(busy_call_cpus=-1)


def test_a_background_call_waits_while_another_call_has_work_in_flight():
    share = CallShare(busy_cpus=1.0, half_life_s=10.0)
    for owner in ("heavy", "light", "idle"):
        share.join(owner)
    share.charge("heavy", 100.0)
    llm: dict[str, int] = {}

    async def main():
        # Nobody else has work: at once.
        await asyncio.wait_for(share.wait_turn("heavy", lambda: llm), 0.5)
        share.begin("light")
        waiting = asyncio.create_task(share.wait_turn("heavy", lambda: llm))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await asyncio.wait_for(share.wait_turn("light", lambda: llm), 0.5)  # a light call never waits
        share.end("light")
        llm["light"] = 1  # a request in the LLM is work in flight too
        await asyncio.sleep(0.2)
        assert not waiting.done()
        llm.clear()
        await asyncio.wait_for(waiting, 0.5)

    asyncio.run(main())


class _SlowAsr:
    """A transcriber that takes `seconds` per decode and records the order of the decodes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.order: list[str] = []
        self.lock = threading.Lock()

    def transcribe(self, audio: np.ndarray) -> str:
        time.sleep(self.seconds)
        with self.lock:
            self.order.append(str(int(audio[0])))
        return ""


def test_services_run_a_light_calls_jobs_before_a_heavy_calls_and_charge_each_call():
    asr = _SlowAsr(0.15)
    services = ModelServices(Config(), transcriber=asr, synthesizer=None, llm=FakeLLM())
    share = services.share
    for owner in ("0", "1"):
        share.join(owner)

    async def main():
        first = asyncio.create_task(services.transcribe(np.zeros(1, np.float32), owner="0"))
        await asyncio.sleep(0.05)
        share.charge("0", 100.0)  # call 0 has kept the models busy far beyond a conversation
        heavy = [asyncio.create_task(services.transcribe(np.zeros(1, np.float32), owner="0")) for _ in range(2)]
        await asyncio.sleep(0.05)
        light = [asyncio.create_task(services.transcribe(np.ones(1, np.float32), owner="1")) for _ in range(2)]
        await asyncio.gather(first, *heavy, *light)

    asyncio.run(main())
    # The decode running when call 1 came finishes; call 1's go next, then call 0's waiting ones.
    assert asr.order == ["0", "1", "1", "0", "0"]
    assert share.rate("1") > 0
