"""The per-call state machine, driven with fakes and a fake clock (no sleeps, no models)."""

from __future__ import annotations

import asyncio

import numpy as np
from va_fakes import (
    RATE,
    FakeClock,
    FakeLLM,
    FakeServices,
    bursts,
    drain,
    feed,
    play_all,
    settle,
    silence,
    speech,
)

from voice_agent.config import AgentConfig
from voice_agent.events import (
    AudioIn,
    CancelResponse,
    CommitAudio,
    ConfigureSession,
    CreateResponse,
    DenoiseStep,
    ErrorEvent,
    Flush,
    PlaybackMark,
    PlaybackTruncate,
    ReplyAudio,
    ReplyStarted,
    ReplyTextDelta,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    TurnMetrics,
    UserText,
)
from voice_agent.session import Outbox, Session, State, heard_prefix, normalize_transcript


class Sink:
    def __init__(self) -> None:
        self.records = []

    def turn_finished(self, call_id, record) -> None:
        self.records.append((record.turn_id, record.status, record.heard))


def make(*, llm=None, speculative=False, **agent):
    clock = FakeClock()
    services = FakeServices(llm)
    sink = Sink()
    config = AgentConfig(speculative_start=speculative, sample_rate_hz=RATE, **agent)
    session = Session(services, config, sink=sink, clock=clock, wall_clock=lambda: 1.0)
    return session, services, clock, sink


def types(events):
    return [type(e).__name__ for e in events]


def run(coro):
    asyncio.run(coro)


def test_spoken_turn_runs_through_all_states():
    async def main():
        session, _services, clock, sink = make()
        assert session.state is State.LISTENING
        await feed(session, clock, bursts(3))
        assert session.state is State.USER_SPEAKING
        await feed(session, clock, silence(700))
        events = drain(session.outbox)
        assert types(events)[:4] == ["SpeechStarted", "SpeechStopped", "TranscriptFinal", "ReplyStarted"]
        assert events[2].text == "what is the"
        audio = [e for e in events if isinstance(e, ReplyAudio)]
        assert [a.text for a in audio] == ["It is sunny.", "Take a hat.", "Have fun!"]
        assert session.state is State.SPEAKING
        # Until the client has played everything, the turn is not over.
        await play_all(session, audio[:2])
        assert session.state is State.SPEAKING
        await play_all(session, audio[2:])
        done = drain(session.outbox)
        assert types(done) == ["ResponseDone", "TurnMetrics"]
        assert done[0].status == "completed" and done[0].heard == "It is sunny. Take a hat. Have fun!"
        assert session.state is State.LISTENING
        assert [e.message["role"] for e in session.history] == ["user", "assistant"]
        assert sink.records == [(1, "completed", "It is sunny. Take a hat. Have fun!")]
        metrics = done[1].values
        assert metrics["speculative"] == "off"
        # The endpointer decided 600 ms after the speech ended: the latencies include that wait.
        assert metrics["asr_final_ms"] >= 590
        assert metrics["tokens_per_forward"] is not None and metrics["tokens_per_forward"] > 1
        await session.close()

    run(main())


def test_every_event_carries_the_turn_id_and_a_monotonic_time():
    async def main():
        session, _, clock, _ = make()
        await feed(session, clock, np.concatenate([bursts(2), silence(700)]))
        events = drain(session.outbox)
        assert {e.turn_id for e in events} == {1}
        times = [e.t for e in events]
        assert all(t >= 1000.0 for t in times)
        await session.close()

    run(main())


def test_barge_in_while_speaking_keeps_only_what_was_heard():
    async def main():
        llm = FakeLLM()
        session, _services, clock, sink = make(llm=llm)
        await feed(session, clock, np.concatenate([bursts(2), silence(700)]))
        events = drain(session.outbox)
        audio = [e for e in events if isinstance(e, ReplyAudio)]
        await play_all(session, audio[:1])  # the caller heard the first sentence only
        await feed(session, clock, speech(200))  # and interrupts
        events = drain(session.outbox)
        # Urgent first: the flush of the old turn, then the new turn's speech start.
        # OpenAI's order: the caller's speech first, then the interrupted reply's flush.
        assert isinstance(events[0], SpeechStarted) and events[0].turn_id == 2
        assert isinstance(events[1], Flush) and events[1].turn_id == 1
        done = next(e for e in events if isinstance(e, ResponseDone))
        assert done.status == "cancelled" and done.reason == "speech"
        assert done.heard == "It is sunny."
        assert not any(isinstance(e, ReplyAudio) for e in events)
        assert (session.history[-1].turn_id, session.history[-1].message) == (1, {"role": "assistant", "content": "It is sunny."})
        assert session.state is State.USER_SPEAKING
        assert sink.records[-1] == (1, "cancelled", "It is sunny.")
        # Marks that come back after the flush (Twilio returns pending marks on clear) change nothing.
        await session.handle(PlaybackMark(turn_id=1, chunk_index=2))
        assert session.records[0].heard == "It is sunny."
        await session.close()

    run(main())


