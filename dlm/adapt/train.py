"""Training: the masked-diffusion objective on the teacher's replies, resumable.

Contract: `train(model, spec, tokenizer, examples, cfg, out_dir)` fine-tunes `model` in place
under `dlm.adapt.objective` (complementary masks, token shift, x_t ⊕ x_0 in one forward) with
AdamW, linear warmup then cosine decay to `min_lr_ratio`, gradient clipping, and bfloat16
autocast on CUDA. Every `checkpoint_every` steps, at the end and when the time budget runs out it
writes two files into `out_dir`:

    student.safetensors   the weights as a `dlm.bd_format` file (float32, family "bd"), loadable
                          by `dlm.checkpoints.load_model`; extra metadata: step, recipe
    optimizer.pt          AdamW state and the step it belongs to

and resumes from them when they exist. The batch order depends only on (seed, epoch) and the
masks only on (seed, step), so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dlm.adapt.data import Example, steps_per_epoch, training_batches
from dlm.adapt.objective import diffusion_loss, diffusion_targets
from dlm.adapt.state import lr_at
from dlm.bd_format import read_bd_checkpoint, save_bd_checkpoint
from dlm.config import DiffusionSpec
from dlm.errors import ResumeError
from dlm.model import Transformer

__all__ = ["STUDENT_FILE", "TrainConfig", "TrainResult", "lr_at", "train"]

STUDENT_FILE = "student.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainConfig:
    max_steps: int  # the schedule's length; a resumed run continues towards it
    batch_size: int = 32  # examples per step (each used twice: mask and complement)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200  # steps; 0: only at the end and at the time budget
    time_budget_s: float = 0.0  # 0: no limit; else stop (with a checkpoint) after this long
    stop_at_step: int = 0  # 0: run to max_steps; else stop (with a checkpoint) at this step
    log_every: int = 10  # steps between loss log lines


@dataclass
class TrainResult:
    step: int  # steps done so far (over all runs)
    finished: bool  # step == max_steps
    last_loss: float  # mean loss of the last logging window
    tokens_per_s: float  # real (unpadded) tokens through the model per second, this run
    seconds: float  # wall time of this run
    history: list[tuple[int, float]]  # (step, mean loss) per logging window


def _save(out_dir: Path, model: Transformer, spec: DiffusionSpec, tokenizer: Any,
          optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    # Optimizer first: a crash between the two files leaves a student older than its optimizer
    # state, which resume detects by the step numbers; never the other way round.
    opt_tmp = out_dir / (OPTIMIZER_FILE + ".tmp")
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, opt_tmp)
    opt_tmp.replace(out_dir / OPTIMIZER_FILE)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    save_bd_checkpoint(out_dir / STUDENT_FILE, state, model.config, spec, tokenizer, dtype=torch.float32,
                       extra={"step": str(step), "train_config": json.dumps(asdict(cfg))})


def _resume(out_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    student, opt_file = out_dir / STUDENT_FILE, out_dir / OPTIMIZER_FILE
    if not (student.exists() and opt_file.exists()):
        return 0
    ckpt = read_bd_checkpoint(student)
    saved = torch.load(opt_file, map_location="cpu", weights_only=True)
    step = int(ckpt.extra["step"])
    if saved["step"] != step:
        raise ResumeError(f"{out_dir}: student at step {step} but optimizer at {saved['step']}; delete both to restart")
    before = json.loads(ckpt.extra["train_config"])
    changed = [k for k in ("max_steps", "batch_size", "lr", "warmup_steps", "seed") if before[k] != getattr(cfg, k)]
    if changed:
        raise ResumeError(f"{out_dir} was trained with other settings ({', '.join(changed)}): resuming would not "
                          f"continue the same run; use the same settings or delete {out_dir} to restart")
    device = model.model.embed_tokens.weight.device
    model.load_state_dict({k: v.to(device) for k, v in ckpt.state_dict.items()})
    optimizer.load_state_dict(saved["optimizer"])
    return step


def train(model: Transformer, spec: DiffusionSpec, tokenizer: Any, examples: list[Example], cfg: TrainConfig,
          out_dir: str | Path) -> TrainResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.mask_token_id is None:
        raise ValueError("the spec has no mask token: convert the model first (dlm.adapt.convert)")
    device = model.model.embed_tokens.weight.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
    step = start_step = _resume(out_dir, model, optimizer, cfg)
    pad_id = spec.eos_token_ids[0]
    eos_id = spec.eos_token_ids[0] if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id)
    batches = training_batches(examples, batch_size=cfg.batch_size, block_size=spec.block_size, eos_id=eos_id,
                               pad_id=pad_id, seed=cfg.seed, start_step=step)
    epochs = cfg.max_steps / max(steps_per_epoch(len(examples), cfg.batch_size), 1)
    t0 = time.monotonic()
    n_tokens = 0
    window: list[float] = []
    history: list[tuple[int, float]] = []
    last_loss = float("nan")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train ({epochs:.2f} epochs)", unit="step", mininterval=2.0)
    stop = min(cfg.stop_at_step or cfg.max_steps, cfg.max_steps)
    while step < stop:
        if cfg.time_budget_s and time.monotonic() - t0 > cfg.time_budget_s:
            bar.write(f"train: time budget of {cfg.time_budget_s:.0f} s reached at step {step}; rerun to resume")
            break
        batch = next(batches)
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        targets = diffusion_targets(batch.tokens.to(device), batch.supervised.to(device), block_size=spec.block_size,
                                    mask_id=spec.mask_token_id, generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast:
            loss = diffusion_loss(model, targets, spec.block_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        n_tokens += batch.n_real_tokens
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last_loss = sum(window) / len(window)
            history.append((step, last_loss))
            window.clear()
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1] if window else last_loss:.3f}", lr=f"{lr_at(step - 1, cfg):.1e}",
                        tok_s=f"{n_tokens / (time.monotonic() - t0):.0f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            _save(out_dir, model, spec, tokenizer, optimizer, step, cfg)
    bar.close()
    if window:
        last_loss = sum(window) / len(window)
        history.append((step, last_loss))
    if step > start_step or not (out_dir / STUDENT_FILE).exists():
        _save(out_dir, model, spec, tokenizer, optimizer, step, cfg)
    model.eval()
    seconds = time.monotonic() - t0
    return TrainResult(step=step, finished=step >= cfg.max_steps, last_loss=last_loss,
                       tokens_per_s=n_tokens / max(seconds, 1e-9), seconds=seconds, history=history)
