"""Semi-autoregressive block decoding over a batch of rows: the engine's step, without threads.

Contract: token ids in, token ids out. `BlockDecoder` owns the static KV cache, a token canvas
(B_max + 1, S + 1) and a committed-flag canvas of the same shape on the model's device. A row is
one request living in one cache row ("slot"). `add()` writes the prompt and prefills; each
`step()` runs at most one forward over every active row and returns one `RowUpdate` per row that
took part: the tokens that became final, and the finish reason (EOS, length). The decoder knows
nothing about text, stop strings, threads or request ids.

Blocks. The generated region is decoded block by block. For causal and block-causal models
blocks are aligned to absolute positions (multiples of the block size, as the model was trained),
so the first block may start inside the prompt; the prompt's tail is simply "already committed".
For full-attention models (LLaDA, Dream) blocks start at the end of the prompt, as in LLaDA's
semi-autoregressive sampler. Sub-blocks restrict which slots may be committed at a step; the
whole block is still fed to the model.

Logit shift (`spec.logit_shift`). The logits at position i predict the token at i + 1, so slot j
of a block is predicted from position bstart + j - 1. Where that position is not in this step's
window (the first slot of a block whose previous block is cached), its logits are the "carry":
kept from the forward that last saw that position (the prefill, the block write, the refresh).
For a causal or block-causal model with block size 1 this means the single slot is decided from
the carry without a forward: one forward per token, exactly AR decoding.

Cache modes (`cache=`):
- "exact" (causal, block_causal): the prompt is prefilled once; each denoising step feeds only
  the current block (its noisy K/V go into the cache at the block's positions and are attended by
  the block itself); when a block is complete, one "write" forward feeds the clean block, so its
  cache entries are exact, are never recomputed, and the forward's last logits become the carry.
- "none": every step feeds everything up to the end of the canvas (full attention) or of the
  current block (block-causal): the uncached reference.
- "prefix" (full): once per block a "refresh" forward feeds the whole canvas (and its logits
  serve as that block's first denoising step); later steps feed the current block and everything
  after it, attending the cached prefix. Fast-dLLM's prefix cache.
- "dual" (full): as "prefix", but later steps feed the current block only: both prefix and
  suffix are cached, refreshed once per block. Fast-dLLM's dual cache.

Batching. Finished and aborted rows are removed from the decoder and cost nothing. The active
rows of a step are compacted into a batch whose size, window length and key length are rounded
up to buckets (powers of two, multiples of 64), so shapes come from a small fixed set; padding
rows and padding slots read and write the cache's scratch row/position and are masked out.

Host synchronization: one device-to-host copy per step, of the current block of each decided row
(B, N tokens and flags), to find what became final, detect EOS and advance blocks. There is no
per-token sync and no `.item()` inside the policy or sampling code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dlm.config import DiffusionSpec
from dlm.masks import limit_mask
from dlm.model import Transformer
from dlm.policies import StepInputs, UnmaskPolicy, fixed_steps_schedule, sample_tokens

__all__ = ["CACHE_MODES", "BlockDecoder", "DecodeSettings", "RowUpdate", "StepTrace", "resolve_cache_mode"]

CACHE_MODES = ("auto", "exact", "none", "prefix", "dual")


def resolve_cache_mode(attention: str, cache: str) -> str:
    """"auto" -> "exact" for causal/block-causal models, "dual" for full attention."""
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}; expected one of {CACHE_MODES}")
    if cache == "auto":
        return "dual" if attention == "full" else "exact"
    if attention == "full" and cache == "exact":
        raise ValueError("a full-attention model has no exact cache; use 'none', 'prefix' or 'dual'")
    if attention != "full" and cache in ("prefix", "dual"):
        raise ValueError(f"cache {cache!r} is for full-attention models; this one is {attention}")
    return cache


@dataclass
class DecodeSettings:
    """One request's resolved decoding parameters (validated by the engine)."""

    block_size: int  # tokens per block
    sub_block_size: int  # tokens per sub-block; equal to block_size where there are none
    max_new_tokens: int  # generation stops with "length" after this many tokens
    policy: UnmaskPolicy  # which masked slots to commit at each step
    threshold: float  # Threshold policy's bar
    factor: float  # Factor policy's f
    steps_per_block: int  # FixedSteps: steps per block (per sub-block where there are sub-blocks)
    temperature: float  # 0: greedy
    top_p: float  # nucleus sampling mass; 1: off
    seed: int | None  # sampling seed of this request (None: nondeterministic)
    trace: bool = False  # also return a StepTrace of the current block at every step


