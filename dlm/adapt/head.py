"""Training the draft head (dlm/draft_head.py) on the teacher's greedy replies, resumable, on CPU.

Contract: `train_head(loaded, examples, cfg, out_dir, base_path)` trains a `DraftHead` for the
frozen AR model `loaded` and writes into `out_dir`:

    drafter.safetensors   the head in bf16 (`dlm.drafter.save_drafter`: config, vocabulary, base
                          fingerprint, the adapter merged into the base if any, training info):
                          the file to ship; written at every checkpoint
    drafter-state.pt      fp32 weights, AdamW state and step: what a resumed run continues from
                          (never shipped, never committed)
    features.pt           the base's hidden states over every example (float16), computed once
                          (`head_features`); a resumed run reads them back

The base runs once per example, without gradients, over prompt + reply (exactly the hidden states
decoding computes, since the replies are the teacher's own greedy ones); training then never
touches the base again, so a step costs only the head: thousands of samples a second. A sample is
a position t of a reply: the window of (hidden state, next token) pairs ending at t (its last
token is the one t's prediction made final), and the targets t + 2 .. t + 1 + n_slots (cross
entropy over the head's vocabulary, weight `slot_decay ** i`: a draft counts only if every earlier
one was accepted). A share of samples (`short_window`) sees fewer pairs, as right after a prefill.
The vocabulary is every token the training replies use (targets outside it cannot be drafted).

`evaluate_head(loaded, head, examples)` reports each slot's agreement with the teacher on
held-out replies and, for each draft length n, the tokens per forward of greedy verification as
decoding goes: from a reply's start, each forward makes 1 + the leading drafts that agree (at
most n) final, and the next starts after them. That is what the engine does (it drafts after
every forward from the same hidden states), apart from arithmetic (the engine's head runs in
packed bf16) and the short windows of prompts shorter than the window.
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
from dlm.adapt.draft import DRAFTER_FILE, STATE_FILE
from dlm.adapt.state import lr_at, resume_state, save_state
from dlm.draft_head import DraftHead, DraftHeadConfig
from dlm.drafter import save_drafter

__all__ = ["DRAFTER_FILE", "HeadTrainConfig", "evaluate_head", "head_features", "train_head"]

log = logging.getLogger(__name__)

FEATURES_FILE = "features.pt"


@dataclass
class HeadTrainConfig:
    max_steps: int
    batch_size: int = 256  # samples (reply positions) per step
    window: int = 4
    n_slots: int = 6
    n_layers: int = 2
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    slot_decay: float = 0.8
    short_window: float = 0.1  # share of samples with a random shorter window
    seed: int = 0
    checkpoint_every: int = 500  # steps; 0: only at the end and at the time budget
    time_budget_s: float = 0.0  # 0: no limit


class _Corpus:
    """Every example's tokens and hidden states end to end (each followed by a gap of padding),
    and the global index of each sample position t."""

    def __init__(self, examples: list[Example], features: list[Tensor], n_slots: int) -> None:
        pad = n_slots + 2
        ids, hs, samples = [], [], []
        offset = 0
        for e, h in zip(examples, features, strict=True):
            seq = e.prompt_ids + e.reply_ids
            P, T = len(e.prompt_ids), len(seq)
            ids.append(torch.tensor(seq + [-100] * pad))
            hs += [h, torch.zeros(pad, h.shape[1], dtype=h.dtype)]
            samples.append(torch.arange(offset + P - 1, offset + T - 1))  # t: t + 1 (the bonus) is a reply token
            offset += T + pad
        self.ids, self.h, self.samples = torch.cat(ids), torch.cat(hs), torch.cat(samples)

    def batch(self, t: Tensor, window: int, n: int, remap: Tensor, valid: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Samples at global positions t (S,) -> feats (S, W, dim), tokens (S, W), valid (S,),
        targets (S, n) as indices into the head's vocabulary (-100: none or outside it)."""
        back = torch.arange(-window + 1, 1)
        g = (t[:, None] + back[None]).clamp_min(0)
        feats = self.h[g].float()
        tokens = self.ids[g + 1].clamp_min(0)
        target = self.ids[t[:, None] + 2 + torch.arange(n)[None]]
        target = torch.where(target >= 0, remap[target.clamp_min(0)], target)
        if valid is None:
            valid = torch.full((len(t),), window)
        return feats, tokens, valid, target


