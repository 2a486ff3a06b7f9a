"""Command line of the recipe: `python -m dlm.adapt STEP ...` and `voice-agent adapt STEP ...`.

Steps: data, train, eval, export, pipeline (all four, each skipped or resumed where its output
exists), drafter (train / resume / evaluate the draft-and-verify drafter on data.jsonl), bench (step times on a random model of the real shape), pack-gpu (what a bare CUDA
machine needs), split / join (files in checksummed parts).
`add_arguments(parser)` fills a parser (shared by both entry points); `run(args)` returns the
exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from dlm.adapt.data import Example

__all__ = ["add_arguments", "main", "run"]

STEPS = ("data", "train", "eval", "export", "pipeline")
# `adapt drafter`: tokens per forward on its training replies above the held-out ones by more than
# this share say that the drafter learnt its replies more than their kind (the shipped head: 83 %).
GENERALISATION_GAP = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The steps' options; returns the subparsers (voice-agent adapt adds its own steps)."""
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)
    for step in STEPS:
        p = sub.add_parser(step, help=f"run the {step} step" if step != "pipeline" else "data, train, eval, export")
        p.add_argument("--scale", choices=("tiny", "small", "cpu", "full"), default="tiny", help="preset sizes (default: tiny)")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the run folder")
        p.add_argument("--base", type=Path, default=None, help="the AR base/teacher (default: the embedded SmolLM2 GGUF)")
        p.add_argument("--time-budget-s", type=float, default=0.0,
                       help="stop generation/training cleanly after this long (0: no limit); rerun to resume")
        p.add_argument("--n-prompts", type=int, help="override the preset's prompt count")
        p.add_argument("--n-heldout", type=int, help="override the preset's held-out prompt count")
        p.add_argument("--sampled-per-prompt", type=int, help="override the sampled replies per prompt")
        p.add_argument("--block-size", type=int, choices=(16, 32), help="override the block size")
        p.add_argument("--batch-size", type=int, help="override the training batch size")
        p.add_argument("--lr", type=float, help="override the learning rate")
        p.add_argument("--epochs", type=float, help="override the schedule's length in epochs")
        p.add_argument("--gen-batch-size", type=int, help="override the teacher's batch size")
        p.add_argument("--seed", type=int, help="override the preset's seed (0): the prompts, sampling and "
                                                 "training order; another seed makes other data")
        p.add_argument("--max-steps", type=int, default=0, help="fix the schedule's length in steps")
        p.add_argument("--eval-prompts", type=int, default=0, help="evaluate on at most this many held-out prompts")
        p.add_argument("--student", type=Path, default=None,
                       help="eval/export: this bd checkpoint instead of the run's train/student.safetensors")
        p.add_argument("--train-budget-s", type=float, default=0.0,
                       help="pipeline: time budget of the training step alone (0: --time-budget-s)")
        if step == "data":
            p.add_argument("--adapter", type=Path, default=None, metavar="FILE",
                           help="the teacher is the base with this adapter merged (dlm.adapter), e.g. the "
                                "grounded one: a drafter for that model trains on its replies")
            p.add_argument("--teacher-weights", choices=("hf", "blocks", "blocks-amx", "blocks-bf16", "blocks-int16"), default="hf",
                           help="hf: Hugging Face generate (default); blocks / blocks-amx / blocks-bf16 / "
                                "blocks-int16: this project's AR engine on a GGUF's own blocks (float32 / "
                                "float32-accurate on AMX / AMX bf16 / 16-bit integer products on AVX512-VNNI, "
                                "the default's arithmetic on a CPU without AMX), several times faster on CPU")
            p.add_argument("--prompts", choices=("templates", "self", "file"), default=None,
                           help="templates: the generated voice prompts (default); self: requests the teacher "
                                "writes itself from the first words of one (Magpie), wider than the templates; "
                                "file: requests people wrote, from --requests")
            p.add_argument("--requests", type=Path, default=None, metavar="FILE",
                           help="a text file of requests, one a line (implies --prompts file): up to --n-prompts "
                                "of them, shuffled by --seed, the last --n-heldout held out")
            p.add_argument("--first-prompt", type=int, default=0,
                           help="skip the generated prompts before this index (new prompts after an earlier "
                                "data set made with the same seed)")
    p = sub.add_parser("drafter", help="train (or resume) and evaluate a drafter for exact draft-and-verify "
                                       "decoding on the run's data.jsonl (teacher greedy replies)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the run folder")
    p.add_argument("--data", type=Path, nargs="+", default=None, metavar="FILE",
                   help="the teacher's replies (default: DIR/data.jsonl; the embedded SmolLM2's are "
                        "dlm/assets/smollm2-135m-teacher-greedy.jsonl.gz); with several files, the held-out "
                        "replies are the first file's, and training replies to those prompts are left out")
    p.add_argument("--init", type=Path, default=None, metavar="FILE",
                   help="start from this drafter file (e.g. the shipped one) where DIR holds no state yet")
    p.add_argument("--base", type=Path, default=None, help="the AR model (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--adapter", type=Path, default=None, metavar="FILE",
                   help="merge this adapter (dlm.adapter) into the base: the drafter is trained for, and "
                        "only loads onto, the base with it")
    p.add_argument("--kind", choices=("head", "slots"), default="head",
                   help="head (default): a draft head after the verifying forward (dlm/draft_head.py); slots: "
                        "mask slots with a LoRA adapter inside it (dlm/drafter.py)")
    p.add_argument("--dtype", default=None,
                   help="the base's dtype while training (default: float32 on the GGUF's blocks for a head, the "
                        "serving arithmetic; bfloat16 for slots: AMX)")
    p.add_argument("--epochs", type=float, default=1.0, help="slots: the schedule's length in epochs")
    p.add_argument("--max-steps", type=int, default=None,
                   help="fix the schedule's length in steps (head default: 3000; 0: a head's features and "
                        "evaluation only)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (slots, default 8) or reply "
                                                             "positions per step (head, default 256)")
    p.add_argument("--cuts", type=int, default=8, help="slots: draft blocks per sequence per step")
    p.add_argument("--slots", type=int, default=6, help="mask slots per draft block (the longest draft)")
    p.add_argument("--window", type=int, default=4, help="head: context pairs (hidden state, token) it reads")
    p.add_argument("--layers", type=int, default=2, help="head: transformer layers")
    p.add_argument("--rank", type=int, default=32, help="slots: LoRA rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--soft", type=float, default=0.0,
                   help="head: share of the loss that matches the teacher's whole distribution at each target "
                        "(distillation), beside its greedy token (default 0)")
    p.add_argument("--feature-layers", default="", metavar="I,J,...",
                   help="head: also read these base layers' outputs (EAGLE-3's low/mid features; training and "
                        "evaluation only, the engine does not feed them yet)")
    p.add_argument("--causal", action="store_true",
                   help="head: draft one place at a time, each slot reading the draft before it (EAGLE's order; "
                        "with --init, a parallel head's weights become a causal head's start)")
    p.add_argument("--device", default="cpu", help="head: where the base's features and the training run (cpu, cuda)")
    p.add_argument("--max-vocab", type=int, default=0, metavar="N",
                   help="head: draft only the N tokens the training replies use most (default 0: every token "
                        "they use, and an --init head's; each costs its output row's products at every pass)")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop cleanly after this long; rerun to resume")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the run's drafter.safetensors")
    p.add_argument("--eval-examples", type=int, default=64, help="held-out replies to evaluate on")
    p = sub.add_parser("bench", help="time training and teacher-decoding steps on a random SmolLM2-135M-shaped model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64, help="training examples per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training example")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--gen-batch-size", type=int, default=768)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the result as JSON")
    p = sub.add_parser("pack-gpu", help="prepare upload folders for a bare CUDA machine (base GGUF parts + gguf)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-upload"), metavar="DIR")
    p.add_argument("--base", type=Path, default=None)
    p = sub.add_parser("split", help="split a file into checksummed parts (default 16 MB)")
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--part-bytes", type=int, default=None)
    p = sub.add_parser("join", help="reassemble parts from their manifest, checking every checksum")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument("--search", type=Path, action="append", default=[], metavar="DIR", help="more folders holding parts")
    return sub


