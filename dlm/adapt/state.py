"""What the resumable training runs of dlm.adapt share: the learning-rate schedule, the batch
order, and the state file of a run that trains a small module on a frozen base (the draft head,
dlm/adapt/head.py; the mask-slot drafter, dlm/adapt/draft.py; an adapter, dlm/adapt/finetune.py).

Contract:
- `lr_at(step, cfg)`: linear warmup over `cfg.warmup_steps`, then cosine from `cfg.lr` to
  `cfg.lr * cfg.min_lr_ratio` at `cfg.max_steps` (any config with those fields).
- `batch_indices(n, step, batch_size, seed)`: the indices of step's batch out of n items: an order
  shuffled per epoch that depends on (seed, epoch) only, so a resumed run sees the batches an
  uninterrupted one would.
- `data_fingerprint(rows)`: the sha256 of a run's training rows in their order, each row a few
  int sequences (a teacher reply's prompt and reply ids; a sequence's ids and loss mask).
- `save_state(path, step, module, optimizer, cfg, data)` writes {step, weights (fp32), optimizer,
  config, data (the fingerprint)} atomically; `resume_state(path, module, optimizer, cfg, data)`
  loads it into module and optimizer and returns the step (0 where there is no file).
  `check_resumable(path, cfg, data)` is its check alone, returning the state for
  `load_resumed(saved, module, optimizer)`, for a trainer that has minutes of work to do between
  the two (the draft head's features), so the file is read once: a state saved with another batch
  size, seed or head kind, or on other training rows, raises dlm.errors.ResumeError, since the
  resumed run would not continue the same one (its batches would change, or steps on new data
  would follow steps on the old under one record). A state saved before the fingerprint was
  kept (session 48) resumes on any rows: its run cannot be told apart. A larger `max_steps` (or
  another learning rate) is how a finished run is trained further.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.errors import ResumeError

__all__ = ["batch_indices", "check_resumable", "data_fingerprint", "load_resumed", "lr_at", "resume_state",
           "save_state"]


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


def data_fingerprint(rows: Iterable[Sequence[Sequence[int]]]) -> str:
    """The sha256 of training rows in their order: each row's part count and lengths, then its
    parts' values (so a token moved from a prompt to its reply changes it too)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(array("q", [len(row), *(len(part) for part in row)]).tobytes())
        for part in row:
            h.update(array("q", part).tobytes())
    return h.hexdigest()


def save_state(path: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
               data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "weights": {k: v.detach().float() for k, v in module.state_dict().items()},
                "optimizer": optimizer.state_dict(), "config": asdict(cfg), "data": data}, tmp)
    tmp.replace(path)


def check_resumable(path: Path, cfg: Any, data: str) -> dict | None:
    """The state saved at path (None where there is none), once it is known to continue this run:
    ResumeError where it was saved with another batch size, seed or head kind, or on training rows
    of another fingerprint than `data` (a state saved before session 48 keeps none)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    changed = [k for k in ("batch_size", "seed") if saved["config"].get(k) != getattr(cfg, k)]
    # A draft head's `causal` too (the same weights' shapes, another model; absent before session 39: False)
    if bool(saved["config"].get("causal")) != bool(getattr(cfg, "causal", False)):
        changed.append("causal")
    if changed:
        raise ResumeError(f"{path.parent} was trained with another {' and '.join(changed)}: resuming would not "
                          f"continue the same run; use the same settings, another output folder, or delete {path} "
                          "to restart")
    if saved.get("data") not in (None, data):
        raise ResumeError(f"{path.parent} was trained on other data (other training examples, or the same ones "
                          f"filtered or ordered otherwise): resuming would follow its steps with steps on these "
                          f"under one record; use another output folder, or delete {path} to restart")
    return saved


def load_resumed(saved: dict | None, module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """A state `check_resumable` returned, loaded into module and optimizer: its step (0: none)."""
    if saved is None:
        return 0
    module.load_state_dict(saved["weights"])
    optimizer.load_state_dict(saved["optimizer"])
    return int(saved["step"])


def resume_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, data: str) -> int:
    return load_resumed(check_resumable(path, cfg, data), module, optimizer)
