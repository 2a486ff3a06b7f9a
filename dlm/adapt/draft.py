"""Training the drafter (dlm/drafter.py) on the teacher's greedy replies, resumable, on CPU in bf16.

Contract: `train_drafter(loaded, examples, cfg, out_dir, base_path)` trains a `Drafter` for the
frozen AR model `loaded` and writes into `out_dir`:

    drafter.safetensors   the drafter in bf16 (`dlm.drafter.save_drafter`: config, base fingerprint,
                          that of the adapter merged into the base (`loaded.adapter`) if any,
                          training info), the file to ship; written at every checkpoint
    drafter-state.pt      fp32 weights, AdamW state and step: what a resumed run continues from
                          (never shipped, never committed)

One step: a batch of (prompt, teacher reply) sequences runs once through the frozen base without
gradients (its K/V go into a KV cache, as in decoding); then `cuts_per_seq` draft blocks per
sequence, each placed after a random position q of the reply (the last token the verifier has
seen, q >= the prompt's last position), run with gradients through the base's layers plus the
adapter, attending to the cached K/V up to q and causally inside their block, exactly as
`dlm.speculative` lays them out. Slot i of a block learns the teacher's token at q + 2 + i (cross
entropy, weight `slot_decay ** i`: a draft only counts if every earlier one was accepted). Only
the adapter has gradients; no weight gradient of the base is ever computed.

`evaluate_drafter(loaded, drafter, examples, n_slots)` reports, on held-out replies, each slot's
top-1 agreement with the teacher and, for each draft length n, the tokens per forward that greedy
verification with a draft block after every position gets (the tree layout): 1 + the number of
leading slots that agree, at most n. The engine's own count (`voice-agent bench llm`) is the
measure; this one is quick and needs no decoding.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dlm.adapt.data import Example, draftable, replies_fingerprint
from dlm.adapt.state import batch_indices, lr_at, resume_state, save_state
from dlm.drafter import Drafter, DrafterConfig, save_drafter
from dlm.model import DraftInputs, Transformer

__all__ = ["DRAFTER_FILE", "DraftTrainConfig", "draft_batch_loss", "evaluate_drafter", "train_drafter"]

log = logging.getLogger(__name__)

DRAFTER_FILE = "drafter.safetensors"
STATE_FILE = "drafter-state.pt"


@dataclass
class DraftTrainConfig:
    max_steps: int
    batch_size: int = 8  # sequences per step
    cuts_per_seq: int = 12  # draft blocks per sequence per step
    n_slots: int = 8
    rank: int = 32
    alpha: float = 32.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    slot_decay: float = 0.8
    seed: int = 0
    checkpoint_every: int = 50  # steps; 0: only at the end and at the time budget
    time_budget_s: float = 0.0  # 0: no limit


def _layout(examples: list[Example], cuts: list[list[int]], n: int, pad_id: int) -> dict[str, Tensor]:
    """Tensors of one step: the base batch (prompt + reply, padded; one cache row per sequence)
    and the draft blocks, one batch row per block (C blocks per sequence), each pointing at its
    sequence's cache row and writing its own K/V past the text, block c of a sequence at
    positions L + c*n .. L + c*n + n - 1 (without gradients the writes land in the shared row,
    so blocks must not share positions)."""
    B = len(examples)
    seqs = [e.prompt_ids + e.reply_ids for e in examples]
    L = max(len(s) for s in seqs)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.tensor(s)
    C = len(cuts[0])
    q = torch.tensor(cuts, dtype=torch.long).view(B * C, 1)  # (B*C, 1): the block's last seen position
    i = torch.arange(n)[None, :]  # (1, n)
    pos = q + 1 + i  # (B*C, n)
    target_pos = q + 2 + i
    seq = torch.cat([tokens, torch.full((B, n + 2), -100, dtype=torch.long)], dim=1)  # past the text: no target
    lengths = torch.tensor([len(s) for s in seqs]).repeat_interleave(C)[:, None]
    rows = torch.arange(B).repeat_interleave(C)
    target = seq[rows[:, None], target_pos.clamp_max(seq.shape[1] - 1)]
    target = torch.where(target_pos < lengths, target, torch.full_like(target, -100))
    base = L + torch.arange(C).repeat(B)[:, None] * n  # (B*C, 1): where each block's K/V go
    wpos = base + i  # (B*C, n)
    keys = torch.arange(L + C * n)[None, None, :]  # (1, 1, K)
    lim = (q + 1).expand(-1, n)[..., None]  # the text up to q
    own = (keys >= base[..., None]) & (keys <= wpos[..., None])  # this block's slots up to the query's own
    mask = (keys < lim) | own  # (B*C, n, K)
    return {"tokens": tokens, "rows": rows, "pos": pos, "wpos": wpos, "mask": mask[:, None],
            "slot": i.expand(B * C, n), "target": target, "L": L, "C": C}


def _cut_range(e: Example) -> range:
    """Where a draft block may follow in a sequence: q, the last position the verifier has seen,
    from the prompt's last token to the reply's second-to-last (so slot 0 has a target)."""
    P = len(e.prompt_ids)
    return range(P - 1, P + len(e.reply_ids) - 2)


def _cuts(examples: list[Example], k: int, rng: random.Random) -> list[list[int]]:
    """k draft-block positions q per sequence (`_cut_range`), without repeats where there are enough."""
    out = []
    for e in examples:
        choices = list(_cut_range(e))
        out.append(rng.sample(choices, k) if len(choices) >= k else [rng.choice(choices) for _ in range(k)])
    return out


def _draft_hidden(model: Transformer, drafter: Drafter, lay: dict[str, Tensor], n: int) -> Tensor:
    """The base over the text without gradients (K/V into a cache), then the draft blocks over
    it: their final hidden states (B*C, n, dim)."""
    B, L = lay["tokens"].shape
    cache = model.new_cache(B, L + lay["C"] * n)
    with torch.no_grad():
        positions = torch.arange(L)[None].expand(B, L)
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
        model(lay["tokens"], positions, causal, cache=cache, cache_rows=torch.arange(B),
              out_index=torch.zeros(B, 1, dtype=torch.long))
    blocks = lay["pos"].shape[0]
    return model(torch.zeros(blocks, n, dtype=torch.long), lay["pos"], lay["mask"], cache=cache, cache_rows=lay["rows"],
                 write_positions=lay["wpos"], draft=DraftInputs(drafter, 0, lay["slot"]), hidden=True)


def draft_batch_loss(model: Transformer, drafter: Drafter, examples: list[Example], cuts: list[list[int]],
                     n: int, slot_decay: float, pad_id: int) -> tuple[Tensor, dict[str, float]]:
    """The weighted cross entropy of one batch, and per-slot top-1 agreement (for logs)."""
    lay = _layout(examples, cuts, n, pad_id)
    h = _draft_hidden(model, drafter, lay, n)
    logits = model.logits(h)  # (B*C, n, V) float32
    target = lay["target"]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view_as(target)
    weight = (slot_decay ** lay["slot"].float()) * (target >= 0)
    loss = (ce * weight).sum() / weight.sum().clamp_min(1.0)
    with torch.no_grad():
        hit = (logits.argmax(-1) == target) & (target >= 0)
        stats = {}
        for i in range(n):
            sel = (lay["slot"] == i) & (target >= 0)
            stats[f"acc{i}"] = float(hit[sel].float().mean()) if sel.any() else float("nan")
    return loss, stats


def _save(out_dir: Path, drafter: Drafter, optimizer: torch.optim.Optimizer, step: int, cfg: DraftTrainConfig,
          base_path: Path, info: dict[str, Any], adapter: Path | None, data: str) -> None:
    save_state(out_dir / STATE_FILE, step, drafter, optimizer, cfg, data)
    save_drafter(out_dir / DRAFTER_FILE, drafter, base_path, {**info, "step": step, "train": asdict(cfg)},
                 adapter=adapter)


def train_drafter(loaded: Any, examples: list[Example], cfg: DraftTrainConfig, out_dir: str | Path,
                  base_path: str | Path, info: dict[str, Any] | None = None, init: Drafter | None = None) -> Drafter:
    """Train (or resume) a drafter for the frozen `loaded.model`; see the module docstring.
    `init`: the weights to start from where out_dir holds no state yet (a shipped drafter, to
    train it further in a later session; its rank and slots replace cfg's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model: Transformer = loaded.model
    model.requires_grad_(False)
    examples = draftable(examples)  # a draft block needs a target
    if not examples:
        raise ValueError("no training example has a reply of two tokens or more")
    if init is not None:
        cfg.rank, cfg.alpha, cfg.n_slots = init.config.rank, init.config.alpha, init.config.n_slots
    drafter = Drafter(loaded.config, DrafterConfig(rank=cfg.rank, alpha=cfg.alpha, n_slots=cfg.n_slots))
    drafter.init_slots(model.model.embed_tokens.weight)
    if init is not None:
        drafter.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    fingerprint = replies_fingerprint(examples)
    step = resume_state(out_dir / STATE_FILE, drafter, optimizer, cfg, fingerprint)
    if step:
        log.info("drafter: resuming from step %d of %d", step, cfg.max_steps)
    pad_id = loaded.spec.eos_token_ids[0] if loaded.spec.eos_token_ids else 0
    info = dict(info or {}, n_train=len(examples))
    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="drafter", unit="step", mininterval=2.0)
    tokens_done, window_t0 = 0, time.monotonic()
    loss_ema = None
    while step < cfg.max_steps:
        if cfg.time_budget_s and time.monotonic() - started > cfg.time_budget_s:
            bar.write(f"drafter: time budget of {cfg.time_budget_s:.0f} s reached at step {step}; rerun to resume")
            break
        batch = [examples[i] for i in batch_indices(len(examples), step, cfg.batch_size, cfg.seed)]
        cuts = _cuts(batch, cfg.cuts_per_seq, random.Random(cfg.seed * 7919 + step))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, stats = draft_batch_loss(model, drafter, batch, cuts, cfg.n_slots, cfg.slot_decay, pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        tokens_done += sum(len(e.prompt_ids) + len(e.reply_ids) for e in batch) + len(batch) * cfg.cuts_per_seq * cfg.n_slots
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", acc0=f"{stats['acc0']:.2f}", acc1=f"{stats.get('acc1', 0):.2f}",
                        tok_s=f"{tokens_done / max(time.monotonic() - window_t0, 1e-9):.0f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save(out_dir, drafter, optimizer, step, cfg, Path(base_path), info, getattr(loaded, "adapter", None), fingerprint)
    bar.close()
    _save(out_dir, drafter, optimizer, step, cfg, Path(base_path), info, getattr(loaded, "adapter", None), fingerprint)
    return drafter


def evaluate_drafter(loaded: Any, drafter: Drafter, examples: list[Example], n_slots: int,
                     batch_size: int = 8) -> dict[str, Any]:
    """Per-slot agreement with the teacher on these replies (held-out ones; `adapt drafter` also
    some it trained on, to compare), and the tokens per forward that greedy verification would get
    with a block after every position (see the module docstring)."""
    examples = draftable(examples)  # a draft block needs a target
    pad_id = loaded.spec.eos_token_ids[0] if loaded.spec.eos_token_ids else 0
    hits = [0] * n_slots
    counts = [0] * n_slots
    runs: list[int] = []  # per block: how many leading slots agree with the teacher
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            cuts = [list(_cut_range(e)) for e in batch]
            width = max(len(c) for c in cuts)
            cuts = [c + [c[-1]] * (width - len(c)) for c in cuts]  # repeat the last: counted once below
            lay = _layout(batch, cuts, n_slots, pad_id)
            h = _draft_hidden(loaded.model, drafter, lay, n_slots)
            B = len(batch)
            hit = (loaded.model.logits(h).argmax(-1) == lay["target"]).view(B, width, n_slots)
            valid = (lay["target"] >= 0).view(B, width, n_slots)
            for b, e in enumerate(batch):
                for ci in range(len(_cut_range(e))):
                    run = 0
                    for i in range(n_slots):
                        if valid[b, ci, i]:
                            hits[i] += int(hit[b, ci, i])
                            counts[i] += 1
                        if run == i and valid[b, ci, i] and hit[b, ci, i]:
                            run += 1
                    runs.append(run)
    expected = {n: round(sum(1 + min(r, n) for r in runs) / max(len(runs), 1), 3) for n in range(1, n_slots + 1)}
    return {"slot_agreement": [round(h / max(c, 1), 4) for h, c in zip(hits, counts, strict=True)],
            "tokens_per_forward_by_draft_len": expected, "blocks": len(runs), "examples": len(examples)}
