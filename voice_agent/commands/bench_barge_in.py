"""`voice-agent bench barge-in`: how fast the caller's speech stops a reply, and what must not.

One call per trial, over `/twilio` and/or `/v1/realtime`: the caller asks one of the spoken
prompts of `bench e2e`, and `--after-s` into the reply its line carries one of three sounds
(voice_agent/bench/callers.py, `run_barge_ins`):
- `speech`: the caller talks over the reply (another prompt, in another voice). Measured: from the
  send of the frame holding the interruption's first voiced sample (so at most one 20 ms frame of
  capture) to the flush (Twilio `clear`, Realtime `output_audio_buffer.cleared`). No flush within
  3 s is a missed barge-in.
- `echo`: no caller speech, but the reply itself comes back into the microphone as a speakerphone
  without echo cancelling plays it (`--echo-delay-ms` late, `--echo-db` below it). A flush before
  the reply has played out is a false barge-in.
- `noise`: a short noise over the reply (a click, a cough, a triple knock, a double cough). A
  flush is a false barge-in.

By default it starts one `voice-agent serve` with the configuration and its `--set` options
(`voice-agent bench --set agent.echo_gate_ratio=0.5 barge-in` measures the echo gate); `--url`
measures a running server. Output: a table on stdout, `<tag>.json` and `<tag>.txt` in `--out`.
Bars (issue "turn-taking latency"): the flush within 300 ms of the caller's speech (judged at the
p95 of the speech trials), no false barge-in from the echo trials. Timing figures, not assertions:
a trial that fails for a server problem carries its reason and is left out of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.config import Config

HELP = "barge-in: the caller's speech to the flush of the reply, and false barge-ins from echo and noises"

FLUSH_BAR_MS = 300.0
DEFAULT_TRIALS = 10


def noises(rate_hz: int = 16_000) -> dict[str, np.ndarray]:
    """Short non-speech sounds, deterministic: name -> float32 audio at `rate_hz`."""
    rng = np.random.default_rng(7)

    def burst(seconds: float, peak: float, lowpass: int = 1) -> np.ndarray:
        n = int(seconds * rate_hz)
        x = rng.standard_normal(n + lowpass - 1)
        x = np.convolve(x, np.ones(lowpass) / lowpass, mode="valid")  # a moving average: a duller sound
        x *= np.hanning(n)
        return (peak * x / np.abs(x).max()).astype(np.float32)

    def gap(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * rate_hz), np.float32)

    return {
        "click": burst(0.01, 0.6),
        "cough": burst(0.12, 0.4),  # the VAD test's cough (tests/audio/test_vad.py)
        "knock x3": np.concatenate([burst(0.03, 0.7, lowpass=8), gap(0.15), burst(0.03, 0.7, lowpass=8), gap(0.15),
                                    burst(0.03, 0.7, lowpass=8)]),
        "cough x2": np.concatenate([burst(0.15, 0.4), gap(0.1), burst(0.15, 0.4)]),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="measure a running server (http://host:port) instead of starting one")
    parser.add_argument("--route", choices=("realtime", "twilio", "both"), default="both", help="WebSocket route (default: both)")
    parser.add_argument("--kinds", default="speech,echo,noise", help="trial kinds, comma separated (default: speech,echo,noise)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"trials per kind and route (default: {DEFAULT_TRIALS})")
    parser.add_argument("--after-s", type=float, default=1.0, help="the sound starts this long after the reply's first audio (default: 1.0)")
    parser.add_argument("--echo-delay-ms", type=int, default=100, help="echo trials: the reply comes back this late (default: 100)")
    parser.add_argument("--echo-db", type=float, default=-10.0, help="echo trials: at this level relative to the reply (default: -10)")
    parser.add_argument("--reply-timeout-s", type=float, default=30.0, help="no reply audio this long after the question: a failed trial (default: 30)")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0, help="wait this long for the started server's /healthz (default: 300)")
    parser.add_argument("--cache-dir", default="~/.cache/voice-agent/bench-e2e", help="where the spoken prompts are kept (shared with bench e2e)")
    parser.add_argument("--out", default="runs/bench-barge-in", help="folder for the JSON and the table (default: runs/bench-barge-in)")
    parser.add_argument("--tag", default="barge-in", help="file name stem of the outputs (default: barge-in)")
    parser.add_argument("--no-progress", action="store_true", help="no line per trial on stderr")


def summarize(results: list[Any]) -> list[dict[str, Any]]:
    """One row per (route, kind): trials run, failed, and the figures of that kind."""
    from voice_agent.bench.report import percentiles

    rows = []
    for route in dict.fromkeys(r.route for r in results):
        for kind in dict.fromkeys(r.kind for r in results if r.route == route):
            mine = [r for r in results if r.route == route and r.kind == kind]
            ran = [r for r in mine if r.ok]
            row: dict[str, Any] = {"route": route, "kind": kind, "trials": len(ran), "failed": len(mine) - len(ran)}
            if kind == "speech":
                row["flush_ms"] = percentiles(r.flush_ms for r in ran)
                row["missed"] = sum(r.flush_ms is None for r in ran)
                p95 = row["flush_ms"]["p95"]
                row["meets_bar"] = bool(ran) and row["missed"] == 0 and p95 is not None and p95 <= FLUSH_BAR_MS
            else:
                row["false_barge_ins"] = sum(r.flush_ms is not None for r in ran)
                row["false_by_sound"] = {s: sum(r.flush_ms is not None for r in ran if r.sound == s)
                                         for s in dict.fromkeys(r.sound for r in ran)}
                row["meets_bar"] = bool(ran) and row["false_barge_ins"] == 0
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [f"{'route':<9} {'kind':<7} {'trials':>6} {'failed':>6} | result", "-" * 100]
    for row in rows:
        if row["kind"] == "speech":
            f = row["flush_ms"]
            what = (f"flush p50 {ms(f['p50'])} ms, p95 {ms(f['p95'])}, max {ms(f['max'])}; missed {row['missed']}"
                    f"  [bar: p95 <= {FLUSH_BAR_MS:.0f} ms, none missed: {'met' if row['meets_bar'] else 'MISSED'}]")
        else:
            by = ", ".join(f"{s} {n}" for s, n in row["false_by_sound"].items())
            what = f"false barge-ins {row['false_barge_ins']} of {row['trials']} ({by})"
            if row["kind"] == "echo":
                what += f"  [bar: none: {'met' if row['meets_bar'] else 'MISSED'}]"
        lines.append(f"{row['route']:<9} {row['kind']:<7} {row['trials']:>6} {row['failed']:>6} | {what}")
    lines.append("flush = the caller's first voiced sample (the send of its 20 ms frame) -> Twilio `clear` / Realtime "
                 "`output_audio_buffer.cleared` at the caller.")
    return "\n".join(lines)


def _sounds(kind: str, trials: int, prompts: list[Any], echo_name: str) -> list[Any]:
    from voice_agent.bench.callers import BargeInSound

    if kind == "speech":  # the interruption: a prompt half the set away (prompts alternate piper and espeak-ng voices)
        others = [prompts[(k + 1 + len(prompts) // 2) % len(prompts)] for k in range(trials)]
        return [BargeInSound("speech", other.prompt.voice, other.audio) for other in others]
    if kind == "echo":
        return [BargeInSound("echo", echo_name) for _ in range(trials)]
    table = list(noises().items())
    return [BargeInSound("noise", table[k % len(table)][0], table[k % len(table)][1]) for k in range(trials)]


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.bench import callers as callers_mod
    from voice_agent.bench import report, servers
    from voice_agent.bench.prompts import PROMPTS, load_prompts
    from voice_agent.commands.bench_e2e import _machine
    from voice_agent.errors import UserError
    from voice_agent.models import resolve_tts_voice

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in callers_mod.BARGE_IN_KINDS for k in kinds):
        raise UserError(f"--kinds takes some of {', '.join(callers_mod.BARGE_IN_KINDS)}, not {args.kinds!r}")
    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    if args.after_s < 0 or args.echo_delay_ms < 0 or args.echo_db > 0:
        raise UserError("--after-s and --echo-delay-ms must be >= 0, --echo-db <= 0")
    routes = ["twilio", "realtime"] if args.route == "both" else [args.route]
    command = shlex.join(["voice-agent", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("voice-agent", "__main__.py") else None
    machine = _machine()
    print(f"synthesizing the prompts (piper + espeak-ng) into {args.cache_dir} ...", file=sys.stderr, flush=True)
    prompts = load_prompts(len(PROMPTS), Path(args.cache_dir).expanduser(), resolve_tts_voice(config.tts.voice))
    echo_name = f"{args.echo_delay_ms} ms, {args.echo_db:g} dB"
    server = None
    results: list[Any] = []
    started_s = time.monotonic()

    def progress(result: Any) -> None:
        if args.no_progress:
            return
        what = (result.error if not result.ok else "no flush" if result.flush_ms is None else f"flush {result.flush_ms:.0f} ms")
        print(f"  {result.route} {result.kind} {result.trial + 1}/{args.trials} ({result.sound}): {what}  "
              f"[{time.monotonic() - started_s:.0f} s]", file=sys.stderr, flush=True)

    try:
        if args.url:
            health = servers.check_url(args.url)  # raises UserError: unreachable
            url = args.url
        else:
            work_dir = Path(tempfile.mkdtemp(prefix="voice-agent-bench-barge-in-"))
            server = servers.start_server("barge-in", list(args.overrides), work_dir, config_path=args.config)
            print(f"starting the server ({server.url}, log {server.log_path}) ...", file=sys.stderr, flush=True)
            health = servers.wait_healthy(server, args.startup_timeout_s)
            url = server.url
        for route in routes:
            for kind in kinds:
                questions = [prompts[k % len(prompts)] for k in range(args.trials)]
                results += asyncio.run(callers_mod.run_barge_ins(
                    url, route, questions, _sounds(kind, args.trials, prompts, echo_name), after_s=args.after_s,
                    echo_delay_s=args.echo_delay_ms / 1000, echo_gain=10 ** (args.echo_db / 20), on_trial=progress,
                    reply_timeout_s=args.reply_timeout_s))
    finally:
        if server is not None:
            server.stop()
    rows = summarize(results)
    text = format_table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.tag
    document = {
        "bench": "barge-in",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "server": {"url": args.url, "llm": health.get("llm"), "overrides": list(args.overrides)},
        "settings": {"routes": routes, "kinds": kinds, "trials": args.trials, "after_s": args.after_s,
                     "echo_delay_ms": args.echo_delay_ms, "echo_db": args.echo_db},
        # The server's own settings where this run started it (a --url server's are its own).
        "server_vad": None if args.url else {"min_speech_ms": config.vad.min_speech_ms,
                                             "echo_gate_ratio": config.agent.echo_gate_ratio},
        "bar": {"flush_p95_ms": FLUSH_BAR_MS, "false_barge_ins_from_echo": 0},
        "rows": rows,
        "results": results,
    }
    report.write_json(stem.with_suffix(".json"), document)
    stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {stem}.json, {stem}.txt", file=sys.stderr)
    return 0 if any(r.ok for r in results) else 1
