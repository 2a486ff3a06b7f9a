"""Semantic end of turn in the session: an end-of-turn model judges each pause (fakes, fake clock)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
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
    Flush,
    ReplyAudio,
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    TurnMetrics,
)
from voice_agent.session import Session


def make(turn_p, *, end_silence_ms=1500):
    clock = FakeClock()
    services = FakeServices(end_silence_ms=end_silence_ms)
    services.turn_p = turn_p
    config = AgentConfig(speculative_start=False, sample_rate_hz=RATE)
    session = Session(services, config, clock=clock, wall_clock=lambda: 1.0)
    return session, services, clock


def stopped(events):
    return [e for e in events if isinstance(e, SpeechStopped)]


def test_a_complete_turn_ends_at_the_first_pause_not_after_the_fallback_silence():
    async def main():
        seen = []
        session, _services, clock = make(lambda audio: seen.append(audio.size) or 0.9)
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(200))
        events = drain(session.outbox)
        assert len(stopped(events)) == 1, "the model said the turn is over at the 200 ms pause"
        assert [e.text for e in events if isinstance(e, TranscriptFinal)] == ["what is the"]
        assert len(seen) == 1 and seen[0] > 0
        await session.close()
        values = session.turns[-1].metrics
        assert values["end_of_turn"] == "model" and values["end_of_turn_audio_p"] == 0.9

    asyncio.run(main())


def test_an_unfinished_turn_waits_for_the_fallback_silence():
    async def main():
        session, _services, clock = make(lambda audio: 0.1, end_silence_ms=1000)
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(900))
        assert stopped(drain(session.outbox)) == [], "P = 0.1: the caller may go on, keep listening"
        await feed(session, clock, silence(200))
        events = drain(session.outbox)
        assert len(stopped(events)) == 1
        # The latency reference is the end of the speech, not the end of the wait.
        assert stopped(events)[0].audio_end_ms <= 3 * 240 + 2 * 100 + 20
        await session.close()
        values = session.turns[-1].metrics
        assert values["end_of_turn"] == "silence" and values["end_of_turn_audio_p"] == 0.1

    asyncio.run(main())


@pytest.mark.parametrize("logprob", [-0.9, -0.1])
def test_a_pause_after_an_unsure_transcript_ends_the_turn_after_the_shorter_silence(logprob):
    """Whisper unsure of the words (garbled speech): the text score cannot judge them, so the
    pause ends the turn after the shorter silence (turn.unsure_silence_ms), said in the metrics;
    a transcript whisper was sure of waits for the full fallback."""
    async def main():
        session, services, clock = make(lambda text: 0.1, end_silence_ms=1500)
        services.turn_reads_text = True
        services.asr_logprob, services.unsure_ms = logprob, 600
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(500))
        assert stopped(drain(session.outbox)) == []
        await feed(session, clock, silence(200))
        events = drain(session.outbox)
        if logprob > -0.5:
            assert stopped(events) == [], "sure of 'what is the', not over: keep listening"
            await feed(session, clock, silence(900))
            events = drain(session.outbox)
        assert len(stopped(events)) == 1
        assert [e.text for e in events if isinstance(e, TranscriptFinal)] == ["what is the"]
        await session.close()
        assert session.turns[-1].metrics["end_of_turn"] == ("unsure" if logprob < -0.5 else "silence")

    asyncio.run(main())


def test_a_pause_inside_a_sentence_is_judged_again_at_the_next_pause():
    async def main():
        verdicts = iter([0.2, 0.95])  # "what is the" ... "weather like": unfinished, then done
        session, _services, clock = make(lambda audio: next(verdicts))
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(500))
        assert stopped(drain(session.outbox)) == []
        await feed(session, clock, bursts(2))
        await feed(session, clock, silence(200))
        events = drain(session.outbox)
        assert len(stopped(events)) == 1
        assert [e.text for e in events if isinstance(e, TranscriptFinal)] == ["what is the weather like"]
        await session.close()

    asyncio.run(main())


def test_a_verdict_that_arrives_after_the_caller_spoke_again_ends_nothing():
    async def main():
        release = asyncio.Event()

        async def slow(audio):
            await release.wait()
            return 0.99

        session, _services, clock = make(slow)
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(200))  # the check starts, its verdict is held back
        await feed(session, clock, bursts(2))  # the caller goes on
        release.set()
        await settle()
        assert stopped(drain(session.outbox)) == [], "the pause that was judged is over"
        await feed(session, clock, silence(100))
        assert stopped(drain(session.outbox)) == []
        await session.close()

    asyncio.run(main())


def test_a_failing_turn_model_falls_back_to_silence_and_says_so_once(caplog):
    async def main():
        def broken(audio):
            raise RuntimeError("model file gone")

        session, _services, clock = make(broken, end_silence_ms=600)
        with caplog.at_level(logging.WARNING, logger="voice_agent.session"):
            for _ in range(2):
                await feed(session, clock, bursts(2))
                await feed(session, clock, silence(300))
                assert stopped(drain(session.outbox)) == []
                await feed(session, clock, silence(400))
                assert len(stopped(drain(session.outbox))) == 1
                await feed(session, clock, silence(100))
        assert sum("end-of-turn model failed" in r.getMessage() for r in caplog.records) == 1
        await session.close()

    asyncio.run(main())


def test_closing_the_call_cancels_a_pending_verdict():
    async def main():
        never = asyncio.Event()

        async def stuck(audio):
            await never.wait()
            return 1.0

        session, _services, clock = make(stuck)
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(200))
        checks = [t for t in session._tasks if t.get_name() == "turn-check"]
        assert len(checks) == 1 and not checks[0].done()
        await session.close()
        assert checks[0].cancelled()

    asyncio.run(main())


def test_a_text_detector_reads_a_decode_that_the_final_transcript_reuses():
    async def main():
        heard = []

        def over_if_a_question_is_whole(text):
            heard.append(text)
            return 0.9 if text.split()[-1:] == ["weather"] else 0.1

        session, services, clock = make(over_if_a_question_is_whole)
        services.turn_reads_text = True
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(400))
        assert stopped(drain(session.outbox)) == [], "'what is the' is not over"
        await feed(session, clock, bursts(1))
        await feed(session, clock, silence(200))
        events = drain(session.outbox)
        assert len(stopped(events)) == 1
        assert heard == ["what is the", "what is the weather"]
        assert [e.text for e in events if isinstance(e, TranscriptFinal)] == ["what is the weather"]
        # Two decodes in all: one per judged pause; the final reused the second.
        assert services.transcribed == ["what is the", "what is the weather"]
        await session.close()

    asyncio.run(main())



@pytest.mark.parametrize("pause_ms", [1000, 200])
def test_a_judged_pause_starts_the_llm_on_its_transcript_while_the_verdict_is_computed(pause_ms):
    """The speculative start at a judged pause: the LLM runs on the transcript the text detector
    reads, before the verdict; a speculative pause endpointer firing at the same pause (200)
    shares the decode and the request; the final transcript adopts it."""

    async def main():
        verdict = asyncio.Event()

        async def held_until_released(text):
            await verdict.wait()
            return 0.9

        llm = FakeLLM()
        services = FakeServices(llm, end_silence_ms=1500)
        services.turn_p, services.turn_reads_text = held_until_released, True
        config = AgentConfig(speculative_start=True, speculative_pause_ms=pause_ms, sample_rate_hz=RATE)
        clock = FakeClock()
        session = Session(services, config, clock=clock, wall_clock=lambda: 1.0)
        await feed(session, clock, bursts(3))
        await feed(session, clock, silence(200))  # the judged pause (and the speculative one)
        await settle()
        assert stopped(drain(session.outbox)) == [], "no verdict yet"
        assert [r[-1]["content"] for r in llm.requests] == ["what is the"], "the LLM already runs on it"
        assert services.transcribed == ["what is the"], "one decode for both"
        verdict.set()
        await settle()
        events = drain(session.outbox)
        assert len(stopped(events)) == 1
        assert len(llm.requests) == 1 and llm.aborted == 0
        await play_all(session, events)
        metrics = next(e for e in drain(session.outbox) if isinstance(e, TurnMetrics)).values
        assert metrics["speculative"] == "hit" and metrics["end_of_turn"] == "model"
        assert services.transcribed == ["what is the"], "the final reused the pause's decode"
        await session.close()

    asyncio.run(main())


def _echo_call(gate: float):
    clock = FakeClock()
    services = FakeServices()
    services.tts_level = 0.5  # a loud reply: its echo at 30 % would pass the fake VAD's 0.1
    config = AgentConfig(speculative_start=False, sample_rate_hz=RATE, echo_gate_ratio=gate)
    return Session(services, config, clock=clock, wall_clock=lambda: 1.0), clock


async def _reply_playing(session, clock):
    await feed(session, clock, bursts(2))
    await feed(session, clock, silence(700))
    replies = [e for e in drain(session.outbox) if isinstance(e, ReplyAudio)]
    assert replies
    session.audio_sent(replies[0].turn_id)  # the writer started sending it: playback begins
    return np.concatenate([r.samples for r in replies])


def test_the_reply_levels_keep_time_across_chunks_of_any_length():
    async def main():
        session, _ = _echo_call(0.5)
        turn = session._new_turn("speech")
        rate = 22_050  # piper's rate: 441 samples a 20 ms frame
        for level in (0.5, 0.0, 0.5, 0.0):  # four chunks of 662 samples (30 ms), played back to back
            session._add_far_end(turn, np.full(662, level, np.float32), rate)
        # Six whole frames, each where it plays, 2 samples carried over: a chunk's partial last
        # frame is not dropped (that made four frames, 40 ms ahead of the playback by the fourth).
        expected = 0.5 * np.sqrt(np.array([441, 221, 0, 440, 222, 0]) / 441)
        np.testing.assert_allclose(turn.far_end, expected, rtol=1e-5)
        assert turn.far_rest.size == 2
        await session.close()

    asyncio.run(main())


def test_a_chunks_partial_last_frame_plays_before_the_silence_when_the_reply_fell_behind():
    async def main():
        session, clock = _echo_call(0.5)
        turn = session._new_turn("speech")
        rate = 22_050
        turn.t_first_sent = clock()  # playback begins
        session._add_far_end(turn, np.full(662, 0.5, np.float32), rate)  # 30 ms: plays out by 30 ms
        clock.t += 0.100  # the next chunk comes 100 ms in: 70 ms of silence went out between
        session._add_far_end(turn, np.full(662, 0.5, np.float32), rate)
        # The first chunk's last 10 ms closed with silence, then the rest of the gap, then the new
        # chunk from 100 ms on (a frame, 10 ms carried over); joining the 10 ms to the new chunk put
        # it after the gap and the new chunk's levels 10 ms late.
        expected = [0.5, 0.5 * np.sqrt(221 / 441), 0, 0, 0, 0.5]
        np.testing.assert_allclose(turn.far_end, expected, rtol=1e-5)
        assert turn.far_rest.size == 221
        await session.close()

    asyncio.run(main())


def test_the_reply_echoed_back_is_no_barge_in_but_the_caller_talking_over_it_is():
    async def main():
        session, clock = _echo_call(0.5)
        reply = await _reply_playing(session, clock)
        await feed(session, clock, np.concatenate([silence(100), 0.3 * reply[: RATE]]))  # 100 ms late, -10 dB
        events = drain(session.outbox)
        assert not [e for e in events if isinstance(e, (Flush, SpeechStarted))], "its own echo interrupted the reply"
        assert session.echo_gated_s >= 0.3  # the echo, not the silence before it
        await feed(session, clock, speech(300))  # the caller, as loud as the reply
        events = drain(session.outbox)
        assert any(isinstance(e, Flush) for e in events) and any(isinstance(e, SpeechStarted) for e in events)
        await session.close()

        session, clock = _echo_call(0.0)  # the gate off: the same echo is taken for the caller
        reply = await _reply_playing(session, clock)
        await feed(session, clock, np.concatenate([silence(100), 0.3 * reply[: RATE]]))
        assert any(isinstance(e, Flush) for e in drain(session.outbox))
        await session.close()

    asyncio.run(main())


def test_a_caller_quieter_than_the_reply_barges_in_once_the_line_is_known_to_carry_no_echo():
    async def main():
        clock = FakeClock()
        services = FakeServices(FakeLLM(" ".join(["word"] * 60) + "."))  # a 3 s reply
        services.tts_level = 0.5
        config = AgentConfig(speculative_start=False, sample_rate_hz=RATE, echo_gate_ratio=0.5)
        session = Session(services, config, clock=clock, wall_clock=lambda: 1.0)
        await _reply_playing(session, clock)
        await feed(session, clock, silence(1000))  # nothing comes back while it plays
        assert session._echo_path is not None and session._echo_path.estimate().kind == "none"
        # A caller at 0.2, below half the reply's level: the level rule alone would take it for echo.
        await feed(session, clock, 0.4 * speech(300))
        assert any(isinstance(e, Flush) for e in drain(session.outbox))
        assert session.echo_gated_s == 0
        await session.close()

    asyncio.run(main())
