"""`voice-agent adapt STEP ...`: the adaptation recipe (dlm/adapt), same options as `python -m dlm.adapt`,
plus `grounded`: the grounded-answer fine-tune of the phone bot (issue 19), which needs this
package's generated businesses (voice_agent/bench/grounded.py).

`voice-agent adapt grounded --out DIR` trains a low-rank adapter (dlm/adapter.py) of the AR
model on conversations about generated businesses (never the held-out ones), mixed with the
teacher's own greedy replies to general voice prompts (so general answers stay as they were), on
CPU in bf16, resumable (rerun the same command), and writes DIR/adapter.safetensors. At the end it
reports the mean loss per reply token, base and adapted, on held-out conversations (held-out
businesses) and on the teacher's held-out replies (DIR/grounded-eval.json). The shipped file is
dlm/assets/smollm2-135m-grounded.safetensors; `voice-agent bench quality --set llm.model=...`
scores a model with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from voice_agent.config import Config

HELP = "adapt the AR teacher: the block-diffusion recipe (data, train, eval, export, pipeline), drafter, grounded"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dlm.adapt.cli import add_arguments as add

    sub = add(parser)
    p = sub.add_parser("grounded", help="train (or resume) the phone bot's grounded-answer adapter on generated "
                                        "businesses (never the held-out ones)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the run folder")
    p.add_argument("--base", type=Path, default=None, help="the AR model (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--conversations", type=int, default=2400, help="training conversations (businesses) (default 2400)")
    p.add_argument("--teacher-data", type=Path, default=None, metavar="FILE",
                   help="general replies mixed in (default: dlm/assets/smollm2-135m-teacher-greedy.jsonl.gz)")
    p.add_argument("--teacher-share", type=float, default=0.25,
                   help="share of training sequences that are the teacher's general replies (default 0.25)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop cleanly after this long; rerun to resume")
    p.add_argument("--eval-only", action="store_true", help="only evaluate DIR/adapter.safetensors")
    p.add_argument("--eval-conversations", type=int, default=64, help="held-out conversations to evaluate on")


def run(args: argparse.Namespace, config: Config) -> int:
    from dlm.threads import claim_for_engine

    # Training runs in this thread: give it the cores (the `voice-agent` command leaves other
    # threads one each, dlm.threads; without this, 1.6 draft-head steps/s instead of 2.8 on a
    # 2-core CPU). Not for the data steps: there the teacher decodes on the AR engine, in its
    # worker thread, and a second thread with a team of OpenMP threads slows that worker (libgomp
    # puts idle threads to sleep once they outnumber the cores: 15-18 ms a token against 8-10
    # where this thread had run a parallel product first; `adapt data`'s teacher 199-213 -> 213-229
    # tokens/s; session 32). `dlm.adapt.pipeline` claims where this thread does the work.
    if getattr(args, "step", None) not in ("data", "pipeline"):
        claim_for_engine()
    if args.step == "grounded":
        return _grounded(args)
    from dlm.adapt.cli import run as run_adapt

    return run_adapt(args)


def _grounded(args: argparse.Namespace) -> int:
    import random

    from dlm.adapt import pipeline
    from dlm.adapt.data import read_dataset
    from dlm.adapt.finetune import (
        ADAPTER_FILE,
        FinetuneConfig,
        conversation_seq,
        example_seq,
        finetune,
        target_loss,
    )
    from dlm.adapter import load_adapter, merge_adapter
    from dlm.chat import ChatFormatter
    from dlm.checkpoints import load_model
    from voice_agent.bench import grounded
    from voice_agent.bench import phone_bot as pb
    from voice_agent.errors import UserError
    from voice_agent.models import package_file

    if not 0 <= args.teacher_share < 1:
        raise UserError("--teacher-share must lie in [0, 1)")
    if not 1 <= args.conversations <= pb.HELDOUT_SEED:
        raise UserError(f"--conversations must lie in [1, {pb.HELDOUT_SEED}] (seeds from {pb.HELDOUT_SEED} are held out)")
    base = args.base or pipeline.default_base()
    teacher_file = args.teacher_data or package_file("package:dlm/assets/smollm2-135m-teacher-greedy.jsonl.gz")
    loaded = load_model(base, dtype="bfloat16")
    formatter = ChatFormatter(loaded.tokenizer, loaded.spec)
    _, teacher = read_dataset(teacher_file)
    teacher_train = [example_seq(e) for e in teacher if e.split == "train"]
    teacher_heldout = [example_seq(e) for e in teacher if e.split == "heldout"]
    heldout_convs = [conversation_seq(formatter, m, "heldout") for m in _heldout_conversations(args.eval_conversations)]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.eval_only:
        seqs = [conversation_seq(formatter, m, "grounded") for m in grounded.conversations(args.conversations)]
        n_teacher = min(len(teacher_train), round(len(seqs) * args.teacher_share / (1 - args.teacher_share)))
        seqs += random.Random(0).sample(teacher_train, n_teacher)
        print(f"grounded: {len(seqs) - n_teacher} business conversations + {n_teacher} teacher replies; "
              f"{args.max_steps} steps of {args.batch_size}", flush=True)
        cfg = FinetuneConfig(max_steps=args.max_steps, batch_size=args.batch_size, rank=args.rank,
                             alpha=2.0 * args.rank, lr=args.lr, time_budget_s=args.time_budget_s)
        finetune(loaded, seqs, cfg, out, base, info={"data": "voice_agent.bench.grounded",
                                                      "conversations": args.conversations,
                                                      "teacher": Path(teacher_file).name, "teacher_share": args.teacher_share})
    adapter_path = out / ADAPTER_FILE
    if not adapter_path.exists():
        raise UserError(f"{adapter_path} does not exist: train first (without --eval-only)")
    report = {"base": {"heldout_businesses": target_loss(loaded, heldout_convs),
                       "teacher_heldout": target_loss(loaded, teacher_heldout)}}
    merge_adapter(loaded.model, load_adapter(adapter_path, loaded.config, base))
    loaded.model.pack_linears()  # the packed copies were made from the unadapted weights
    report["adapted"] = {"heldout_businesses": target_loss(loaded, heldout_convs),
                         "teacher_heldout": target_loss(loaded, teacher_heldout)}
    (out / "grounded-eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print("mean loss per reply token (held-out businesses; the teacher's held-out general replies):")
    for name, r in report.items():
        print(f"  {name:8s} {r['heldout_businesses']:.3f}  {r['teacher_heldout']:.3f}")
    return 0


def _heldout_conversations(n: int) -> list[list[dict[str, str]]]:
    """Conversations like the training ones about held-out businesses (for the loss report only)."""
    import random

    from voice_agent.bench import grounded
    from voice_agent.bench import phone_bot as pb

    out = []
    for b in pb.heldout(n):
        rng = random.Random(b.seed)
        q, a = rng.choice(grounded.turns(b, rng))
        out.append([{"role": "system", "content": grounded.instructions(b, rng)},
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return out
