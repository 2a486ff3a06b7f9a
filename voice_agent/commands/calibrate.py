"""`voice-agent calibrate`: pick the draft length (and layout) that decodes fastest on this machine.

Draft-and-verify decoding (a model with a drafter) trades tokens per forward against the cost of a
forward: a longer draft block is accepted further on average but makes every forward wider, and
where a wider forward stops being nearly free depends on the CPU (AMX, cores, memory) or the GPU.
This command measures it instead of guessing: for every draft length (1 .. the drafter's slots) and,
for a mask-slot drafter, both layouts (`draft_tree` true: a draft block per possible acceptance
length; false: one block after the full draft; a draft head has one), for a draft head at the
longest length each confidence bar (`llm.draft_confidence`: its drafts stop where it is less sure;
0: never) and, for a parallel head, each of `--draft-branches` (`llm.draft_branches`: its drafts as
a tree of each place's top tokens, at bars of their own unless `--draft-confidences` says; default
1, a chain only: on a 2-core CPU a tree's extra rows cost more than its extra tokens, docs/models.md
"A tree of drafts"; a causal head drafts chains only), each of them with each prompt lookup length
(`llm.prompt_lookup`: drafts copied from the reply's own text; 0: none), it decodes the same voice
prompts one at a time, greedy, and records the wall time per generated token after the first (the
prefill is the same for all) and the tokens per forward; and the same model's AR engine (no drafts:
the same replies) as the baseline, since on some CPUs a verifying forward over several positions
costs nearly as much as that many steps (no AMX: docs/benchmarks.md, "Session 22: a CPU without
AMX"). Every setting is measured in `--rounds` rounds (default 3), each round in another order, and
keeps its fastest round: on a shared machine other work only slows a run, and a machine that speeds
up or slows down over the minutes of a calibration does so for every setting alike (session 32 saw
one run of the same engine 25 % slower than the one before it). It writes the fastest into a config
file that it names: a copy of the configuration in use (`--config`, else the embedded default) with
`llm.engine` ("auto", or "ar" where the AR engine was fastest), `llm.draft_len`, `llm.draft_tree`,
`llm.draft_confidence` and for a draft head `llm.prompt_lookup` and `llm.draft_branches` (the
fastest draft setting) set, and a comment with the measurements. Use it with `voice-agent serve
--config FILE`.

A draft head's batches are priced too: with the fastest setting, `--batch` requests (default 8)
decode at once for each of `--row-costs` (`llm.row_cost`: what a verified position costs in a
forward of several rows, by which a batch verifies only the drafts that pay for theirs; 0: every
draft) and for the AR engine, in rounds as above, and the price whose batch made the most tokens a
second is written as `llm.row_cost` (`--batch 0`: not measured; the file keeps its row cost).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import stat
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from voice_agent.bench.rounds import in_rounds
from voice_agent.config import Config, default_config_text, parse_override

HELP = "measure which draft length decodes fastest here, against the AR engine, and write the fastest into a config file"

# A draft head's confidence bars tried by default (0: every draft of the length is verified).
DEFAULT_CONFIDENCES = (0.0, 0.1, 0.15, 0.2, 0.3)
# ... and for its trees (`--draft-branches` above 1): a tree's bar is what bounds its nodes, and
# where trees pay (cheap rows) lower bars than a chain's do (docs/models.md, "A tree of drafts").
DEFAULT_TREE_CONFIDENCES = (0.02, 0.05, 0.1, 0.2)
DEFAULT_ROUNDS = 3
# A draft head's batch: requests decoded at once, and the prices of a verified position tried
# (llm.row_cost; 0: no budget).
DEFAULT_BATCH = 8
DEFAULT_ROW_COSTS = (0.0, 0.1, 0.2, 0.3)

DEFAULT_OUT = Path("~/.config/voice-agent/calibrated.toml")
PROMPTS = [
    "What is the capital of France?",
    "Can you recommend a good book for a long flight?",
    "How do I make a cup of green tea?",
    "What's the weather usually like in Seattle in spring?",
    "Tell me something interesting about octopuses.",
    "How long should I boil an egg for a runny yolk?",
]
# The batch's requests: the prompts above and more, each once.
BATCH_PROMPTS = [*PROMPTS, "Why is the sky blue?", "What should I pack for a weekend of hiking?"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE",
                        help=f"the config file to write (default: {DEFAULT_OUT})")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="voice prompts per setting (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-lens", default="", metavar="N1,N2,...",
                        help="draft lengths to try (default: 1 .. the drafter's slots)")
    parser.add_argument("--draft-confidences", default="", metavar="C1,C2,...",
                        help="a draft head's confidence bars to try, each in [0, 1) (default: "
                             f"{','.join(map(str, DEFAULT_CONFIDENCES))}; a mask-slot drafter has none: 0)")
    parser.add_argument("--draft-branches", default="1", metavar="K1,K2,...",
                        help="a parallel draft head's branches to try at the longest length: 1 a chain, more a tree "
                             "of each place's top tokens at each confidence bar (--draft-confidences, else "
                             f"{','.join(map(str, DEFAULT_TREE_CONFIDENCES))}) (llm.draft_branches; default 1: on a "
                             "CPU a tree rarely pays for its rows; where rows are cheap, such as a GPU, try 1,2,3)")
    parser.add_argument("--prompt-lookups", default="", metavar="N1,N2,...",
                        help="a draft head's prompt lookup lengths to try with each setting (default: 0, the "
                             "engine's default and llm.prompt_lookup; a mask-slot drafter has none: 0)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"a draft head's batch: requests decoded at once to price its drafts in batches (0: "
                             f"not measured; default {DEFAULT_BATCH}, at most {len(BATCH_PROMPTS)})")
    parser.add_argument("--row-costs", default="", metavar="C1,C2,...",
                        help="the prices of a verified position to try in the batch (llm.row_cost; 0: no budget; "
                             f"default {','.join(map(str, DEFAULT_ROW_COSTS))})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"rounds of measurements, each in another order; a setting keeps its fastest (default: "
                             f"{DEFAULT_ROUNDS})")


def with_table_keys(text: str, table: str, values: dict[str, str]) -> str:
    """A TOML config text with keys of one table set to the given (already TOML) values: replaced
    where the key is there, added right under the table header where not (a header may carry a
    comment: `[llm]  # the language model`), the table appended where the text has none. Comments
    and every other line stay as they are."""
    lines = text.splitlines()
    header = re.compile(rf"\s*\[\s*{re.escape(table)}\s*\]\s*(#.*)?$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        lines += ["", f"[{table}]", *(f"{k} = {v}" for k, v in values.items())]
        return "\n".join(lines) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    missing = dict(values)
    i = start + 1
    while i < end:
        m = re.match(r"\s*([A-Za-z0-9_]+)\s*=", lines[i])
        if m and m.group(1) in missing:
            # its value may span lines (a multi-line string or array): up to the first line that ends it
            last = next((j for j in range(i, end) if _parses("\n".join(lines[i:j + 1]))), i)
            lines[i:last + 1] = [f"{m.group(1)} = {missing.pop(m.group(1))}"]
            end -= last - i
        i += 1
    lines[start + 1:start + 1] = [f"{k} = {v}" for k, v in missing.items()]
    return "\n".join(lines) + "\n"


def _parses(text: str) -> bool:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return True


def toml_value(value: Any) -> str:
    """A value as TOML writes it (str, bool, int, float, or a list of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf, -inf and nan as TOML writes them too
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # JSON's escapes are TOML's, but for characters past U+FFFF (JSON pairs surrogates, TOML wants
    # the character) and DEL (TOML escapes it, JSON need not)
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def with_overrides(text: str, overrides: list[str]) -> str:
    """The config text with each `--set section.key=value` written into its table, so that the
    written file runs what was measured (the model, the device, ...)."""
    tables: dict[str, dict[str, str]] = {}
    for override in overrides:
        (section, key), value = parse_override(override)
        tables.setdefault(section, {})[key] = toml_value(value)
    for section, values in tables.items():
        text = with_table_keys(text, section, values)
    return text


def _writable(out: Path) -> str | None:
    """Why `out` cannot be written (None: it can), checked before the measuring starts."""
    if out.is_dir():
        return "it is a directory"
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return "no permission to write it"
    return None


def measure(loaded: Any, prompts: list[list[dict[str, str]]], draft_len: int, tree: bool,
            max_new_tokens: int, engine_kind: str = "auto", draft_confidence: float = 0.0,
            prompt_lookup: int = 0, draft_branches: int = 1) -> dict[str, float]:
    """Decode the prompts one at a time with one setting (`engine_kind` "ar": the AR engine,
    draft_len, tree, draft_confidence, prompt_lookup and draft_branches unused): ms per token
    after the first, tokens per forward (prefill not counted)."""
    from dlm.engine import GenerationParams
    from dlm.engines import make_engine

    params = GenerationParams(max_new_tokens=max_new_tokens)
    decode_s = 0.0
    tokens = forwards = 0
    with make_engine(loaded, engine_kind, max_batch_size=1, draft_len=draft_len, tree=tree,
                     draft_confidence=draft_confidence, prompt_lookup=prompt_lookup,
                     draft_branches=draft_branches) as engine:
        engine.submit(prompts[0], params).result()  # warm-up (and the prompt's prefix, as a call would)
        for prompt in prompts:
            first = last = None
            final = None
            for delta in engine.submit(prompt, params):
                now = time.perf_counter()
                if delta.token_ids:
                    first = now if first is None else first
                    last = now
                final = delta
            if first is not None and final is not None and final.tokens > 1:
                decode_s += last - first
                tokens += final.tokens - 1
                forwards += final.steps - final.prefill_steps - 1
    return {"ms_per_token": 1000 * decode_s / max(tokens, 1), "tokens_per_forward": (tokens + 1) / max(forwards + 1, 1),
            "tokens": tokens}


def measure_batch(loaded: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int, engine_kind: str = "auto",
                  **draft: Any) -> dict[str, float]:
    """Decode the prompts all at once with one setting (draft: `make_engine`'s draft keys, such as
    row_cost; unused by the AR engine), after the same batch once untimed (which leaves the
    prompts' K/V for prefix reuse: what is timed is mostly decoding): ms per token of the batch
    (its wall time over all its tokens), tokens per forward (prefill counted)."""
    from dlm.engine import GenerationParams
    from dlm.engines import make_engine

    params = GenerationParams(max_new_tokens=max_new_tokens)
    with make_engine(loaded, engine_kind, max_batch_size=len(prompts), **draft) as engine:
        for handle in [engine.submit(p, params) for p in prompts]:
            handle.result()
        t0 = time.perf_counter()
        finals = [list(handle)[-1] for handle in [engine.submit(p, params) for p in prompts]]
        wall = time.perf_counter() - t0
    tokens = sum(d.tokens for d in finals)
    return {"ms_per_token": 1000 * wall / max(tokens, 1), "tokens_per_forward": tokens / max(sum(d.steps for d in finals), 1),
            "tokens": tokens}


def choose(ar: dict[str, Any], drafted: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    """(the [llm] keys as TOML values, the fastest draft setting's measurement): that setting's
    length, layout, confidence bar (and a draft head's prompt lookup and branches), and the
    engine: "ar" where the AR engine's ms per token beat every draft setting's, else "auto"."""
    best = min(drafted, key=lambda r: r["ms_per_token"])
    engine = "ar" if ar["ms_per_token"] < best["ms_per_token"] else "auto"
    keys = {"engine": f'"{engine}"', "draft_len": str(best["draft_len"]), "draft_tree": str(best["tree"]).lower(),
            "draft_confidence": repr(float(best.get("draft_confidence", 0.0)))}
    if "prompt_lookup" in best:
        keys["prompt_lookup"] = str(int(best["prompt_lookup"]))
    if "draft_branches" in best:
        keys["draft_branches"] = str(int(best["draft_branches"]))
    return keys, best


def draft_settings(lens: list[int], confidences: list[float], head: bool, branches: tuple[int, ...] = (1,),
                   tree_confidences: list[float] | None = None) -> list[tuple[int, bool, float, int]]:
    """(draft length, tree layout, confidence bar, branches) to measure. A mask-slot drafter:
    every length in both layouts, no bar, one branch. A draft head drafts after the acceptance is
    known (the layout changes nothing), and its bars cut drafts from the longest length down (a
    bar on a short draft leaves little to cut): every length with the least bar asked (0 by
    default), the longest with each; its chains (1 branch) so, its trees (more) at the longest
    length with each of `tree_confidences` (default: `confidences`; a tree's bar is what bounds it)."""
    if not head:
        return [(n, tree, 0.0, 1) for tree in (True, False) for n in lens]
    longest, least = max(lens), min(confidences)
    chains = [(n, True, c, 1) for n in lens for c in (confidences if n == longest else [least])] if 1 in branches else []
    return chains + [(longest, True, c, k) for k in branches if k > 1 for c in (tree_confidences or confidences)]


def _setting(r: dict[str, Any]) -> str:
    """One draft setting as the report names it."""
    if "prompt_lookup" not in r:  # mask slots: the layout of their draft blocks
        return f"draft_len {r['draft_len']} {'tree ' if r['tree'] else 'chain'} confidence {r.get('draft_confidence', 0.0):g}"
    k = r.get("draft_branches", 1)  # a draft head: one chain, or a tree of k branches a place
    return (f"draft_len {r['draft_len']} {'chain' if k == 1 else f'tree of {k} branches'} "
            f"confidence {r.get('draft_confidence', 0.0):g} prompt lookup {r['prompt_lookup']}")


def run(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.llm import load_local_llm

    if args.rounds < 1:
        print(f"--rounds must be at least 1, not {args.rounds}", file=sys.stderr)
        return 2
    if not (args.batch == 0 or 2 <= args.batch <= len(BATCH_PROMPTS)):
        print(f"--batch must be 0 (not measured) or lie in [2, {len(BATCH_PROMPTS)}]", file=sys.stderr)
        return 2
    try:
        row_costs = [float(x) for x in args.row_costs.split(",") if x.strip()] or list(DEFAULT_ROW_COSTS)
    except ValueError:
        print(f"--row-costs: expected comma-separated numbers, got {args.row_costs!r}", file=sys.stderr)
        return 2
    if any(not 0.0 <= c <= 16.0 for c in row_costs):
        print("--row-costs: each must lie in [0, 16] (0: no budget)", file=sys.stderr)
        return 2
    out = args.out.expanduser()
    why = _writable(out)
    if why is not None:  # before minutes of measuring
        print(f"--out {out}: cannot be written: {why}", file=sys.stderr)
        return 2
    loaded, resolved = load_local_llm(config.llm.model, device=config.llm.device, dtype=config.llm.dtype,
                                      weights=config.llm.weights, kv_cache=config.llm.kv_cache)
    if loaded.drafter is None:
        print(f"voice-agent calibrate: {resolved.name!r} ({resolved.path}) has no drafter; there is nothing to "
              "calibrate (draft-and-verify needs one: see docs/models.md)", file=sys.stderr)
        return 2
    n_slots = loaded.drafter.n_slots
    try:
        lens = [int(x) for x in args.draft_lens.split(",") if x.strip()] or list(range(1, n_slots + 1))
    except ValueError:
        print(f"--draft-lens: expected comma-separated integers, got {args.draft_lens!r}", file=sys.stderr)
        return 2
    if any(not 1 <= n <= n_slots for n in lens):
        print(f"--draft-lens: each must lie in [1, {n_slots}] (the drafter's slots)", file=sys.stderr)
        return 2
    if not 1 <= args.prompts <= len(PROMPTS):
        print(f"--prompts must lie in [1, {len(PROMPTS)}]", file=sys.stderr)
        return 2
    from dlm.draft_head import DraftHead

    head = isinstance(loaded.drafter, DraftHead)
    try:
        confidences = [float(x) for x in args.draft_confidences.split(",") if x.strip()] or \
            list(DEFAULT_CONFIDENCES if head else (0.0,))
    except ValueError:
        print(f"--draft-confidences: expected comma-separated numbers, got {args.draft_confidences!r}", file=sys.stderr)
        return 2
    if any(not 0.0 <= c < 1.0 for c in confidences):
        print("--draft-confidences: each must lie in [0, 1) (0: every draft verified)", file=sys.stderr)
        return 2
    if not head and any(confidences):
        print(f"--draft-confidences: {resolved.name!r} drafts with mask slots; only a draft head has a confidence "
              "bar (0)", file=sys.stderr)
        return 2
    from dlm.speculative import DEFAULT_PROMPT_LOOKUP, MAX_DRAFT_BRANCHES

    try:
        lookups = [int(x) for x in args.prompt_lookups.split(",") if x.strip()] or \
            (sorted({min(v, n_slots) for v in (0, DEFAULT_PROMPT_LOOKUP, config.llm.prompt_lookup)}) if head else [0])
    except ValueError:
        print(f"--prompt-lookups: expected comma-separated integers, got {args.prompt_lookups!r}", file=sys.stderr)
        return 2
    if any(not 0 <= v <= (n_slots if head else 0) for v in lookups):
        print(f"--prompt-lookups: each must lie in [0, {n_slots if head else 0}]"
              + ("" if head else f" ({resolved.name!r} drafts with mask slots: no prompt lookup)"), file=sys.stderr)
        return 2
    try:
        branches = tuple(sorted({int(x) for x in args.draft_branches.split(",") if x.strip()})) or (1,)
    except ValueError:
        print(f"--draft-branches: expected comma-separated integers, got {args.draft_branches!r}", file=sys.stderr)
        return 2
    # Trees branch a parallel head's places; a causal head scores each place after the drafts
    # before it, so it drafts chains (`HeadSpeculativeDecoder._branching`), as mask slots do.
    chains_only = "mask slots" if not head else "a causal draft head" if loaded.drafter.config.causal else None
    if any(not 1 <= k <= MAX_DRAFT_BRANCHES for k in branches) or (chains_only and branches != (1,)):
        print(f"--draft-branches: each must lie in [1, {MAX_DRAFT_BRANCHES}]" + (
            f" ({resolved.name!r} drafts with {chains_only}: one branch)" if chains_only else ""), file=sys.stderr)
        return 2
    tree_bars = confidences if args.draft_confidences.strip() else list(DEFAULT_TREE_CONFIDENCES)
    batch = args.batch if head else 0  # mask slots have no budget to price
    system = {"role": "system", "content": config.agent.system_prompt}
    prompts = [[system, {"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]
    candidates: list[dict[str, Any]] = [{"engine_kind": "ar"}]
    candidates += [{"draft_len": n, "tree": tree, "draft_confidence": c,
                    **({"prompt_lookup": v, "draft_branches": k} if head else {})}
                   for n, tree, c, k in draft_settings(lens, confidences, head, branches, tree_bars) for v in lookups]

    def run_setting(candidate: dict[str, Any]) -> dict[str, float]:
        return measure(loaded, prompts, max_new_tokens=args.max_new_tokens, **{"draft_len": 1, "tree": True, **candidate})

    def report(done: int, total: int, r: int, result: dict[str, Any]) -> None:
        what = "AR engine (no drafts)" if result.get("engine_kind") == "ar" else _setting(result)
        forwards = "" if result.get("engine_kind") == "ar" else f", {result['tokens_per_forward']:.2f} tokens/forward"
        print(f"[{done}/{total}] round {r + 1}/{args.rounds}: {what}: {result['ms_per_token']:7.1f} ms/token{forwards}",
              file=sys.stderr, flush=True)

    measured = in_rounds(candidates, args.rounds, run_setting, report)
    ar, results = measured[0], measured[1:]
    keys, best = choose(ar, results)
    batched: list[dict[str, Any]] = []
    cheapest: dict[str, Any] | None = None  # the row cost whose batch was fastest
    if batch:
        together = [[system, {"role": "user", "content": p}] for p in BATCH_PROMPTS[:batch]]
        setting = {k: best[k] for k in ("draft_len", "tree", "draft_confidence", "prompt_lookup", "draft_branches")
                   if k in best}

        def run_batch(candidate: dict[str, Any]) -> dict[str, float]:
            return measure_batch(loaded, together, args.max_new_tokens, **setting, **candidate)

        def report_batch(done: int, total: int, r: int, result: dict[str, Any]) -> None:
            what = "AR engine" if result.get("engine_kind") == "ar" else f"row cost {result['row_cost']:g}"
            print(f"[batch {done}/{total}] round {r + 1}/{args.rounds}: {batch} at once, {what}: "
                  f"{result['ms_per_token']:7.2f} ms/token", file=sys.stderr, flush=True)

        batched = in_rounds([{"engine_kind": "ar"}, *({"row_cost": c} for c in row_costs)], args.rounds, run_batch,
                            report_batch)
        cheapest = min(batched[1:], key=lambda r: r["ms_per_token"])
        keys["row_cost"] = repr(cheapest["row_cost"])
    # The file the run was configured from (never a configs/default.toml that happens to lie in
    # the working directory), with the --set overrides it ran with, then the keys measured.
    template = Path(args.config).expanduser().read_text(encoding="utf-8") if args.config else default_config_text()
    template = with_overrides(template, args.overrides or [])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = [f"# Written by `voice-agent calibrate` on {stamp} ({platform.processor() or platform.machine()}, "
              f"{resolved.name}, {config.llm.device}): ms per generated token, greedy, one call at a time, "
              f"the fastest of {args.rounds} round{'s' if args.rounds != 1 else ''}"]
    header += [f"#   AR engine (no drafts): {ar['ms_per_token']:.1f} ms/token"]
    header += [f"#   {_setting(r)}: {r['ms_per_token']:.1f} ms/token, {r['tokens_per_forward']:.2f} tokens/forward"
               for r in results]
    if batched:
        header += [f"# {batch} calls at once with the fastest setting, ms per token of the batch:",
                   f"#   AR engine: {batched[0]['ms_per_token']:.2f}"]
        header += [f"#   row cost {r['row_cost']:g}: {r['ms_per_token']:.2f}, {r['tokens_per_forward']:.2f} tokens/forward"
                   for r in batched[1:]]
    text = with_table_keys(template, "llm", keys)
    try:  # whole or not at all: a file beside it (the link's target's, its mode), then renamed over it
        target = out.resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text("\n".join(header) + "\n" + text, encoding="utf-8")
        if target.exists():  # a config may hold a token: keep who may read it
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        tmp.replace(target)
    except OSError as e:
        print(f"voice-agent calibrate: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    speedup = ar["ms_per_token"] / max(best["ms_per_token"], 1e-9)
    if keys["engine"] == '"ar"':
        print(f"fastest: the AR engine ({ar['ms_per_token']:.1f} ms/token; the same replies): the best draft "
              f"setting, {_setting(best)}, ran at {speedup:.2f}x its speed here")
    else:
        print(f"fastest: {_setting(best)} ({best['ms_per_token']:.1f} ms/token, {speedup:.2f}x the AR engine)")
    if cheapest is not None:
        print(f"in batches of {batch}: row cost {cheapest['row_cost']:g} ({cheapest['ms_per_token']:.2f} ms/token; "
              f"the AR engine {batched[0]['ms_per_token']:.2f})")
    print(f"written to {out}: use it with  voice-agent serve --config {out}")
    return 0