def test_barge_in_while_thinking_aborts_the_llm_and_drops_queued_audio():
    async def main():
        llm = FakeLLM(hold=True)
        session, _services, clock, _ = make(llm=llm)
        await feed(session, clock, np.concatenate([bursts(2), silence(700)]))
        assert session.state is State.THINKING
        await feed(session, clock, speech(200))
        await settle()
        assert llm.aborted == 1
        events = drain(session.outbox)
        done = next(e for e in events if isinstance(e, ResponseDone))
        assert done.status == "cancelled" and done.heard == ""
        # Nothing the caller did not hear enters the history.
        assert [e.message["role"] for e in session.history] == ["user"]
        await session.close()

    run(main())


def test_outbox_flush_drops_only_the_turns_droppable_events():
    async def main():
        box = Outbox(max_items=8)
        samples = np.zeros(10, np.float32)
        await box.put(ReplyStarted(turn_id=1, audio_output=True))
        await box.put(ReplyAudio(turn_id=1, chunk_index=0, text="a", samples=samples, sample_rate_hz=RATE))
        await box.put(ReplyTextDelta(turn_id=1, text="x"))
        await box.put(ReplyAudio(turn_id=2, chunk_index=0, text="b", samples=samples, sample_rate_hz=RATE))
        assert box.drop_turn(1) == 2
        box.put_urgent(Flush(turn_id=1, reason="speech"))
        got = drain(box)
        assert types(got) == ["Flush", "ReplyStarted", "ReplyAudio"]
        assert got[2].turn_id == 2

    run(main())


def test_outbox_put_waits_when_full_and_never_drops():
    async def main():
        box = Outbox(max_items=2)
        await box.put(ReplyTextDelta(turn_id=1, text="a"))
        await box.put(ReplyTextDelta(turn_id=1, text="b"))
        third = asyncio.create_task(box.put(ReplyTextDelta(turn_id=1, text="c")))
        await settle()
        assert not third.done()
        assert (await box.get()).text == "a"
        await settle()
        assert third.done()
        assert [e.text for e in drain(box)] == ["b", "c"]

    run(main())


def test_typed_text_in_a_text_only_session():
    async def main():
        session, services, _clock, _ = make()
        await session.handle(ConfigureSession(audio_output=False))
        await session.handle(UserText(text="hello"))
        await settle()
        events = drain(session.outbox)
        assert types(events)[0] == "ReplyStarted"
        text = "".join(e.text for e in events if isinstance(e, ReplyTextDelta))
        assert text == "It is sunny. Take a hat. Have fun!"
        assert isinstance(events[-2], ResponseDone) and events[-2].status == "completed"
        assert isinstance(events[-1], TurnMetrics)
        assert services.synthesized == []
        assert session.history[0].message == {"role": "user", "content": "hello"}
        assert session.state is State.LISTENING
        await session.close()

    run(main())


def test_typed_text_interrupts_a_reply():
    async def main():
        llm = FakeLLM(hold=True)
        session, _, _, _ = make(llm=llm)
        await session.handle(UserText(text="first"))
        await settle()
        await session.handle(UserText(text="second"))
        await settle()
        assert llm.aborted == 1
        assert len(llm.requests) == 2
        assert llm.requests[1][-1] == {"role": "user", "content": "second"}
        await session.close()

    run(main())


def test_system_prompt_and_history_budget():
    async def main():
        session, _, _, _ = make(history_tokens=30, system_prompt="Be brief.")
        for i in range(10):
            session._add_history(i, {"role": "user", "content": f"question number {i} " * 2})
            session._add_history(i, {"role": "assistant", "content": f"answer {i}"})
        messages = session._messages()
        assert messages[0] == {"role": "system", "content": "Be brief."}
        assert messages[-1]["content"] == "answer 9"
        assert messages[1]["role"] == "user"
        assert len(messages) < 21
        total = sum(len(m["content"].split()) + 4 for m in messages[1:])
        assert total <= 30
        await session.close()

    run(main())


