"""What the resumable training runs of dlm.adapt share: the learning-rate schedule, the batch
order, and the state file of a run that trains a small module on a frozen base (the drafter,
dlm/adapt/draft.py; an adapter, dlm/adapt/finetune.py).

Contract:
- `lr_at(step, cfg)`: linear warmup over `cfg.warmup_steps`, then cosine from `cfg.lr` to
  `cfg.lr * cfg.min_lr_ratio` at `cfg.max_steps` (any config with those fields).
- `batch_indices(n, step, batch_size, seed)`: the indices of step's batch out of n items: an order
  shuffled per epoch that depends on (seed, epoch) only, so a resumed run sees the batches an
  uninterrupted one would.
- `save_state(path, step, module, optimizer, cfg)` writes {step, weights (fp32), optimizer,
  config} atomically; `resume_state(path, module, optimizer, cfg)` loads it into module and
  optimizer and returns the step (0 where there is no file). A run saved with another batch size
  or seed raises RuntimeError: its order of batches would not continue. A larger `max_steps`
  (or another learning rate) is how a finished run is trained further.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["batch_indices", "lr_at", "resume_state", "save_state"]


def lr_at(step: int, cfg: Any) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    per_epoch = math.ceil(n / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)  # depends on (seed, epoch) only
    return order[index * batch_size:(index + 1) * batch_size]


def save_state(path: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "weights": {k: v.detach().float() for k, v in module.state_dict().items()},
                "optimizer": optimizer.state_dict(), "config": asdict(cfg)}, tmp)
    tmp.replace(path)


def resume_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any) -> int:
    if not path.exists():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    changed = [k for k in ("batch_size", "seed") if saved["config"].get(k) != getattr(cfg, k)]
    # A draft head's `causal` too (the same weights' shapes, another model; absent before session 39: False)
    if bool(saved["config"].get("causal")) != bool(getattr(cfg, "causal", False)):
        changed.append("causal")
    if changed:
        raise RuntimeError(f"{path.parent} was trained with another {' and '.join(changed)}: resuming would not "
                           f"continue the same run; use the same settings or delete {path} to restart")
    module.load_state_dict(saved["weights"])
    optimizer.load_state_dict(saved["optimizer"])
    return int(saved["step"])
