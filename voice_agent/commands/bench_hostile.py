"""`voice-agent bench hostile`: a hostile client against a real server, and what it costs others.

Starts `voice-agent serve` (the configured models) on 127.0.0.1 and measures, in one run:
1. Solo: one honest caller speaks `--prompts` spoken prompts on /v1/realtime; voice-to-voice
   latency per prompt (the `bench e2e` caller).
2. Flood, `--rounds` times: `--messages` hostile messages over `--connections` connections, half
   /v1/realtime, half /twilio (`voice_agent.bench.hostile`); after the last connection closed,
   the seconds until the server holds no work (LLM rows and queue, ASR, TTS, the heap trim after
   the last call: /healthz "work"), the server's CPU seconds over the `--quiet-s` after that, and
   its resident memory against the start (after a warm-up call).
3. Beside: the honest caller again, while one hostile connection floods /v1/realtime for as long
   as the honest calls last; honest p50 voice-to-voice / solo p50.
Bars (issue "no work outlives its call"): idle within 1 s of the last close in every round, no CPU
after that, resident memory within 100 MB of the start; beside/solo p50 at most 1.5.
Writes a table and JSON (`--out`, `--tag`). Only ever targets the server it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dlm.memory import resident_bytes
from voice_agent.config import Config

HELP = "a hostile client flooding a real server: idle after it hangs up, memory, an honest caller beside it"

IDLE_BAR_S = 1.0
RSS_BAR_MB = 100.0
BESIDE_BAR = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=10_000, help="hostile messages per flood round (default: 10000)")
    parser.add_argument("--connections", type=int, default=12, help="hostile connections at once, half per route (default: 12)")
    parser.add_argument("--rounds", type=int, default=3, help="flood rounds (default: 3)")
    parser.add_argument("--prompts", type=int, default=8, help="spoken prompts of the honest caller, solo and beside (default: 8)")
    parser.add_argument("--quiet-s", type=float, default=2.0, help="CPU is measured over this long once idle (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hostile messages")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0, help="wait this long for the server's /healthz")
    parser.add_argument("--cache-dir", default="~/.cache/voice-agent/bench-e2e", help="where the synthesized prompts are kept")
    parser.add_argument("--out", default="runs/bench-hostile", help="folder for the JSON and table (default: runs/bench-hostile)")
    parser.add_argument("--tag", default="hostile", help="file name stem of the outputs (default: hostile)")


def process_usage(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and resident MB of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu_s, (resident_bytes(pid) or 0) / 2**20


def _p50(results: list[Any]) -> float | None:
    from voice_agent.bench.report import percentiles

    return percentiles(r.voice_to_voice_ms for r in results if r.ok)["p50"]


async def _beside(url: str, prompts: list[Any], seed: int) -> tuple[list[Any], Any]:
    """The honest caller, with one hostile /v1/realtime connection flooding until it is done."""
    from voice_agent.bench import callers, hostile

    stop = asyncio.Event()

    async def honest() -> list[Any]:
        try:
            return await callers.run_callers(url, "realtime", prompts, config_name="beside", callers=1, turns_per_call=len(prompts))
        finally:
            stop.set()

    flood = asyncio.create_task(hostile.run_hostile(url, messages=10**9, connections=1, seed=seed, stop=stop))
    results = await honest()
    return results, await flood


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.bench import callers, hostile, servers
    from voice_agent.bench.prompts import load_prompts
    from voice_agent.errors import UserError
    from voice_agent.models import resolve_tts_voice

    if min(args.messages, args.connections, args.rounds, args.prompts) < 1:
        raise UserError("--messages, --connections, --rounds and --prompts must be at least 1")
    print(f"synthesizing {args.prompts} prompts into {args.cache_dir} ...", file=sys.stderr, flush=True)
    prompts = load_prompts(args.prompts, Path(args.cache_dir).expanduser(), resolve_tts_voice(config.tts.voice))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="voice-agent-bench-hostile-"))
    overrides = [*args.overrides, f"server.max_calls={max(config.server.max_calls, args.connections + 2)}"]
    server = servers.start_server("hostile", overrides, work_dir, config_path=args.config)
    rounds: list[dict[str, Any]] = []
    try:
        print(f"starting the server ({server.url}, log {server.log_path}) ...", file=sys.stderr, flush=True)
        health = servers.wait_healthy(server, args.startup_timeout_s)
        pid = server.process.pid

        def honest(name: str) -> list[Any]:
            return asyncio.run(callers.run_callers(server.url, "realtime", prompts, config_name=name, callers=1, turns_per_call=len(prompts)))

        print("warm-up call ...", file=sys.stderr, flush=True)
        honest("warm-up")
        _, rss_start_mb = process_usage(pid)
        print("solo: the honest caller alone ...", file=sys.stderr, flush=True)
        solo = honest("solo")
        for i in range(args.rounds):
            print(f"flood {i + 1}/{args.rounds}: {args.messages} messages over {args.connections} connections ...", file=sys.stderr, flush=True)
            report = asyncio.run(hostile.run_hostile(server.url, messages=args.messages, connections=args.connections, seed=args.seed + i))
            idle_s = hostile.wait_idle(server.url, 60.0, since=report.last_close_t)
            cpu0, _ = process_usage(pid)
            time.sleep(args.quiet_s)
            cpu1, rss_mb = process_usage(pid)
            rounds.append({
                "sent": report.sent, "connections_opened": report.connections, "wall_s": round(report.wall_s, 2),
                "idle_after_close_s": None if idle_s is None else round(idle_s, 3),
                "cpu_s_after_idle": round(cpu1 - cpu0, 3), "quiet_s": args.quiet_s,
                "rss_mb": round(rss_mb, 1), "rss_growth_mb": round(rss_mb - rss_start_mb, 1),
                "errors_by_code": dict(report.errors.most_common()), "closes": dict(report.closes),
            })
        print("beside: the honest caller with a hostile call at the same time ...", file=sys.stderr, flush=True)
        beside, beside_flood = asyncio.run(_beside(server.url, prompts, args.seed + 1000))
    finally:
        server.stop()

    solo_p50, beside_p50 = _p50(solo), _p50(beside)
    ratio = beside_p50 / solo_p50 if solo_p50 and beside_p50 else None
    worst_idle = max((r["idle_after_close_s"] if r["idle_after_close_s"] is not None else float("inf")) for r in rounds)
    bars = {
        "idle_within_1s_every_round": worst_idle <= IDLE_BAR_S,
        "no_cpu_after_idle": all(r["cpu_s_after_idle"] <= 0.05 * r["quiet_s"] for r in rounds),
        "rss_within_100mb": all(abs(r["rss_growth_mb"]) <= RSS_BAR_MB for r in rounds),
        "beside_over_solo_p50_at_most_1.5": ratio is not None and ratio <= BESIDE_BAR,
    }
    document = {
        "bench": "hostile",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["voice-agent", *sys.argv[1:]]),
        "llm": health.get("llm"),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {"messages": args.messages, "connections": args.connections, "rounds": args.rounds, "prompts": args.prompts},
        "rss_start_mb": round(rss_start_mb, 1),
        "rounds": rounds,
        "solo": {"p50_ms": solo_p50, "ok": sum(r.ok for r in solo), "voice_to_voice_ms": [r.voice_to_voice_ms for r in solo]},
        "beside": {"p50_ms": beside_p50, "ok": sum(r.ok for r in beside), "voice_to_voice_ms": [r.voice_to_voice_ms for r in beside],
                   "hostile_messages": beside_flood.sent, "hostile_errors_by_code": dict(beside_flood.errors.most_common())},
        "beside_over_solo_p50": None if ratio is None else round(ratio, 3),
        "bars": bars,
    }
    lines = ["round  sent   idle after close (s)  CPU after idle (s)  RSS (MB)  growth (MB)"]
    for i, r in enumerate(rounds, 1):
        lines.append(f"{i:>5}  {r['sent']:>5}  {r['idle_after_close_s']!s:>20}  {r['cpu_s_after_idle']:>18}  {r['rss_mb']:>8}  {r['rss_growth_mb']:>11}")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines.append(f"honest voice-to-voice p50: solo {fmt(solo_p50)} ms ({sum(r.ok for r in solo)}/{len(solo)} ok), "
                 f"beside a hostile call {fmt(beside_p50)} ms ({sum(r.ok for r in beside)}/{len(beside)} ok), ratio {ratio if ratio is None else round(ratio, 2)}")
    lines += [f"bar: {name}: {'met' if met else 'MISSED'}" for name, met in bars.items()]
    text = "\n".join(lines)
    stem = out_dir / args.tag
    stem.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.txt')}", file=sys.stderr)
    return 0 if all(r.ok for r in solo) else 1