def run(args: argparse.Namespace) -> int:
    from dlm.adapt import pack, pipeline

    log = logging.getLogger("dlm.adapt")
    if args.step == "pack-gpu":
        folders = pack.pack_for_gpu(args.out, args.base or pipeline.default_base())
        for f in folders:
            print(f"{f}  ({sum(p.stat().st_size for p in f.rglob('*') if p.is_file()) / 1e6:.1f} MB)")
        return 0
    if args.step == "bench":
        from dlm.adapt.bench import bench

        result = bench(args.device, batch_size=args.batch_size, seq_len=args.seq_len, train_steps=args.train_steps,
                       gen_batch_size=args.gen_batch_size, new_tokens=args.new_tokens)
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return 0
    if args.step == "split":
        manifest = pack.split_file(args.file, args.out, args.part_bytes or pack.RETURN_PART_BYTES)
        print(manifest)
        return 0
    if args.step == "join":
        print(pack.join_parts(args.manifest, args.out, args.search))
        return 0

    if args.step == "drafter":
        return _drafter(args, pipeline.default_base())

    scale = pipeline.scale_with(args.scale, n_prompts=args.n_prompts, n_heldout=args.n_heldout,
                                sampled_per_prompt=args.sampled_per_prompt, block_size=args.block_size,
                                batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
                                gen_batch_size=args.gen_batch_size, seed=args.seed)
    if args.step in ("data", "pipeline") and (reason := pipeline.prompt_split_error(scale)):
        print(reason)
        return 2
    base = args.base or pipeline.default_base()
    run_dir: Path = args.out
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.step in ("data", "pipeline"):
        pipeline.run_data(run_dir, base, scale, args.device, args.time_budget_s, adapter=getattr(args, "adapter", None),
                          teacher_weights=getattr(args, "teacher_weights", "hf"),
                          first_prompt=getattr(args, "first_prompt", 0),
                          prompt_source=_prompt_source(args), requests=getattr(args, "requests", None))
    if args.step in ("train", "pipeline"):
        info = pipeline.run_train(run_dir, base, scale, args.device, args.train_budget_s or args.time_budget_s,
                                  args.max_steps)
        log.info("train: step %d of %d, loss %.3f, %.0f tokens/s", info["step"], info["max_steps"], info["last_loss"],
                 info["tokens_per_s"])
        if not info["finished"]:
            print(f"training stopped at step {info['step']} of {info['max_steps']}: run the same command again to resume")
            return 3
    if args.step in ("eval", "pipeline"):
        info = pipeline.run_eval(run_dir, base, scale, args.device, student=args.student, n_prompts=args.eval_prompts)
        print((run_dir / "eval.md").read_text())
        print(json.dumps(info["bars"]))
    if args.step in ("export", "pipeline"):
        path = pipeline.run_export(run_dir, student=args.student)
        print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _prompt_source(args: argparse.Namespace) -> str:
    """`--prompts`, where given (a requests file implies "file"; SystemExit where they disagree)."""
    source, requests = getattr(args, "prompts", None), getattr(args, "requests", None)
    if requests is not None and source not in (None, "file"):
        raise SystemExit(f"--requests goes with --prompts file, not --prompts {source}")
    if source == "file" and requests is None:
        raise SystemExit("--prompts file needs --requests FILE")
    return "file" if requests is not None else source or "templates"


