"""`voice-agent bench e2e`: voice-to-voice latency as a caller hears it, dLLM against AR.

Plays a fixed set of spoken prompts (piper and espeak-ng voices, synthesized at bench time into a
cache folder) in real time over `/v1/realtime` and/or `/twilio`, at 1, 2 and 4 concurrent callers
on a CPU (1 to 32 on a GPU), and times the silence between the last voiced sample a caller sent
and the first reply audio it received, plus the server's per-stage breakdown from its
`voice_agent.metrics` events (Realtime) or its call store (Twilio).

By default it starts two servers as subprocesses, one per configuration, and alternates between
them at each concurrency so that both see the same machine load:
- `dllm`: the configured `llm.model` (with the embedded defaults, the block-diffusion SmolLM2;
  while it is not shipped, that name falls back to the AR SmolLM2, and the report says so);
- `ar`: `llm.model = llm.baseline_model` (an autoregressive checkpoint, decoded by the AR engine).
- `tier`: a voice frontend whose LLM is the LLM tier (`llm.backend = "openai"` at its /v1): the
  configured model in a Ray Serve replica (`voice-agent serve-llm --ray`, started for the run, or
  `--tier-url`), so that `dllm` against `tier` is the cost of the extra hop.
With `--url` it measures one running server instead (configuration `target`).

Output: a table on stdout, and `<tag>.json`, `<tag>.png`, `<tag>.txt` in `--out`. A reply that
does not come within `--reply-timeout-s` is a failed turn in the results, not a crash; an
unreachable server is an error (exit status 2).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from voice_agent.config import Config

HELP = "voice-to-voice latency over /v1/realtime and /twilio with simulated callers (dLLM vs AR)"

CPU_CALLERS = (1, 2, 4)
GPU_CALLERS = (1, 2, 4, 8, 16, 32)
MIN_PROMPTS = 20
_VERSIONS_OF = ("voice-agent", "torch", "transformers", "faster-whisper", "ctranslate2", "piper-tts", "onnxruntime", "websockets", "numpy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="measure a running server (http://host:port) instead of starting servers")
    parser.add_argument("--route", choices=("realtime", "twilio", "both"), default="realtime", help="WebSocket route (default: realtime)")
    parser.add_argument("--callers", help="concurrent callers, comma separated (default: 1,2,4 on CPU; 1,2,4,8,16,32 with llm.device=cuda)")
    parser.add_argument("--engines", default="dllm,ar", help="configurations to start: dllm, ar, tier (default: dllm,ar); "
                        "ignored with --url")
    parser.add_argument("--tier-url", help="with the tier configuration: a running LLM tier's /v1 (default: start "
                        "`voice-agent serve-llm --ray` for the run)")
    parser.add_argument("--tier-replicas", type=int, default=1, help="replicas of the tier the bench starts (default 1)")
    parser.add_argument("--prompts", type=int, default=MIN_PROMPTS, help=f"spoken prompts per run (default: {MIN_PROMPTS})")
    parser.add_argument("--turns-per-call", type=int, default=5, help="prompts per call before a caller hangs up and calls again (default: 5)")
    parser.add_argument("--reply-timeout-s", type=float, default=30.0, help="no reply audio this long after the prompt: a failed turn (default: 30)")
    parser.add_argument("--listen-s", type=float, default=60.0, help="listen to at most this much of a reply before the next prompt (default: 60)")
    parser.add_argument("--startup-timeout-s", type=float, default=300.0, help="wait this long for a started server's /healthz (default: 300)")
    parser.add_argument("--cache-dir", default="~/.cache/voice-agent/bench-e2e", help="where the synthesized prompts are kept")
    parser.add_argument("--out", default="runs/bench-e2e", help="folder for the JSON, PNG and table (default: runs/bench-e2e)")
    parser.add_argument("--tag", default="", help="file name stem of the outputs (default: e2e-<route>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--replot", metavar="JSON", help="no run: rebuild the table, goals and PNG of a saved JSON (next to it)")


class _Progress:
    """A one-line progress bar on stderr (a line per ~10 % where stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.label = ""
        self._enabled = enabled
        self._tty = sys.stderr.isatty()
        self._started_s = time.monotonic()
        self._last_decile = -1

    def turn(self, result: Any) -> None:
        self.done += 1
        self.failed += 0 if result.ok else 1
        self.show()

    def show(self) -> None:
        if not self._enabled:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = int(time.monotonic() - self._started_s)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} turns, {self.failed} failed, "
            f"{elapsed // 60:02d}:{elapsed % 60:02d}  {self.label}"
        )
        if self._tty:
            print(f"\r{line:<110}", end="", file=sys.stderr, flush=True)
        elif (decile := 10 * self.done // max(self.total, 1)) != self._last_decile:
            self._last_decile = decile
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._enabled and self._tty:
            print(file=sys.stderr)


def _parse_callers(text: str | None, gpu: bool) -> list[int]:
    if not text:
        return list(GPU_CALLERS if gpu else CPU_CALLERS)
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        from voice_agent.errors import UserError

        raise UserError(f"--callers must be positive integers separated by commas, not {text!r}")
    return levels


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    versions = {}
    for dist in _VERSIONS_OF:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True, timeout=5).stdout.strip()
        info["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _configurations(config: Config, engines: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """name -> {server overrides, model facts}; plus notes for the report."""
    from voice_agent.errors import UserError
    from voice_agent.models import resolve_llm_model

    notes = []
    out: dict[str, dict[str, Any]] = {}
    for name in engines:
        if name == "dllm":
            resolved = resolve_llm_model(config.llm.model)
            entry: dict[str, Any] = {"llm.model": config.llm.model, "resolved": resolved.name, "path": str(resolved.path),
                                     "fallback_from": resolved.fallback_from, "overrides": []}
            if resolved.fallback_from:
                entry["diffusion"] = False
                notes.append(
                    f"llm.model {resolved.fallback_from!r} is not shipped yet and FALLS BACK to the autoregressive "
                    f"{resolved.name!r}: the 'dllm' configuration is NOT a diffusion model in this run, so dllm and "
                    "ar run the same AR model and their ratio only shows the noise of the machine"
                )
            out[name] = entry
        elif name == "tier":
            resolved = resolve_llm_model(config.llm.model)
            # The frontend's overrides pointing at the tier are added once its URL is known.
            out[name] = {"llm.model": config.llm.model, "resolved": resolved.name, "path": str(resolved.path),
                         "fallback_from": resolved.fallback_from, "diffusion": not resolved.fallback_from,
                         "overrides": []}
        elif name == "ar":
            resolved = resolve_llm_model(config.llm.baseline_model)
            out[name] = {"llm.model": config.llm.baseline_model, "resolved": resolved.name, "path": str(resolved.path),
                         "fallback_from": resolved.fallback_from, "diffusion": False,
                         "overrides": [f"llm.model={config.llm.baseline_model}"]}
        else:
            raise UserError(f"--engines: unknown configuration {name!r} (dllm, ar, tier)")
    if config.llm.backend != "local":
        notes.append(f"llm.backend is {config.llm.backend!r}: both configurations use the remote LLM; 'ar' only changes llm.model")
    return out, notes


def _start_tier(args: argparse.Namespace, base: list[str], work_dir: Path) -> Any:
    """`voice-agent serve-llm --ray` for the run, once it answers (`wait_healthy` stops it where
    it does not)."""
    from voice_agent.bench import servers

    tier = servers.start_server("tier-llm", base, work_dir, config_path=args.config, command_name="serve-llm",
                                args=["--ray", "--replicas", str(args.tier_replicas)])
    print(f"starting the LLM tier on Ray Serve ({tier.url}, log {tier.log_path}) ...", file=sys.stderr, flush=True)
    servers.wait_healthy(tier, args.startup_timeout_s)
    return tier


def _write_outputs(document: dict[str, Any], results: list[Any], stem: Path, *, gpu: bool) -> str:
    """Summaries, goals, table, JSON and PNG of `results` (the document is updated in place)."""
    from voice_agent.bench import report

    configs = document["configurations"]
    summaries = report.summarize(results)
    diffusion = not any(entry.get("fallback_from") for entry in configs.values())
    goals = report.evaluate_goals(summaries, gpu=gpu, diffusion=diffusion)
    document["goals"] = [asdict(g) for g in goals]
    document["summaries"] = [asdict(s) for s in summaries]
    document["turns"] = [asdict(r) for r in results]
    report.write_json(stem.parent / f"{stem.name}.json", document)
    machine = document["machine"]
    title = f"voice-agent bench e2e on {document['device']} ({machine['cpu']}, {machine['cpu_count']} cores)"
    if not diffusion:
        title += " - 'dllm' is the AR fallback (dLLM not shipped)"
    report.plot(stem.parent / f"{stem.name}.png", summaries, results, title=title)
    lines = [report.format_table(summaries), ""]
    lines += [f"note: {n}" for n in document["notes"]]
    for g in goals:
        status = "not judged" if g.met is None and g.value is not None else "not measured" if g.met is None else ("met" if g.met else "MISSED")
        lines.append(f"goal: {g.goal}: {status} ({g.value})")
    for s in summaries:
        if s.failure_reasons:
            lines.append(f"failures {s.route} {s.config} x{s.callers}: {s.failure_reasons}")
    text = "\n".join(lines)
    (stem.parent / f"{stem.name}.txt").write_text(text + "\n", encoding="utf-8")
    return text


def _replot(path: Path) -> int:
    import json

    from voice_agent.bench.callers import TurnResult

    document = json.loads(path.read_text(encoding="utf-8"))
    results = [TurnResult(**turn) for turn in document["turns"]]
    print(_write_outputs(document, results, path.with_suffix(""), gpu=str(document["device"]).startswith("cuda")))
    print(f"rewrote {path} and its .png and .txt", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, config: Config) -> int:
    if args.replot:
        return _replot(Path(args.replot))
    from voice_agent.bench import callers as callers_mod
    from voice_agent.bench import servers
    from voice_agent.bench.prompts import load_prompts
    from voice_agent.errors import UserError
    from voice_agent.models import resolve_tts_voice

    gpu = config.llm.device.startswith("cuda")
    levels = _parse_callers(args.callers, gpu)
    routes = ["realtime", "twilio"] if args.route == "both" else [args.route]
    if args.prompts < 1 or args.turns_per_call < 1:
        raise UserError("--prompts and --turns-per-call must be at least 1")
    notes: list[str] = []
    if args.prompts < MIN_PROMPTS:
        notes.append(f"only {args.prompts} prompts (fewer than {MIN_PROMPTS}): percentiles are rough")
    machine = _machine()
    command = shlex.join(["voice-agent", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("voice-agent", "__main__.py") else None
    if args.url:
        health = servers.check_url(args.url)  # raises UserError: unreachable
        configs = {"target": {"url": args.url, "llm": health.get("llm"), "overrides": []}}
    else:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        configs, more = _configurations(config, engines)
        notes += more
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    print(f"synthesizing {args.prompts} prompts (piper + espeak-ng) into {args.cache_dir} ...", file=sys.stderr, flush=True)
    prompts = load_prompts(args.prompts, Path(args.cache_dir).expanduser(), resolve_tts_voice(config.tts.voice))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="voice-agent-bench-e2e-"))
    started: dict[str, servers.ServerProcess] = {}  # the voice servers, by configuration
    tier_llm: servers.ServerProcess | None = None  # the LLM tier this run started
    results: list[callers_mod.TurnResult] = []
    total = len(routes) * len(levels) * len(configs) * len(prompts)
    progress = _Progress(total, not args.no_progress)
    try:
        if not args.url:
            base = list(args.overrides)
            max_calls = max(levels) + 1
            if config.server.max_calls < max_calls:
                base.append(f"server.max_calls={max_calls}")
            if "tier" in configs:
                tier_url = args.tier_url
                if not tier_url:
                    tier_llm = _start_tier(args, base, work_dir)
                    tier_url = f"{tier_llm.url}/v1"
                configs["tier"]["tier_url"] = tier_url
                configs["tier"]["overrides"] = ["llm.backend=openai", f"llm.base_url={tier_url}", "llm.api_model="]
            for name, entry in configs.items():
                started[name] = servers.start_server(name, [*base, *entry["overrides"]], work_dir, config_path=args.config)
            for name, server in started.items():
                print(f"starting the {name} server ({server.url}, log {server.log_path}) ...", file=sys.stderr, flush=True)
                health = servers.wait_healthy(server, args.startup_timeout_s)
                configs[name]["llm"] = health.get("llm")
                configs[name]["server_overrides"] = server.overrides
        urls = {name: (args.url if args.url else started[name].url) for name in configs}
        for route in routes:
            for level in levels:
                for name in configs:  # alternate configurations at each level: same machine load
                    progress.label = f"{route} {name} x{level}"
                    progress.show()
                    results += asyncio.run(
                        callers_mod.run_callers(
                            urls[name],
                            route,
                            prompts,
                            config_name=name,
                            callers=level,
                            turns_per_call=args.turns_per_call,
                            on_turn=progress.turn,
                            reply_timeout_s=args.reply_timeout_s,
                            listen_timeout_s=args.listen_s,
                        )
                    )
    finally:
        progress.close()
        for server in started.values():
            server.stop()
        if tier_llm is not None:
            tier_llm.stop(grace_s=60)  # SIGTERM: serve-llm removes its application and stops Ray
    if "twilio" in routes:
        if args.url:
            notes.append("Twilio route against --url: no per-stage breakdown (it comes from the server's call store)")
        else:
            for name, server in started.items():
                mine = [r for r in results if r.route == "twilio" and r.config == name]
                matched = callers_mod.attach_store_metrics(mine, str(server.store_path))
                if matched < sum(r.ok for r in mine):
                    notes.append(f"Twilio {name}: {matched} of {sum(r.ok for r in mine)} answered turns found in the call store")
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]

    tag = args.tag or f"e2e-{args.route}"
    document = {
        "bench": "e2e",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "device": config.llm.device,
        "configurations": configs,
        "notes": notes,
        "settings": {
            "routes": routes,
            "callers": levels,
            "prompts": len(prompts),
            "turns_per_call": args.turns_per_call,
            "reply_timeout_s": args.reply_timeout_s,
            "listen_s": args.listen_s,
            "vad_end_silence_ms": config.vad.end_silence_ms,
            "speculative_start": config.agent.speculative_start,
            "max_new_tokens": config.llm.max_new_tokens,
        },
        "prompts": [{"prompt_id": p.prompt_id, "text": p.prompt.text, "voice": p.prompt.voice, "speed": p.prompt.speed,
                     "duration_s": round(p.duration_s, 3)} for p in prompts],
    }
    stem = out_dir / tag
    print(_write_outputs(document, results, stem, gpu=gpu))
    json_path, png_path, txt_path = (stem.parent / f"{stem.name}.{ext}" for ext in ("json", "png", "txt"))
    print(f"wrote {json_path}, {png_path}, {txt_path}", file=sys.stderr)
    return 0 if any(r.ok for r in results) else 1
