"""`voice-agent bench llm|audio|barge-in|e2e|hostile|quality|tools|turns`: measurements, not tests.

`bench llm` runs the dLLM engine and the AR baseline engine on the same weights, in one run:
- by default, the configured model with its chat template over short voice-assistant prompts
  (where it is an AR model, the AR fallback while the adapted model is not shipped, it says so
  and measures the AR baseline only);
- `--untrained-bd`: the configured AR model's weights decoded as a block-diffusion model
  (`dlm.adapt.convert.to_block_diffusion`, no training): shows the mechanics; its tokens per
  forward pass say nothing about a trained model;
- `--synthetic NAME`: random weights in the shapes of a real checkpoint (`dlm.synthetic`, e.g.
  fast-dllm-v2-1.5b), prompts of random token ids, no EOS, and a fixed number of denoising steps
  per block (`--steps-per-block`), so every reply does the same work on any machine.

At each concurrency level C (`--concurrency 1,8,32,128`), C requests are submitted at once to one
engine whose max batch is the largest level, after an untimed warm-up at that level (which also
compiles the shapes under `--compile`); up to 8 such rounds run on different prompts (level 1: each
of the 8 prompts alone, one after the other), and a level's wall time is the sum of its rounds'.
Each engine is made for each level alone (one engine alive at a time: two would share the cores'
OpenMP teams, dlm/threads.py); `--repeats N` measures every (engine, level) N times in rotating
order and keeps the fastest (`voice-agent calibrate`'s rounds). The warm-up's prompts differ from the measured ones (other
user messages, other random ids): the engine reuses the cached K/V of a prompt prefix left in a
free row (dlm/decode.py "Prefix reuse"), so the measured chat requests reuse the shared system
prompt, as every new call does on a running server, but never their own user message. Per reply: time to the first final text (first final
token ids where the model has no tokenizer), wall time, tokens, forward passes. Per level: tokens
per forward pass, median tokens/s per request, aggregate tokens/s (all tokens / the level's wall
time), and on CUDA the peak memory (`torch.cuda.max_memory_allocated`).

`--json FILE` writes the raw records with the environment (device name, on a CPU its model and
whether the AMX products run, driver from nvidia-smi where present, torch and CUDA versions, the
exact command line). `--profile FILE` runs
torch.profiler over a short run at the first level and writes a table of the top ops.
`--weights int4` runs the GGUF's own 4-bit weights in the decoding steps, `--weights blocks` its own
blocks at every position in float32 (docs/models.md).
`--reference llama.cpp` runs llama.cpp (llama-cpp-python, an optional extra; one note line where
it is missing) on the same GGUF and token ids at concurrency 1 in the same run, in the same rounds
as our engines (`--repeats`; loaded for its round alone, so that one engine is in memory at a
time), with bars for our engines against it; `--fidelity` compares the AR engine's greedy replies
and logits with the same weights in float32. With `--set llm.accept=A` (< 1: lossy acceptance) it
also reports the teacher's NLL per token of the dLLM's replies against its own greedy replies'
(the same weights in float32). On CPU every run also times single forwards (a step, a block of
16, a 150-token prefill: issue 15's bars) and reports the model's weight bytes and the process RSS.
`--url URL` measures an OpenAI-compatible server instead (voice_agent/bench/remote.py): the same
prompts, levels and records, streamed greedy completions; tokens per forward where the server
reports its forwards (our LLM tier does). The other targets live in their own modules (`_OTHERS`: `bench_audio`, `bench_barge_in`,
`bench_e2e`, `bench_hostile`, `bench_quality`, `bench_startup`, `bench_tools`, `bench_turns`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dlm.memory import release_free_memory, resident_bytes
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
SYNTHETIC_PROMPT_TOKENS = 64  # prompt length of a synthetic request (random ids): two whole blocks of 32
PROFILE_MAX_NEW_TOKENS = 64
REFERENCE = "llama.cpp"  # the reference engine of --reference (voice_agent/bench/reference.py)
MAX_ROUNDS = 8  # rounds of C requests measured per concurrency level C (fewer where prompts run out)  # the profiled run: a few blocks, enough steps to average over

_OTHERS = {"audio": "bench_audio", "barge-in": "bench_barge_in", "e2e": "bench_e2e", "hostile": "bench_hostile", "quality": "bench_quality",
           "startup": "bench_startup", "tools": "bench_tools", "turns": "bench_turns"}


def _other(target: str):
    try:
        return importlib.import_module(f"voice_agent.commands.{_OTHERS[target]}")
    except ModuleNotFoundError as e:
        if e.name == f"voice_agent.commands.{_OTHERS[target]}":
            return None
        raise


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    llm = sub.add_parser("llm", help="dLLM engine vs AR baseline on the same weights")
    llm.add_argument("--device", help="torch device, e.g. cpu, cuda (default: llm.device)")
    llm.add_argument("--dtype", help="float32 | bfloat16 | auto (default: llm.dtype; auto with --synthetic)")
    llm.add_argument("--weights", help="dense | int4 | blocks | blocks-amx | blocks-bf16 | blocks-int8 | blocks-int16 | auto (default: llm.weights)")
    llm.add_argument("--max-new-tokens", type=int, default=64)
    llm.add_argument("--concurrency", type=_levels, default=[1, 8], metavar="C1,C2,...",
                     help="requests submitted at once, one level after the other (default: 1,8)")
    llm.add_argument("--synthetic", metavar="NAME",
                     help="random weights in a real checkpoint's shapes (dlm.synthetic: fast-dllm-v2-1.5b, small)")
    llm.add_argument("--untrained-bd", action="store_true",
                     help="decode the configured AR model as block diffusion, untrained (mechanics only)")
    llm.add_argument("--policy", help="threshold | fixed_steps | factor (default: llm.policy; fixed_steps "
                                      "with --synthetic)")
    llm.add_argument("--steps-per-block", type=int, default=8,
                     help="denoising steps per block under fixed_steps (default 8: 4 tokens/forward at block 32)")
    llm.add_argument("--engines", default="dllm,ar", help="which engines to run (default: dllm,ar)")
    llm.add_argument("--heldout", metavar="DATA.jsonl", type=Path,
                     help="prompts: the held-out prompts of a dlm.adapt data file (as the drafter's "
                          "evaluation), instead of the built-in voice prompts")
    llm.add_argument("--n-prompts", type=int, default=32, help="with --heldout: at most this many (default 32)")
    llm.add_argument("--draft-len", type=int, default=0, help="draft-and-verify: mask slots per draft block "
                                                              "(default: llm.draft_len, else 1)")
    llm.add_argument("--compile", metavar="MODE", help="torch.compile the denoising forward: default | "
                                                       "reduce-overhead | max-autotune | max-autotune-no-cudagraphs")
    llm.add_argument("--reference", choices=[REFERENCE],
                     help="also run llama.cpp (llama-cpp-python, an optional extra) on the same GGUF and prompts, "
                          "greedy, at concurrency 1, in the same run")
    llm.add_argument("--fidelity", action="store_true",
                     help="also compare with the same weights in float32, dense: greedy AR replies that differ, "
                          "and the largest logit difference at the prefill's and at a decoding step's position")
    llm.add_argument("--url", metavar="URL",
                     help="measure an OpenAI-compatible server instead (its /v1, e.g. http://host:8000/v1: our "
                          "serve-llm, vLLM, SGLang, Mercury); the key comes from llm.api_key_env")
    llm.add_argument("--model", help="with --url: the model to request (default: llm.api_model, else the server's first)")
    llm.add_argument("--against-local", action="store_true",
                     help="with --url: also run the configured model in this process, prompt by prompt alternately "
                          "with the server at concurrency 1: the cost of the hop (the LLM tier's bar)")
    llm.add_argument("--repeats", type=_positive, default=1,
                     help="measure each engine (--reference's too) at each level this many times, in rotating "
                          "order, and keep its fastest measurement (a shared machine's other work only slows a run; "
                          "default 1)")
    llm.add_argument("--json", metavar="FILE", help="write the raw results and the environment to FILE")
    llm.add_argument("--profile", metavar="FILE", help="profile a short run and write the top ops table to FILE")
    for target in _OTHERS:
        module = _other(target)
        p = sub.add_parser(target, help=getattr(module, "HELP", "(not built yet)"))
        if module is not None:
            module.add_arguments(p)


# -- environment ------------------------------------------------------------------------------

def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: str) -> dict[str, Any]:
    """Where a run ran: versions, the device by name, on a CPU its model and whether the block
    kernel's AMX products run there ("amx": "yes", else why not), the git commit."""
    import torch

    env: dict[str, Any] = {
        "command": shlex.join(["voice-agent", *sys.argv[1:]]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": platform.processor() or platform.machine(),
        "driver": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    if device.startswith("cpu"):
        from dlm.blocks import amx_available

        env["device_name"] = _cpu_model()
        env["amx"] = amx_available() or "yes"  # the default model's arithmetic differs with and without
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            env["driver"] = out
        except (OSError, subprocess.SubprocessError) as e:
            env["driver"] = f"nvidia-smi failed: {e}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           timeout=5, check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


# -- workload ---------------------------------------------------------------------------------

def _workload(args: argparse.Namespace, config: Config) -> tuple[Any, bool, list[Any], list[Any], Any, list[str]]:
    """-> (loaded model, diffusion capable, prompts, warm-up prompts, GenerationParams, notes)."""
    import torch

    from voice_agent.commands.chat import load_llm
    from voice_agent.llm import generation_params

    device = args.device or config.llm.device
    notes: list[str] = []
    if args.synthetic:
        from dlm.synthetic import synthetic_model

        max_seq_len = -(-(SYNTHETIC_PROMPT_TOKENS + args.max_new_tokens) // 64) * 64 + 64
        loaded = synthetic_model(args.synthetic, device=device, dtype=args.dtype or "auto", max_seq_len=max_seq_len)
        generator = torch.Generator().manual_seed(0)
        high = loaded.spec.mask_token_id  # ids below the mask token: ordinary vocabulary
        prompts = [torch.randint(0, high, (SYNTHETIC_PROMPT_TOKENS,), generator=generator).tolist()
                   for _ in range(2 * max(args.concurrency))]
        params = generation_params(config.llm, max_new_tokens=args.max_new_tokens, loop_guard=False)
        params.policy = args.policy or "fixed_steps"
        params.steps_per_block, params.block_size, params.sub_block_size = args.steps_per_block, 0, 0
        params.temperature = 0.0
        notes.append(f"synthetic random weights ({args.synthetic}): no EOS, every reply runs to max_new_tokens; "
                     f"policy {params.policy}, {args.steps_per_block} steps per block")
        return loaded, True, prompts[::2], prompts[1::2], params, notes
    loaded, diffusion = load_llm(config, config.llm.model, device, args.dtype or config.llm.dtype, args.weights)
    params = generation_params(config.llm, max_new_tokens=args.max_new_tokens, loop_guard=False)
    if args.policy:
        params.policy = args.policy
    if params.policy == "fixed_steps":
        params.steps_per_block = args.steps_per_block
    if args.untrained_bd:
        from dlm.adapt.convert import to_block_diffusion

        if diffusion:
            raise SystemExit("--untrained-bd needs an AR model; the configured model already is a diffusion model")
        loaded.spec = to_block_diffusion(loaded, block_size=32, sub_block_size=0)
        loaded.family = f"{loaded.family}->bd (untrained)"
        diffusion = True
        notes.append("UNTRAINED block-diffusion view of the AR weights: mechanics only; its tokens per forward "
                     "pass and its text say nothing about a trained dLLM")
    elif not diffusion:
        notes.append(f"no diffusion model available: {config.llm.model!r} resolved to {loaded.path} "
                     f"({loaded.family}, no mask token); only the AR baseline is measured")
    prompts, warm_up = _chat_prompts(args, config, notes)
    return loaded, diffusion, prompts, warm_up, params, notes


def _chat_prompts(args: argparse.Namespace, config: Config, notes: list[str]) -> tuple[list[Any], list[Any]]:
    """(measured chats, warm-up chats): the voice prompts (or --heldout's), as many as the
    largest level needs."""
    system = {"role": "system", "content": config.agent.system_prompt}
    if args.heldout:
        from dlm.adapt.data import read_dataset

        _, examples = read_dataset(args.heldout)
        seen: dict[int, list[dict[str, str]]] = {}
        for e in examples:
            if e.split == "heldout" and e.prompt_index not in seen and len(seen) < args.n_prompts:
                seen[e.prompt_index] = e.messages
        if not seen:
            raise SystemExit(f"{args.heldout}: no held-out prompts")
        chats = list(seen.values())
        notes.append(f"{len(chats)} held-out prompts of {args.heldout} (their own system prompts)")
    else:
        chats = [[system, {"role": "user", "content": p}] for p in PROMPTS]
    n = max(max(args.concurrency), len(chats))  # level 1 runs every prompt once, one at a time
    prompts = [chats[i % len(chats)] for i in range(n)]
    warm_up = [[system, {"role": "user", "content": f"(warm-up) {PROMPTS[i % len(PROMPTS)]}"}] for i in range(n)]
    return prompts, warm_up


def _levels_measured(measure: Callable[[list[Any]], tuple[list[dict[str, Any]], float]], name: str,
                     concurrency: list[int], prompts: list[Any], warm_up: list[Any], *, every_prompt: bool,
                     before: Callable[[], None] = lambda: None,
                     peak: Callable[[], int | None] = lambda: None) -> list[dict[str, Any]]:
    """Each level C: an untimed warm-up of C requests, then up to MAX_ROUNDS rounds of C requests
    on other prompts (`every_prompt`: as many rounds as the prompts fill), summed."""
    results = []
    for c in concurrency:
        measure(warm_up[:c])  # warm-up at this level (and compile its shapes)
        before()
        # Each round on other prompts, so that low levels (concurrency 1 above all) are measured
        # over more than one or two replies.
        records, wall = [], 0.0
        rounds = max(1, len(prompts) // c)
        for r in range(rounds if every_prompt else min(MAX_ROUNDS, rounds)):
            round_records, round_wall = measure(prompts[r * c:(r + 1) * c])
            records += round_records
            wall += round_wall
        results.append(_summary(name, c, records, wall, peak()))
        print(f"  {name} concurrency {c}: {wall:.2f} s", file=sys.stderr)
    return results


# -- measuring --------------------------------------------------------------------------------

def _measure(engine, prompts: list[Any], params) -> tuple[list[dict[str, Any]], float]:
    """Submit all prompts at once; one record per reply, timed from the common submit time.
    Returns (records, wall time of the whole level)."""
    records: list[dict[str, Any]] = []
    handles = []
    t0 = time.perf_counter()
    for prompt in prompts:
        rec: dict[str, Any] = {"first_output_s": None, "token_times": [], "token_ids": []}

        def on_delta(d, rec=rec):  # worker thread: record times (and ids) only
            now = time.perf_counter()
            if rec["first_output_s"] is None and (d.text or (d.token_ids and engine.tokenizer is None)):
                rec["first_output_s"], rec["first_output_tokens"] = now - t0, d.tokens
            if d.token_ids:  # when each count of final tokens was reached: [seconds, tokens so far]
                rec["token_times"].append([round(now - t0, 6), d.tokens])
                rec["token_ids"] += d.token_ids
            if d.finished:
                rec.update(wall_s=now - t0, tokens=d.tokens, steps=d.steps, prefill_steps=d.prefill_steps,
                           prefill_tokens=d.prefill_tokens,
                           finish=d.finish_reason, error=d.error)

        handles.append((engine.submit(prompt, params, on_delta=on_delta), rec))
    for handle, rec in handles:
        rec["text"] = handle.result()
        records.append(rec)
    wall = time.perf_counter() - t0
    for rec in records:
        rec["tokens_per_forward"] = rec["tokens"] / max(rec["steps"], 1)
        rec["tokens_per_s"] = rec["tokens"] / max(rec["wall_s"], 1e-9)
    return records, wall


def _summary(engine_name: str, concurrency: int, records: list[dict[str, Any]], wall_s: float,
             peak_bytes: int | None) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return statistics.median(values) if values else None

    tokens = sum(r["tokens"] for r in records)
    # A remote server that does not report its forwards (`bench llm --url`): no tokens per forward.
    counted = all(r.get("steps") is not None for r in records)
    return {
        "engine": engine_name,
        "concurrency": concurrency,
        "replies": len(records),
        "median_first_output_s": med("first_output_s"),
        "median_wall_s": med("wall_s"),
        "median_tokens": med("tokens"),
        "tokens_per_forward": tokens / max(sum(r["steps"] for r in records), 1) if counted else None,
        # The same without the forwards that prefilled the prompts, nor the tokens they made.
        "decode_tokens_per_forward": (tokens - sum(r.get("prefill_tokens", 0) for r in records))
        / max(sum(r["steps"] - r.get("prefill_steps", 0) for r in records), 1) if counted else None,
        "median_tokens_per_s_per_request": med("tokens_per_s"),
        "aggregate_tokens_per_s": tokens / max(wall_s, 1e-9),
        "level_wall_s": wall_s,
        "peak_memory_bytes": peak_bytes,
        "errors": sum(1 for r in records if r.get("finish") == "error"),
        "replies_detail": records,
    }


def _profile(engine, loaded, prompts: list[Any], params, compile_mode: str | None, path: Path) -> None:
    """torch.profiler over a short run of the engine's step loop, driven here in this thread (the
    profiler records the thread that starts it, not the engine's worker): a `BlockDecoder` like
    the engine's, the same prompts and settings, one untimed run first (warm-up, compilation)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = loaded.model.device.type == "cuda"
    short = replace(params, max_new_tokens=min(params.max_new_tokens, PROFILE_MAX_NEW_TOKENS))
    requests = [engine.prepare(prompt, short) for prompt in prompts]
    def run() -> int:
        # A fresh decoder (cache) per run: the profiled run prefills its prompts like the first one.
        decoder = engine.make_decoder(max_batch_size=len(requests), max_seq_len=engine.max_seq_len,
                                       cache=engine.cache, compile_mode=compile_mode)
        for slot, (ids, settings) in enumerate(requests):
            decoder.add(slot, ids, settings)
        steps = 0
        while decoder.rows:
            steps += 1
            for update in decoder.step():
                if update.finish_reason is not None:
                    decoder.remove(update.slot)
        return steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        run()
        with profile(activities=activities) as prof:
            steps = run()
            if cuda:
                torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30)
    path.write_text(f"{len(requests)} requests, {steps} decoder steps (the batched prefill in the first)\n{table}\n",
                    encoding="utf-8")


FORWARD_REPEATS = 7
VERIFY_POSITIONS = 8  # forward_costs: a verifying forward timed at 1 .. this many positions (and rows)
HEAD_ROWS = (1, 2, 4, 8)  # forward_costs: a draft head's pass timed at these many rows


def forward_costs(model: Any, *, context: int = 160, block: int = 16, prompt: int = 150, head: Any = None
                  ) -> dict[str, Any]:
    """Wall time of single forwards of the model on this machine (the fastest of FORWARD_REPEATS,
    after a warm-up; a 1-row batch, random token ids): a decoding step of one token after
    `context` cached positions (fewer where the model holds fewer); `block` positions after it,
    as a step (verifying a draft: the step kernels) and as a bulk forward (denoising a block: the
    prefill kernels); the prefill of a `prompt`-token prompt. With the issue's bars: a block at
    most 1.3x a step, the prefill at most 40 ms. And a verifying forward by its positions (1 to
    VERIFY_POSITIONS, logits at each, as a draft head's engine verifies): how many come at one's
    price and what each one more costs (`verify_cost`, beside the price the engine's budget
    takes for the model's arithmetic, `dlm.speculative.row_cost_of`), and by its rows (1 to
    VERIFY_POSITIONS rows of one position each, as a batch's AR steps: `verify_row_cost`, the same
    fit; the budget prices a row's position as a draft's). With a draft `head`, its
    pass at HEAD_ROWS rows (`head_pass`: what one more row costs, as a share of one more verified
    position, beside the engine's HEAD_ROW_SHARE)."""
    import torch

    from dlm.masks import limit_mask
    from dlm.threads import in_engine_thread

    V = model.config.vocab_size
    if max(block, prompt) >= model.config.max_seq_len:
        raise ValueError(f"a model of {model.config.max_seq_len} positions cannot time a {max(block, prompt)}-token forward")
    context = min(context, model.config.max_seq_len - max(block, prompt) - 1)  # a short model: less context
    cache = model.new_cache(VERIFY_POSITIONS, context + max(block, prompt) + 1)

    def forward(start: int, T: int, step: bool, every_logit: bool = False, rows: int = 1) -> Callable[[], Any]:
        tokens = torch.randint(0, V, (rows, T), generator=torch.Generator().manual_seed(T))
        positions = torch.arange(start, start + T)[None].expand(rows, -1)
        mask = limit_mask(positions + 1, start + T)  # causal over the cache
        out = (torch.arange(T)[None] if every_logit else torch.tensor([[T - 1]])).expand(rows, -1)
        cache_rows = torch.arange(rows)
        return lambda: model(tokens, positions, mask, cache=cache, cache_rows=cache_rows, out_index=out, step=step)

    def fastest(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(FORWARD_REPEATS):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def head_pass(B: int) -> Callable[[], Any]:
        g = torch.Generator().manual_seed(B)
        W = head.config.window
        feats = torch.randn(B, W, model.config.dim, generator=g)
        tokens = head.vocab[torch.randint(0, len(head.vocab), (B, W), generator=g)]
        valid = torch.full((B,), W)
        return lambda: head(feats, tokens, valid, head.n_slots)

    def measure() -> tuple[float, float, float, list[float], list[float], list[float]]:
        with torch.inference_mode():
            forward(0, context, False, rows=VERIFY_POSITIONS)()  # every row's context K/V
            # one position of one row is the decoding step: timed once, the first of both series
            by_positions = [fastest(forward(context, P, True, every_logit=True)) for P in range(1, VERIFY_POSITIONS + 1)]
            return (fastest(forward(context, block, True)), fastest(forward(context, block, False)),
                    fastest(forward(0, prompt, False)), by_positions,
                    by_positions[:1] + [fastest(forward(context, 1, True, every_logit=True, rows=B))
                                        for B in range(2, VERIFY_POSITIONS + 1)],
                    [] if head is None else [fastest(head_pass(B)) for B in HEAD_ROWS])

    # where an engine's forwards run: in a thread with the engines' share of the cores (dlm.threads)
    verify_s, denoise_s, prefill_s, by_positions, by_rows, head_s = in_engine_thread(measure)
    step_s = by_positions[0]
    fit = verify_cost(by_positions)
    floors = product_floors(model, block=block, prompt=prompt, step_ms=1e3 * step_s)
    return {
        "context": context, "step_ms": 1e3 * step_s, "block": block, "block_step_ms": 1e3 * verify_s,
        "block_bulk_ms": 1e3 * denoise_s,
        "prompt": prompt, "prefill_ms": 1e3 * prefill_s,
        "verify_ms_by_positions": [round(1e3 * t, 3) for t in by_positions],
        "verify_cost": fit,
        "verify_ms_by_rows": [round(1e3 * t, 3) for t in by_rows],
        "verify_row_cost": verify_cost(by_rows),
        "head_pass": None if head is None else _head_pass(head_s, fit),
        "floors": floors,
        "bars": {
            "block_step_ratio": {"value": verify_s / step_s, "limit": f"<= 1.3 ({block} positions as a step / one "
                                                                    "token's step)", "pass": verify_s / step_s <= 1.3},
            "block_bulk_ratio": {"value": denoise_s / step_s, "limit": f"<= 1.3 ({block} positions in bulk / one "
                                                                     "token's step)", "pass": denoise_s / step_s <= 1.3},
            "prefill_ms": {"value": 1e3 * prefill_s, "limit": f"<= 40 (a {prompt}-token prompt)",
                           "pass": prefill_s <= 0.040},
        },
    }


def multiply_adds(config: Any) -> tuple[int, int]:
    """(the decoder layers', the output layer's) multiply-adds of one position of a Llama-style
    model: its projections' weights (q/k/v, o, gate/up, down; the output layer's vocabulary x
    width), each used once a position. What attention adds (growing with the context), the norms
    and a fine-tune's low-rank updates are left out: this is a lower bound on the work."""
    D, H, Hkv, Dh, F = config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.intermediate_size
    layer = D * (H + 2 * Hkv) * Dh + H * Dh * D + D * 2 * F + F * D
    return config.n_layers * layer, config.vocab_size * D


def product_floors(model: Any, *, block: int, prompt: int, step_ms: float) -> dict[str, Any]:
    """What the work of issue 15's forward bars costs at this CPU's peak rate for the instruction
    the model's block products are made of (`dlm.blocks.product_peak`, over the engines' threads):
    `block` positions after the context with logits at the last, as `forward_costs` times them, in
    ms and in steps of `step_ms`; a `prompt`-token prefill, logits at its last position, in ms.
    The projections' multiply-adds only (`multiply_adds`), each at the instruction's full rate: no
    forward whose products are made of that instruction can be faster. The rate is the larger of
    the threads' together and one thread's times the threads (a busy moment slows a run of
    several threads; the larger keeps the floor a floor). {"measured": False, "why": ...} where the
    model does not run block products whose instruction `product_peak` times (dense or int4
    weights, AMX tiles) or this CPU cannot run them."""
    import torch

    from dlm.blocks import PEAK_MEASURED, product_peak
    from dlm.threads import in_engine_thread

    products = model.block_products() if hasattr(model, "block_products") else None
    if products not in PEAK_MEASURED:
        return {"measured": False, "why": "the model does not run block products" if products is None
                else "the AMX tiles' products are not measured"}

    def measure() -> tuple[float | None, float | None, int]:
        threads = torch.get_num_threads()
        together = product_peak(products, threads)
        return together, together if threads == 1 or together is None else product_peak(products, 1), threads

    together, alone, threads = in_engine_thread(measure)  # the engines' threads, as the forwards above
    if together is None or alone is None:
        return {"measured": False, "why": "this CPU cannot run the model's products"}
    peak = max(together, threads * alone)
    layers, output = multiply_adds(model.config)
    block_ms = 1e3 * (block * layers + output) / peak
    return {"measured": True, "products": PEAK_MEASURED[products], "threads": threads, "peak_gmac_per_s": peak / 1e9,
            "threads_gmac_per_s": together / 1e9, "one_thread_gmac_per_s": alone / 1e9,
            "layer_macs": layers, "output_macs": output, "block_ms": block_ms, "block_steps": block_ms / step_ms,
            "prefill_ms": 1e3 * (prompt * layers + output) / peak}


def verify_cost(times: list[float], within: float = 0.05) -> dict[str, float]:
    """A verifying forward's cost by positions (times[P - 1] for P = 1, 2, ...) as the engine's
    budget prices it (`dlm.speculative.RowCost`): `free`, how many positions from the first cost
    at most `within` more than one (up to the first that costs more: a later reading that noise
    made as fast does not count); `each_ms`, the least-squares slope of the time over the positions
    from `free` on (what each one more costs); `each`, that as a share of one position's forward."""
    free = next((P - 1 for P, t in enumerate(times, 1) if t > (1 + within) * times[0]), len(times))
    points = list(enumerate(times, 1))[free - 1:]
    if len(points) < 2:
        return {"free": free, "each_ms": 0.0, "each": 0.0}
    slope = max(_slope(points), 0.0)
    return {"free": free, "each_ms": round(1e3 * slope, 3), "each": round(slope / times[0], 3)}


def _slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of y over x through (x, y) points (two distinct x at least)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def _head_pass(times: list[float], fit: dict[str, float]) -> dict[str, Any]:
    """A draft head's pass by rows (times at HEAD_ROWS): the least-squares ms per row, and that as
    a share of one more verified position (`fit`'s each_ms), which the engine takes as HEAD_ROW_SHARE."""
    from dlm.speculative import HEAD_ROW_SHARE

    slope = _slope(list(zip(HEAD_ROWS, times, strict=True)))
    return {"rows": list(HEAD_ROWS), "ms": [round(1e3 * t, 3) for t in times], "each_row_ms": round(1e3 * slope, 3),
            "share_of_position": round(1e3 * slope / fit["each_ms"], 3) if fit["each_ms"] > 0 else None,
            "engine_share": HEAD_ROW_SHARE}


def _engine_row_cost(model: Any, row_cost: float | str) -> dict[str, float] | None:
    """The price the draft-and-verify engine's budget takes (`llm.row_cost`: "auto" measures the
    model's arithmetic, a number is what `voice-agent calibrate` wrote, 0 no budget), or None."""
    from dlm.speculative import SpeculativeEngine

    cost = SpeculativeEngine._row_cost(model, row_cost)
    return None if cost is None else {"free": cost.free, "each": cost.each}


# Issue 15's memory bar: what loading the default model adds to a process's resident size.
LLM_RESIDENT_BAR_BYTES = 400e6


def _memory(model: Any, rss_before_load: int | None) -> dict[str, Any]:
    """The model's weight bytes (every copy the forward reads: dense, packed, blocks), this
    process's resident size (the model, torch, the tokenizer: everything `bench llm` has loaded
    so far), and what loading the model added to it (the LLM's resident size: its weights, its
    tokenizer, a drafter; the same process before loading had torch imported). The engines' KV
    caches come on top, only where their rows have written (`dlm.model.lazy_zeros`): `bench llm`
    adds each engine's after its levels (`in_use_bytes`)."""
    rss = resident_bytes()
    added = None if rss is None or rss_before_load is None else rss - rss_before_load
    return {"weight_bytes": model.weight_bytes(), "process_rss_bytes": rss, "process_rss_before_load_bytes": rss_before_load,
            "llm_rss_bytes": added, "in_use_bytes": {},
            "bars": {} if added is None else {"llm_resident_mb": {
                "value": added / 1e6, "limit": f"<= {LLM_RESIDENT_BAR_BYTES / 1e6:.0f} (MB the model's load added to the "
                                               "process; issue 15's bar for the default model)",
                "pass": added <= LLM_RESIDENT_BAR_BYTES}}}


def _fidelity(loaded: Any, ref: Any, prompt_ids: list[list[int]], replies: list[dict[str, Any]],
              params: Any) -> dict[str, Any]:
    """The model under test against `ref`, the same weights (its fine-tune included) in float32,
    dense (issue 15: report the logit difference and whether greedy replies change): the float32 AR
    engine's greedy replies to the same prompt ids, and per prompt the largest |logit difference|
    at the last prompt position (the prefill's kernels) and at the first reply token's position
    (a decoding step's)."""
    import torch

    from dlm.ar import AREngine
    from dlm.masks import causal_mask

    greedy = replace(params, temperature=0.0)
    with AREngine(ref, max_batch_size=1) as engine:
        ref_ids = [[t for d in engine.submit(ids, greedy) for t in d.token_ids] for ids in prompt_ids]
    prefill_diffs, step_diffs = [], []
    model = loaded.model
    with torch.inference_mode():
        for ids, rec in zip(prompt_ids, replies, strict=True):
            if not rec["token_ids"]:
                continue
            seq = torch.tensor([ids + rec["token_ids"][:1]])
            P = len(ids)
            full = ref.model(seq, torch.arange(P + 1)[None], causal_mask(P + 1))[0]  # (P + 1, V)
            cache = model.new_cache(1, P + 8)  # the model's own cache (llm.kv_cache)
            rows = torch.tensor([0])
            keys = torch.arange(P + 1)
            prefill = model(seq[:, :P], keys[None, :P], causal_mask(P), cache=cache, cache_rows=rows,
                            out_index=torch.tensor([[P - 1]]))[0, 0]
            step = model(seq[:, P:], keys[None, P:], torch.ones(1, 1, 1, P + 1, dtype=torch.bool), cache=cache,
                         cache_rows=rows, step=True)[0, 0]
            prefill_diffs.append(float((prefill - full[P - 1]).abs().max()))
            step_diffs.append(float((step - full[P]).abs().max()))
    differing = [i for i, (a, b) in enumerate(zip(ref_ids, replies, strict=True)) if a != b["token_ids"]]
    first_diff = [next((j for j, (x, y) in enumerate(zip(ref_ids[i], replies[i]["token_ids"], strict=False))
                        if x != y),
                       min(len(ref_ids[i]), len(replies[i]["token_ids"]))) for i in differing]
    return {
        "replies": len(prompt_ids),
        "differing_replies": len(differing),
        "first_difference_at": first_diff,  # token index of the first difference, per differing reply
        "median_max_abs_logit_diff_prefill": _median(prefill_diffs),
        "median_max_abs_logit_diff_step": _median(step_diffs),
        "max_abs_logit_diff": max(prefill_diffs + step_diffs, default=None),
        "float32_token_ids": ref_ids,
    }


def _float32_reference(loaded: Any) -> Any:
    """The model under test's weights (its fine-tune included) loaded again, dense, in float32."""
    from dlm.checkpoints import load_model

    print("  loading the float32 reference (fidelity, lossy quality)", file=sys.stderr)
    return load_model(loaded.path, dtype="float32", max_seq_len=loaded.config.max_seq_len, adapter=loaded.adapter)


def _lossy_quality(ref: Any, prompt_ids: list[list[int]], ours: list[dict[str, Any]], ar: list[dict[str, Any]],
                   accept: float) -> dict[str, Any]:
    """Lossy acceptance (`llm.accept` < 1): the teacher's negative log-likelihood per token (`ref`,
    the same weights and fine-tune in float32, dense, as an AR model) of draft-and-verify's replies,
    divided by that of the teacher's own greedy replies (the AR engine's) to the same prompts:
    the quality axis of issue 14's frontier (1: as good as the teacher by its own measure), the
    measure of the adaptation recipe's evaluation (dlm.adapt.teacher.reply_nll)."""
    import torch

    from dlm.adapt.teacher import hf_teacher, reply_nll

    teacher = hf_teacher(ref, "cpu", torch.float32)

    def per_token(replies: list[dict[str, Any]]) -> float:
        pairs = [(ids, rec["token_ids"]) for ids, rec in zip(prompt_ids, replies, strict=True) if rec["token_ids"]]
        sums = reply_nll(teacher, [p for p, _ in pairs], [r for _, r in pairs]) if pairs else []
        return sum(n for n, _ in sums) / max(sum(k for _, k in sums), 1)

    ours_per, ar_per = per_token(ours), per_token(ar)
    return {"accept": accept, "replies": len(prompt_ids), "teacher_nll_per_token": ours_per,
            "teacher_own_nll_per_token": ar_per, "nll_ratio": ours_per / ar_per if ar_per > 0 else None}


def _reference(args: argparse.Namespace, loaded: Any, notes: list[str]) -> Callable[[], Any] | None:
    """What makes the llama.cpp reference (a `LlamaCppReference` loaded when called) where asked for
    and possible; otherwise None and a note saying why."""
    if not getattr(args, "reference", None):
        return None
    from voice_agent.bench.reference import LlamaCppReference, llama_cpp_missing

    missing = llama_cpp_missing()
    if missing is None and Path(loaded.path).suffix.lower() != ".gguf":
        missing = f"the model under test is not a GGUF file ({loaded.path}); llama.cpp runs GGUF files"
    if missing is None and args.synthetic:
        missing = "--synthetic weights exist only in this process"
    if missing is not None:
        print(f"note: {REFERENCE} skipped: {missing}", file=sys.stderr)
        notes.append(f"{REFERENCE} skipped: {missing}")
        return None
    import torch

    from dlm.threads import engine_threads

    return functools.partial(LlamaCppReference, loaded.path, threads=engine_threads() or torch.get_num_threads(),
                             n_ctx=loaded.config.max_seq_len)


# Options that measure the in-process engine: they do not go with --url.
LOCAL_ONLY = ("device", "dtype", "weights", "synthetic", "untrained_bd", "policy", "draft_len", "compile", "reference",
              "fidelity", "profile")


def run_remote(args: argparse.Namespace, config: Config) -> int:
    """`bench llm --url`: the same prompts and levels against an OpenAI-compatible server."""
    from voice_agent.bench.remote import RemoteChat

    given = [f"--{name.replace('_', '-')}" for name in LOCAL_ONLY if getattr(args, name, None)]
    given += ["--repeats"] if args.repeats != 1 else []
    if given:
        print(f"{', '.join(given)}: measure the in-process engine, not a server at --url", file=sys.stderr)
        return 2
    notes: list[str] = []
    remote = RemoteChat(args.url, api_key=config.secrets.llm_api_key, model=args.model or config.llm.api_model)
    try:
        model = remote.model()
    except RuntimeError as e:
        print(f"voice-agent bench llm: {e}", file=sys.stderr)
        return 2
    prompts, warm_up = _chat_prompts(args, config, notes)
    results = _levels_measured(lambda batch: remote.measure(batch, args.max_new_tokens), "remote", args.concurrency,
                               prompts, warm_up, every_prompt=bool(args.heldout))
    hop = _hop_against_local(args, config, remote, prompts, warm_up, results) if args.against_local else None
    failed = [r.get("error") for level in results for r in level["replies_detail"] if r.get("error")]
    if failed:
        notes.append(f"{len(failed)} requests failed, e.g. {failed[0]}")
    if any(level["tokens_per_forward"] is None for level in results):
        notes.append("the server does not report its forward passes (voice-agent's `voice_agent` extension): "
                     "no tokens per forward")
    report = {
        "environment": {**_environment("remote"), "url": args.url},
        "model": model, "family": f"served at {args.url}", "dtype": "the server's", "max_new_tokens": args.max_new_tokens,
        "policy": "the server's", "compile": None, "notes": notes, "results": results, "decoding": "remote",
        "hop": hop,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"raw results written to {args.json}", file=sys.stderr)
    _print_table(report)
    return 1 if failed else 0


HOP_BAR_MS = 30.0  # issue 17: the LLM tier may add at most this to the time to the first text


def _hop_against_local(args: argparse.Namespace, config: Config, remote: Any, prompts: list[Any], warm_up: list[Any],
                       results: list[dict[str, Any]]) -> dict[str, Any]:
    """The configured model in this process against the server, prompt by prompt alternately at
    concurrency 1 (the machine's load drifts; pairs see the same): median time to the first text
    of each, the median of the paired differences and its bar. The in-process level joins
    `results` as engine "local"."""
    from dlm.engines import make_engine
    from voice_agent.commands.chat import load_llm
    from voice_agent.llm import generation_params

    loaded, _ = load_llm(config, config.llm.model, config.llm.device, config.llm.dtype)
    params = generation_params(config.llm, max_new_tokens=args.max_new_tokens, loop_guard=False)
    params.temperature = 0.0  # as the server is asked
    local_records, remote_records, local_wall, remote_wall = [], [], 0.0, 0.0
    with make_engine(loaded, config.llm.engine, max_batch_size=1, **config.llm.draft_settings()) as engine:
        _measure(engine, warm_up[:1], params)
        remote.measure(warm_up[:1], args.max_new_tokens)
        for prompt in prompts[:MAX_ROUNDS]:
            records, wall = _measure(engine, [prompt], params)
            local_records += records
            local_wall += wall
            records, wall = remote.measure([prompt], args.max_new_tokens)
            remote_records += records
            remote_wall += wall
    print(f"  local and remote alternately at concurrency 1: {local_wall + remote_wall:.2f} s", file=sys.stderr)
    results.append(_summary("local", 1, local_records, local_wall, None))
    pairs = [(r["first_output_s"] - lo["first_output_s"]) * 1000 for lo, r in zip(local_records, remote_records, strict=True)
             if r["first_output_s"] is not None and lo["first_output_s"] is not None]
    diff = _median(pairs)
    # Where a server reports its own time to the first text (ours does), the hop splits into the
    # server's extra time against this process and the transport (client - server).
    server = [(r, r["server_first_output_s"]) for r in remote_records if r.get("server_first_output_s") is not None]
    return {
        "pairs": len(pairs),
        "local_first_output_ms": _median([r["first_output_s"] * 1000 for r in local_records if r["first_output_s"]]),
        "remote_first_output_ms": _median([r["first_output_s"] * 1000 for r in remote_records if r["first_output_s"]]),
        "server_first_output_ms": _median([s * 1000 for _, s in server]),
        "transport_ms": _median([(r["first_output_s"] - s) * 1000 for r, s in server if r["first_output_s"] is not None]),
        "remote_results": _summary("remote-paired", 1, remote_records, remote_wall, None),
        "bar": {"value": diff, "limit": f"<= {HOP_BAR_MS:g} ms (median of the paired differences in the time to the "
                                        "first text, server - in-process)",
                "pass": diff is not None and diff <= HOP_BAR_MS},
    }


def run_llm(args: argparse.Namespace, config: Config) -> int:
    if args.url:
        return run_remote(args, config)
    if args.against_local or args.model:
        print("--against-local and --model go with --url", file=sys.stderr)
        return 2
    import torch

    from dlm.draft_head import DraftHead
    from dlm.engines import decoding, make_engine

    if args.synthetic and args.untrained_bd:
        print("--synthetic and --untrained-bd exclude each other", file=sys.stderr)
        return 2
    import gc

    if args.reference:  # llama.cpp's libraries imported before the baseline: not our engines' memory
        from voice_agent.bench.reference import llama_cpp_missing

        llama_cpp_missing()
    gc.collect()  # what earlier work left is not the model's: freed and trimmed before the baseline
    release_free_memory()
    rss_before_load = resident_bytes()
    loaded, diffusion, prompts, warm_up, params, notes = _workload(args, config)
    device = str(loaded.model.device)
    cuda = device.startswith("cuda")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    wanted = {name.strip() for name in args.engines.split(",")}
    # The dLLM row decodes as llm.engine asks ("speculative": a bd checkpoint drafting for itself).
    dllm = "speculative" if config.llm.engine == "speculative" else "auto"
    engines = [(name, kind) for name, kind in (("dllm", dllm), ("ar", "ar"))
               if name in wanted and (diffusion or name == "ar")]
    max_c = max(args.concurrency)
    max_seq_len = loaded.config.max_seq_len
    results = []
    memory = _memory(loaded.model, rss_before_load)
    head = getattr(loaded, "drafter", None)
    costs = None if cuda else forward_costs(loaded.model, head=head if isinstance(head, DraftHead) else None)
    gc.collect()  # the single forwards' cache (rows of context) is not the engines' memory: freed now
    release_free_memory()
    prompt_ids: list[list[int]] = []
    draft = {**config.llm.draft_settings(), "draft_len": args.draft_len or config.llm.draft_len}
    if costs is not None and isinstance(head, DraftHead) and any(name == "dllm" for name, _ in engines):
        costs["engine_row_cost"] = _engine_row_cost(loaded.model, draft["row_cost"])
    from voice_agent.bench.rounds import in_rounds

    def reset_peak() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    walls: dict[tuple[str, int], list[float]] = {}
    make_reference = _reference(args, loaded, notes)
    reference = None  # the last one that measured a round: its version and file for the report
    reference_failed = False  # llama.cpp raised in a round: not tried again, its finished rounds kept
    replies_at_one = 0  # how many replies our engines' level 1 measures: the reference measures as many
    kept_by_reference = 0  # bytes the process holds more after llama.cpp's rounds than before them

    def run_reference() -> dict[str, Any]:
        """llama.cpp at concurrency 1 on the prompts our engines' level 1 ran (their token ids),
        loaded for this round alone and closed after it, as each of our engines is made for its
        own: one engine in memory at a time, so that each one's memory figure is its own. What
        llama.cpp keeps once its model is freed (about 5 MB on the default model after its first
        round: its libraries' state; a throwaway script, session 44) is measured around each round and left out of
        our engines' figures. Where llama.cpp fails (a GGUF it cannot load, ...), a note says so
        and the run goes on without it: our engines' rounds are not lost."""
        nonlocal reference, reference_failed, kept_by_reference
        if not prompt_ids or not replies_at_one:
            raise RuntimeError(f"{REFERENCE} measures the token ids our engines' level 1 decodes: it runs first")
        if reference_failed:
            return {"level_wall_s": math.inf}
        gc.collect()  # what the round before freed, given back first: not counted as llama.cpp's
        release_free_memory()
        before = resident_bytes()
        try:
            made = make_reference()
            try:
                from dlm.threads import in_engine_thread

                def run() -> tuple[list[dict[str, Any]], float]:
                    eos = loaded.spec.eos_token_ids
                    made.measure(prompt_ids[:1], args.max_new_tokens, eos)  # warm-up, as ours
                    return made.measure(prompt_ids[1:1 + replies_at_one], args.max_new_tokens, eos)

                # in a thread with the cores our engines get (dlm.threads): llama.cpp's OpenMP is torch's
                records, wall = in_engine_thread(run)
            finally:
                made.close()
        except Exception as e:  # llama.cpp's own error, whatever its kind
            reference_failed = True
            note = f"{REFERENCE} failed ({type(e).__name__}: {str(e)[:300]}); no more of its rounds are run"
            print(f"note: {note}", file=sys.stderr)
            notes.append(note)
            return {"level_wall_s": math.inf}
        finally:
            gc.collect()
            release_free_memory()
            after = resident_bytes()
            if before is not None and after is not None:
                kept_by_reference += max(0, after - before)
        reference = made
        print(f"  {REFERENCE} concurrency 1: {wall:.2f} s", file=sys.stderr)
        walls.setdefault((REFERENCE, 1), []).append(round(wall, 4))
        return _summary(REFERENCE, 1, records, wall, None)

    def run_level(candidate: dict[str, Any]) -> dict[str, Any]:
        """One engine (made for this run alone: one engine alive at a time, dlm/threads.py) at one
        concurrency level."""
        nonlocal prompt_ids, replies_at_one
        name, level = candidate["engine_name"], candidate["level"]
        if name == REFERENCE:
            return run_reference()
        with make_engine(loaded, candidate["kind"], max_batch_size=max_c, max_seq_len=max_seq_len,
                         compile_mode=args.compile, **draft) as engine:
            if not prompt_ids:  # the token ids both engines and the reference decode
                prompt_ids = [engine.prepare(p, params)[0] for p in [*warm_up[:1], *prompts]]
            if args.profile and level == args.concurrency[0] and (name, level) not in walls:
                path = Path(args.profile).with_suffix(f".{name}{Path(args.profile).suffix or '.txt'}")
                _profile(engine, loaded, prompts[:level], params, args.compile, path)
                print(f"profile of {name} written to {path}", file=sys.stderr)
            acceptance = getattr(engine, "draft_acceptance", lambda reset=False: None)

            def before() -> None:
                reset_peak()
                acceptance(reset=True)  # the warm-up's drafts are not counted

            (result,) = _levels_measured(
                lambda batch: _measure(engine, batch, params), name, [level], prompts, warm_up,
                every_prompt=bool(args.heldout), before=before,  # --heldout: every held-out prompt
                peak=lambda: torch.cuda.max_memory_allocated() if cuda else None)
            result["draft_acceptance"] = acceptance()
            if level == 1:
                replies_at_one = result["replies"]
            rss = resident_bytes()  # with this engine's cache holding what its level wrote
        if rss is not None and rss_before_load is not None:
            in_use = rss - rss_before_load - kept_by_reference
            memory["in_use_bytes"][name] = max(memory["in_use_bytes"].get(name, 0), in_use)
        walls.setdefault((name, level), []).append(round(result["level_wall_s"], 4))
        return result

    # Each engine at each level `--repeats` times, in rotating order, its fastest measurement kept
    # (other work on a shared machine only slows a run): the ratios between engines, llama.cpp's
    # among them, are then measured under like conditions. The reference comes last in the list,
    # so that the first round's first run is ours and makes the token ids it decodes.
    candidates = [{"engine_name": name, "kind": kind, "level": c} for name, kind in engines for c in args.concurrency]
    if make_reference is not None and engines and 1 in args.concurrency:
        candidates.append({"engine_name": REFERENCE, "kind": None, "level": 1})
    elif make_reference is not None:
        notes.append(f"{REFERENCE} runs at concurrency 1, beside our engines' level 1; this run has none")
    for measured in in_rounds(candidates, args.repeats, run_level, key="level_wall_s"):
        name, level = measured.pop("engine_name"), measured.pop("level")
        del measured["kind"]
        if (name, level) in walls:  # not llama.cpp where no round of it finished
            results.append({**measured, "repeat_walls_s": walls[(name, level)]})
    ar_level = pair = None
    if args.fidelity:
        ar_level = next((r for r in results if r["engine"] == "ar" and r["concurrency"] == 1), None)
        if ar_level is None:
            notes.append("--fidelity compares the AR engine's replies at concurrency 1; this run has none")
    if params.accept < 1.0:
        pair = _level_pair(results, 1)
        if pair is None:
            notes.append("llm.accept < 1: the teacher-NLL ratio needs both engines at concurrency 1; this run has not")
    fidelity = quality = None
    if ar_level is not None or pair is not None:
        ref = _float32_reference(loaded)  # loaded once for both
        if ar_level is not None:
            fidelity = _fidelity(loaded, ref, prompt_ids[1:1 + ar_level["replies"]], ar_level["replies_detail"], params)
        if pair is not None:
            quality = _lossy_quality(ref, prompt_ids[1:1 + pair[1]["replies"]], pair[0]["replies_detail"],
                                     pair[1]["replies_detail"], params.accept)
    decoding_name = decoding(loaded)
    report = {
        "environment": _environment(device),
        "model": str(loaded.path), "family": loaded.family, "dtype": str(loaded.model.dtype),
        "weights": loaded.weights, "max_new_tokens": args.max_new_tokens, "policy": params.policy,
        "steps_per_block": params.steps_per_block if params.policy == "fixed_steps" else None,
        "compile": args.compile, "notes": notes, "results": results,
        "decoding": decoding_name,
        "draft_settings": draft if decoding_name == "draft-and-verify" else None,
        "bars": None if args.synthetic else (exact_bars if decoding_name == "draft-and-verify" else speed_bars)(
            results, min(args.concurrency)),
        "reference": None if reference is None else {"engine": REFERENCE, "version": reference.version,
                                                     "model": str(reference.path)},
        "reference_bars": reference_bars(results),
        "fidelity": fidelity,
        "lossy_quality": quality,
        "forward_costs": costs,
        "memory": memory,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"raw results written to {args.json}", file=sys.stderr)
    _print_table(report)
    return 0


# The issue's speed bars (measured here, not in tests): tokens per forward pass, wall time for the
# same number of tokens (48 or the shorter reply), time to the dLLM's first final text vs the AR's
# time to as many tokens. All at concurrency 1, prompt by prompt, medians.
BAR_TOKENS = 48
BARS = {"tokens_per_forward": 3.0, "wall_speedup": 2.0, "first_text_ratio": 1 / 3}


def _time_to(token_times: list[list[float]], n: int) -> float | None:
    """When a reply first had at least n final tokens."""
    return next((t for t, k in token_times if k >= n), None)


def _level_pair(results: list[dict[str, Any]], concurrency: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The dLLM's and the AR's results at one concurrency level, or None without both."""
    by_engine = {r["engine"]: r for r in results if r["concurrency"] == concurrency}
    if "dllm" not in by_engine or "ar" not in by_engine:
        return None
    return by_engine["dllm"], by_engine["ar"]


def _time_ratios(dllm: dict[str, Any], ar: dict[str, Any], count: Callable[[list, list], int]) -> list[float]:
    """Per prompt: the dLLM's time / the AR's time to `count(dllm timeline, ar timeline)` tokens."""
    ratios = []
    for d, a in zip(dllm["replies_detail"], ar["replies_detail"], strict=True):
        if not d.get("token_times") or not a.get("token_times"):
            continue
        n = count(d["token_times"], a["token_times"])
        t_d, t_a = _time_to(d["token_times"], n), _time_to(a["token_times"], n)
        if t_d and t_a:
            ratios.append(t_d / t_a)
    return ratios


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _wall_speedups(dllm: dict[str, Any], ar: dict[str, Any]) -> list[float]:
    """Per prompt: AR time / dLLM time to the same number of tokens (BAR_TOKENS or the shorter reply)."""
    return [1 / r for r in _time_ratios(dllm, ar, lambda d, a: min(d[-1][1], a[-1][1], BAR_TOKENS))]


def speed_bars(results: list[dict[str, Any]], concurrency: int = 1) -> dict[str, Any] | None:
    """The dLLM vs AR comparison of one concurrency level, or None without both engines there.
    Replies are paired by prompt (same order in both engines' records)."""
    levels = _level_pair(results, concurrency)
    if levels is None:
        return None
    dllm, ar = levels
    speedups = _wall_speedups(dllm, ar)
    # The dLLM's first final text (its time, and its tokens then), against the AR's time to as many.
    first_ratios = []
    for d, a in zip(dllm["replies_detail"], ar["replies_detail"], strict=True):
        n = d.get("first_output_tokens")
        if n is not None and a.get("token_times") and (t_a := _time_to(a["token_times"], min(n, a["token_times"][-1][1]))):
            first_ratios.append(d["first_output_s"] / t_a)
    tpf = dllm["tokens_per_forward"]
    wall, first = _median(speedups), _median(first_ratios)
    return {
        "concurrency": concurrency,
        "pairs": len(speedups),
        "tokens_per_forward": {"value": tpf, "limit": f">= {BARS['tokens_per_forward']}",
                               "pass": tpf >= BARS["tokens_per_forward"]},
        "wall_speedup": {"value": wall, "limit": f">= {BARS['wall_speedup']} (AR time / dLLM time to the same "
                                                 f"number of tokens, {BAR_TOKENS} or the shorter reply)",
                         "pass": wall is not None and wall >= BARS["wall_speedup"]},
        "first_text_ratio": {"value": first, "limit": "<= 1/3 (dLLM time to its first final text / AR time to as "
                                                      "many tokens)",
                             "pass": first is not None and first <= BARS["first_text_ratio"]},
    }


# Exact draft-and-verify decoding (a model with a drafter): its own bars, at concurrency 1.
EXACT_BARS = {"differing_replies": 0, "decode_tokens_per_forward": 2.5, "wall_speedup": 2.0, "first8_ratio": 0.5}
FIRST_TOKENS = 8


def exact_bars(results: list[dict[str, Any]], concurrency: int = 1) -> dict[str, Any] | None:
    """Draft-and-verify vs the AR engine on the same weights: replies that differ (at temperature
    0 there must be none), tokens per forward without the prefill, the wall-time speed-up to the
    same number of tokens, and the time to the first FIRST_TOKENS final tokens (or the shorter
    reply) as a fraction of the AR's. None without both engines at that level."""
    levels = _level_pair(results, concurrency)
    if levels is None:
        return None
    dllm, ar = levels
    pairs = list(zip(dllm["replies_detail"], ar["replies_detail"], strict=True))
    differing = sum(1 for d, a in pairs if d.get("token_ids") != a.get("token_ids"))
    speedups = _wall_speedups(dllm, ar)
    first = _time_ratios(dllm, ar, lambda d, a: min(d[-1][1], a[-1][1], FIRST_TOKENS))
    tpf = dllm["decode_tokens_per_forward"]
    wall, first_ratio = _median(speedups), _median(first)
    return {
        "concurrency": concurrency,
        "pairs": len(pairs),
        "differing_replies": {"value": differing, "limit": "0 (token for token the AR engine's reply)",
                              "pass": differing == 0},
        "decode_tokens_per_forward": {"value": tpf, "limit": f">= {EXACT_BARS['decode_tokens_per_forward']} (prefill "
                                                             "not counted: its forwards, nor the first token it made; "
                                                             f"counted: {dllm['tokens_per_forward']:.2f})",
                                      "pass": tpf >= EXACT_BARS["decode_tokens_per_forward"]},
        "wall_speedup": {"value": wall, "limit": f">= {EXACT_BARS['wall_speedup']} (AR time / ours to the same number "
                                                 f"of tokens, {BAR_TOKENS} or the shorter reply)",
                         "pass": wall is not None and wall >= EXACT_BARS["wall_speedup"]},
        "first8_ratio": {"value": first_ratio, "limit": f"<= {EXACT_BARS['first8_ratio']} (time to the first "
                                                        f"{FIRST_TOKENS} final tokens, ours / AR)",
                         "pass": first_ratio is not None and first_ratio <= EXACT_BARS["first8_ratio"]},
    }


# Our engines against llama.cpp on the same GGUF (issue 15), at concurrency 1, medians.
REFERENCE_BARS = {"ar_tokens_per_s_ratio": 1.0, "ar_first_output_ratio": 1.0, "dllm_wall_speedup": 2.0}


def reference_bars(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The AR engine's tokens/s per request and time to first output against llama.cpp's, and the
    dLLM's wall-time speed-up over llama.cpp to the same number of tokens (where a dLLM ran);
    None without the reference."""
    by_engine = {r["engine"]: r for r in results if r["concurrency"] == 1}
    ref = by_engine.get(REFERENCE)
    if ref is None:
        return None
    bars: dict[str, Any] = {"pairs": ref["replies"]}
    ar = by_engine.get("ar")
    if ar is not None:
        tps = _ratio(ar["median_tokens_per_s_per_request"], ref["median_tokens_per_s_per_request"])
        first = _ratio(ar["median_first_output_s"], ref["median_first_output_s"])
        same = sum(1 for a, r in zip(ar["replies_detail"], ref["replies_detail"], strict=True)
                   if a.get("token_ids") == r.get("token_ids"))
        bars["ar_tokens_per_s_ratio"] = {"value": tps, "limit": ">= 1 (AR engine tokens/s per request / llama.cpp's)",
                                         "pass": tps is not None and tps >= REFERENCE_BARS["ar_tokens_per_s_ratio"]}
        bars["ar_first_output_ratio"] = {"value": first, "limit": "<= 1 (AR engine time to first output / llama.cpp's)",
                                         "pass": first is not None and first <= REFERENCE_BARS["ar_first_output_ratio"]}
        bars["same_replies_as_ar"] = same  # information: llama.cpp's arithmetic differs from ours
    dllm = by_engine.get("dllm")
    if dllm is not None:
        wall = _median(_wall_speedups(dllm, ref))
        bars["dllm_wall_speedup"] = {"value": wall, "limit": f">= 2 (llama.cpp time / dLLM time to the same number "
                                                             f"of tokens, {BAR_TOKENS} or the shorter reply)",
                                     "pass": wall is not None and wall >= REFERENCE_BARS["dllm_wall_speedup"]}
    return bars


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _print_acceptance(engine: str, concurrency: int, counted: dict[str, list[dict[str, Any]]]) -> None:
    """The draft head's greedy drafts accepted by chain confidence, prompt lookup's by place
    (`dlm.speculative.DraftAcceptance`): the confidence's calibration and LOOKUP_SURE, checked."""
    head = ", ".join(f"{b['confidence'][0]:.1f}-{b['confidence'][1]:.1f} {b['rate']:.2f} of {b['verified']}"
                     for b in counted["head"]) or "none verified"
    copies = ", ".join(f"{c['place']}: {c['rate']:.2f} of {c['verified']} (modelled {c['modelled']:.2f})"
                       for c in counted["copies"]) or "none verified"
    print(f"drafts accepted ({engine}, concurrency {concurrency}; greedy rows): the head's by chain confidence {head}; "
          f"copies by place {copies}")


def _print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    amx = f"; AMX: {env['amx']}" if env.get("amx") else ""
    weights = f" on {report['weights']} weights" if report.get("weights") else ""
    print(f"model {report['model']} ({report['family']}) on {env['device']} ({env['device_name']}{amx}) {report['dtype']}{weights}, "
          f"torch {env['torch']}, max_new_tokens {report['max_new_tokens']}, policy {report['policy']}, "
          f"compile {report['compile']}")
    if report.get("draft_settings"):
        print("draft settings: " + ", ".join(f"{k} {v}" for k, v in report["draft_settings"].items()))
    for note in report["notes"]:
        print(f"note: {note}")
    width = max([6, *(len(r["engine"]) for r in report["results"])])  # "llama.cpp" is wider than ours
    print(f"{'engine':<{width}} {'conc':>5} {'first s':>8} {'wall s':>8} {'tokens':>7} {'tok/fwd':>8} "
          f"{'tok/s/req':>10} {'agg tok/s':>10} {'peak MiB':>9}")

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in report["results"]:
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        print(f"{r['engine']:<{width}} {r['concurrency']:>5} {fmt(r['median_first_output_s'], '8.3f')} "
              f"{fmt(r['median_wall_s'], '8.3f')} {fmt(r['median_tokens'], '7.0f')} {fmt(r['tokens_per_forward'], '8.2f')} "
              f"{fmt(r['median_tokens_per_s_per_request'], '10.1f')} {r['aggregate_tokens_per_s']:>10.1f} "
              f"{fmt(peak, '9.0f')}")
    print("(first s: median time to the first final text, or token ids without a tokenizer; tok/fwd: tokens per "
          "forward pass over all replies of a level; agg tok/s: all tokens / the level's wall time)")
    bars = report.get("bars")
    if bars:
        print(f"{report.get('decoding', 'dLLM')} bars at concurrency {bars['concurrency']} ({bars['pairs']} prompts, "
              "medians):")
        for name in (EXACT_BARS if "differing_replies" in bars else BARS):
            bar = bars[name]
            print(f"  {name:<18} {fmt(bar['value'], '6.2f')}  {bar['limit']}: {'pass' if bar['pass'] else 'MISSED'}")
    for r in report["results"]:
        if r.get("draft_acceptance"):
            _print_acceptance(r["engine"], r["concurrency"], r["draft_acceptance"])
    mem = report.get("memory")
    if mem:
        rss = mem["process_rss_bytes"]
        added = mem.get("llm_rss_bytes")
        print(f"memory: weights {mem['weight_bytes'] / 2**20:.0f} MiB (every copy the forward reads), process resident "
              f"{'-' if rss is None else f'{rss / 2**20:.0f} MiB'} after loading, of which the model's load added "
              f"{'-' if added is None else f'{added / 2**20:.0f} MiB'}; with each engine after its levels (its KV "
              "cache's written rows included): "
              + (", ".join(f"{name} {b / 2**20:.0f} MiB" for name, b in mem.get("in_use_bytes", {}).items()) or "-"))
        for name, bar in mem.get("bars", {}).items():
            print(f"  {name:<18} {fmt(bar['value'], '6.1f')}  {bar['limit']}: {'pass' if bar['pass'] else 'MISSED'}")
    costs = report.get("forward_costs")
    if costs:
        print(f"single forwards (fastest of {FORWARD_REPEATS}): step {costs['step_ms']:.1f} ms, {costs['block']} "
              f"positions as a step {costs['block_step_ms']:.1f} ms / in bulk {costs['block_bulk_ms']:.1f} ms, "
              f"prefill of {costs['prompt']} tokens {costs['prefill_ms']:.1f} ms")
        for name, bar in costs["bars"].items():
            print(f"  {name:<18} {fmt(bar['value'], '6.2f')}  {bar['limit']}: {'pass' if bar['pass'] else 'MISSED'}")
        floors = costs.get("floors")
        if floors and floors["measured"]:
            print(f"  floors at this CPU's peak ({floors['products']}, {floors['threads']} threads: "
                  f"{floors['peak_gmac_per_s']:.0f} GMAC/s; the projections' multiply-adds and nothing else, "
                  f"{floors['layer_macs'] / 1e6:.1f} M a position and {floors['output_macs'] / 1e6:.1f} M for logits): "
                  f"{costs['block']} positions {floors['block_ms']:.1f} ms ({floors['block_steps']:.2f} steps), "
                  f"prefill of {costs['prompt']} tokens {floors['prefill_ms']:.1f} ms")
        elif floors:
            print(f"  floors at this CPU's peak: not measured ({floors['why']})")
        if costs.get("verify_ms_by_positions"):
            fit, engine = costs["verify_cost"], costs.get("engine_row_cost")
            print("verifying forwards by positions (logits at each), ms: "
                  + ", ".join(f"{P}: {t:.1f}" for P, t in enumerate(costs["verify_ms_by_positions"], 1))
                  + f"; {fit['free']} at one's price, then {fit['each_ms']:.2f} ms each ({fit['each']:.2f} of one); "
                  + ("the engine's budget prices " + f"{engine['free']} free, {engine['each']} each (of a whole step: "
                     "with the head's pass and the step's other work)" if engine
                     else "the engine's budget: none (llm.row_cost = 0, or no draft head ran)"))
        if costs.get("verify_ms_by_rows"):
            rows = costs["verify_row_cost"]
            print("verifying forwards by rows (one position each), ms: "
                  + ", ".join(f"{B}: {t:.1f}" for B, t in enumerate(costs["verify_ms_by_rows"], 1))
                  + f"; {rows['free']} at one's price, then {rows['each_ms']:.2f} ms each ({rows['each']:.2f} of one; "
                  "the budget prices a row's position as a draft's)")
        passes = costs.get("head_pass")
        if passes:
            share = passes["share_of_position"]
            print("the draft head's pass by rows, ms: " + ", ".join(f"{b}: {t:.2f}" for b, t in zip(passes["rows"], passes["ms"],
                                                                                                   strict=True))
                  + f"; {passes['each_row_ms']:.2f} ms a row, {fmt(share, '.2f')} of a verified position (the engine "
                  f"takes {passes['engine_share']})")
    quality = report.get("lossy_quality")
    if quality:
        print(f"lossy acceptance (llm.accept {quality['accept']}; {quality['replies']} prompts): the teacher's NLL per "
              f"token of these replies {quality['teacher_nll_per_token']:.3f} against {quality['teacher_own_nll_per_token']:.3f} "
              f"for its own greedy replies: ratio {fmt(quality['nll_ratio'], '.3f')}")
    fid = report.get("fidelity")
    if fid:
        print(f"against the same weights in float32, dense ({fid['replies']} prompts, greedy): "
              f"{fid['differing_replies']} replies differ (first difference at tokens {fid['first_difference_at']}); "
              f"max |logit difference| median {fmt(fid['median_max_abs_logit_diff_prefill'], '.3f')} at the prefill's "
              f"position, {fmt(fid['median_max_abs_logit_diff_step'], '.3f')} at a step's, "
              f"largest {fmt(fid['max_abs_logit_diff'], '.3f')}")
    hop = report.get("hop")
    if hop:
        bar = hop["bar"]
        print(f"the hop ({hop['pairs']} prompts alternately, concurrency 1): first text in-process "
              f"{fmt(hop['local_first_output_ms'], '.1f')} ms, through the server {fmt(hop['remote_first_output_ms'], '.1f')} "
              f"ms; paired difference {fmt(bar['value'], '.1f')} ms  {bar['limit']}: {'pass' if bar['pass'] else 'MISSED'}")
        if hop.get("server_first_output_ms") is not None:
            print(f"  of the server's answer: first text {fmt(hop['server_first_output_ms'], '.1f')} ms by its own clock "
                  f"(from the request's arrival), transport (client - server) {fmt(hop['transport_ms'], '.1f')} ms")
    ref = report.get("reference_bars")
    if ref:
        print(f"against {REFERENCE} at concurrency 1 ({ref['pairs']} prompts, medians):")
        for name in REFERENCE_BARS:
            if name in ref:
                bar = ref[name]
                print(f"  {name:<22} {fmt(bar['value'], '6.2f')}  {bar['limit']}: "
                      f"{'pass' if bar['pass'] else 'MISSED'}")
        if "same_replies_as_ar" in ref:
            print(f"  replies token for token the same as our AR engine's: {ref['same_replies_as_ar']} of "
                  f"{ref['pairs']} (the two compute in different arithmetic)")


def run(args: argparse.Namespace, config: Config) -> int:
    if args.target == "llm":
        return run_llm(args, config)
    module = _other(args.target)
    if module is None:
        print(f"voice-agent bench {args.target}: not built yet in this version", file=sys.stderr)
        return 2
    return int(module.run(args, config) or 0)
