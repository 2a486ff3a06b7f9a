"""`voice-agent bench barge-in`: the client that talks over replies (or echoes them, or knocks),
against a fake server on localhost that replies with a paced tone and flushes it when the caller
is loud for 100 ms; and the report."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audio.codecs import mulaw_decode, mulaw_encode, pcm16_to_float32
from voice_agent.bench.callers import BargeInResult, BargeInSound, run_barge_ins
from voice_agent.bench.prompts import PROMPT_RATE_HZ, PROMPTS, SpokenPrompt, voiced_bounds
from voice_agent.commands.bench_barge_in import format_table, noises, summarize

ROOT = Path(__file__).resolve().parents[2]
REPLY_S = 3.0
REPLY_AMPLITUDE = 0.4  # the reply's tone (RMS 0.28)
BARGE_RMS = 0.1  # the fake server's barge-in: 5 frames in a row louder than this (its echo at -10 dB is not)


def tone(seconds: float, amplitude: float, rate: int = PROMPT_RATE_HZ, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def question() -> SpokenPrompt:
    audio = np.concatenate([np.zeros(1600, np.float32), tone(0.5, 0.3), np.zeros(800, np.float32)])
    start, end = voiced_bounds(audio, PROMPT_RATE_HZ)
    return SpokenPrompt(0, PROMPTS[0], audio, start, end)


class FakeServer:
    """Ends a turn after 200 ms of silence, then plays REPLY_S of tone in 100 ms pieces, in real
    time, 200 ms ahead; flushes it when the caller is louder than BARGE_RMS for 5 frames in a row.
    Keeps the caller's levels heard while the reply played."""

    def __init__(self) -> None:
        self.heard: list[float] = []  # RMS of each caller frame while a reply played
        self.url = ""

    async def __aenter__(self) -> FakeServer:
        from websockets.asyncio.server import serve

        self._server = await serve(self._handler, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{next(iter(self._server.sockets)).getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handler(self, ws) -> None:
        realtime = ws.request.path == "/v1/realtime"
        if realtime:
            session = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                 "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
            await ws.send(json.dumps({"type": "session.created", "session": session}))
        stream_sid = None
        voiced = silent = loud_run = 0
        reply: asyncio.Task | None = None

        async def play() -> None:
            rate = 24000 if realtime else 8000
            audio = tone(REPLY_S, REPLY_AMPLITUDE, rate)
            t0 = asyncio.get_running_loop().time()
            for k, i in enumerate(range(0, audio.size, rate // 10)):
                await asyncio.sleep(max(0.0, t0 + 0.1 * k - 0.2 - asyncio.get_running_loop().time()))
                piece = audio[i : i + rate // 10]
                if realtime:
                    data = base64.b64encode((piece * 32767).astype("<i2").tobytes()).decode()
                    await ws.send(json.dumps({"type": "response.output_audio.delta", "response_id": "resp_1", "delta": data}))
                else:
                    data = base64.b64encode(mulaw_encode(piece)).decode()
                    await ws.send(json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": data}}))

        async for message in ws:
            event = json.loads(message)
            if not realtime:
                if event["event"] == "start":
                    stream_sid = event["streamSid"]
                if event["event"] != "media":
                    continue
                samples = mulaw_decode(base64.b64decode(event["media"]["payload"]))
            else:
                samples = pcm16_to_float32(base64.b64decode(event["audio"]))
            rms = float(np.sqrt(np.mean(samples**2)))
            if reply is None:
                voiced, silent = (voiced + 1, 0) if rms > 0.01 else (voiced, silent + 1)
                if voiced >= 5 and silent == 10:
                    reply = asyncio.create_task(play())
                continue
            if reply.done():
                continue
            self.heard.append(rms)
            loud_run = loud_run + 1 if rms > BARGE_RMS else 0
            if loud_run >= 5:
                reply.cancel()
                flush = {"type": "output_audio_buffer.cleared", "response_id": "resp_1"} if realtime else \
                    {"event": "clear", "streamSid": stream_sid}
                await ws.send(json.dumps(flush))


def trial(route: str, sound: BargeInSound, **kwargs) -> tuple[BargeInResult, list[float]]:
    async def main():
        async with FakeServer() as server:
            results = await run_barge_ins(server.url, route, [question()], [sound], reply_timeout_s=5, **kwargs)
            return results[0], server.heard

    return asyncio.run(main())


@pytest.mark.parametrize("route", ["realtime", "twilio"])
def test_speech_over_the_reply_is_timed_to_the_flush(route: str) -> None:
    speech = np.concatenate([np.zeros(800, np.float32), tone(0.6, 0.5)])
    result, _ = trial(route, BargeInSound("speech", "tone", speech), after_s=0.5)
    assert result.ok and result.error is None
    # The fake flushes after 5 loud frames (100 ms) at the earliest; the frame holding the first
    # voiced sample counts from its start.
    assert 80 <= result.flush_ms <= 600, result.flush_ms
    assert 0.5 <= result.played_s <= 0.5 + 1.0


@pytest.mark.parametrize("route", ["realtime", "twilio"])
def test_the_echo_line_sends_the_reply_back_late_and_quieter_and_counts_no_flush(route: str) -> None:
    result, heard = trial(route, BargeInSound("echo", "100 ms, -10 dB"), echo_delay_s=0.1, echo_gain=10 ** (-10 / 20))
    assert result.ok and result.flush_ms is None
    assert result.played_s == pytest.approx(REPLY_S, abs=0.5)
    steady = np.median(heard[len(heard) // 4 : len(heard) // 2])  # well inside the reply
    assert steady == pytest.approx(REPLY_AMPLITUDE / np.sqrt(2) * 10 ** (-10 / 20), rel=0.15)


def test_a_click_is_not_a_barge_in_and_a_reply_too_short_to_interrupt_is_a_failed_trial() -> None:
    result, _ = trial("realtime", BargeInSound("noise", "click", noises()["click"]), after_s=0.5)
    assert result.ok and result.flush_ms is None
    late, _ = trial("realtime", BargeInSound("speech", "tone", tone(0.5, 0.5)), after_s=REPLY_S + 1)
    assert not late.ok and "over before" in late.error


def test_an_unreachable_server_is_a_failed_trial() -> None:
    async def main():
        return await run_barge_ins("http://127.0.0.1:9", "twilio", [question()], [BargeInSound("echo", "e")], connect_timeout_s=2)

    (result,) = asyncio.run(main())
    assert not result.ok and "cannot connect" in result.error


def test_the_report_judges_the_bars() -> None:
    def r(kind: str, flush: float | None, ok: bool = True, sound: str = "s") -> BargeInResult:
        return BargeInResult("twilio", kind, sound, 0, 0, ok=ok, flush_ms=flush)

    rows = summarize([r("speech", 200.0), r("speech", 250.0), r("speech", None, ok=False), r("echo", None), r("echo", None),
                      r("noise", 300.0, sound="knock x3"), r("noise", None, sound="click")])
    speech, echo, noise = rows
    assert speech["trials"] == 2 and speech["failed"] == 1 and speech["missed"] == 0 and speech["meets_bar"]
    assert echo["false_barge_ins"] == 0 and echo["meets_bar"]
    assert noise["false_barge_ins"] == 1 and noise["false_by_sound"] == {"knock x3": 1, "click": 0}
    text = format_table(rows)
    assert "met" in text and "false barge-ins 1 of 2" in text
    (slow,) = summarize([r("speech", 350.0)])
    assert not slow["meets_bar"]
    (missed,) = summarize([r("speech", None)])
    assert missed["missed"] == 1 and not missed["meets_bar"]


def test_the_noises_are_short_and_fixed() -> None:
    a, b = noises(), noises()
    assert list(a) == ["click", "cough", "knock x3", "cough x2"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(x.size < PROMPT_RATE_HZ // 2 and np.abs(x).max() <= 0.7 + 1e-6 for x in a.values())


def test_the_command_is_wired_into_bench() -> None:
    out = subprocess.run([sys.executable, "-m", "voice_agent", "bench", "barge-in", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "--echo-db" in out and "--kinds" in out
    bad = subprocess.run([sys.executable, "-m", "voice_agent", "bench", "barge-in", "--kinds", "sneeze", "--url",
                          "http://127.0.0.1:9"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--kinds takes some of" in bad.stderr