def test_speculative_start_hit_uses_one_llm_request():
    async def main():
        llm = FakeLLM()
        session, _services, clock, _ = make(llm=llm, speculative=True, speculative_pause_ms=200)
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(300))  # a pause: the LLM starts on "what is the"
        assert len(llm.requests) == 1
        assert session.state is State.USER_SPEAKING  # nothing is said before the turn ends
        assert not any(isinstance(e, ReplyStarted) for e in drain(session.outbox))
        await feed(session, clock, silence(400))
        events = drain(session.outbox)
        assert len(llm.requests) == 1 and llm.aborted == 0
        audio = [e for e in events if isinstance(e, ReplyAudio)]
        assert audio
        await play_all(session, audio)
        metrics = next(e for e in drain(session.outbox) if isinstance(e, TurnMetrics)).values
        assert metrics["speculative"] == "hit"
        assert metrics["speculative_saved_ms"] >= 300  # started ~400 ms before the final transcript
        await session.close()

    run(main())


def test_speculative_start_miss_restarts_on_the_final_transcript():
    async def main():
        llm = FakeLLM(hold=True)
        session, services, clock, _ = make(llm=llm, speculative=True, speculative_pause_ms=200)
        await feed(session, clock, bursts(2))
        await feed(session, clock, silence(300))
        assert len(llm.requests) == 1
        # A sound too short to count as the caller going on, yet a third "word" to the ASR.
        await feed(session, clock, np.concatenate([speech(60), silence(600)]))
        assert len(llm.requests) == 2 and llm.aborted == 1
        assert llm.requests[1][-1]["content"] == "what is the"
        assert services.transcribed == ["what is", "what is the"]  # the final could not reuse
        llm.release.set()
        await settle()
        events = drain(session.outbox)
        await play_all(session, events)
        metrics = next(e for e in drain(session.outbox) if isinstance(e, TurnMetrics)).values
        assert metrics["speculative"] == "miss"
        await session.close()

    run(main())


def test_speculation_is_dropped_when_the_caller_goes_on():
    async def main():
        llm = FakeLLM(hold=True)
        session, _services, clock, _ = make(llm=llm, speculative=True, speculative_pause_ms=200)
        await feed(session, clock, bursts(2))
        await feed(session, clock, silence(300))
        assert len(llm.requests) == 1
        await feed(session, clock, bursts(2))  # the caller goes on speaking
        assert llm.aborted == 1
        await session.close()

    run(main())


def test_speculative_start_can_be_turned_off():
    async def main():
        llm = FakeLLM()
        session, _, clock, _ = make(llm=llm, speculative=False)
        await feed(session, clock, bursts(2))
        await feed(session, clock, silence(300))
        assert llm.requests == []
        await session.close()

    run(main())


def test_truncate_after_an_interruption_corrects_the_history():
    async def main():
        session, _services, clock, sink = make()
        await feed(session, clock, np.concatenate([bursts(2), silence(700)]))
        audio = [e for e in drain(session.outbox) if isinstance(e, ReplyAudio)]
        await session.handle(CancelResponse())
        await settle()
        assert session.records[0].heard == ""
        # The client says it played 150 ms: the first sentence (3 words at 50 ms each).
        first_ms = int(len(audio[0].samples) / RATE * 1000)
        await session.handle(PlaybackTruncate(turn_id=1, audio_end_ms=first_ms))
        assert session.records[0].heard == "It is sunny."
        assert session.history[-1].message == {"role": "assistant", "content": "It is sunny."}
        assert sink.records[-1] == (1, "cancelled", "It is sunny.")
        await session.close()

    run(main())


def test_cancel_without_a_reply_is_an_error_and_the_call_goes_on():
    async def main():
        session, services, _, _ = make()
        await session.handle(CancelResponse(client_event_id="evt_7"))
        events = drain(session.outbox)
        assert [(e.code, e.client_event_id) for e in events if isinstance(e, ErrorEvent)] == [("response_cancel_not_active", "evt_7")]
        await session.handle(UserText(text="hello", respond=True))
        await settle()
        assert services.llm.completed == 1
        await session.close()

    run(main())


