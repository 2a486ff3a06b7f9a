"""`voice-agent bench startup`: how long `voice-agent serve` takes to be ready, and its memory.

Starts `voice-agent serve` (the configured models; `--set` options are passed on) on 127.0.0.1
`--repeats` times, one after the other, and for each measures the seconds from starting the
process to its first `/healthz` answer (polled every 20 ms), its resident size then (VmRSS) and
its high-water mark so far (VmHWM: the start-up's peak, the conversions' transients included),
then stops it. The table gives each run and the median of the runs; `--json FILE` keeps them with
the environment. Whether the GGUF conversions `serve` reads (`voice_agent.services.gguf_conversions`)
were in the cache before the first run is printed and recorded: a run that converts takes seconds
more, and writes them for the next (install.sh makes them ahead). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from voice_agent.config import Config

HELP = "how long `serve` takes to answer its first request, and its memory then and at its peak"

POLL_S = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="servers started one after the other (default: 3)")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0, help="wait this long for each /healthz (default: 300)")
    parser.add_argument("--json", metavar="FILE", help="write the runs and the environment to FILE")


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process `pid` in MB (2**20 bytes)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def conversions_cached(config: Config) -> bool:
    """Whether every GGUF conversion `serve` reads with `config` is in the cache already."""
    from dlm.gguf_file import cache_file, default_cache_dir
    from voice_agent.services import gguf_conversions

    return all(cache_file(path, default_cache_dir(), dense=dense).exists()
               for path, kinds in gguf_conversions(config).items() for dense in kinds)


def measure_once(overrides: list[str], config_path: str | None, work_dir: Path, timeout_s: float) -> dict[str, Any]:
    """One `serve`, started and stopped: {"ready_s", "rss_mb", "peak_mb"}. UserError where it
    exits or does not answer within `timeout_s` (with its log's tail)."""
    from voice_agent.bench import servers
    from voice_agent.errors import UserError

    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    server = servers.start_server("startup", overrides, work_dir, config_path=config_path)
    try:
        servers.wait_healthy(server, timeout_s, poll_s=POLL_S)
        ready_s = time.perf_counter() - started
        try:
            rss_mb, peak_mb = _memory_mb(server.process.pid)
        except (OSError, KeyError):  # gone between its answer and this read (a zombie has no VmRSS)
            raise UserError(f"the server exited right after it answered; its log ({server.log_path}) ends with:\n"
                            f"{server.log_tail()}") from None
    finally:
        server.stop()
    return {"ready_s": round(ready_s, 3), "rss_mb": round(rss_mb, 1), "peak_mb": round(peak_mb, 1)}


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.commands.bench import _environment
    from voice_agent.errors import UserError

    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, not {args.repeats}")
    if not Path("/proc/self/status").exists():
        raise UserError("bench startup reads the server's memory from /proc: Linux only")
    cached = conversions_cached(config)
    print("the GGUF conversions serve reads are " + ("cached" if cached else
          "not cached yet: the first run converts them (install.sh makes them ahead)"), file=sys.stderr, flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="voice-agent-bench-startup-") as work:
        for i in range(args.repeats):
            print(f"run {i + 1}/{args.repeats}: starting serve ...", file=sys.stderr, flush=True)
            runs.append(measure_once(args.overrides, args.config, Path(work) / str(i), args.startup_timeout_s))
    median = {key: round(statistics.median(r[key] for r in runs), 3) for key in ("ready_s", "rss_mb", "peak_mb")}
    print("| run | ready s | resident MB | peak MB |\n|---|---|---|---|")
    for i, r in enumerate(runs):
        print(f"| {i + 1}{' (converted)' if i == 0 and not cached else ''} | {r['ready_s']:.2f} | {r['rss_mb']:.0f} | "
              f"{r['peak_mb']:.0f} |")
    print(f"| median | {median['ready_s']:.2f} | {median['rss_mb']:.0f} | {median['peak_mb']:.0f} |")
    if args.json:
        report = {"environment": _environment(config.llm.device), "overrides": args.overrides,
                  "conversions_cached_before": cached, "runs": runs, "median": median}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
