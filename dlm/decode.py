"""Semi-autoregressive block decoding over a batch of rows: the engine's step, without threads.

Contract: token ids in, token ids out. `BlockDecoder` owns the static KV cache, a token canvas
(B_max + 1, S + 1) and a committed-flag canvas of the same shape on the model's device. A row is
one request living in one cache row ("slot"). `add()` writes the prompt; each `step()` runs at
most one prefill forward (see "Prefill") and one denoising forward over every active row, and
returns one `RowUpdate` per row that took part: the tokens that became final, and the finish
reason (EOS, length). `step(hold)` leaves the rows of the slots in `hold` out of that step (they
keep their state; the engine holds back background owners' rows so), and `step_seconds` then
says what the step cost each row that took part. The decoder knows nothing about text, stop
strings, threads or request ids.

Blocks. The generated region is decoded block by block. For causal and block-causal models
blocks are aligned to absolute positions (multiples of the block size, as the model was trained),
so the first block may start inside the prompt; the prompt's tail is simply "already committed".
For full-attention models (LLaDA, Dream) blocks start at the end of the prompt, as in LLaDA's
semi-autoregressive sampler. Sub-blocks restrict which slots may be committed at a step; the
whole block is still fed to the model.

Logit shift (`spec.logit_shift`). The logits at position i predict the token at i + 1, so slot j
of a block is predicted from position bstart + j - 1. Where that position is not in this step's
window (the first slot of a block whose previous block is cached), its logits are the "carry":
kept from the forward that last saw that position clean (the prefill, the block write, the
refresh). For a causal or block-causal model with block size 1 the single slot is decided from
the carry alone: one forward per token (the previous token's write), exactly AR decoding.

Cache modes (`cache=`):
- "exact" (causal, block_causal): the prompt is prefilled once; each denoising step feeds only
  the current block (its noisy K/V go into the cache at the block's positions and are attended by
  the block itself). When a block is complete, its clean K/V must be written once; that write is
  fused into the next block's first denoising step: the same forward carries one more batch row,
  pointing at the same cache row, that feeds the clean finished block. Attention is
  block-causal, so the clean tokens do not see the noisy next block, and the model writes every
  row's K/V before any row attends, so the next block sees the clean K/V of this very forward.
  The cache stays exact, each block costs no forward beyond its denoising steps, and the write
  row's last logits become the carry (the next block's first slot).
- "none": every step feeds everything up to the end of the canvas (full attention) or of the
  current block (block-causal): the uncached reference.
- "prefix" (full): once per block a "refresh" forward feeds the whole canvas (and its logits
  serve as that block's first denoising step); later steps feed the current block and everything
  after it, attending the cached prefix. Fast-dLLM's prefix cache.
- "dual" (full): as "prefix", but later steps feed the current block only: both prefix and
  suffix are cached, refreshed once per block. Fast-dLLM's dual cache.

Prefill (exact cache). `add()` only writes the canvas; the prompt's K/V (up to the first block)
are written by the next steps. Each step first runs one batched prefill forward over the rows
still prefilling (least prompt left first), then the denoising forward of the rows ready to decode, so
prompts admitted together are prefilled together and running rows are never starved: a long
prompt goes in chunks (`prefill_chunk_tokens` per row, rounded down to whole blocks, so a chunk
never ends inside a block its queries may see) and one step prefills at most
`prefill_budget_tokens` prompt tokens (always at least one chunk); both shrink, at the prefill
speed measured so far, so that a prefill forward takes about `prefill_step_s` (0.3 s: about 140
prompt tokens on a quiet 2-core CPU, fewer when the CPU is shared), so an abort or a new request
waits at most about that long. The speed is measured on forwards that hold a full chunk (or run
slower than the target): a short prompt's forward is mostly fixed cost and would under-read it.
While other rows decode, the chunks of long prompts (more than one chunk left) take at most
`long_prefill_share` of the wall time: after one, they wait twice its time (at 1/3), and the
decoding rows step on meanwhile. A prompt that fits one chunk (a voice
turn, or the new tail of a call's prompt after prefix reuse) is never held back; "one chunk" is
`prefill_chunk_tokens`, not the chunk shrunk to the measured speed (on a shared CPU that would
make a voice turn's tail "long"). A row whose prefill completes at a step decodes in the same step. The prefill is a forward of its own, eager, with finer
buckets than the denoising forward (batch: exact; window: powers of two up to 8, then multiples
of 8 up to the chunk size): no compiled graph depends on them, and on a compute-bound CPU every
padded position costs as much as a real one. Fused into the denoising forward it would widen
every row's window to the chunk's length.
A failure of the prefill forward raises `PrefillError` naming the rows it removed, so the caller
fails those requests only.

Prefix reuse (exact cache). A voice call re-sends its system prompt and history every turn. A
cache row keeps, after its request leaves, the token ids of the positions whose clean K/V it
holds (the prefill and every block written clean; never the last, noisy block). A new request
added to that slot starts its prefill after the longest common prefix of those ids and its
prompt: exact, since a position's K/V depend only on the tokens it attends, which are the same
(causal: the tokens up to it; block-causal: up to the end of its block, so the reused length is
rounded down to whole blocks and the block size must match). The last prefill position is always
recomputed: its logits are the carry. `prefix_match()` tells the caller (the engine picks the
free slot with the longest match) how many positions a slot would reuse. Where the model's
decoding steps run other kernels than its prefill (`Transformer.step_kernels`: int4 steps, bf16
prefill), a generated position's K/V differ in their last bits from what a prefill writes, so
only the prefilled positions are kept: the next turn re-prefills the previous reply.

Batching. Finished and aborted rows are removed from the decoder and cost nothing. The active
rows of a step are compacted into a batch whose size, window length and key length are rounded
up to buckets (batch: powers of two up to 8, then multiples of 8; windows and keys: powers of two
up to 32, then multiples of 64), so shapes come from a small fixed set; padding rows and padding
slots read and write the cache's scratch row/position and are masked out.

Sharing a model. The decoder owns its KV cache (`Transformer.new_cache`), canvas and carry; the
model holds only weights and RoPE tables, which no forward writes. Several decoders (engines) on
one model therefore cannot corrupt each other, whichever threads drive them.

Device work and host synchronization. Per step, the host-side plan (rows, windows, schedules) goes
to the device in two non-blocking copies (pinned memory on CUDA); sampling parameters live on the
device per slot, written at `add()`. The one host synchronization of a step is the copy back of
the decided rows' current blocks (tokens and committed flags, pinned and non-blocking, then one
wait), to find what became final, detect EOS and advance blocks. There is no `.item()` and no
per-token sync in the policy or sampling code. `compile_mode` compiles the denoising forward with
`torch.compile` (the cache is marked as a static address so CUDA graphs replay in place); the
prefill forward stays eager.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dlm.config import DiffusionSpec
from dlm.errors import DlmError
from dlm.masks import limit_mask
from dlm.model import Transformer
from dlm.policies import StepInputs, UnmaskPolicy, fixed_steps_schedule, sample_tokens

__all__ = ["CACHE_MODES", "COMPILE_MODES", "BlockDecoder", "DecodeSettings", "PrefillError", "RowUpdate",
           "StepTrace", "resolve_cache_mode"]

CACHE_MODES = ("auto", "exact", "none", "prefix", "dual")
# torch.compile modes for the denoising forward ("reduce-overhead" and "max-autotune" use CUDA graphs).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    draft_len: int = 0  # speculative decoding: mask slots per draft block (0: the decoder's default)
    accept: float = 1.0  # speculative decoding, greedy: a draft's least share of the top probability (1: exact)
    constraint: Any = None  # this request's dlm.constraints.TokenConstraint (AR decoders only)


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
    prefill_steps: int = 0  # of `steps`, the prefill forwards
    eos_id: int | None = None  # the EOS id the model wrote, where finish_reason == "eos"


class PrefillError(DlmError):
    """The batched prefill forward of a step failed; its rows were removed from the decoder."""

    def __init__(self, slots: list[int], cause: BaseException) -> None:
        super().__init__(f"prefill failed: {type(cause).__name__}: {cause}")
        self.slots = slots  # the removed rows' cache slots


class Phase(enum.Enum):
    DENOISE = "denoise"  # feed the current block (or the mode's window), commit some slots
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
    prefill_end: int  # exact cache: prompt positions whose K/V are written before decoding (0: none)
    prefill_upto: int  # positions below are prefilled; the row decodes once this reaches prefill_end
    ids: list[int]  # host copy of the row's tokens: the prompt, then every final token (EOS included)
    clean_upto: int  # exact cache: positions below hold clean K/V (prefill, block writes)
    final_upto: int  # positions below are final and were reported
    unit_start: int  # the current sub-block's first position
    unit_masked: int  # masked slots in the current sub-block when it started (FixedSteps)
    generator: torch.Generator | None
    unit_step: int = 0  # steps taken in the current sub-block
    eos_pos: int | None = None  # earliest committed EOS position
    steps: int = 0
    prefill_steps: int = 0  # of steps, the prefill forwards
    pending_write: bool = False  # exact cache: the previous block is complete, its clean K/V not yet written
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


@dataclass
class _CachedPrefix:
    """What a free cache row still holds from its last request (exact cache)."""

    ids: list[int]  # token ids of the positions 0..len-1, whose clean K/V are in the row
    block_size: int  # the block size they were written under (block-causal keys depend on it)


@dataclass
class _Entry:
    """One batch row of a forward."""

    row: _Row
    start: int  # first position fed
    length: int  # positions fed
    # "prefill" / "write": clean tokens, whose K/V become exact and whose last logits become the
    # row's carry; "decide": the current block (or the cache mode's window), predictions wanted.
    kind: str


def _bucket(n: int) -> int:
    """Window and key length buckets: powers of two up to 32, then multiples of 64."""
    if n <= 32:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 64) * 64


def _batch_bucket(n: int) -> int:
    """Batch buckets: powers of two up to 8, then multiples of 8 (a fused write adds a row; a
    coarser bucket would often double the batch for it)."""
    if n <= 8:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 8) * 8


ModelFn = Callable[..., Tensor]


class BlockDecoder:
    def __init__(self, model: Transformer, spec: DiffusionSpec, *, max_batch_size: int,
                 max_seq_len: int, cache: str = "auto", compile_mode: str | None = None,
                 prefill_chunk_tokens: int = 256, prefill_budget_tokens: int = 256,
                 long_prefill_share: float = 1 / 3, prefill_step_s: float | None = 0.3) -> None:
        """compile_mode: None (eager) or one of COMPILE_MODES for the denoising forward.
        prefill_chunk_tokens: most prompt tokens one row prefills per step (rounded down to whole
        blocks, at least one); prefill_budget_tokens: most prompt tokens prefilled per step over
        all rows (at least one chunk); long_prefill_share: most of the wall time that chunks of
        long prompts (more than one chunk left) take while other rows decode; prefill_step_s:
        chunks and budget shrink so that a prefill forward takes about this long at the prefill
        speed measured so far (None: fixed sizes). See "Prefill"."""
        if prefill_chunk_tokens < 1 or prefill_budget_tokens < 1:
            raise ValueError("prefill_chunk_tokens and prefill_budget_tokens must be >= 1")
        if not 0.0 < long_prefill_share <= 1.0:
            raise ValueError("long_prefill_share must lie in (0, 1]")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_budget_tokens = prefill_budget_tokens
        self.long_prefill_share = long_prefill_share
        self.prefill_step_s = prefill_step_s
        self._prefill_tokens_per_s: float | None = None  # moving average of the prefill forwards
        self._long_prefill_resume_s = 0.0  # time.monotonic() from which a long prompt's chunk may run again
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
        self.device = model.device
        self.kv = model.new_cache(max_batch_size, max_seq_len)  # ours alone (see "Sharing a model")
        self._step_fn: ModelFn = model
        if compile_mode is not None:
            if compile_mode not in COMPILE_MODES:
                raise ValueError(f"unknown compile mode {compile_mode!r}; expected one of {COMPILE_MODES}")
            for t in (self.kv.k, self.kv.v):  # CUDA graphs write the cache in place: it must not move
                torch._dynamo.mark_static_address(t)
            self._step_fn = torch.compile(model, mode=compile_mode, fullgraph=True)
        rows = max_batch_size + 1  # + the scratch row
        dev = self.device
        self.canvas = torch.full((rows, max_seq_len + 1), self.filler, dtype=torch.long, device=dev)
        self.committed = torch.zeros((rows, max_seq_len + 1), dtype=torch.bool, device=dev)
        self.carry = torch.zeros((rows, model.config.vocab_size), dtype=torch.float32, device=dev)
        # Per slot: temperature, top_p, threshold, factor; written at add(), read by every step.
        self.sampling = torch.zeros((rows, 4), dtype=torch.float32, device=dev)
        self.rows: dict[int, _Row] = {}
        self.step_seconds: dict[int, float] = {}  # the last step's cost per slot (see step())
        self.cached: dict[int, _CachedPrefix] = {}  # free slots' reusable prefixes (see "Prefix reuse")

    # -- host <-> device ---------------------------------------------------------------------
    def _upload(self, host: Tensor) -> Tensor:
        """A host tensor on the device without a host sync (pinned, non-blocking on CUDA; the
        caching host allocator keeps the pinned buffer alive until the copy is done)."""
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _download(self, t: Tensor) -> list:
        """The step's one host sync: t as (nested) lists."""
        if self.device.type == "cuda":
            host = t.to("cpu", non_blocking=True)  # lands in pinned memory
            torch.cuda.current_stream(self.device).synchronize()
            return host.tolist()
        return t.tolist()

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

    def _key_end(self, entry: _Entry) -> int:
        """One past the last cache position the entry's queries may attend."""
        row, end = entry.row, entry.start + entry.length
        if self.attention == "full":
            return row.total_len
        if self.attention == "block_causal":
            bs = row.settings.block_size
            return -(-end // bs) * bs
        return end

    # -- rows --------------------------------------------------------------------------------
    def add(self, slot: int, prompt_ids: list[int], settings: DecodeSettings) -> None:
        """Start a request in a free slot. No forward: the next steps prefill it (see "Prefill")."""
        if slot in self.rows:
            raise RuntimeError(f"slot {slot} is busy")
        P = len(prompt_ids)
        total = self.required_len(P, settings)
        if total > self.S:
            raise ValueError(f"needs {total} positions; the cache has {self.S}")
        origin = self._origin(P, settings.block_size)
        self.canvas[slot].fill_(self.filler)
        self.canvas[slot, :P] = self._upload(torch.tensor(prompt_ids, dtype=torch.long))
        self.committed[slot].zero_()
        self.committed[slot, :P] = True
        s = settings
        self.sampling[slot] = self._upload(torch.tensor([s.temperature, s.top_p, s.threshold, s.factor]))
        generator = None
        if s.temperature > 0:
            generator = torch.Generator(device=self.device)
            if s.seed is not None:
                generator.manual_seed(s.seed)
            else:
                generator.seed()
        phase = Phase.REFRESH if self.cache in ("prefix", "dual") else Phase.DENOISE
        prefill_end = origin if self.cache == "exact" else 0
        reuse = self.prefix_match(slot, prompt_ids, settings)
        self.cached.pop(slot, None)  # the row's positions from `reuse` on are this request's now
        row = _Row(slot=slot, prompt_len=P, settings=s, gen_end=P + s.max_new_tokens,
                   total_len=total, block_start=origin, phase=phase, prefill_end=prefill_end, prefill_upto=reuse,
                   ids=list(prompt_ids), clean_upto=reuse, final_upto=P, unit_start=P, unit_masked=0,
                   generator=generator)
        self._start_unit(row, P)
        self.rows[slot] = row

    def prefix_match(self, slot: int, prompt_ids: list[int], settings: DecodeSettings) -> int:
        """Prompt positions whose K/V the free slot already holds exactly (see "Prefix reuse")."""
        cached = self.cached.get(slot)
        if cached is None or slot in self.rows:
            return 0
        bs = settings.block_size
        if self.attention == "block_causal" and cached.block_size != bs:
            return 0
        end = min(len(cached.ids), self._origin(len(prompt_ids), bs) - 1)  # keep the carry's position
        n = next((i for i in range(end) if cached.ids[i] != prompt_ids[i]), max(end, 0))
        return n // bs * bs if self.attention == "block_causal" else n

    def remove(self, slot: int) -> None:
        """Free the slot; its clean prefix stays reusable by the next request there."""
        row = self.rows.pop(slot, None)
        if row is None or self.cache != "exact":
            return
        # Where decoding steps run other kernels than the prefill (Transformer.step_kernels), only
        # prefilled positions are kept: reused, they hold exactly what a fresh prefill writes.
        upto = min(row.clean_upto, row.prefill_upto) if self.model.step_kernels else row.clean_upto
        if upto > 0:
            self.cached[slot] = _CachedPrefix(row.ids[:upto], row.settings.block_size)

    def _start_unit(self, row: _Row, first_open: int) -> None:
        """Enter the sub-block holding position first_open (the first uncommitted slot)."""
        sub = row.settings.sub_block_size
        rel = first_open - row.block_start
        row.unit_start = row.block_start + rel // sub * sub
        unit_end = min(row.unit_start + sub, row.needed_end)
        row.unit_masked = max(0, unit_end - max(row.unit_start, first_open))
        row.unit_step = 0

    def _carry_only(self, row: _Row) -> bool:
        """True where the current block is decided from the carry alone (AR-style: no slot fed)."""
        return self.cache == "exact" and self.shift == 1 and row.settings.block_size == 1

    def _window(self, row: _Row) -> tuple[int, int]:
        """(start, length) of the row's decide window at this step."""
        if row.phase is Phase.REFRESH or self.cache == "none":
            end = row.total_len if self.attention == "full" else row.block_end
            return 0, end
        if self.cache == "prefix":
            return row.block_start, row.total_len - row.block_start
        return row.block_start, row.settings.block_size  # exact, dual

    # -- the forward ---------------------------------------------------------------------------
    def _forward(self, entries: list[_Entry], fn: ModelFn, *, eager_prefill: bool = False) -> Tensor:
        """One batched forward over the entries' windows -> logits (B, N, V): at a decide entry,
        its block slots minus the shift (clamped into the window: where a slot's predictor lies
        before the window, the caller takes the carry instead); at a prefill/write entry, its last
        position (every column). Sets the carry of prefill/write entries, and of refresh entries
        where logits are shifted, from this forward's logits."""
        n = len(entries)
        L = max(e.length for e in entries)
        if eager_prefill:  # no compiled graph depends on these shapes: pad less (see "Prefill")
            B, W = n, min(_bucket(L), -(-L // 8) * 8)
        else:
            B, W = _batch_bucket(n), _bucket(L)
        # Prefill/write entries need one column; a prefill-only forward computes no more logits.
        N = max((e.row.settings.block_size for e in entries if e.kind == "decide"), default=1)
        # Host plan, (6, B): slot, start, length, block size, canvas extent, sets the carry.
        plan = [[self.kv.scratch_row] * B, [0] * B, [0] * B, [1] * B, [1] * B, [0] * B]
        out_rel = [[0] * N for _ in range(B)]
        key_end = 1
        for i, e in enumerate(entries):
            row = e.row
            plan[0][i], plan[1][i], plan[2][i] = row.slot, e.start, e.length
            plan[3][i], plan[4][i] = row.settings.block_size, row.total_len
            if e.kind == "decide":
                base = row.block_start - e.start - self.shift
                out_rel[i] = [min(max(base + j, 0), W - 1) for j in range(N)]
                plan[5][i] = int(row.phase is Phase.REFRESH and self.shift == 1)
            else:
                out_rel[i] = [e.length - 1] * N
                plan[5][i] = 1
            key_end = max(key_end, self._key_end(e))
        K = min(_bucket(key_end), self.S)
        host = torch.cat([torch.tensor(plan, dtype=torch.long), torch.tensor(out_rel, dtype=torch.long).T])
        dev_plan = self._upload(host)  # (6 + N, B)
        rows_t, start_t, len_t, bs_t, total_t, sets_carry = dev_plan[:6]
        out_index = dev_plan[6:].T  # (B, N)
        j = torch.arange(W, device=self.device)
        valid = j[None, :] < len_t[:, None]  # (B, W)
        pos = torch.where(valid, start_t[:, None] + j[None, :], self.kv.scratch_pos)  # padding -> scratch
        limits = self._limits(pos, valid, bs_t, total_t)
        tokens = self.canvas[rows_t[:, None], pos]  # (B, W)
        logits = fn(tokens, pos, limit_mask(limits, K), cache=self.kv, cache_rows=rows_t,
                    out_index=out_index)  # (B, N, V)
        # Rows that do not set their carry write the scratch row's (nobody reads it).
        carry_rows = torch.where(sets_carry.bool(), rows_t, self.kv.scratch_row)
        self.carry[carry_rows] = logits[:, 0]
        for row in {id(e.row): e.row for e in entries}.values():
            row.steps += 1
        for e in entries:
            if e.kind != "decide":  # prefill / write: these positions now hold clean K/V
                e.row.clean_upto = max(e.row.clean_upto, e.start + e.length)
        return logits

    # -- the step ------------------------------------------------------------------------------
    def _prefill_entries(self, rows: list[_Row], limit: int) -> list[_Entry]:
        """This step's prefill chunks within the budget: of `rows` (this step's), those still
        prefilling, the one with the least prompt left first (a short voice prompt is not held
        behind a long one; ties in admission order). `limit`: `_prefill_limit` of this step."""
        entries: list[_Entry] = []
        budget = min(self.prefill_budget_tokens, limit)
        waiting = [row for row in rows if row.prefill_upto < row.prefill_end]
        decoding = len(waiting) < len(rows)
        for row in sorted(waiting, key=lambda r: r.prefill_end - r.prefill_upto):
            length = min(self._chunk(limit, row), row.prefill_end - row.prefill_upto)
            if decoding and self._long(row, row.prefill_upto) and time.monotonic() < self._long_prefill_resume_s:
                continue  # a long prompt's turn comes later: the decoding rows go on meanwhile
            if entries and length > budget:
                break
            entries.append(_Entry(row, row.prefill_upto, length, "prefill"))
            budget -= length
        return entries

    def _prefill_limit(self, step_s: float | None) -> int:
        """Most prompt tokens of one row in a prefill forward meant to take about `step_s`."""
        limit = self.prefill_chunk_tokens
        if step_s is not None and self._prefill_tokens_per_s is not None:
            limit = max(1, min(limit, int(self._prefill_tokens_per_s * step_s)))
        return limit

    @staticmethod
    def _chunk(limit: int, row: _Row) -> int:
        """`limit` prompt tokens rounded down to whole blocks of the row, at least one (a chunk
        never ends inside a block its queries may see: block-causal keys)."""
        bs = row.settings.block_size
        return max(limit // bs, 1) * bs

    def _long(self, row: _Row, upto: int) -> bool:
        """Whether the row's prompt from `upto` on is a long one (more than one chunk of
        `prefill_chunk_tokens`, whole blocks), which yields to decoding rows. Judged by the
        configured chunk, not by the chunk shrunk to the measured prefill speed: on a CPU shared
        with other work that speed drops, and a voice turn's few dozen new tokens would count as
        long and wait behind every long prompt's share of the time."""
        return row.prefill_end - upto > self._chunk(self.prefill_chunk_tokens, row)

    def step(self, hold: Collection[int] = (), prefill_step_s: float | None = None) -> list[RowUpdate]:
        """One step: a batched prefill forward over the rows still prefilling (if any), then one
        denoising forward at most over the rows ready to decode; an update per decoded row. Rows
        whose slot is in `hold` take no part: they keep their state for a later step.
        `prefill_step_s`, where given, replaces the decoder's for this step's prefill (shorter: a
        step that others may have to wait for ends sooner; such a step's prefill speed is not
        measured: a forward of fewer tokens does less per second, and the next steps' chunks
        would shrink). Afterwards
        `step_seconds` says what the step cost each row that took part (slot -> seconds: a prefill
        forward's time split by the rows' prompt tokens, the denoising forward's split evenly).
        Raises PrefillError (after removing its rows) where the prefill forward fails."""
        self.step_seconds = {}
        step_s = self.prefill_step_s if prefill_step_s is None else prefill_step_s
        rows = self._prefill_step([row for slot, row in self.rows.items() if slot not in hold], step_s,
                                  measure=prefill_step_s is None)
        if not rows:
            return []
        started_s = time.monotonic()
        updates = self._decode_step(rows)
        share_s = (time.monotonic() - started_s) / len(rows)
        for row in rows:
            self.step_seconds[row.slot] = self.step_seconds.get(row.slot, 0.0) + share_s
        return updates

    def _prefill_step(self, rows: list[_Row], step_s: float | None, measure: bool) -> list[_Row]:
        """This step's prefill forward over `rows`, if any, sized to take about `step_s` (and
        where `measure`, its speed updates the measured prefill speed); those of them ready to
        decode (prefill complete)."""
        limit = self._prefill_limit(step_s)
        prefill = self._prefill_entries(rows, limit)
        if prefill:
            long = any(self._long(e.row, e.start) for e in prefill) and len(rows) > len(prefill)
            started_s = time.monotonic()
            try:
                self._forward(prefill, self.model, eager_prefill=True)  # prompt chunks come in many shapes
            except Exception as e:
                slots = [entry.row.slot for entry in prefill]
                for slot in slots:
                    self.remove(slot)
                raise PrefillError(slots, e) from e
            for entry in prefill:
                entry.row.prefill_upto = entry.start + entry.length
                entry.row.prefill_steps += 1
            took_s = time.monotonic() - started_s
            tokens = sum(e.length for e in prefill)
            for entry in prefill:
                self.step_seconds[entry.row.slot] = took_s * entry.length / tokens
            # A forward's fixed cost weighs more the fewer tokens it has: only a forward with a
            # full chunk (a row cut at this step's limit), or one slower than the target, says
            # what a chunk will take. (Measured from every forward, a voice call's short tails of
            # 10-30 new tokens a turn drove it from 178 to 52 tokens/s in eight turns, and each
            # tail then took 2-8 forwards; measured on full chunks only, a low reading recovers:
            # its chunks are full and run faster than it says.)
            full = any(e.length >= self._chunk(limit, e.row) for e in prefill)
            if measure and (self._prefill_tokens_per_s is None or full or (step_s is not None and took_s > step_s)):
                rate = tokens / max(took_s, 1e-6)
                self._prefill_tokens_per_s = rate if self._prefill_tokens_per_s is None else 0.7 * self._prefill_tokens_per_s + 0.3 * rate
            if long:  # while other rows decode, long prompts take at most long_prefill_share of the time
                self._long_prefill_resume_s = time.monotonic() + took_s * (1 / self.long_prefill_share - 1)
        return [row for row in rows if row.prefill_upto >= row.prefill_end]

    def _decode_step(self, rows: list[_Row]) -> list[RowUpdate]:
        """The denoising forward over the rows ready to decode, and their updates."""
        entries: list[_Entry] = []
        decide_src: list[int] = []  # per row: its decide entry's batch index, -1 for carry only
        for row in rows:
            if row.pending_write:  # exact cache: the finished block, clean, in the same forward
                bs = row.settings.block_size
                entries.append(_Entry(row, row.block_start - bs, bs, "write"))
                row.pending_write = False
            if self._carry_only(row):
                decide_src.append(-1)
            else:
                decide_src.append(len(entries))
                entries.append(_Entry(row, *self._window(row), "decide"))
        logits = self._forward(entries, self._step_fn) if entries else None
        use_carry = [src < 0 or row.block_start - entries[src].start - self.shift < 0
                     for row, src in zip(rows, decide_src, strict=True)]
        return self._decide(rows, logits, decide_src, use_carry)

    def _decide(self, rows: list[_Row], logits: Tensor | None, src: list[int],
                use_carry: list[bool]) -> list[RowUpdate]:
        """Sample, select what to commit, write the canvas, sync once, advance the rows.
        logits (B_fwd, N, V) from this step's forward or None; src: each row's batch index in it
        (-1: none); use_carry: the row's first slot is predicted by its carry."""
        N = max(row.settings.block_size for row in rows)
        V = self.carry.shape[-1]
        n = len(rows)
        policies = list({id(row.settings.policy): row.settings.policy for row in rows}.values())
        pos_h = [[self.S] * N for _ in range(n)]  # the block's absolute positions (scratch past it)
        allowed = [[0] * N for _ in range(n)]  # slots of the current sub-block
        n_commit = []
        for i, row in enumerate(rows):
            s = row.settings
            pos_h[i][: s.block_size] = range(row.block_start, row.block_end)
            lo, hi = row.unit_start, min(row.unit_start + s.sub_block_size, row.needed_end)
            for j in range(max(lo - row.block_start, 0), max(hi - row.block_start, 0)):
                allowed[i][j] = 1
            steps = s.steps_per_block or s.sub_block_size
            # Past its schedule (only if a step committed less than planned): commit the rest.
            n_commit.append(fixed_steps_schedule(row.unit_masked, steps, row.unit_step)
                            if row.unit_step < steps else row.unit_masked)
        per_row = [[row.slot for row in rows], [max(i, 0) for i in src], [int(c) for c in use_carry], n_commit,
                   [next(k for k, p in enumerate(policies) if p is row.settings.policy) for row in rows]]
        host = torch.cat([torch.tensor(per_row, dtype=torch.long).T, torch.tensor(pos_h, dtype=torch.long),
                          torch.tensor(allowed, dtype=torch.long)], dim=1)  # (n, 5 + 2N)
        dev = self._upload(host)
        slots, src_t, carry_t, n_commit_t, policy_t = dev[:, :5].T
        pos, allowed_t = dev[:, 5:5 + N], dev[:, 5 + N:].bool()
        if logits is None:  # only carry-only rows (block size 1): N == 1
            block_logits = self.carry[slots][:, None, :].expand(n, N, V)
        else:
            block_logits = logits[src_t, :N]  # (n, N, V), a copy: column 0 may be replaced below
            block_logits[:, 0] = torch.where(carry_t.bool()[:, None], self.carry[slots], block_logits[:, 0])
        tok = self.canvas[slots[:, None], pos]  # (n, N)
        done = self.committed[slots[:, None], pos]
        candidates = allowed_t & ~done
        sampling = self.sampling[slots]  # (n, 4)
        uniform = None
        if any(row.generator is not None for row in rows):
            uniform = torch.stack([
                torch.rand((N, V), generator=row.generator, device=self.device) if row.generator is not None
                else torch.full((N, V), 0.5, device=self.device)
                for row in rows
            ])
        proposal, confidence = sample_tokens(block_logits, sampling[:, 0], sampling[:, 1], uniform)
        inputs = StepInputs(threshold=sampling[:, 2], factor=sampling[:, 3], n_commit=n_commit_t)
        commit = torch.zeros_like(candidates)
        for k, policy in enumerate(policies):
            commit |= policy.select(confidence, candidates, inputs) & (policy_t == k)[:, None]
        new_tok = torch.where(commit, proposal, tok)
        new_done = done | commit
        self.canvas[slots[:, None], pos] = new_tok
        self.committed[slots[:, None], pos] = new_done
        tok_h, done_h = self._download(torch.stack([new_tok, new_done.long()]))  # the one host sync
        return [self._advance(row, tok_h[i], [bool(d) for d in done_h[i]]) for i, row in enumerate(rows)]

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
            row.ids.append(t)
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
            if self.cache == "exact":
                row.pending_write = True
            elif self.cache in ("prefix", "dual"):
                row.phase = Phase.REFRESH
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
                         tokens=row.final_upto - row.prompt_len - (1 if finish == "eos" else 0), trace=trace,
                         prefill_steps=row.prefill_steps, eos_id=row.ids[row.eos_pos] if finish == "eos" else None)
