"""`voice-agent bench e2e`: the measuring client, the statistics, the report files.

Fast tests use synthetic speech (a tone) and fake servers on localhost that answer like
`/v1/realtime` and `/twilio` after a known silence, so the client's timing and failure handling
are checked without models. The real run (2 prompts, 1 caller, a real `voice-agent serve`) takes
minutes on a shared CPU: it runs with VOICE_AGENT_BENCH_E2E_REAL=1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audio.codecs import mulaw_decode, pcm16_to_float32
from voice_agent.bench.callers import TurnResult, attach_store_metrics, run_callers
from voice_agent.bench.prompts import PROMPT_RATE_HZ, PROMPTS, SpokenPrompt, voiced_bounds
from voice_agent.bench.report import (
    evaluate_goals,
    format_table,
    percentiles,
    plot,
    stage_durations,
    summarize,
    write_json,
)
from voice_agent.bench.servers import check_url
from voice_agent.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT_SILENCE_FRAMES = 10  # the fake servers' end of turn: 200 ms of silence
REPLY_DELAY_S = 0.05


def tone_prompt(prompt_id: int = 0, seconds: float = 0.6) -> SpokenPrompt:
    t = np.arange(int(PROMPT_RATE_HZ * seconds)) / PROMPT_RATE_HZ
    voiced = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    audio = np.concatenate([np.zeros(1600, np.float32), voiced, np.zeros(800, np.float32)])
    start, end = voiced_bounds(audio, PROMPT_RATE_HZ)
    return SpokenPrompt(prompt_id, PROMPTS[prompt_id], audio, start, end)


# --- prompts -----------------------------------------------------------------------------------


def test_voiced_bounds_find_the_speech_in_silence() -> None:
    p = tone_prompt()
    assert abs(p.voiced_start_sample - 1600) <= 160
    assert abs(p.voiced_end_sample - (1600 + int(0.6 * PROMPT_RATE_HZ))) <= 160
    assert voiced_bounds(np.zeros(16000, np.float32), PROMPT_RATE_HZ) == (0, 0)


def test_prompt_set_is_fixed_and_mixes_voices() -> None:
    assert len(PROMPTS) >= 20
    voices = {p.voice for p in PROMPTS}
    assert "piper" in voices and len(voices - {"piper"}) >= 3
    assert any(len(p.phrases) > 1 for p in PROMPTS)  # natural pauses inside some prompts


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_load_prompts_synthesizes_once_into_the_cache(tmp_path: Path) -> None:
    from voice_agent.bench.prompts import load_prompts
    from voice_agent.models import resolve_tts_voice

    try:
        voice = resolve_tts_voice("en_US-joe-medium")
    except UserError as e:
        pytest.skip(str(e))
    first = load_prompts(2, tmp_path, voice)  # one piper prompt, one espeak-ng prompt
    assert [p.prompt.voice for p in first] == ["piper", PROMPTS[1].voice]
    assert len(list(tmp_path.glob("*.wav"))) == 2
    again = load_prompts(2, tmp_path, voice)
    for a, b in zip(first, again, strict=True):
        assert 0.5 < a.duration_s < 5
        np.testing.assert_allclose(a.audio, b.audio, atol=1 / 32768)


def test_each_piper_prompt_is_spoken_at_its_own_speed() -> None:
    """The synthesizer is loaded once, on the first piper prompt: later prompts keep their speed."""
    from voice_agent.bench.prompts import _Synth, _trim
    from voice_agent.models import resolve_tts_voice

    try:
        voice = resolve_tts_voice("en_US-joe-medium")
    except UserError as e:
        pytest.skip(str(e))
    synth = _Synth(voice)
    text = "How many minutes are there in a day?"
    # Piper draws its durations with noise (same speed: length ratios 0.9-1.1); at 0.6 and 1.6 the
    # trimmed speech measures about 0.5 of the length.
    slow, fast = _trim(synth.phrase(text, "piper", 0.6)), _trim(synth.phrase(text, "piper", 1.6))
    assert len(fast) < 0.75 * len(slow)


# --- fake servers ------------------------------------------------------------------------------


class FakeServer:
    """Answers each utterance (voiced frames, then ENDPOINT_SILENCE_FRAMES silent ones) like the
    real routes do; `reply=False` never answers (for the timeout)."""

    def __init__(self, reply: bool = True) -> None:
        self.reply = reply
        self.marks_echoed: list[str] = []
        self.url = ""

    async def __aenter__(self) -> FakeServer:
        from websockets.asyncio.server import serve

        self._server = await serve(self._handler, "127.0.0.1", 0)
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handler(self, ws) -> None:
        route = ws.request.path
        if route == "/v1/realtime":
            session = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                 "output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
            await ws.send(json.dumps({"type": "session.created", "session": session}))
        voiced, silent, turn = 0, 0, 0
        stream_sid = None
        async for message in ws:
            event = json.loads(message)
            if route == "/twilio":
                if event["event"] == "start":
                    stream_sid = event["streamSid"]
                if event["event"] == "mark":
                    self.marks_echoed.append(event["mark"]["name"])
                if event["event"] != "media":
                    continue
                samples = mulaw_decode(base64.b64decode(event["media"]["payload"]))
            else:
                samples = pcm16_to_float32(base64.b64decode(event["audio"]))
            loud = float(np.sqrt(np.mean(samples**2))) > 0.01
            voiced, silent = (voiced + 1, 0) if loud else (voiced, silent + 1)
            if voiced >= 5 and silent == ENDPOINT_SILENCE_FRAMES:
                voiced, turn = 0, turn + 1
                if route == "/v1/realtime":
                    await ws.send(json.dumps({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 0}))
                if not self.reply:
                    continue
                await asyncio.sleep(REPLY_DELAY_S)
                audio = base64.b64encode(bytes(4800)).decode()  # 100 ms of silence at 24 kHz
                if route == "/v1/realtime":
                    rid = f"resp_{turn}"
                    await ws.send(json.dumps({"type": "response.output_audio.delta", "response_id": rid, "delta": audio}))
                    await ws.send(json.dumps({"type": "response.done", "response": {"id": rid, "status": "completed"}}))
                    metrics = {"asr_final_ms": 230.0, "llm_first_text_ms": 240.0, "tts_first_audio_ms": 245.0, "voice_to_voice_ms": 250.0}
                    await ws.send(json.dumps({"type": "voice_agent.metrics", "turn_id": turn, "metrics": metrics}))
                else:
                    payload = base64.b64encode(bytes([0xFF]) * 160).decode()
                    await ws.send(json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}))
                    await ws.send(json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": f"r{turn}.0"}}))


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("route", ["realtime", "twilio"])
def test_callers_time_the_silence_until_the_reply(route: str) -> None:
    prompts = [tone_prompt(0), tone_prompt(1, 0.4)]
    seen: list[TurnResult] = []

    async def main():
        async with FakeServer() as server:
            results = await run_callers(server.url, route, prompts, config_name="fake", callers=2,
                                        turns_per_call=5, on_turn=seen.append, reply_timeout_s=5)
            await asyncio.sleep(0.1)
            return results, server.marks_echoed

    results, marks = run(main())
    assert len(results) == len(seen) == 2
    assert {r.caller for r in results} == {0, 1}
    for r in results:
        assert r.ok, r.error
        # 200 ms of endpointing silence (the voiced end is inside a frame) + the reply delay
        assert 150 <= r.voice_to_voice_ms <= 2000, r.voice_to_voice_ms
        assert r.reply_audio_s > 0
    if route == "realtime":
        assert all(150 <= r.endpoint_ms <= r.voice_to_voice_ms for r in results)
        assert all(r.server["asr_final_ms"] == 230.0 for r in results)
    else:
        assert sorted(marks) == ["r1.0", "r1.0"]  # each caller echoed its mark after playback
        assert all(r.call_sid and r.call_sid.startswith("CA") for r in results)


def test_a_reply_that_never_comes_is_a_failed_turn_not_a_crash() -> None:
    async def main():
        async with FakeServer(reply=False) as server:
            return await run_callers(server.url, "realtime", [tone_prompt()], config_name="fake", callers=1,
                                     turns_per_call=5, reply_timeout_s=0.8)

    [result] = run(main())
    assert not result.ok
    assert result.error.startswith("timeout")
    assert result.endpoint_ms is not None


def test_an_unreachable_server_fails_turns_and_check_url_says_so() -> None:
    from voice_agent.bench.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    results = run(run_callers(url, "realtime", [tone_prompt(0), tone_prompt(1)], config_name="x", callers=1, turns_per_call=5,
                              connect_timeout_s=2))
    assert [r.ok for r in results] == [False, False]
    assert all("cannot connect" in r.error for r in results)
    with pytest.raises(UserError, match="unreachable"):
        check_url(url, timeout_s=1)


# --- statistics and report ---------------------------------------------------------------------


def synthetic_results() -> list[TurnResult]:
    rng = np.random.default_rng(1)
    results = []
    for config, llm_ms in (("dllm", 100.0), ("ar", 300.0)):
        for callers in (1, 2):
            for i in range(20):
                r = TurnResult("realtime", config, callers, i % callers, 0, i, "piper", "hi", ok=i != 7)
                if r.ok:
                    asr = 650 + rng.uniform(0, 50)
                    llm = asr + llm_ms * callers
                    tts = llm + 120
                    r.endpoint_ms = 600 + rng.uniform(0, 30)
                    r.voice_to_voice_ms = tts + 30
                    r.server = {"asr_final_ms": asr, "llm_first_text_ms": llm, "tts_first_chunk_ms": tts - 50,
                                "tts_first_audio_ms": tts, "voice_to_voice_ms": tts + 10, "tokens": 20, "forward_passes": 10, "speculative": "none"}
                else:
                    r.error = "timeout: no reply audio within 30 s"
                results.append(r)
    return results


def test_percentiles() -> None:
    p = percentiles([None, *range(1, 101)])
    assert p["n"] == 100 and p["max"] == 100.0
    assert p["p50"] == pytest.approx(50.5) and p["p95"] == pytest.approx(95.05, abs=0.1)
    assert percentiles([None])["p50"] is None


def test_stages_add_up_and_a_speculative_llm_counts_zero() -> None:
    r = TurnResult("realtime", "dllm", 1, 0, 0, 0, "piper", "hi", ok=True, voice_to_voice_ms=1000.0, endpoint_ms=600.0)
    r.server = {"asr_final_ms": 700.0, "llm_first_text_ms": 650.0, "tts_first_audio_ms": 900.0}
    stages = stage_durations(r)
    assert stages == {"endpointing": 600.0, "asr": 100.0, "llm": 0.0, "tts": 200.0, "delivery": 100.0}
    assert sum(stages.values()) == pytest.approx(r.voice_to_voice_ms)
    twilio = TurnResult("twilio", "dllm", 1, 0, 0, 0, "piper", "hi", ok=True, voice_to_voice_ms=1000.0)
    assert stage_durations(twilio)["delivery"] is None  # no server milestones: nothing to split


def test_summaries_table_goals_json_and_png(tmp_path: Path) -> None:
    results = synthetic_results()
    summaries = summarize(results)
    assert [(s.config, s.callers) for s in summaries] == [("dllm", 1), ("ar", 1), ("dllm", 2), ("ar", 2)]
    dllm1 = next(s for s in summaries if (s.config, s.callers) == ("dllm", 1))
    assert dllm1.turns == 20 and dllm1.failures == 1 and dllm1.voice_to_voice_ms["n"] == 19
    assert dllm1.failure_reasons == {"timeout": 1}
    assert dllm1.llm_stage_ms["p50"] == pytest.approx(100.0)
    assert dllm1.tokens_per_forward == 2.0
    assert dllm1.chunk_to_audio_ms["p50"] == dllm1.chunk_to_audio_ms["max"] == pytest.approx(60.0)
    table = format_table(summaries)
    assert "chunk>audio" in table
    assert len([line for line in table.splitlines() if line.startswith("realtime")]) == 4
    goals = {g.goal: g for g in evaluate_goals(summaries, gpu=False)}
    ratio = next(g for name, g in goals.items() if "1.5x" in name)
    assert ratio.value == pytest.approx(3.0) and ratio.met
    fallback = next(g for g in evaluate_goals(summaries, gpu=False, diffusion=False) if "1.5x" in g.goal)
    assert fallback.met is None and fallback.value == pytest.approx(3.0)
    v2v = next(g for name, g in goals.items() if "800 ms" in name)
    assert v2v.met is (dllm1.voice_to_voice_ms["p50"] <= 800)
    path = tmp_path / "e2e.json"
    write_json(path, {"summaries": summaries, "turns": results, "goals": list(goals.values())})
    loaded = json.loads(path.read_text())
    assert loaded["turns"][0]["route"] == "realtime" and len(loaded["summaries"]) == 4
    png = tmp_path / "e2e.png"
    plot(png, summaries, results, title="synthetic")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 200_000


def test_the_tier_goal_is_the_extra_hop_at_one_caller() -> None:
    results = [r for r in synthetic_results() if r.config == "dllm"]
    tier = []
    for r in results:
        hop = TurnResult(**{**r.__dict__, "config": "tier"})
        if hop.ok:
            hop.voice_to_voice_ms = r.voice_to_voice_ms + 12.0  # the tier adds 12 ms to every turn
        tier.append(hop)
    goal = next(g for g in evaluate_goals(summarize(results + tier), gpu=False) if "LLM tier" in g.goal)
    assert goal.value == pytest.approx(12.0, abs=0.1) and goal.met
    assert not [g for g in evaluate_goals(summarize(results), gpu=False) if "LLM tier" in g.goal]


def test_replot_rebuilds_the_report_of_a_saved_json(tmp_path: Path, capsys) -> None:
    from dataclasses import asdict

    from voice_agent.cli import main

    document = {"device": "cpu", "machine": {"cpu": "test", "cpu_count": 2}, "notes": ["synthetic"],
                "configurations": {"dllm": {"fallback_from": "default"}, "ar": {}},
                "turns": [asdict(r) for r in synthetic_results()]}
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(document))
    assert main(["bench", "e2e", "--replot", str(path)]) == 0
    assert "not judged" in capsys.readouterr().out
    assert (tmp_path / "saved.png").stat().st_size > 0
    assert len(json.loads(path.read_text())["summaries"]) == 4


def test_store_metrics_are_matched_by_call_and_time(tmp_path: Path) -> None:
    from voice_agent.session import TurnRecord
    from voice_agent.store import CallStore

    store = CallStore(tmp_path / "calls.db")
    store.call_started("c1", "twilio")
    store.call_info("c1", {"call_sid": "CA1"})
    store.turn_finished("c1", TurnRecord(1, "speech", 100.2, status="completed", metrics={"asr_final_ms": 1.0}))
    store.turn_finished("c1", TurnRecord(2, "speech", 110.1, status="completed", metrics={"asr_final_ms": 2.0}))
    store.close()
    a = TurnResult("twilio", "dllm", 1, 0, 0, 0, "piper", "a", ok=True, speech_start_wall_s=100.0, voice_end_wall_s=102.0, call_sid="CA1")
    b = TurnResult("twilio", "dllm", 1, 0, 0, 1, "piper", "b", ok=True, speech_start_wall_s=110.0, voice_end_wall_s=111.0, call_sid="CA1")
    assert attach_store_metrics([a, b], str(tmp_path / "calls.db")) == 2
    assert (a.server["asr_final_ms"], b.server["asr_final_ms"]) == (1.0, 2.0)


def test_the_command_is_wired_into_bench() -> None:
    from voice_agent.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["bench", "e2e", "--url", "http://127.0.0.1:1", "--callers", "1,2", "--route", "twilio"])
    assert (args.target, args.url, args.callers, args.route) == ("e2e", "http://127.0.0.1:1", "1,2", "twilio")


def test_unreachable_url_is_a_clear_error(tmp_path: Path) -> None:
    from voice_agent.bench.servers import free_port

    done = subprocess.run(
        [sys.executable, "-m", "voice_agent", "bench", "e2e", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 2
    assert "unreachable" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VOICE_AGENT_BENCH_E2E_REAL") != "1", reason="minutes on a shared CPU: set VOICE_AGENT_BENCH_E2E_REAL=1")
def test_real_run_two_prompts_one_caller(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "voice_agent", "bench", "--set", "llm.max_new_tokens=24", "e2e", "--prompts", "2",
         "--callers", "1", "--engines", "dllm", "--listen-s", "2", "--reply-timeout-s", "120",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path), "--tag", "real", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "real.json").read_text())
    turns = document["turns"]
    assert len(turns) == 2 and all(t["ok"] for t in turns), turns
    assert all(t["voice_to_voice_ms"] > 0 and t["server"].get("asr_final_ms") is not None for t in turns)
    assert all(t["server"]["tts_first_chunk_ms"] <= t["server"]["tts_first_audio_ms"] for t in turns)
    assert all(s["chunk_to_audio_ms"]["n"] == 2 for s in document["summaries"])
    assert (tmp_path / "real.png").stat().st_size < 200_000
