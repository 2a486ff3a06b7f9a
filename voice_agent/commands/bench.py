"""`voice-agent bench llm|audio|e2e`: measurements, not tests.

`bench llm` runs the dLLM engine and the AR baseline engine on the same weights, in one run, over
a fixed set of short voice-assistant prompts, at batch 1 (one request at a time) and with all
prompts submitted concurrently. Per reply: wall time, time to the first final text, tokens per
forward pass and tokens/s; a table (or --json). Where the configured model has no diffusion
decoding (the AR fallback while the adapted model is not shipped), it says so and measures the
AR baseline only. `bench audio` and `bench e2e` live in `bench_audio` / `bench_e2e` modules.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from typing import Any

from voice_agent.config import Config

HELP = "benchmark the LLM engines (dLLM vs AR), the audio models, or the whole pipeline"

PROMPTS = [
    "What's the weather usually like in Paris in spring?",
    "Set a timer for ten minutes.",
    "Can you give me a quick recipe for pancakes?",
    "What's the capital of Australia?",
    "Tell me a short joke.",
    "How do I reset my wifi router?",
    "Remind me what a healthy breakfast looks like.",
    "What time zone is Tokyo in?",
]

_OTHERS = {"audio": "bench_audio", "e2e": "bench_e2e"}


def _other(target: str):
    try:
        return importlib.import_module(f"voice_agent.commands.{_OTHERS[target]}")
    except ModuleNotFoundError as e:
        if e.name == f"voice_agent.commands.{_OTHERS[target]}":
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    llm = sub.add_parser("llm", help="dLLM engine vs AR baseline on the same weights")
    llm.add_argument("--device", help="torch device (default: llm.device)")
    llm.add_argument("--dtype", help="float32 | bfloat16 (default: llm.dtype)")
    llm.add_argument("--max-new-tokens", type=int, default=64)
    llm.add_argument("--concurrency", type=int, default=8, help="requests submitted at once in the batched run")
    llm.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    llm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for target in _OTHERS:
        module = _other(target)
        p = sub.add_parser(target, help=getattr(module, "HELP", "(not built yet)"))
        if module is not None:
            module.add_arguments(p)


def _measure(engine, prompts: list[list[dict]], params, concurrency: int) -> list[dict[str, Any]]:
    """Submit in waves of `concurrency`; one record per reply, timed from its own submit."""
    records: list[dict[str, Any]] = []
    for i in range(0, len(prompts), concurrency):
        wave = []
        for messages in prompts[i:i + concurrency]:
            rec: dict[str, Any] = {"t0": time.perf_counter(), "first_s": None}

            def on_delta(d, rec=rec):
                now = time.perf_counter()
                if d.text and rec["first_s"] is None:
                    rec["first_s"] = now - rec["t0"]
                if d.finished:
                    rec.update(wall_s=now - rec["t0"], tokens=d.tokens, steps=d.steps, finish=d.finish_reason)

            wave.append((engine.submit(messages, params, on_delta=on_delta), rec))
        for handle, rec in wave:
            rec["text"] = handle.result()
            records.append(rec)
    for rec in records:
        rec.pop("t0")
        rec["tokens_per_forward"] = rec["tokens"] / max(rec["steps"], 1)
        rec["tokens_per_s"] = rec["tokens"] / max(rec["wall_s"], 1e-9)
    return records


def _summary(engine_name: str, batch: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    med = lambda key: statistics.median(r[key] for r in records if r[key] is not None) if any(r[key] is not None for r in records) else None  # noqa: E731
    return {
        "engine": engine_name,
        "batch": batch,
        "replies": len(records),
        "median_wall_s": med("wall_s"),
        "median_first_text_s": med("first_s"),
        "median_tokens": med("tokens"),
        "tokens_per_forward": sum(r["tokens"] for r in records) / max(sum(r["steps"] for r in records), 1),
        "median_tokens_per_s": med("tokens_per_s"),
        "replies_detail": records,
    }


def run_llm(args: argparse.Namespace, config: Config) -> int:
    from dlm.ar import AREngine
    from dlm.engine import Engine
    from voice_agent.commands.chat import generation_params, load_llm

    device = args.device or config.llm.device
    dtype = args.dtype or config.llm.dtype
    loaded, diffusion = load_llm(config, config.llm.model, device, dtype)
    notes = []
    if not diffusion:
        notes.append(f"no diffusion model available: {config.llm.model!r} resolved to {loaded.path} "
                     f"({loaded.family}, no mask token); only the AR baseline is measured")
        print(f"WARNING: {notes[-1]}", file=sys.stderr)
    params = generation_params(config, args.max_new_tokens)
    system = {"role": "system", "content": config.agent.system_prompt}
    prompts = [[system, {"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]
    engines = ([("dllm", Engine)] if diffusion else []) + [("ar", AREngine)]
    results = []
    for name, cls in engines:
        with cls(loaded, max_batch_size=max(1, args.concurrency)) as engine:
            engine.submit(prompts[0], generation_params(config, 4)).result()  # warm-up
            for batch in (1, args.concurrency):
                results.append(_summary(name, batch, _measure(engine, prompts, params, batch)))
    report = {"model": str(loaded.path), "family": loaded.family, "device": device, "dtype": dtype,
              "max_new_tokens": args.max_new_tokens, "policy": params.policy, "notes": notes, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {loaded.path} ({loaded.family}) on {device} {dtype}, max_new_tokens {args.max_new_tokens}")
    for note in notes:
        print(f"note: {note}")
    print(f"{'engine':<6} {'batch':>5} {'wall s':>8} {'first text s':>12} {'tokens':>7} {'tok/fwd':>8} {'tok/s':>8}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in results:
        print(f"{r['engine']:<6} {r['batch']:>5} {fmt(r['median_wall_s'], '8.3f')} {fmt(r['median_first_text_s'], '12.3f')} "
              f"{fmt(r['median_tokens'], '7.0f')} {r['tokens_per_forward']:>8.2f} {fmt(r['median_tokens_per_s'], '8.1f')}")
    print("(medians over replies; tok/fwd = tokens per forward pass over all replies; at batch > 1 a forward serves several replies)")
    return 0


def run(args: argparse.Namespace, config: Config) -> int:
    if args.target == "llm":
        return run_llm(args, config)
    module = _other(args.target)
    if module is None:
        print(f"voice-agent bench {args.target}: not built yet in this version", file=sys.stderr)
        return 2
    return int(module.run(args, config) or 0)
