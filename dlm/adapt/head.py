"""Training the draft head (dlm/draft_head.py) on the teacher's greedy replies, resumable, on the
CPU or a GPU (wherever the base `loaded` lives: features, training and evaluation run there).

Contract: `train_head(loaded, examples, cfg, out_dir, base_path)` trains a `DraftHead` for the
frozen AR model `loaded` and writes into `out_dir`:

    drafter.safetensors   the head in bf16 (`dlm.drafter.save_drafter`: config, vocabulary, base
                          fingerprint, the adapter merged into the base if any, training info):
                          the file to ship; written at every checkpoint
    drafter-state.pt      fp32 weights, AdamW state and step: what a resumed run continues from
                          (never shipped, never committed)
    features.pt           the base's hidden states over every example (float16), computed once
                          (`head_features`; with `feature_layers`, those layers' outputs too),
                          each keyed by its token ids, with the fingerprints of the base and
                          adapter; every FEATURES_SAVE_EVERY sequences computed are saved as a
                          part file (features.pt.part-NNNN), merged into features.pt at the end:
                          an interrupted run goes on where it stopped, and a run given a link to
                          another run's file (same base, adapter, layers) computes only the
                          sequences that file lacks (another mix of data files); the merge
                          replaces the link

The base runs once per example, without gradients, over prompt + reply (exactly the hidden states
decoding computes, since the replies are the teacher's own greedy ones); training then never
touches the base again, so a step costs only the head: thousands of samples a second. A sample is
a position t of a reply: the window of (hidden state, next token) pairs ending at t (its last
token is the one t's prediction made final), and the targets t + 2 .. t + 1 + n_slots (cross
entropy over the head's vocabulary, weight `slot_decay ** i`: a draft counts only if every earlier
one was accepted; with `soft`, that share of each target's loss is the cross entropy to the
teacher's whole distribution there instead, computed from the stored final states). A share of
samples (`short_window`) sees fewer pairs, as right after a prefill. The vocabulary is every
token the training replies use (targets outside it cannot be drafted). A causal head (`causal`)
is taught by teacher forcing: each slot after the first reads the teacher's token at the target
before it, which is the draft it reads in decoding wherever the drafts before it were right
(the only drafts that count).

`evaluate_head(loaded, head, examples)` reports each slot's agreement with the teacher on
held-out replies and, for each draft length n, the tokens per forward of greedy verification as
decoding goes: from a reply's start, each forward makes 1 + the leading drafts that agree (at
most n) final, and the next starts after them. That is what the engine does (it drafts after
every forward from the same hidden states), apart from arithmetic (the engine's head runs on Q8
blocks or packed bf16) and the short windows of prompts shorter than the window. A causal
head is evaluated with the teacher's tokens before each slot (exactly its own drafts wherever
those agree, so the tokens per forward are decoding's; its slot agreement is each slot's after
right ones).
"""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dlm.adapt.data import Example, draftable, replies_fingerprint
from dlm.adapt.draft import DRAFTER_FILE, STATE_FILE
from dlm.adapt.state import check_resumable, load_resumed, lr_at, save_state
from dlm.draft_head import DraftHead, DraftHeadConfig
from dlm.drafter import base_fingerprint, save_drafter
from dlm.tuned_file import file_sha256

__all__ = ["DRAFTER_FILE", "HeadTrainConfig", "evaluate_head", "head_features", "train_head"]

log = logging.getLogger(__name__)

FEATURES_FILE = "features.pt"
FEATURES_FORMAT = 2  # 2: a dict of sequences' features by key (1: one list in the examples' order)
FEATURES_SAVE_EVERY = 1000  # sequences computed between saves of a part file (see _features)


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
    soft: float = 0.0  # share of the loss that matches the teacher's distribution at each target (0: hard targets)
    feature_layers: tuple[int, ...] = ()  # DraftHeadConfig.feature_layers
    causal: bool = False  # DraftHeadConfig.causal (with `init`: a parallel head's weights start a causal one)
    short_window: float = 0.1  # share of samples with a random shorter window
    seed: int = 0
    checkpoint_every: int = 500  # steps; 0: only at the end and at the time budget
    time_budget_s: float = 0.0  # 0: no limit
    max_vocab: int = 0  # 0: every token the replies use (and an init's); else the most used this many

    def __post_init__(self) -> None:
        self.feature_layers = tuple(self.feature_layers)
        if self.max_vocab < 0:
            raise ValueError(f"max_vocab must be >= 0 (0: no cap), not {self.max_vocab}")
        # the head's own limits, before the minutes of features rather than at its first save
        DraftHeadConfig(window=self.window, n_slots=self.n_slots, n_layers=self.n_layers, vocab_size=1,
                        feature_layers=self.feature_layers, causal=self.causal)