def head_features(loaded: Any, examples: list[Example], desc: str = "features") -> list[Tensor]:
    """The base's final normed hidden states over each example's prompt + reply, (T, dim) float16."""
    model = loaded.model
    longest = max(len(e.prompt_ids) + len(e.reply_ids) for e in examples)
    cache = model.new_cache(1, longest)
    out = []
    with torch.no_grad():
        for e in tqdm(examples, desc=desc, unit="seq", mininterval=2.0):
            seq = e.prompt_ids + e.reply_ids
            T = len(seq)
            causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
            h = model(torch.tensor([seq]), torch.arange(T)[None], causal, cache=cache,
                      cache_rows=torch.zeros(1, dtype=torch.long), hidden=True)[0]
            out.append(h.to(torch.float16))
    return out


def _vocab(examples: list[Example], vocab_size: int) -> Tensor:
    used = torch.zeros(vocab_size, dtype=torch.bool)
    for e in examples:
        used[torch.tensor(e.reply_ids)] = True
    return used.nonzero().squeeze(1)


def _remap(vocab: Tensor, vocab_size: int) -> Tensor:
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    return remap


def _loss(head: DraftHead, corpus: _Corpus, t: Tensor, valid: Tensor, remap: Tensor, cfg: HeadTrainConfig
          ) -> tuple[Tensor, float]:
    feats, tokens, valid, target = corpus.batch(t, cfg.window, cfg.n_slots, remap, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(feats, tokens, valid, cfg.n_slots)
    ce = F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), target.reshape(-1), reduction="none",
                         ignore_index=-100).view_as(target)
    weight = (cfg.slot_decay ** torch.arange(cfg.n_slots).float())[None] * (target >= 0)
    with torch.no_grad():
        acc0 = float(((scores[:, 0].argmax(-1) == target[:, 0]) & (target[:, 0] >= 0)).float().mean())
    return (ce * weight).sum() / weight.sum().clamp_min(1.0), acc0


def _features(loaded: Any, examples: list[Example], out_dir: Path) -> list[Tensor]:
    path = out_dir / FEATURES_FILE
    key = [len(e.prompt_ids) + len(e.reply_ids) for e in examples]
    if path.exists():
        saved = torch.load(path)
        if saved.get("lengths") == key:
            return saved["h"]
        log.info("head: %s is for other examples; computing them again", path)
    h = head_features(loaded, examples)
    torch.save({"lengths": key, "h": h}, path)
    return h