def test_llm_failure_fails_the_turn_not_the_call():
    async def main():
        llm = FakeLLM()
        llm.fail = "server unreachable"
        session, _, _, _ = make(llm=llm)
        await session.handle(ConfigureSession(audio_output=False))
        await session.handle(UserText(text="hi"))
        await settle()
        events = drain(session.outbox)
        assert any(isinstance(e, ErrorEvent) and e.code == "llm_error" for e in events)
        done = next(e for e in events if isinstance(e, ResponseDone))
        assert done.status == "failed" and "unreachable" in done.error
        llm.fail = None
        await session.handle(UserText(text="again"))
        await settle()
        assert any(isinstance(e, ResponseDone) and e.status == "completed" for e in drain(session.outbox))
        await session.close()

    run(main())


def test_manual_turns_commit_and_create_response():
    async def main():
        session, _services, clock, _ = make()
        await session.handle(ConfigureSession(server_vad=False))
        await feed(session, clock, np.concatenate([bursts(2), silence(700)]))
        assert drain(session.outbox) == []  # no VAD: nothing happens until the commit
        await session.handle(CommitAudio())
        await settle()
        events = drain(session.outbox)
        assert types(events) == ["SpeechStopped", "TranscriptFinal"]
        assert events[1].text == "what is"
        await session.handle(CreateResponse())
        await settle()
        assert isinstance(drain(session.outbox)[0], ReplyStarted)
        await session.handle(CommitAudio())
        assert any(isinstance(e, ErrorEvent) and e.code == "input_audio_buffer_commit_empty" for e in drain(session.outbox))
        await session.close()

    run(main())


def test_inbox_drops_the_oldest_audio_when_the_session_lags():
    async def main():
        session, _, _, _ = make(max_inbox_audio_s=0.5)
        for _ in range(50):  # 1 s of audio arrives before the session gets to run
            session._push_audio(AudioIn(samples=silence(20), sample_rate_hz=RATE))
        assert session.dropped_audio_s >= 0.49
        await settle()
        await session.close()

    run(main())


def test_denoise_steps_only_when_asked():
    async def main():
        session, _, _, _ = make()
        await session.handle(ConfigureSession(audio_output=False))
        await session.handle(UserText(text="hi"))
        await settle()
        assert not any(isinstance(e, DenoiseStep) for e in drain(session.outbox))
        await session.handle(ConfigureSession(trace_steps=True))
        await session.handle(UserText(text="hi"))
        await settle()
        steps = [e for e in drain(session.outbox) if isinstance(e, DenoiseStep)]
        assert steps and steps[0].tokens[-1] == "<mask>"
        await session.close()

    run(main())


def test_close_records_the_unfinished_turn_and_is_idempotent():
    async def main():
        llm = FakeLLM(hold=True)
        session, _, _clock, sink = make(llm=llm)
        await session.handle(UserText(text="hi"))
        await settle()
        await session.close()
        await session.close()
        assert sink.records == [(1, "cancelled", "")]
        assert llm.aborted == 1

    run(main())