@dataclass
class StepTrace:
    """A snapshot of one row's current block after a step (for the web visualization)."""

    step: int  # forward passes so far for this row
    block_start: int  # absolute position of the block's first slot
    token_ids: list[int]  # the block's tokens (mask id / filler where still masked)
    masked: list[bool]  # True where the slot is still masked


@dataclass
class RowUpdate:
    """What one step did to one row."""

    slot: int  # the row's cache slot
    new_ids: list[int]  # generated tokens that became final at this step (EOS excluded)
    finish_reason: str | None  # "eos" | "length" | None while running
    steps: int  # forward passes so far for this row (prefill included)
    tokens: int  # generated tokens final so far
    trace: StepTrace | None = None  # only where settings.trace


class Phase(enum.Enum):
    DENOISE = "denoise"  # feed the current block (or the mode's window), commit some slots
    WRITE = "write"  # exact cache: feed the just-completed block once, clean
    REFRESH = "refresh"  # prefix/dual cache: feed the whole canvas, then denoise from it


@dataclass
class _Row:
    slot: int
    prompt_len: int
    settings: DecodeSettings
    gen_end: int  # prompt_len + max_new_tokens: no slot at or past it is decoded
    total_len: int  # the canvas extent: the end of the last block
    block_start: int
    phase: Phase
    final_upto: int  # positions below are final and were reported
    unit_start: int  # the current sub-block's first position
    unit_masked: int  # masked slots in the current sub-block when it started (FixedSteps)
    generator: torch.Generator | None
    unit_step: int = 0  # steps taken in the current sub-block
    eos_pos: int | None = None  # earliest committed EOS position
    steps: int = 0
    block: list[int] = field(default_factory=list)  # last synced block tokens
    done: list[bool] = field(default_factory=list)  # last synced committed flags

    @property
    def block_end(self) -> int:
        return self.block_start + self.settings.block_size

    @property
    def needed_end(self) -> int:
        """One past the last slot of the current block that must be decoded."""
        end = min(self.block_end, self.gen_end)
        return end if self.eos_pos is None else min(end, self.eos_pos + 1)


def _bucket(n: int) -> int:
    """Fixed shape buckets: powers of two up to 32, then multiples of 64."""
    if n <= 32:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 64) * 64


