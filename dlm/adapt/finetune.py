"""Supervised fine-tuning of an AR chat model as a low-rank adapter (dlm/adapter.py), resumable,
on CPU in bf16.

Contract:
- `SupervisedSeq(ids, loss_mask, kind)`: one training sequence; `loss_mask[t]` says whether token
  t is a target (predicted from the tokens before it). `conversation_seq(formatter, messages,
  kind)` renders chat messages with the model's template and marks every assistant reply, and
  the end-of-turn token after it, as targets; `example_seq(example)` does the same for a teacher
  reply of dlm.adapt.data (prompt, reply).
- `finetune(loaded, seqs, cfg, out_dir, base_path, info)` trains an `Adapter` on the frozen model
  `loaded.model` and writes into `out_dir`:

      adapter.safetensors   the adapter in bf16 (`dlm.adapter.save_adapter`), written at every
                            checkpoint: the file to ship
      adapter-state.pt      fp32 weights, AdamW state and step: what a resumed run continues from
                            (never shipped, never committed)

  Sequences without a target, or longer than the model's context (a warning says how many), are
  left out. One step: a batch of sequences (right-padded; causal attention, so no real token
  sees padding), cross entropy over the target tokens only, gradients on the adapter only. The
  order of sequences depends on (seed, epoch) alone, so a resumed run sees the batches an
  uninterrupted one would (dlm.adapt.state). `time_budget_s` stops cleanly at a step boundary
  (rerun the same command to resume).
- `target_loss(loaded, seqs)`: the mean cross entropy per target token, without gradients (how
  well a model, adapted or not, predicts held-out replies).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dlm.adapt.data import Example
from dlm.adapt.state import batch_indices, data_fingerprint, lr_at, resume_state, save_state
from dlm.adapter import TARGETS, Adapter, AdapterConfig, save_adapter

__all__ = ["ADAPTER_FILE", "FinetuneConfig", "SupervisedSeq", "conversation_seq", "example_seq", "finetune",
           "target_loss"]

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "adapter-state.pt"


@dataclass
class SupervisedSeq:
    ids: list[int]
    loss_mask: list[bool]
    kind: str = ""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError("ids and loss_mask differ in length")


@dataclass
class FinetuneConfig:
    max_steps: int
    batch_size: int = 8
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS  # every projection of every layer
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25  # steps; 0: only at the end and at the time budget
    time_budget_s: float = 0.0  # 0: no limit


def conversation_seq(formatter: Any, messages: list[dict[str, str]], kind: str = "") -> SupervisedSeq:
    """Chat messages (a dlm.chat.ChatFormatter renders them) -> a sequence whose targets are the
    assistant replies, each with the end-of-turn token that closes it."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation ends with an assistant reply")
    ids = formatter.encode(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    eos = set(formatter.stop_token_ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = formatter.encode(messages[:k], add_generation_prompt=True)
        start, end = len(prompt), len(formatter.encode(messages[:k + 1], add_generation_prompt=False))
        if ids[:start] != prompt:
            raise ValueError("the chat template does not render a conversation as the prefixes of its turns")
        close = next((t for t in range(start, end) if ids[t] in eos), None)
        if close is None:
            raise ValueError("the chat template closes an assistant turn with no end-of-turn token")
        for t in range(start, close + 1):
            mask[t] = True
    return SupervisedSeq(ids, mask, kind)


def example_seq(example: Example) -> SupervisedSeq:
    """A teacher reply (prompt ids, reply ids ending with EOS) -> the reply as the target."""
    return SupervisedSeq(example.prompt_ids + example.reply_ids,
                         [False] * len(example.prompt_ids) + [True] * len(example.reply_ids), example.kind or "teacher")


def _batch_loss(model: Any, seqs: list[SupervisedSeq], pad_id: int) -> tuple[Tensor, int]:
    """Mean cross entropy over the batch's target tokens, and how many there were."""
    B, L = len(seqs), max(len(s.ids) for s in seqs)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    target = torch.full((B, L), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids = torch.tensor(s.ids)
        tokens[b, :len(s.ids)] = ids
        keep = torch.tensor(s.loss_mask[1:])
        target[b, :len(s.ids) - 1] = torch.where(keep, ids[1:], torch.full_like(ids[1:], -100))
    positions = torch.arange(L)[None].expand(B, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    h = model(tokens, positions, causal, hidden=True)
    sel = target >= 0
    logits = model.logits(h[sel][None])[0]  # (N, V): the head only where there is a target
    n = int(sel.sum())
    return F.cross_entropy(logits, target[sel]), n


def _save(out_dir: Path, adapter: Adapter, optimizer: torch.optim.Optimizer, step: int, cfg: FinetuneConfig,
          base_path: Path, info: dict[str, Any], data: str) -> None:
    save_state(out_dir / STATE_FILE, step, adapter, optimizer, cfg, data)
    save_adapter(out_dir / ADAPTER_FILE, adapter, base_path, {**info, "step": step, "train": asdict(cfg)})


def finetune(loaded: Any, seqs: list[SupervisedSeq], cfg: FinetuneConfig, out_dir: str | Path, base_path: str | Path,
             info: dict[str, Any] | None = None) -> Adapter:
    """Train (or resume) an adapter of the frozen `loaded.model`; see the module docstring."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seqs = [s for s in seqs if any(s.loss_mask[1:])]
    if not seqs:
        raise ValueError("no training sequence has a target token")
    fits = [s for s in seqs if len(s.ids) <= loaded.config.max_seq_len]
    if len(fits) < len(seqs):
        log.warning("finetune: %d of %d sequences are longer than the model's context of %d tokens: left out",
                    len(seqs) - len(fits), len(seqs), loaded.config.max_seq_len)
    if not fits:
        raise ValueError(f"every training sequence is longer than the model's context of {loaded.config.max_seq_len}")
    seqs = fits
    model = loaded.model
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    adapter = Adapter(loaded.config, AdapterConfig(rank=cfg.rank, alpha=cfg.alpha, targets=tuple(cfg.targets)))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    fingerprint = data_fingerprint((s.ids, s.loss_mask) for s in seqs)
    step = resume_state(out_dir / STATE_FILE, adapter, optimizer, cfg, fingerprint)
    if step:
        log.info("finetune: resuming from step %d of %d", step, cfg.max_steps)
    pad_id = loaded.spec.eos_token_ids[0] if loaded.spec.eos_token_ids else 0
    info = dict(info or {}, n_train=len(seqs))
    handles = adapter.attach(model)
    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="finetune", unit="step", mininterval=2.0)
    loss_ema = None
    try:
        while step < cfg.max_steps:
            if cfg.time_budget_s and time.monotonic() - started > cfg.time_budget_s:
                bar.write(f"finetune: time budget of {cfg.time_budget_s:.0f} s reached at step {step}; rerun to resume")
                break
            batch = [seqs[i] for i in batch_indices(len(seqs), step, cfg.batch_size, cfg.seed)]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss, _ = _batch_loss(model, batch, pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_at(step, cfg):.1e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save(out_dir, adapter, optimizer, step, cfg, Path(base_path), {**info, "loss_ema": loss_ema}, fingerprint)
    finally:
        Adapter.detach(handles)
        bar.close()
    _save(out_dir, adapter, optimizer, step, cfg, Path(base_path), {**info, "loss_ema": loss_ema}, fingerprint)
    return adapter


def target_loss(loaded: Any, seqs: list[SupervisedSeq], batch_size: int = 8) -> float:
    """Mean cross entropy per target token of `loaded.model` as it is (merge an adapter first)."""
    pad_id = loaded.spec.eos_token_ids[0] if loaded.spec.eos_token_ids else 0
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            loss, n = _batch_loss(loaded.model, seqs[start:start + batch_size], pad_id)
            total += float(loss) * n
            count += n
    return total / max(count, 1)