class _Corpus:
    """Every example's tokens and hidden states end to end (each followed by a gap of padding) on
    `device`, and the global index of each sample position t (on the CPU, where batches are drawn)."""

    def __init__(self, examples: list[Example], features: list[Tensor], n_slots: int,
                 device: torch.device | str = "cpu") -> None:
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
        self.ids, self.h, self.samples = torch.cat(ids).to(device), torch.cat(hs).to(device), torch.cat(samples)

    def batch(self, t: Tensor, window: int, n: int, remap: Tensor, valid: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Samples at global positions t (S,) -> feats (S, W, dim), tokens (S, W), valid (S,),
        targets (S, n) as indices into the head's vocabulary (-100: none or outside it)."""
        device = self.ids.device
        t = t.to(device)
        back = torch.arange(-window + 1, 1, device=device)
        g = (t[:, None] + back[None]).clamp_min(0)
        feats = self.h[g].float()
        tokens = self.ids[g + 1].clamp_min(0)
        target = self.ids[self.targets_at(t, n)]
        target = torch.where(target >= 0, remap[target.clamp_min(0)], target)
        valid = torch.full((len(t),), window, device=device) if valid is None else valid.to(device)
        return feats, tokens, valid, target

    def targets_at(self, t: Tensor, n: int) -> Tensor:
        """The global positions of samples t's first n targets (S, n): t + 2 .. t + 1 + n."""
        t = t.to(self.ids.device)
        return t[:, None] + 2 + torch.arange(n, device=t.device)[None]

    def prev(self, t: Tensor, n: int) -> Tensor:
        """A causal head's inputs at samples t (S,): the teacher's tokens at each sample's first
        n - 1 targets (S, n - 1) (0 past a reply's end, where no target counts)."""
        return self.ids[self.targets_at(t, n - 1)].clamp_min(0)

    def teacher_logits(self, t: Tensor, n: int, head_rows: Tensor) -> Tensor:
        """The teacher's logits over the head's vocabulary (its output embedding rows `head_rows`)
        at each of samples t's n targets: from the final normed hidden state just before it."""
        t = t.to(self.h.device)
        h = self.h[t[:, None] + 1 + torch.arange(n, device=t.device)[None], -head_rows.shape[1]:]  # the final state
        return h.float() @ head_rows.T


def head_features(loaded: Any, examples: list[Example], desc: str = "features", batch_size: int = 0,
                  layers: tuple[int, ...] = ()) -> list[Tensor]:
    """The base's final normed hidden states over each example's prompt + reply, (T, dim) float16
    on the CPU; with `layers`, (T, (len(layers) + 1) * dim): those layers' outputs, RMS-normalised,
    then the final state (DraftHeadConfig.feature_layers; the layers' own forwards only, not the
    block kernel's single call). `batch_size` sequences per forward (0: one on a CPU, 64
    elsewhere), padded at the end to the batch's longest (causal: padding changes no real
    position's state). One at a time on the block kernel (a CPU's) and without `layers`, the
    sequences go in the order of their tokens, and each runs only its positions after the prefix
    it shares with the one before (the system prompt, at least), attending to that one's keys
    left in the cache: the same bits as its whole forward (the kernel computes each position from
    its own inputs and its keys in a fixed order), for about half the positions of chat prompts
    (`_shared_prefixes`)."""
    model = loaded.model
    if any(i >= len(model.model.layers) for i in layers):
        raise ValueError(f"feature layers {list(layers)}: the base has layers 0..{len(model.model.layers) - 1}")
    device = model.device  # the embedding table may be released (block formats)
    batch_size = batch_size or (1 if device.type == "cpu" else 64)
    seqs = [e.prompt_ids + e.reply_ids for e in examples]
    if batch_size == 1 and not layers and model.fused_layers:
        return _shared_prefixes(model, seqs, desc)
    taps: list[Tensor] = []
    hooks = [model.model.layers[i].register_forward_hook(lambda _m, _i, out: taps.append(F.rms_norm(
        out.float(), out.shape[-1:]))) for i in layers]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar lengths
    longest = max(map(len, seqs))
    cache = model.new_cache(batch_size, longest, device=device)
    out: list[Tensor | None] = [None] * len(seqs)
    try:
        with torch.no_grad(), tqdm(total=len(seqs), desc=desc, unit="seq", mininterval=2.0) as bar:
            for start in range(0, len(order), batch_size):
                picked = order[start:start + batch_size]
                T = max(len(seqs[i]) for i in picked)
                ids = torch.tensor([seqs[i] + [0] * (T - len(seqs[i])) for i in picked], device=device)
                causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
                positions = torch.arange(T, device=device)[None].expand(len(picked), T)
                taps.clear()
                h = model(ids, positions, causal, cache=cache, cache_rows=torch.arange(len(picked), device=device),
                          hidden=True)
                if len(taps) != len(layers):
                    raise ValueError(f"feature layers {list(layers)}: this model's forward does not run them one by "
                                     "one (load it with weights='dense')")
                h = torch.cat([*taps, h.float()], dim=-1).to(torch.float16).cpu()
                for row, i in enumerate(picked):
                    out[i] = h[row, : len(seqs[i])].clone()
                bar.update(len(picked))
    finally:
        for hook in hooks:
            hook.remove()
    return out  # type: ignore[return-value]


def _shared_prefixes(model: Any, seqs: list[list[int]], desc: str) -> list[Tensor]:
    """`head_features` one sequence at a time on the fused block forward, each after the prefix it
    shares with the sequence before it in token order: that prefix's keys and values are still in
    the cache row, and its final states are the earlier sequence's."""
    device = model.device
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    cache = model.new_cache(1, max(map(len, seqs)), device=device)
    row = torch.zeros(1, dtype=torch.long, device=device)
    out: list[Tensor | None] = [None] * len(seqs)
    before: list[int] = []
    h_before = torch.empty(0, model.config.dim, dtype=torch.float16)
    with torch.no_grad(), tqdm(total=len(seqs), desc=desc, unit="seq", mininterval=2.0) as bar:
        for i in order:
            seq = seqs[i]
            T = len(seq)
            end = min(len(before), T - 1)  # at most all but its last position
            shared = next((j for j in range(end) if before[j] != seq[j]), end)
            positions = torch.arange(shared, T, device=device)
            mask = (torch.arange(T, device=device)[None] <= positions[:, None])[None, None]  # (1, 1, T - shared, T)
            h = model(torch.tensor(seq[shared:], device=device)[None], positions[None], mask, cache=cache,
                      cache_rows=row, hidden=True)
            out[i] = h_before = torch.cat([h_before[:shared], h[0].float().to(torch.float16).cpu()])
            before = seq
            bar.update(1)
    return out  # type: ignore[return-value]


def _vocab(examples: list[Example], vocab_size: int, also: Tensor | None = None, limit: int = 0) -> Tensor:
    """The token ids the replies use and `also`'s, ascending; with `limit`, only the `limit` the
    replies use most (ties: the lower id; `also`'s unused ones last)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for e in examples:
        counts += torch.bincount(torch.tensor(e.reply_ids), minlength=vocab_size)
    rank = counts.double()
    if also is not None:
        rank[also.cpu()] += 0.5  # in the vocabulary even when unused, but after every used token
    used = (rank > 0).nonzero().squeeze(1)
    if limit and len(used) > limit:
        order = torch.sort(-rank[used], stable=True).indices  # most used first, ties by id
        used = used[order[:limit]].sort().values
    return used


def _remap(vocab: Tensor, vocab_size: int) -> Tensor:
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    return remap


def _loss(head: DraftHead, corpus: _Corpus, t: Tensor, valid: Tensor, remap: Tensor, cfg: HeadTrainConfig
          ) -> tuple[Tensor, float]:
    feats, tokens, valid, target = corpus.batch(t, cfg.window, cfg.n_slots, remap, valid)
    prev = corpus.prev(t, cfg.n_slots) if head.config.causal else None  # teacher forcing
    with torch.autocast(feats.device.type, dtype=torch.bfloat16):
        scores = head(feats, tokens, valid, cfg.n_slots, prev)
    ce = F.cross_entropy(scores.float().reshape(-1, scores.shape[-1]), target.reshape(-1), reduction="none",
                         ignore_index=-100).view_as(target)
    if cfg.soft:
        # Distillation: the teacher's whole distribution at each target, beside its greedy token.
        with torch.no_grad():
            teacher = corpus.teacher_logits(t, cfg.n_slots, head._head).softmax(-1)
        soft = -(teacher * scores.float().log_softmax(-1)).sum(-1)
        ce = (1 - cfg.soft) * ce + cfg.soft * soft
    weight = (cfg.slot_decay ** torch.arange(cfg.n_slots, device=ce.device).float())[None] * (target >= 0)
    with torch.no_grad():
        acc0 = float(((scores[:, 0].argmax(-1) == target[:, 0]) & (target[:, 0] >= 0)).float().mean())
    return (ce * weight).sum() / weight.sum().clamp_min(1.0), acc0


def _sequence_key(e: Example) -> str:
    return hashlib.blake2b(array("q", e.prompt_ids + e.reply_ids).tobytes(), digest_size=16).hexdigest()


def _features_source(base_path: str | Path, adapter: str | Path | None) -> dict[str, str | None]:
    """What the features were computed from: the base's fingerprint and the merged adapter's."""
    return {"base": base_fingerprint(base_path), "adapter": None if adapter is None else file_sha256(adapter)}


def _features(loaded: Any, examples: list[Example], out_dir: Path, layers: tuple[int, ...],
              source: dict[str, str | None]) -> list[Tensor]:
    """Each example's features from features.pt and its parts, computing those they lack: every
    FEATURES_SAVE_EVERY sequences computed are saved as one more part (features.pt.part-NNNN,
    only the new ones), and the parts are merged into features.pt at the end (a link of that name
    is replaced by a file of this run's own). A file of other layers, another base or adapter
    (`source`) or an older format is not read."""
    path = out_dir / FEATURES_FILE
    header = {"format": FEATURES_FORMAT, "layers": list(layers), "source": source}
    parts = _feature_parts(out_dir)
    store: dict[str, Tensor] = {}
    for f in ([path] if path.exists() else []) + parts:
        saved = torch.load(f)
        if {k: saved.get(k) for k in header} == header:
            store.update(saved["h"])
        else:
            log.info("head: %s holds features of other layers, another base or adapter, or an older format; "
                     "not read", f)
    keys = [_sequence_key(e) for e in examples]
    missing = list({k: e for k, e in zip(keys, examples, strict=True) if k not in store}.items())  # repeats once
    if missing:
        log.info("head: features of %d of %d sequences to compute (%s and its parts have the others)",
                 len(missing), len(keys), path)
    first = 1 + max((int(f.name.rsplit("-", 1)[1]) for f in parts), default=-1)
    for n, start in enumerate(range(0, len(missing), FEATURES_SAVE_EVERY), start=first):
        chunk = missing[start:start + FEATURES_SAVE_EVERY]
        h = head_features(loaded, [e for _, e in chunk], desc=f"features {start}+{len(chunk)} of {len(missing)}",
                          layers=layers)
        new = dict(zip([k for k, _ in chunk], h, strict=True))
        store.update(new)
        _save_whole(out_dir / f"{FEATURES_FILE}.part-{n:04d}", {**header, "h": new})
    if missing or parts:
        _save_whole(path, {**header, "h": store})
        for f in out_dir.glob(FEATURES_FILE + ".part-*"):  # with a `.tmp` a crash left
            f.unlink()
    return [store[k] for k in keys]


def _feature_parts(out_dir: Path) -> list[Path]:
    """The part files saved whole (features.pt.part-NNNN), in order: not a `.tmp` a crash left."""
    return sorted(out_dir.glob(FEATURES_FILE + ".part-[0-9][0-9][0-9][0-9]"))


def _save_whole(path: Path, obj: Any) -> None:
    """torch.save to a temporary name, then renamed: never a half-written file, nor one shared by a link."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_head(loaded: Any, examples: list[Example], cfg: HeadTrainConfig, out_dir: str | Path,
               base_path: str | Path, info: dict[str, Any] | None = None, init: DraftHead | None = None) -> DraftHead:
    """Train (or resume) a draft head for the frozen `loaded.model`; see the module docstring.
    `init`: the weights to start from where out_dir holds no state yet (a shipped head, to train
    further; its window, slots and layers replace cfg's, its vocabulary grows by the tokens the
    data's replies use, up to `cfg.max_vocab`: no weight is per token, so a token dropped loses
    nothing but its drafts; a causal `init` stays causal, and `cfg.causal` makes a parallel one's
    weights a causal head's start)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = draftable(examples)
    if not examples:
        raise ValueError("no training example has a reply of two tokens or more")
    model = loaded.model
    V = loaded.config.vocab_size
    if init is not None:
        cfg.window, cfg.n_slots, cfg.n_layers = init.config.window, init.config.n_slots, init.config.n_layers
        cfg.feature_layers = init.config.feature_layers
        cfg.causal = cfg.causal or init.config.causal
        # Its vocabulary and every token the data's replies use: no weight is per token (the
        # output rows are the base's), so new tokens cost nothing but their rows' products.
        vocab = _vocab(examples, V, also=init.vocab, limit=cfg.max_vocab)
    else:
        vocab = _vocab(examples, V, limit=cfg.max_vocab)
    device = model.device  # the embedding table may be released (block formats)
    adapter = getattr(loaded, "adapter", None)
    fingerprint = replies_fingerprint(examples)
    saved = check_resumable(out_dir / STATE_FILE, cfg, fingerprint)  # before the features' minutes
    features = _features(loaded, examples, out_dir, cfg.feature_layers, _features_source(base_path, adapter))
    corpus = _Corpus(examples, features, cfg.n_slots, device)
    remap = _remap(vocab, V).to(device)
    head = DraftHead(loaded.config, DraftHeadConfig(window=cfg.window, n_slots=cfg.n_slots, n_layers=cfg.n_layers,
                                                    vocab_size=len(vocab), feature_layers=cfg.feature_layers,
                                                    causal=cfg.causal)).to(device)
    head.vocab.copy_(vocab)
    if init is not None:
        state = {k: v.float() if v.is_floating_point() else v for k, v in init.state_dict().items()}
        head.load_state_dict({**state, "vocab": head.vocab})  # the grown vocabulary
    else:
        head.init_from(model)
    head.attach(model)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                                  fused=device.type == "cuda")
    step = load_resumed(saved, head, optimizer)
    if step:
        log.info("head: resuming from step %d of %d", step, cfg.max_steps)
    info = dict(info or {}, n_train=len(examples), n_samples=len(corpus.samples))

    def save() -> None:
        save_state(out_dir / STATE_FILE, step, head, optimizer, cfg, fingerprint)
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
    """Per-slot agreement with the teacher on these replies (held-out ones; `adapt drafter` also
    some it trained on, to compare), and the tokens per forward that greedy verification gets (see
    the module docstring)."""
    examples = draftable(examples)
    n, V = head.n_slots, loaded.config.vocab_size
    device = head.vocab.device
    corpus = _Corpus(examples, head_features(loaded, examples, desc="evaluation features",
                                             layers=head.config.feature_layers), n, device)
    remap = _remap(head.vocab, V).to(device)
    runs, hits, counts = [], torch.zeros(n, device=device), torch.zeros(n, device=device)
    with torch.no_grad():
        for start in range(0, len(corpus.samples), batch_size):
            feats, tokens, valid, target = corpus.batch(corpus.samples[start:start + batch_size], head.config.window, n,
                                                        remap)
            t = corpus.samples[start:start + batch_size].to(device)
            # A causal head's places after the teacher's tokens: where every earlier draft agrees,
            # exactly the drafts decoding would make.
            prev = corpus.prev(t, n) if head.config.causal else None
            hit = (head(feats, tokens, valid, n, prev).argmax(-1) == target) & (target >= 0)
            hits += hit.float().sum(0)
            counts += (corpus.ids[corpus.targets_at(t, n)] >= 0).float().sum(0)
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