def train_head(loaded: Any, examples: list[Example], cfg: HeadTrainConfig, out_dir: str | Path,
               base_path: str | Path, info: dict[str, Any] | None = None, init: DraftHead | None = None) -> DraftHead:
    """Train (or resume) a draft head for the frozen `loaded.model`; see the module docstring.
    `init`: the weights to start from where out_dir holds no state yet (a shipped head, to train
    further; its window, slots, layers and vocabulary replace cfg's and the data's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = [e for e in examples if len(e.reply_ids) >= 2]
    if not examples:
        raise ValueError("no training example has a reply of two tokens or more")
    model = loaded.model
    V = loaded.config.vocab_size
    if init is not None:
        cfg.window, cfg.n_slots, cfg.n_layers = init.config.window, init.config.n_slots, init.config.n_layers
        vocab = init.vocab.clone()
    else:
        vocab = _vocab(examples, V)
    corpus = _Corpus(examples, _features(loaded, examples, out_dir), cfg.n_slots)
    remap = _remap(vocab, V)
    head = DraftHead(loaded.config, DraftHeadConfig(window=cfg.window, n_slots=cfg.n_slots, n_layers=cfg.n_layers,
                                                    vocab_size=len(vocab)))
    head.vocab.copy_(vocab)
    if init is not None:
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init.state_dict().items()})
    else:
        head.init_from(model)
    head.attach(model)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step = resume_state(out_dir / STATE_FILE, head, optimizer, cfg)
    if step:
        log.info("head: resuming from step %d of %d", step, cfg.max_steps)
    info = dict(info or {}, n_train=len(examples), n_samples=len(corpus.samples))
    adapter = getattr(loaded, "adapter", None)

    def save() -> None:
        save_state(out_dir / STATE_FILE, step, head, optimizer, cfg)
        save_drafter(out_dir / DRAFTER_FILE, head, base_path, {**info, "step": step, "train": asdict(cfg)},
                     adapter=adapter)

    started = time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="draft head", unit="step", mininterval=2.0)
    loss_ema = None
    head.train()
    while step < cfg.max_steps:
        if cfg.time_budget_s and time.monotonic() - started > cfg.time_budget_s:
            bar.write(f"draft head: time budget of {cfg.time_budget_s:.0f} s reached at step {step}; rerun to resume")
            break
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        t = corpus.samples[torch.randint(len(corpus.samples), (cfg.batch_size,), generator=g)]
        valid = torch.full((cfg.batch_size,), cfg.window)
        short = torch.rand(cfg.batch_size, generator=g) < cfg.short_window
        valid[short] = torch.randint(1, cfg.window + 1, (int(short.sum()),), generator=g)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, acc0 = _loss(head, corpus, t, valid, remap, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        elapsed = max(time.monotonic() - started, 1e-9)
        bar.set_postfix(loss=f"{loss_ema:.3f}", acc0=f"{acc0:.2f}", samples_s=f"{bar.n * cfg.batch_size / elapsed:.0f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save()
    bar.close()
    save()
    return head.eval()


def evaluate_head(loaded: Any, head: DraftHead, examples: list[Example], batch_size: int = 512) -> dict[str, Any]:
    """Per-slot agreement with the teacher on held-out replies, and the tokens per forward that
    greedy verification gets (see the module docstring)."""
    examples = [e for e in examples if len(e.reply_ids) >= 2]
    n, V = head.n_slots, loaded.config.vocab_size
    corpus = _Corpus(examples, head_features(loaded, examples, desc="held-out features"), n)
    remap = _remap(head.vocab, V)
    runs, hits, counts = [], torch.zeros(n), torch.zeros(n)
    with torch.no_grad():
        for start in range(0, len(corpus.samples), batch_size):
            feats, tokens, valid, target = corpus.batch(corpus.samples[start:start + batch_size], head.config.window, n,
                                                        remap)
            hit = (head(feats, tokens, valid, n).argmax(-1) == target) & (target >= 0)
            hits += hit.float().sum(0)
            t = corpus.samples[start:start + batch_size]
            counts += (corpus.ids[t[:, None] + 2 + torch.arange(n)[None]] >= 0).float().sum(0)
            runs.append(hit.long().cumprod(1).sum(1))
    run = torch.cat(runs).tolist()  # per sample: how many leading drafts agree
    # Tokens per forward as decoding gets them: from each reply's start, a forward at position t
    # makes 1 + min(run, k) tokens final and the next forward starts after them (an average over
    # all positions instead would count the easy stretches, which decoding crosses in few
    # forwards, as often as the hard ones: about 0.7 tokens per forward too high at k = 4).
    expected = {}
    for k in range(1, n + 1):
        tokens = forwards = i = 0
        for e in examples:  # its samples are run[i : i + len(reply)]; the last token needs no forward
            t, end = i, i + len(e.reply_ids) - 1
            while t < end:
                step = 1 + min(run[t], k, end - t - 1)
                tokens, forwards, t = tokens + step, forwards + 1, t + step
            i += len(e.reply_ids)
        expected[k] = round(tokens / max(forwards, 1), 3)
    return {"slot_agreement": [round(float(h / max(c, 1)), 4) for h, c in zip(hits, counts, strict=True)],
            "tokens_per_forward_by_draft_len": expected, "samples": len(run), "examples": len(examples),
            "vocab": len(head.vocab)}
