"""ASR scheduling: finals before partials of every call, at most one decode per call in flight,
adaptive partials, reuse of a decode that covers the speech (fake clock; real threads only
where ModelServices' own thread handling is the point)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from va_fakes import RATE, FakeClock, FakeLLM, FakeServices, bursts, drain, feed, settle, silence, speech

from voice_agent.config import AgentConfig, Config
from voice_agent.events import TranscriptDelta, TranscriptFinal, TurnMetrics
from voice_agent.services import ModelServices
from voice_agent.session import Session
from voice_agent.transcription import AsrPriority, PriorityGate, TranscriptStream, same_speech

FINAL, SPECULATIVE, PARTIAL = AsrPriority.FINAL, AsrPriority.SPECULATIVE, AsrPriority.PARTIAL


def run(coro):
    asyncio.run(coro)


# --- PriorityGate --------------------------------------------------------------------------------


def test_gate_serves_by_priority_then_in_order_and_survives_cancellation():
    async def main():
        gate = PriorityGate()
        order: list[str] = []

        async def user(name: str, priority: int) -> None:
            await gate.acquire(priority)
            order.append(name)
            await asyncio.sleep(0)
            gate.release()

        await gate.acquire(FINAL)  # held: everyone else queues
        tasks = [asyncio.create_task(user(n, p)) for n, p in [("p1", PARTIAL), ("s", SPECULATIVE), ("p2", PARTIAL), ("f", FINAL), ("gone", FINAL)]]
        await settle(5)
        tasks[-1].cancel()  # a waiter that gives up leaves the queue
        await settle(5)
        assert gate.waiting() == 4
        gate.release()
        await asyncio.gather(*tasks[:-1])
        assert order == ["f", "s", "p1", "p2"]
        assert not gate.held

    run(main())


def test_gate_passes_a_grant_on_when_its_waiter_is_cancelled_at_that_moment():
    async def main():
        gate = PriorityGate()
        await gate.acquire(FINAL)
        first = asyncio.create_task(gate.acquire(FINAL))
        second = asyncio.create_task(gate.acquire(PARTIAL))
        await settle(5)
        gate.release()  # granted to `first`...
        first.cancel()  # ...which is cancelled before it runs
        await settle(5)
        assert second.done() and gate.held  # the grant went on to `second`
        gate.release()
        assert not gate.held

    run(main())


# --- TranscriptStream ----------------------------------------------------------------------------


def test_same_speech_ignores_only_quiet_trailing_audio():
    words = bursts(2)
    assert same_speech(words, np.concatenate([words, silence(300)]))
    assert same_speech(np.concatenate([words, silence(500)]), np.concatenate([words, silence(300)]))
    assert not same_speech(words, np.concatenate([words, speech(60)]))
    assert not same_speech(words, np.concatenate([silence(20), words])[: words.size])
    assert not same_speech(np.zeros(0, np.float32), words)


class SlowAsr(FakeServices):
    """One decode at a time, in priority order (the real PriorityGate); each decode lasts until
    the test calls `finish()`. `started` lists (priority, transcript) in the order decodes began."""

    def __init__(self, llm: FakeLLM | None = None, **kwargs) -> None:
        super().__init__(llm, **kwargs)
        self.gate = PriorityGate()
        self.started: list[tuple[AsrPriority, str]] = []
        self._finish = asyncio.Event()

    async def transcribe(self, audio_16k, *, priority=FINAL, on_start=None, owner=None):
        await self.gate.acquire(priority)
        try:
            if on_start is not None:
                on_start()
            text = self.asr(audio_16k)
            self.started.append((priority, text))
            self._finish.clear()
            await self._finish.wait()
            self.transcribed.append(text)
            return text
        finally:
            self.gate.release()

    async def finish(self) -> None:
        """Let the running decode end, and everything that follows from it run."""
        self._finish.set()
        await settle()


def test_stream_reuses_a_covering_decode_and_waits_for_a_running_one():
    async def main():
        services = SlowAsr()
        stream = TranscriptStream(services.transcribe)
        words = bursts(2)
        partial = asyncio.create_task(stream.partial(words))
        await settle()
        assert stream.running is PARTIAL
        final = asyncio.create_task(stream.final(np.concatenate([words, silence(300)])))
        await settle()
        assert not final.done()  # waits for the running decode...
        await services.finish()
        assert partial.result() == final.result() == "what is"
        assert (stream.decodes, stream.reused) == (1, 1)  # ...and reuses it
        assert not stream.busy

    run(main())


def test_closing_the_stream_cancels_its_decodes_running_and_queued():
    """A call that hangs up mid-decode leaves no decode task behind: the running one (here of an
    earlier utterance, which `reset` lets run on) and the queued one are both cancelled, and
    the model is free again."""
    async def main():
        services = SlowAsr()
        stream = TranscriptStream(services.transcribe)
        running = asyncio.create_task(stream.partial(bursts(2)))
        await settle()
        assert stream.running is PARTIAL
        stream.reset()  # the next utterance: the running decode of this one goes on
        queued = asyncio.create_task(stream.partial(bursts(1)))
        await settle()
        assert stream.busy and stream.running is None  # queued behind the running decode
        decodes = stream.close()
        assert len(decodes) == 2
        async with asyncio.timeout(5):  # (a decode left running would never end here)
            await asyncio.gather(*decodes, return_exceptions=True)
        await settle()
        assert running.cancelled() and queued.cancelled()
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("asr-")]
        assert not stream.busy and not services.gate.held and services.transcribed == []

    run(main())


async def _model_taken_by_another_call(services: SlowAsr):
    """(the other call's stream, this call's stream, the other call's partial holding the model)."""
    other = TranscriptStream(services.transcribe)
    stream = TranscriptStream(services.transcribe)
    busy = asyncio.create_task(other.partial(bursts(1)))
    await settle()
    return other, stream, busy


def test_stream_final_cancels_a_queued_partial_and_decodes_first():
    async def main():
        services = SlowAsr()
        _, stream, busy = await _model_taken_by_another_call(services)
        queued = asyncio.create_task(stream.partial(bursts(2)))
        await settle()
        assert stream.busy and stream.running is None
        final = asyncio.create_task(stream.final(bursts(3)))
        await settle()
        assert queued.cancelled()  # the endpoint came: that partial never starts
        await services.finish()
        await services.finish()
        assert busy.result() == "what" and final.result() == "what is the"
        assert services.started == [(PARTIAL, "what"), (FINAL, "what is the")]

    run(main())


def test_two_hypotheses_of_one_pause_share_a_queued_decode_and_a_final_overtakes_it():
    async def main():
        services = SlowAsr()
        other, stream, busy = await _model_taken_by_another_call(services)
        words = bursts(2)
        first = asyncio.create_task(stream.hypothesis(words))  # the end-of-turn check's
        await settle()
        second = asyncio.create_task(stream.hypothesis(np.concatenate([words, silence(20)])))  # the speculative start's
        await settle()
        assert not first.done(), "the queued decode was shared, not replaced"
        await services.finish()
        await services.finish()
        assert busy.result() == "what" and first.result() == second.result() == "what is"
        assert services.started == [(PARTIAL, "what"), (SPECULATIVE, "what is")]
        assert (stream.decodes, stream.reused) == (1, 1)

        # A final is more urgent than a queued speculative decode of the same speech: it
        # replaces it rather than waiting at the lower priority.
        busy = asyncio.create_task(other.partial(bursts(3)))
        await settle()
        queued = asyncio.create_task(stream.hypothesis(bursts(4)))
        await settle()
        final = asyncio.create_task(stream.final(bursts(4)))
        await settle()
        assert queued.cancelled()
        await services.finish()
        await services.finish()
        assert final.result() == "what is the weather"
        assert services.started[-1] == (FINAL, "what is the weather")

    run(main())


def test_model_services_release_the_model_only_when_the_thread_is_done():
    """Real threads: a cancelled caller does not free the model while its decode still runs,
    and a final queued behind that decode goes before partials queued earlier."""

    class BlockingTranscriber:
        def __init__(self) -> None:
            self.go = threading.Event()
            self.texts: list[str] = []

        def transcribe(self, audio: np.ndarray) -> str:
            self.go.wait(10)
            self.texts.append(f"{len(audio)}")
            return f"{len(audio)}"

    async def main():
        transcriber = BlockingTranscriber()
        services = ModelServices(Config(), transcriber=transcriber, synthesizer=None, llm=FakeLLM())
        running = asyncio.create_task(services.transcribe(np.ones(1, np.float32), priority=PARTIAL))
        await asyncio.sleep(0.05)
        running.cancel()  # the caller gives up; the decode goes on in its thread
        partial = asyncio.create_task(services.transcribe(np.ones(2, np.float32), priority=PARTIAL))
        final = asyncio.create_task(services.transcribe(np.ones(3, np.float32), priority=FINAL))
        await asyncio.sleep(0.05)
        assert transcriber.texts == []  # nothing else started while the first decode runs
        transcriber.go.set()
        assert await final == "3" and await partial == "2"
        assert transcriber.texts == ["1", "3", "2"]

    run(main())


# --- Sessions --------------------------------------------------------------------------------------


def make(services: FakeServices, *, speculative: bool = False) -> tuple[Session, FakeClock]:
    clock = FakeClock()
    config = AgentConfig(speculative_start=speculative, speculative_pause_ms=200, sample_rate_hz=RATE)
    return Session(services, config, clock=clock, wall_clock=lambda: 1.0), clock


def test_partials_are_adaptive_and_the_final_reuses_the_speculative_decode():
    async def main():
        services = SlowAsr(partial_interval_ms=400)
        session, clock = make(services, speculative=True)
        await feed(session, clock, bursts(5))  # 1.6 s of speech; the first partial never ends
        assert services.started == [(PARTIAL, "what is")]  # one in flight, none queued behind it
        await services.finish()
        await feed(session, clock, silence(300))  # a pause: the speculative decode starts at once
        assert services.started[1:] == [(SPECULATIVE, "what is the weather like")]
        await services.finish()
        assert services.llm.requests[-1][-1]["content"] == "what is the weather like"
        await feed(session, clock, silence(400))  # the endpoint: no decode left to do
        events = drain(session.outbox)
        assert [e.text for e in events if isinstance(e, TranscriptDelta)] == ["what is"]
        assert next(e for e in events if isinstance(e, TranscriptFinal)).text == "what is the weather like"
        assert len(services.started) == 2 and len(services.llm.requests) == 1
        await session.close()
        metrics = next(e for e in drain(session.outbox) if isinstance(e, TurnMetrics)).values
        assert metrics["speculative"] == "hit" and metrics["speculative_saved_ms"] >= 300

    run(main())


def test_no_partial_for_silence_already_decoded_and_none_after_the_endpoint():
    async def main():
        services = SlowAsr(partial_interval_ms=200)
        session, clock = make(services)
        await feed(session, clock, bursts(2))
        await services.finish()  # partial "what"
        await feed(session, clock, silence(260))
        await services.finish()  # partial "what is" (the whole speech)
        await feed(session, clock, silence(400))  # the endpoint: only silence was added
        assert [p for p, _ in services.started] == [PARTIAL, PARTIAL]
        events = drain(session.outbox)
        assert next(e for e in events if isinstance(e, TranscriptFinal)).text == "what is"
        await session.close()

    run(main())


def test_a_final_goes_before_the_partials_of_other_calls():
    async def main():
        services = SlowAsr(partial_interval_ms=400)
        (a, clock_a), (b, clock_b), (c, clock_c) = make(services), make(services), make(services)
        await feed(a, clock_a, bursts(2))  # A's partial runs
        await feed(c, clock_c, bursts(2))  # C's partial queues
        await feed(b, clock_b, bursts(2))  # B's partial queues
        assert services.gate.waiting() == 2
        await feed(b, clock_b, silence(700))  # B's endpoint: its partial is dropped, its final queued
        await services.finish()  # A's partial ends: B's final goes next, before C's partial
        assert services.started == [(PARTIAL, "what is"), (FINAL, "what is")]
        await services.finish()
        assert services.started[2:] == [(PARTIAL, "what is")]  # C's
        await services.finish()
        assert len(services.started) == 3  # B's partial never ran
        assert next(e for e in drain(b.outbox) if isinstance(e, TranscriptFinal)).text == "what is"
        for session in (a, b, c):
            await session.close()

    run(main())


def test_no_speculative_decode_where_it_would_end_after_the_endpoint():
    async def main():
        services = SlowAsr()
        services.asr_decode_s = 0.5  # > 600 - 200 ms between the pause and the endpoint
        session, clock = make(services, speculative=True)
        await feed(session, clock, bursts(2))
        await feed(session, clock, silence(300))  # a pause: no decode is worth starting
        assert services.started == [] and services.llm.requests == []
        await feed(session, clock, silence(400))
        assert services.started == [(FINAL, "what is")]
        await services.finish()
        assert services.llm.requests[-1][-1]["content"] == "what is"
        await session.close()

    run(main())