class BlockDecoder:
    def __init__(self, model: Transformer, spec: DiffusionSpec, *, max_batch_size: int,
                 max_seq_len: int, cache: str = "auto") -> None:
        self.model = model
        self.spec = spec
        self.attention = spec.attention
        self.cache = resolve_cache_mode(spec.attention, cache)
        self.shift = 1 if spec.logit_shift else 0
        self.eos = set(spec.eos_token_ids)
        # The token fed at uncommitted slots. A plain AR model has no mask token; its uncommitted
        # slot is never fed (block size 1 with logit shift decides from the carry).
        self.filler = spec.mask_token_id if spec.mask_token_id is not None else 0
        self.max_batch_size = max_batch_size
        self.S = max_seq_len
        param = model.model.embed_tokens.weight
        self.device = param.device
        model.setup_cache(max_batch_size, max_seq_len, dtype=param.dtype, device=self.device)
        # The cache lives in the model's layers (gpt-fast style). Keep ours, so that a second
        # decoder on the same model (the AR baseline next to the dLLM) does not take it over;
        # two decoders must still not run on one model at the same time.
        self._caches = [layer.self_attn.kv_cache for layer in model.model.layers]
        rows = max_batch_size + 1  # + the scratch row
        self.canvas = torch.full((rows, max_seq_len + 1), self.filler, dtype=torch.long, device=self.device)
        self.committed = torch.zeros((rows, max_seq_len + 1), dtype=torch.bool, device=self.device)
        self.carry = torch.zeros((rows, model.config.vocab_size), dtype=torch.float32, device=self.device)
        self.rows: dict[int, _Row] = {}

    # -- layout ------------------------------------------------------------------------------
    def _origin(self, prompt_len: int, block_size: int) -> int:
        if self.attention == "full":
            return prompt_len
        return prompt_len // block_size * block_size

    def required_len(self, prompt_len: int, settings: DecodeSettings) -> int:
        """Cache positions a request needs: the end of its last block."""
        origin = self._origin(prompt_len, settings.block_size)
        gen_end = prompt_len + settings.max_new_tokens
        bs = settings.block_size
        return origin + -(-(gen_end - origin) // bs) * bs

    def _limits(self, pos: Tensor, valid: Tensor, bs: Tensor, total: Tensor) -> Tensor:
        """(B, W) key limits: query at pos sees cache positions < limit."""
        if self.attention == "causal":
            lim = pos + 1
        elif self.attention == "block_causal":
            lim = (pos // bs[:, None] + 1) * bs[:, None]
        else:
            lim = total[:, None].expand_as(pos)
        return torch.where(valid, lim, torch.ones_like(lim))

    # -- rows --------------------------------------------------------------------------------
    def add(self, slot: int, prompt_ids: list[int], settings: DecodeSettings) -> RowUpdate | None:
        """Start a request in a free slot; prefills where the cache is exact."""
        if slot in self.rows:
            raise RuntimeError(f"slot {slot} is busy")
        P = len(prompt_ids)
        total = self.required_len(P, settings)
        if total > self.S:
            raise ValueError(f"needs {total} positions; the cache has {self.S}")
        origin = self._origin(P, settings.block_size)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        self.canvas[slot].fill_(self.filler)
        self.canvas[slot, :P] = prompt
        self.committed[slot].zero_()
        self.committed[slot, :P] = True
        generator = None
        if settings.temperature > 0:
            generator = torch.Generator(device=self.device)
            if settings.seed is not None:
                generator.manual_seed(settings.seed)
            else:
                generator.seed()
        phase = Phase.REFRESH if self.cache in ("prefix", "dual") else Phase.DENOISE
        row = _Row(slot=slot, prompt_len=P, settings=settings, gen_end=P + settings.max_new_tokens,
                   total_len=total, block_start=origin, phase=phase, final_upto=P,
                   unit_start=P, unit_masked=0, generator=generator)
        self._start_unit(row, P)
        self.rows[slot] = row
        if self.cache == "exact" and origin > 0:
            self._forward([(row, 0, origin, "prefill")])
        return None

    def remove(self, slot: int) -> None:
        self.rows.pop(slot, None)

    def _start_unit(self, row: _Row, first_open: int) -> None:
        """Enter the sub-block holding position first_open (the first uncommitted slot)."""
        sub = row.settings.sub_block_size
        rel = first_open - row.block_start
        row.unit_start = row.block_start + rel // sub * sub
        unit_end = min(row.unit_start + sub, row.needed_end)
        row.unit_masked = max(0, unit_end - max(row.unit_start, first_open))
        row.unit_step = 0

    def _carry_only(self, row: _Row) -> bool:
        """True where the current block is decided from the carry alone (AR-style, no forward)."""
        return self.cache == "exact" and self.shift == 1 and row.settings.block_size == 1 and row.phase is Phase.DENOISE

    def _window(self, row: _Row) -> tuple[int, int, str]:
        """(start, length, kind) of the row's window at this step."""
        bs = row.settings.block_size
        if row.phase is Phase.WRITE:
            return row.block_start - bs, bs, "write"
        if row.phase is Phase.REFRESH or self.cache == "none":
            end = row.total_len if self.attention == "full" else row.block_end
            return 0, end, "decide"
        if self.cache == "prefix":
            return row.block_start, row.total_len - row.block_start, "decide"
        return row.block_start, bs, "decide"  # exact, dual

    # -- the forward ---------------------------------------------------------------------------
    def _forward(self, plan: list[tuple[_Row, int, int, str]]) -> Tensor:
        """One batched forward over windows; returns logits (B, N, V) at each decide row's block
        slots (minus the shift), or at a write/prefill row's last position (column 0).
        Also updates the carry of write/prefill rows (and refresh rows, for their slot 0)."""
        dev = self.device
        n = len(plan)
        B = _bucket(n)
        W = _bucket(max(length for _, _, length, _ in plan))
        N = max(row.settings.block_size for row, *_ in plan)
        slots = [self.max_batch_size] * B  # padding rows use the scratch row
        wstart, wlen, bs, total = [0] * B, [0] * B, [1] * B, [1] * B
        key_end = 1
        out_rel = torch.zeros((B, N), dtype=torch.long)
        for i, (row, start, length, kind) in enumerate(plan):
            slots[i], wstart[i], wlen[i] = row.slot, start, length
            bs[i], total[i] = row.settings.block_size, row.total_len
            if kind == "decide":
                out_rel[i] = row.block_start - start + torch.arange(N) - self.shift
            else:
                out_rel[i] = length - 1
            if self.attention == "full":
                key_end = max(key_end, row.total_len)
            elif self.attention == "block_causal":
                key_end = max(key_end, -(-(start + length) // bs[i]) * bs[i])
            else:
                key_end = max(key_end, start + length)
        K = min(_bucket(key_end), self.S)
        for layer, kv in zip(self.model.model.layers, self._caches, strict=True):
            layer.self_attn.kv_cache = kv
        self.model.max_batch_size, self.model.cache_seq_len = self.max_batch_size, self.S
        rows_t = torch.tensor(slots, device=dev)
        wstart_t, wlen_t = torch.tensor(wstart, device=dev), torch.tensor(wlen, device=dev)
        j = torch.arange(W, device=dev)
        valid = j[None, :] < wlen_t[:, None]  # (B, W)
        pos = torch.where(valid, wstart_t[:, None] + j[None, :], self.S)  # padding -> scratch position
        limits = self._limits(pos, valid, torch.tensor(bs, device=dev), torch.tensor(total, device=dev))
        tokens = self.canvas[rows_t[:, None], pos]  # (B, W)
        out_rel = out_rel.to(dev)
        use_carry = out_rel < 0
        logits = self.model(tokens, pos, limit_mask(limits, K), cache_rows=rows_t,
                            out_index=out_rel.clamp(0, W - 1))  # (B, N, V)
        logits = torch.where(use_carry[..., None], self.carry[rows_t][:, None, :], logits)
        for i, (row, _, _, kind) in enumerate(plan):
            row.steps += 1
            if kind != "decide" or (row.phase is Phase.REFRESH and self.shift):
                self.carry[row.slot] = logits[i, 0]
        return logits[:n]

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RowUpdate]:
        """One denoising step of every active row; returns an update per row that decided."""
        if not self.rows:
            return []
        forward_plan = [(row, *self._window(row)) for row in self.rows.values() if not self._carry_only(row)]
        preds: dict[int, Tensor] = {}
        if forward_plan:
            logits = self._forward(forward_plan)
            for i, (row, _, _, kind) in enumerate(forward_plan):
                if kind == "write":
                    row.phase = Phase.DENOISE  # the next block starts
                else:
                    preds[row.slot] = logits[i]
        decide = [row for row in self.rows.values() if row.slot in preds or self._carry_only(row)]
        if not decide:
            return []
        return self._decide(decide, preds)

    def _decide(self, decide: list[_Row], preds: dict[int, Tensor]) -> list[RowUpdate]:
        dev = self.device
        N = max(row.settings.block_size for row in decide)
        V = self.carry.shape[-1]
        logits = torch.stack([
            preds[row.slot][:N] if row.slot in preds else self.carry[row.slot][None, :].expand(N, V)
            for row in decide
        ])  # (B, N, V)
        B = len(decide)
        slots = torch.tensor([row.slot for row in decide], device=dev)
        allowed = torch.zeros((B, N), dtype=torch.bool)
        pos_h = torch.full((B, N), self.S, dtype=torch.long)
        n_commit = []
        for i, row in enumerate(decide):
            s = row.settings
            pos_h[i, : s.block_size] = torch.arange(row.block_start, row.block_end)
            lo, hi = row.unit_start, min(row.unit_start + s.sub_block_size, row.needed_end)
            allowed[i, max(lo - row.block_start, 0): max(hi - row.block_start, 0)] = True
            steps = s.steps_per_block or s.sub_block_size
            # Past its schedule (only if a step committed less than planned): commit the rest.
            n_commit.append(fixed_steps_schedule(row.unit_masked, steps, row.unit_step)
                            if row.unit_step < steps else row.unit_masked)
        pos = pos_h.to(dev)
        tok = self.canvas[slots[:, None], pos]  # (B, N)
        done = self.committed[slots[:, None], pos]
        candidates = allowed.to(dev) & ~done
        temperature = torch.tensor([row.settings.temperature for row in decide], device=dev)
        top_p = torch.tensor([row.settings.top_p for row in decide], device=dev)
        uniform = None
        if any(row.generator is not None for row in decide):
            uniform = torch.stack([
                torch.rand((N, V), generator=row.generator, device=dev) if row.generator is not None
                else torch.full((N, V), 0.5, device=dev)
                for row in decide
            ])
        proposal, confidence = sample_tokens(logits, temperature, top_p, uniform)
        inputs = StepInputs(
            threshold=torch.tensor([row.settings.threshold for row in decide], device=dev),
            factor=torch.tensor([row.settings.factor for row in decide], device=dev),
            n_commit=torch.tensor(n_commit, device=dev),
        )
        commit = torch.zeros_like(candidates)
        for policy in {id(row.settings.policy): row.settings.policy for row in decide}.values():
            in_group = torch.tensor([row.settings.policy is policy for row in decide], device=dev)
            commit |= policy.select(confidence, candidates, inputs) & in_group[:, None]
        new_tok = torch.where(commit, proposal, tok)
        new_done = done | commit
        self.canvas[slots[:, None], pos] = new_tok
        self.committed[slots[:, None], pos] = new_done
        # The one host sync of the step: the decided rows' current blocks.
        tok_h, done_h = new_tok.cpu().tolist(), new_done.cpu().tolist()
        return [self._advance(row, tok_h[i], done_h[i]) for i, row in enumerate(decide)]

    def _advance(self, row: _Row, block: list[int], done: list[bool]) -> RowUpdate:
        """Host bookkeeping after a step: EOS, what became final, the next sub-block/block."""
        s = row.settings
        row.block, row.done = block[: s.block_size], done[: s.block_size]
        for j in range(s.block_size):
            p = row.block_start + j
            if p >= row.prompt_len and row.done[j] and block[j] in self.eos and p < row.gen_end:
                row.eos_pos = p if row.eos_pos is None else min(row.eos_pos, p)
                break
        new_ids: list[int] = []
        end = row.needed_end
        while row.final_upto < end and row.done[row.final_upto - row.block_start]:
            t = row.block[row.final_upto - row.block_start]
            if row.final_upto != row.eos_pos:
                new_ids.append(t)
            row.final_upto += 1
        trace = None
        if s.trace:
            trace = StepTrace(step=row.steps, block_start=row.block_start, token_ids=list(row.block),
                              masked=[not d for d in row.done])
        finish = None
        if row.eos_pos is not None and row.final_upto > row.eos_pos:
            finish = "eos"
        elif row.final_upto >= row.gen_end:
            finish = "length"
        elif row.final_upto >= end:  # block complete: move on
            row.block_start = row.block_end
            row.phase = {"exact": Phase.WRITE, "none": Phase.DENOISE}.get(self.cache, Phase.REFRESH)
            self._start_unit(row, max(row.block_start, row.prompt_len))
        else:
            first_open = next(row.block_start + j for j in range(s.block_size) if not row.done[j])
            if first_open >= row.unit_start + s.sub_block_size:
                self._start_unit(row, first_open)
            else:
                row.unit_step += 1
            if self.cache in ("prefix", "dual"):
                row.phase = Phase.DENOISE
        return RowUpdate(slot=row.slot, new_ids=new_ids, finish_reason=finish, steps=row.steps,
                         tokens=row.final_upto - row.prompt_len - (1 if finish == "eos" else 0), trace=trace)