def _drafter(args: argparse.Namespace, default_base: Path) -> int:
    import math

    import torch

    from dlm.adapt.data import draftable, read_dataset
    from dlm.adapt.draft import DRAFTER_FILE
    from dlm.adapt.pipeline import DATA_FILE
    from dlm.checkpoints import load_model, runnable_weights
    from dlm.drafter import load_drafter
    from dlm.tuned_file import file_sha256

    if args.max_vocab < 0:
        print(f"--max-vocab must be >= 0 (0: no cap), not {args.max_vocab}")
        return 2
    if args.eval_examples < 1:
        print(f"--eval-examples must be >= 1, not {args.eval_examples}")
        return 2
    base = args.base or default_base
    files = args.data or [args.out / DATA_FILE]
    for data in files:
        if not data.exists():
            print(f"{data} does not exist: make it first with: python -m dlm.adapt data --scale cpu --out {args.out}")
            return 2
    sets = [read_dataset(data) for data in files]
    meta = sets[0][0]
    heldout = [e for e in sets[0][1] if e.split == "heldout"]
    held_prompts = {tuple(e.prompt_ids) for e in heldout}

    def training(examples: list[Example]) -> list[Example]:
        return [e for e in examples if e.split == "train" and tuple(e.prompt_ids) not in held_prompts]

    train_set = [e for _, examples in sets for e in training(examples)]
    heldout = draftable(heldout)[: args.eval_examples]
    if not heldout:
        print(f"{files[0]}: no held-out reply with a token to draft (two tokens or more): nothing to evaluate a "
              "drafter on (make the data with held-out prompts, --n-heldout)")
        return 2
    # As many of the first file's training replies: beside the held-out figures, how much of what
    # the drafter drafts it learnt by heart (evaluated where the drafter trained on that file).
    training_sample = draftable(training(sets[0][1]))[: len(heldout)]
    shas = [file_sha256(data) for data in files]
    info = {"data": [data.name for data in files], "data_sha256": shas, "teacher": Path(str(meta.get("base"))).name}
    if args.kind == "head":
        from dlm.adapt.head import HeadTrainConfig, evaluate_head, train_head

        # The head learns from the hidden states decoding will compute: float32 (on AMX where it
        # runs: the same accuracy, the features' prefills 1.7x faster; on a GPU dense float32,
        # TF32 off as torch leaves it).
        if args.dtype in (None, "float32"):
            on_cpu = torch.device(args.device).type == "cpu"
            blocks = on_cpu and str(base).endswith(".gguf") and not args.feature_layers  # one call: no layer taps
            weights = runnable_weights("blocks-amx")[0] if blocks else "dense"
            loaded = load_model(base, device=args.device, weights=weights, dtype=torch.float32, adapter=args.adapter,
                                inference_only=True)
        else:
            loaded = load_model(base, device=args.device, dtype=args.dtype, adapter=args.adapter)
        if not args.eval_only:
            steps = 3000 if args.max_steps is None else args.max_steps
            cfg = HeadTrainConfig(max_steps=steps, batch_size=args.batch_size or 256, window=args.window,
                                  n_slots=args.slots, n_layers=args.layers, lr=args.lr, soft=args.soft,
                                  feature_layers=tuple(int(i) for i in args.feature_layers.split(",") if i),
                                  time_budget_s=args.time_budget_s, max_vocab=args.max_vocab, causal=args.causal)
            init = load_drafter(args.init, loaded, check_base=False) if args.init else None
            if (refused := _train(train_head, loaded, train_set, cfg, args.out, base, info=info, init=init)) is not None:
                return refused
        head = load_drafter(args.out / DRAFTER_FILE, loaded)

        def evaluate(examples: list[Example]) -> dict:
            return evaluate_head(loaded, head, examples)
    else:
        from dlm.adapt.draft import DraftTrainConfig, evaluate_drafter, train_drafter

        loaded = load_model(base, dtype=args.dtype or "bfloat16", adapter=args.adapter)
        if not args.eval_only:
            batch_size = args.batch_size or 8
            steps = args.max_steps or max(1, math.ceil(args.epochs * len(train_set) / batch_size))
            cfg = DraftTrainConfig(max_steps=steps, batch_size=batch_size, cuts_per_seq=args.cuts, n_slots=args.slots,
                                   rank=args.rank, alpha=float(args.rank), lr=args.lr, time_budget_s=args.time_budget_s)
            # A starting point only: it may come from the base without the adapter (the teacher before).
            init = load_drafter(args.init, loaded, check_base=False) if args.init else None
            args.out.mkdir(parents=True, exist_ok=True)
            if (refused := _train(train_drafter, loaded, train_set, cfg, args.out, base, info=info, init=init)) is not None:
                return refused
        drafter = load_drafter(args.out / DRAFTER_FILE, loaded)

        def evaluate(examples: list[Example]) -> dict:
            return evaluate_drafter(loaded, drafter, examples, drafter.n_slots)
    with torch.no_grad():
        report = evaluate(heldout)
        if training_sample and _trained_on(args.out / DRAFTER_FILE, shas[0], files[0].name):
            report["training_replies"] = evaluate(training_sample)
    (args.out / "drafter-eval.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    if "training_replies" in report:
        trained = report["training_replies"]
        print(_generalisation(report["tokens_per_forward_by_draft_len"], trained["tokens_per_forward_by_draft_len"],
                              report["examples"], trained["examples"]))
    return 0


def _generalisation(heldout: dict, trained: dict, n_heldout: int, n_trained: int) -> str:
    """A line comparing the tokens per forward on held-out replies (by draft length: `heldout`)
    with those on replies the drafter trained on (`trained`), at its longest draft length."""
    k = max(heldout, key=int)
    gap = trained[k] / max(heldout[k], 1e-9) - 1
    if gap > GENERALISATION_GAP:
        verdict = (f"{gap:.0%} more on the replies it trained on: it learnt them more than their kind, and replies "
                   "it has not seen, not more steps on these, are what it needs")
    elif gap < -GENERALISATION_GAP:
        verdict = f"{-gap:.0%} fewer on the replies it trained on: those are harder to draft than the held-out ones"
    else:
        verdict = "about the same on both: it drafts replies it has not seen about as well as those it learnt from"
    return (f"tokens per forward at draft length {k}: {heldout[k]:.3f} on {n_heldout} held-out replies, "
            f"{trained[k]:.3f} on {n_trained} it trained on ({verdict})")


def _recorded_data(drafter: Path) -> dict:
    """The drafter file's record of its training data ({} where there is no file yet)."""
    from dlm.drafter import read_drafter_meta

    return read_drafter_meta(drafter).get("info", {}) if drafter.exists() else {}


def _train(trainer: Callable[..., Any], loaded: Any, train_set: list[Example], cfg: Any, out: Path, base: Path, **kwargs: Any) -> int | None:
    """Run a drafter trainer; 2, with its message, where out holds a run it cannot continue
    (other settings or other training examples: dlm.adapt.state), else None."""
    from dlm.adapt.draft import DRAFTER_FILE
    from dlm.errors import ResumeError

    try:
        trainer(loaded, train_set, cfg, out, base, **kwargs)
    except ResumeError as e:
        print(f"{e} (to go on from its drafter on these files: another --out, with --init {out / DRAFTER_FILE})")
        return 2
    return None


def _trained_on(drafter: Path, sha: str, name: str) -> bool:
    """Whether the drafter trained on the data file of this sha256 (and name): by the sha256 its
    record keeps since session 47; in an older record by the name alone, unless it is the run
    folder's DATA_FILE, which every run's data shares."""
    from dlm.adapt.pipeline import DATA_FILE

    info = _recorded_data(drafter)
    if "data_sha256" in info:
        return sha in info["data_sha256"]
    return name != DATA_FILE and name in info.get("data", [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlm.adapt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)