def test_input_at_other_rates_is_resampled():
    async def main():
        session, _services, clock, _ = make()
        audio8k = np.concatenate([np.full(8000 * 240 // 1000, 0.5, np.float32), np.zeros(8000 * 900 // 1000, np.float32)])
        for i in range(0, len(audio8k), 160):
            clock.t += 0.02
            await session.handle(AudioIn(samples=audio8k[i : i + 160], sample_rate_hz=8000))
            await settle(10)
        await settle()
        events = drain(session.outbox)
        assert isinstance(events[0], SpeechStarted)
        assert any(isinstance(e, SpeechStopped) for e in events)
        assert any(isinstance(e, TranscriptFinal) and e.text == "what" for e in events)
        await session.close()

    run(main())


def test_text_helpers():
    assert normalize_transcript("Hello, there!") == normalize_transcript("hello there")
    assert heard_prefix("one two three four", 0.5) == "one two"
    assert heard_prefix("one two", 1.0) == "one two"
    assert heard_prefix("one two", 0.0) == ""


class PacedLLM(FakeLLM):
    """Streams the pieces the test hands it, one at a time: an LLM slower than speech synthesis."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()

    async def stream(self, messages, *, trace_steps=False, owner=None, options=None):
        from voice_agent.llm import LlmDelta

        self.requests.append(messages)
        while (piece := await self.pieces.get()) is not None:
            yield LlmDelta(text=piece)
        yield LlmDelta(text="", finished=True, finish_reason="eos")


async def _paced_reply() -> tuple[PacedLLM, FakeServices, Session]:
    """A session asked a typed question, its reply streamed by the test (PacedLLM)."""
    llm = PacedLLM()
    services = FakeServices(llm, first_chunk_min_words=4)
    config = AgentConfig(speculative_start=False, sample_rate_hz=RATE)
    session = Session(services, config, sink=Sink(), clock=FakeClock(), wall_clock=lambda: 1.0)
    await session.handle(UserText(text="weather?"))
    await settle()
    return llm, services, session


def test_first_clause_reaches_tts_before_the_first_sentence_ends():
    async def main():
        llm, services, session = await _paced_reply()
        for piece in ["The ", "weather ", "looks ", "great ", "today, ", "so "]:
            await llm.pieces.put(piece)
            await settle()
        # The sentence is still being generated; the first clause is already being spoken.
        assert services.synthesized == ["The weather looks great today,"]
        for piece in ["take ", "a ", "hat. ", "Have ", "fun, ", "and ", "bring ", "water."]:
            await llm.pieces.put(piece)
            await settle()
        # Later chunks wait for whole sentences.
        assert services.synthesized == ["The weather looks great today,", "so take a hat."]
        await llm.pieces.put(None)
        await settle()
        assert services.synthesized == ["The weather looks great today,", "so take a hat.", "Have fun, and bring water."]
        await session.close()

    run(main())


def test_the_reply_waits_in_the_engine_while_its_first_words_are_synthesized():
    """The first chunk's synthesis holds the call's LLM requests (the cores go to the voice) and
    lets them go after it, on success as on failure; later chunks hold nothing."""
    async def main():
        llm, services, session = await _paced_reply()
        for piece in ["The weather ", "looks great today, ", "so take a hat. ", "Have fun. "]:
            await llm.pieces.put(piece)
            await settle()
        await llm.pieces.put(None)
        await settle()
        call = session.call_id
        assert services.synthesized == ["The weather looks great today,", "so take a hat.", "Have fun."]
        assert services.holds_at_synthesis[0] == [(call, True)]  # held while the first chunk is made
        assert llm.holds == [(call, True), (call, False)]  # released after it, never again
        await session.close()

    run(main())


def test_model_services_chunker_follows_the_config():
    from voice_agent.config import load_config
    from voice_agent.services import ModelServices

    def chunks(config, text):
        chunker = ModelServices(config, transcriber=None, synthesizer=None, llm=FakeLLM()).make_chunker()
        return chunker.push(text) + chunker.flush()

    text = "The weather looks great today, so take a hat."
    assert chunks(load_config(overrides=["tts.first_chunk_max_syllables=0"]), text) == [
        "The weather looks great today,", "so take a hat."]
    assert chunks(load_config(), text) == ["The weather looks great", "today, so take a hat."]  # 7 syllables
    assert chunks(load_config(overrides=["tts.first_chunk_min_words=0", "tts.first_chunk_max_words=0"]), text) == [text]
    long = "The sky is blue because of a process called Rayleigh scattering."
    assert chunks(load_config(), long) == ["The sky is blue", "because of a process called Rayleigh scattering."]
    assert chunks(load_config(overrides=["tts.first_chunk_max_words=0", "tts.first_chunk_max_syllables=0"]), long) == [long]
    far = "The moon is approximately 2,150,000 miles away."
    assert chunks(load_config(), far) == ["The moon", "is approximately 2,150,000 miles away."]
    assert chunks(load_config(overrides=["tts.first_chunk_max_syllables=0"]), far) == [
        "The moon is approximately 2,150,000", "miles away."]


def test_why_the_reply_ended_is_in_the_turn_metrics_and_counted():
    from voice_agent.metrics import Metrics

    async def main():
        session, _services, clock, _sink = make(llm=FakeLLM("No, we are closed.", finish_reason="repetition"))
        await feed(session, clock, np.concatenate([bursts(2), silence(700)]))
        await play_all(session, drain(session.outbox))
        metrics = next(e for e in drain(session.outbox) if isinstance(e, TurnMetrics)).values
        await session.close()
        return metrics, session.turns[-1]

    values, record = asyncio.run(main())
    assert values["llm_finish"] == "repetition"
    registry = Metrics()
    registry.turn_finished("call", record)
    assert 'voice_agent_llm_finishes_total{reason="repetition"} 1' in registry.render()
