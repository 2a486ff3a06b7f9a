"""One decoder-only transformer for every family, with a static KV cache.

Contract:
- `Transformer(config)` is a Llama/Qwen-style decoder (RMSNorm, rotate-half RoPE, grouped-query
  attention, SwiGLU, optional q/k/v biases, optional per-head q/k RMSNorm, optional tied
  embeddings). Its `state_dict()` uses exactly the Hugging Face Llama names listed in
  `dlm/config.py`, so `model.load_state_dict(hf_style_state_dict)` works unchanged. The RoPE
  tables and the KV cache are non-persistent buffers: they never appear in the state dict.
- The model does not know about attention *shapes* (causal, full, block-causal): every forward
  takes an explicit boolean mask (True = may attend). `dlm.masks` builds the usual ones.
- Two forwards:
  * `forward(tokens, positions, mask)`: cache-free, for training layouts such as x_t ⊕ x_0
    (positions 0..L-1 repeated). `mask` is (B or 1, 1, T, T).
  * `forward(tokens, positions, mask, cache=cache, cache_rows=rows)`: the cached forward. The
    K/V of the T input tokens are first written into the static cache at (row, position), then
    the queries attend over the first `K = mask.shape[-1]` cache positions of their rows. `mask`
    is (B, 1, T, K). Writing before attending makes one forward serve every cache strategy: an
    exact block cache, a prefix cache and a dual (prefix + suffix) cache differ only in which
    window of positions the caller feeds and which keys the mask allows. Two batch rows may
    point at the same cache row (at disjoint positions): within each layer every row's K/V is
    written before any row attends, so a clean block fed in one batch row is visible, exactly,
    to the noisy next block fed in another.
- The cache is not part of the model: `new_cache(max_batch_size, max_seq_len)` allocates a
  `KVCache` (all layers, once) that the caller owns and passes to every cached forward. The model
  itself holds only weights and the RoPE tables, so any number of decoders (engines) can share
  one model, even from several threads, without touching each other's state.
- A `KVCache` has one spare row and one spare position (`scratch_row`, `scratch_pos`): callers
  that pad a batch to a fixed shape point padding rows and padding positions there, so padding
  never overwrites live K/V.
- `out_index` (B, N) selects which of the T positions get logits, so a forward that only needs
  a few predictions does not pay for the (T, V) output projection.
- Built on the "meta" device (no memory, no init) and loaded with `assign=True`, the model has
  no real RoPE tables yet: `build_rope(device)` makes them.
- Drafting (dlm/drafter.py): `draft=DraftInputs(adapter, start, slot_index)` marks the positions
  from `start` on as mask slots: their input is the adapter's mask embedding of their slot index,
  and every projection adds the adapter's low-rank update there. Positions before `start` run
  the unchanged base. `write_positions` (B, T) puts the K/V of the inputs at other cache
  positions than their RoPE positions (draft slots live in spare positions past the row's text),
  and `hidden=True` returns the final normed hidden states instead of logits (`logits(h)` turns
  the ones wanted into logits).
- `pack_linears()` (bfloat16 on a CPU with oneDNN): every projection, and the output head, use
  oneDNN's prepacked weight layout (q, k, v as one matmul, gate and up as one): plain bf16
  matmuls reorder the weight at every call (docs/benchmarks.md: the packed bf16 AR engine decodes
  1.3x faster than the float32 one); the packed copies live beside the weights (no state-dict
  change) and are dropped by `unpack_linears()`. Calls go PACKED_ROWS rows at a time, and attention on CPU in bf16 runs in
  float64 at text positions (`exact_attention`), so a position's result does not depend on the
  batch, the prefill chunking or the other tokens of the forward: a forward verifying k drafts
  reproduces the one-token-per-step logits bit for bit.
- `pack_linears(int4)` with int4 weights (`Int4Weight`, from a GGUF's own 4-bit blocks:
  dlm.checkpoints.load_model(weights="int4")): the text positions of a decoding step
  (`forward(step=True)`: the AR step, the positions a draft-and-verify forward verifies) run the
  int4 weights, which read a quarter of bf16's bytes (a fine-tune's low-rank update beside them,
  unmerged: `Int4Weight.with_low_rank`); the prefill and mask slots run the packed bf16 copies
  (see `Projection`). `release_dense_weights()` then frees the dense copies: the
  model is inference-only from there on.
- `use_blocks(blocks)` (float32 on CPU): every projection and the output head run a GGUF's own
  quantized blocks (`dlm.blocks.BlockWeight`, dlm.checkpoints.load_model(weights="blocks")) at
  every position, in float32: the dense float32 model's weights bit for bit, only the order of the
  sums differs (fixed, and per row, so a position's result does not depend on the batch either);
  about a sixth of float32's bytes a token. `release_dense_weights()` applies as after packing.
  A forward with a cache (the engines': prefills, steps) then runs every layer in one C call
  (`dlm.blocks.BlockLayers`: the same formulas, each row from its own inputs and cache row only;
  a draft's mask slots add the drafter's updates there, `Drafter.block_updates`; padding rows,
  written at the scratch position, are skipped); forwards without a cache or with gradients run
  the layers' own torch forward.
"""

from __future__ import annotations

import copy
import math
import mmap
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.blocks import BlockLayers, BlockWeight, LayerWeights
from dlm.config import ModelConfig

__all__ = ["PROJECTIONS", "Attention", "BlockProjection", "DecoderLayer", "DraftInputs", "Int4Weight", "KVCache",
           "Projection", "RMSNorm", "Transformer", "can_pack_linears", "projection_shapes", "projection_subset"]

# A layer's projections: short name -> the module's path inside the layer (Hugging Face names).
PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def projection_subset(names: Any) -> tuple[str, ...]:
    """`names` as a tuple; ValueError unless they are a non-empty subset of PROJECTIONS' short
    names (what a low-rank file, an adapter or a drafter, may target)."""
    names = tuple(names)
    if not names or set(names) - set(PROJECTIONS):
        raise ValueError(f"targets must be a non-empty subset of {tuple(PROJECTIONS)}, not {names}")
    return names


def projection_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a layer, by short name."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"q": (c.dim, q), "k": (c.dim, kv), "v": (c.dim, kv), "o": (q, c.dim),
            "gate": (c.dim, c.intermediate_size), "up": (c.dim, c.intermediate_size),
            "down": (c.intermediate_size, c.dim)}


class LayerAdapter(Protocol):
    """One layer's low-rank updates (dlm.drafter.DraftLayer)."""

    def update(self, names: tuple[str, ...], x: Tensor, y: Tensor, start: int) -> Tensor:
        """y = the projections `names` of x, side by side ("q", "k", "v" fused, or one name);
        return y with the updates added at positions start.. (dim 1)."""
        ...


@dataclass
class DraftInputs:
    """Which positions of a forward are mask slots, and the adapter that runs there."""

    adapter: Any  # dlm.drafter.Drafter: .layers[i] (LayerAdapter), .slot_embedding(slot_index, dtype)
    start: int  # positions start.. of every row are mask slots
    slot_index: Tensor  # (B, T - start) long: each slot's index inside its draft block


def can_pack_linears(dtype: torch.dtype, device: torch.device | str) -> bool:
    """True where `Transformer.pack_linears` applies: bf16 on a CPU whose oneDNN has bf16."""
    return (dtype == torch.bfloat16 and torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# oneDNN's packed bf16 matmul gives every row the same bits whatever the other rows, as long as
# a call has at most this many rows (beyond, it changes its blocking: measured on AMX, torch 2.13).
PACKED_ROWS = 32


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ a packed weight, PACKED_ROWS rows per call, so that each row's result does
    not depend on how many rows came with it (a batch, a prefill chunk, a verified draft)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= PACKED_ROWS:
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    else:
        out = torch.cat([torch.ops.mkldnn._linear_pointwise(rows[i:i + PACKED_ROWS], packed, bias, "none", [], "")
                         for i in range(0, rows.shape[0], PACKED_ROWS)])
    return out.view(*x.shape[:-1], out.shape[-1])


# torch's CPU int4 kernel packs and computes a weight's outputs in blocks of this many.
INT4_BLOCK_OUTPUTS = 64


@dataclass
class Int4Weight:
    """A weight stored as groups of 4-bit integers, in torch's CPU int4 layout: within each group
    of `group_size` inputs, w = (q - 8) * scale + zero. GGUF's Q4_0 and Q4_1 blocks are exactly
    this (blocks of 32: w = d * q + m, so scale = d and zero = m + 8 d), so a GGUF's own weights
    run without re-quantising (scale and zero are rounded to bf16). The kernel computes each row
    on its own: a row's bits do not depend on the other rows of the call."""

    packed: Tensor  # (N, K / 2) uint8
    scales_zeros: Tensor  # (K / group_size, N, 2) bf16
    group_size: int
    # A fine-tune's update of these weights (dlm.adapter), unmerged: (down (R, K), up (N, R)) in
    # float64, output += x down^T up^T. See `with_low_rank`.
    low_rank: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_blocks(cls, q: Tensor, scale: Tensor, minimum: Tensor) -> Int4Weight:
        """q (N, K) integers 0..15, scale and minimum (N, K / group): w = q * scale + minimum."""
        group = q.shape[1] // scale.shape[1]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        zero = minimum.float() + 8 * scale.float()
        scales_zeros = torch.stack([scale.float().t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, scales_zeros, group)

    def with_low_rank(self, down: Tensor, up: Tensor) -> Int4Weight:
        """These weights plus a low-rank update W + up @ down (down (R, K), up (N, R); a LoRA
        adapter with its scale folded into `up`), kept apart from the 4-bit blocks: rounding the
        update into them would erase most of it (it is smaller than a 4-bit step). The update runs
        in float64: x down^T is exact there (products of bf16 numbers, summed in any order), the
        product with up rounds at ~1e-16 relative, far below the bf16 step its sum with the int4
        output is rounded to once; so a row's result does not depend on the other rows of the
        call, as the int4 kernel's does not."""
        if self.low_rank is not None:
            raise ValueError("these int4 weights already carry a low-rank update")
        n, k = self.packed.shape[0], self.packed.shape[1] * 2
        if down.shape[1] != k or up.shape[0] != n or down.shape[0] != up.shape[1]:
            raise ValueError(f"a low-rank update of a ({n}, {k}) weight needs down (R, {k}) and up ({n}, R), "
                             f"not {tuple(down.shape)} and {tuple(up.shape)}")
        return Int4Weight(self.packed, self.scales_zeros, self.group_size,
                          (down.detach().double().contiguous(), up.detach().double().contiguous()))

    @staticmethod
    def cat(parts: list[Int4Weight | None]) -> Int4Weight | None:
        """Projections of the same input side by side (fused q/k/v, gate/up); their low-rank
        updates, where any has one, side by side too (one down of the summed rank, a block-diagonal
        up). None where a part has no int4 weight, or where a part before the last has a number of
        outputs that is not a multiple of INT4_BLOCK_OUTPUTS (the packed layout goes by blocks of
        that many outputs: such a part's tail would be read as its neighbour's)."""
        if not all(parts) or any(p.packed.shape[0] % INT4_BLOCK_OUTPUTS for p in parts[:-1]):
            return None
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("fused int4 weights need one group size")
        low_rank = None
        if any(p.low_rank is not None for p in parts):
            downs = [p.low_rank[0] for p in parts if p.low_rank is not None]
            up = torch.zeros(sum(p.packed.shape[0] for p in parts), sum(d.shape[0] for d in downs),
                             dtype=torch.float64)
            row = col = 0
            for p in parts:
                if p.low_rank is not None:
                    part_up = p.low_rank[1]
                    up[row:row + part_up.shape[0], col:col + part_up.shape[1]] = part_up
                    col += part_up.shape[1]
                row += p.packed.shape[0]
            low_rank = (torch.cat(downs), up)
        return Int4Weight(torch.cat([p.packed for p in parts]), torch.cat([p.scales_zeros for p in parts], dim=1),
                          parts[0].group_size, low_rank)

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel reads rows densely
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_zeros)
        if self.low_rank is not None:
            down, up = self.low_rank
            out = F.linear(F.linear(rows.double(), down), up).add_(out).to(out.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @property
    def nbytes(self) -> int:
        low_rank = 0 if self.low_rank is None else sum(t.nbytes for t in self.low_rank)
        return self.packed.nbytes + self.scales_zeros.nbytes + low_rank


class Int8AsInt4Weight:
    """A weight of 8-bit blocks (GGUF's Q8_0: w = d * q, q in -128..127, blocks of 32) run as two
    int4 weights: with q + 128 = 16 hi + lo, w = 16 d (hi - 8) + d lo, exactly (d rounded to
    bf16). At one row the two int4 passes read 35 MB where bf16 reads 56 for SmolLM2's head."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        """q (N, K) integers -128..127, scale (N, K / group)."""
        u = q.to(torch.int32) + 128
        self.hi = Int4Weight.from_blocks(u >> 4, 16 * scale.float(), -128 * scale.float())
        self.lo = Int4Weight.from_blocks(u & 15, scale.float(), torch.zeros_like(scale, dtype=torch.float32))

    def __call__(self, x: Tensor) -> Tensor:
        return self.hi(x) + self.lo(x)

    @property
    def nbytes(self) -> int:
        return self.hi.nbytes + self.lo.nbytes


# Up to this many rows, the int4 kernel (about 1x, 1.1x, 1.6x, 2.8x a 1-row call at 1, 2, 4, 8
# rows, measured on AMX, torch 2.13) costs less than the packed bf16 one (about 3.5x a 1-row int4
# call at any count up to 32), which reads four times the bytes.
STEP_INT4_ROWS = 8


class Projection:
    """One projection, or several of the same input fused side by side, in the formats the CPU
    inference path runs (no autograd): `amx` (oneDNN-packed bf16, for calls of many rows: AMX
    makes 32 rows cost about what one does) and optionally `int4` (for the rows of a decoding
    step: at one row a matmul reads the whole weight, and 4 bits read a quarter of bf16's bytes).
    `step` leading positions (dim 1) take `int4` where there is one, the rest `amx`; which
    positions are steps is the forward's choice (`Transformer.forward`), never the call's size,
    so a position's bits do not depend on what came with it. The rows after the step positions
    (draft-block slots: proposals, whose bits decide nothing exact) take whichever is cheaper:
    int4 with the step rows where the call has at most STEP_INT4_ROWS rows in all, else `amx`.
    `amx=False` (with int4 only): no bf16 copy, every row runs int4 (the output head, which sees
    a row or two per prompt)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, int4: Int4Weight | Int8AsInt4Weight | None = None,
                 amx: bool = True) -> None:
        if not amx and int4 is None:
            raise ValueError("a projection needs its bf16 copy or an int4 weight")
        self.amx = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_ROWS) if amx else None
        self.bias = None if bias is None else bias.detach()
        self.int4 = int4

    @property
    def step_kernels(self) -> bool:
        """True where a decoding step's positions run other kernels than the prefill's."""
        return self.int4 is not None

    def __call__(self, x: Tensor, step: int) -> Tensor:
        if self.int4 is None or (step <= 0 and self.amx is not None):
            return packed_linear(x, self.amx, self.bias)
        if step >= x.shape[1] or self.amx is None or x.shape[0] * x.shape[1] <= STEP_INT4_ROWS:
            y = self.int4(x)
        else:
            y = torch.cat([self.int4(x[:, :step]), packed_linear(x[:, step:], self.amx, None)], dim=1)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        amx = 0 if self.amx is None else self.amx.element_size() * self.amx.numel()  # also an opaque oneDNN tensor
        return amx + (self.int4.nbytes if self.int4 is not None else 0)


class BlockProjection:
    """One projection (or a fused group) on float32 block weights (dlm.blocks) at every position:
    the same kernel for the prefill and the steps, so a step's K/V are what a prefill writes."""

    step_kernels = False

    def __init__(self, weight: BlockWeight, bias: Tensor | None) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: Tensor, step: int) -> Tensor:
        y = self.weight(x)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes)


class BlockEmbedding:
    """The input embedding looked up in a GGUF's own blocks: each row dequantised as it is needed,
    w = q * scale + minimum in float32 (a GGUF's Q4/Q8 products are exact in float32, so these are
    the dense table's values bit for bit: `Transformer.use_block_embedding` checks every row of a
    loaded table; a load on the block formats loads none, these blocks being its only source).
    Q8_0 SmolLM2's table: 32 MB here against 113 MB as float32 rows. (Q4 codes are kept one a
    byte: twice their packed size, simpler indexing.)"""

    def __init__(self, q: Tensor, scale: Tensor, minimum: Tensor) -> None:
        n, k = q.shape
        if scale.shape != (n, k // 32) or minimum.shape != scale.shape or k % 32:
            raise ValueError(f"embedding blocks: q {tuple(q.shape)}, scale {tuple(scale.shape)} and minimum "
                             f"{tuple(minimum.shape)} do not describe blocks of 32")
        self.q = q.contiguous()
        self.scale = scale.float().contiguous()
        self.minimum = None if not minimum.any() else minimum.float().contiguous()  # Q8_0: none

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (...) -> their rows (..., K) in float32."""
        k = self.q.shape[1]
        flat = tokens.reshape(-1)
        w = self.q.index_select(0, flat).float().view(-1, k // 32, 32) * self.scale.index_select(0, flat)[..., None]
        if self.minimum is not None:
            w = w + self.minimum.index_select(0, flat)[..., None]
        return w.view(*tokens.shape, k)

    @property
    def tensors(self) -> list[Tensor]:
        return [t for t in (self.q, self.scale, self.minimum) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _dense(weight: Tensor) -> None:
    if weight.is_meta:
        raise RuntimeError("this model was loaded for inference only (its dense weights were released after "
                           "packing): load it with weights='dense' to train or to run it with gradients")


class Linear(nn.Linear):
    """nn.Linear that runs its `proj` once there is one: a `Projection` (`pack()`, see
    pack_linears) or a `BlockProjection` (`Transformer.use_blocks`)."""

    proj: Projection | BlockProjection | None = None

    def pack(self, int4: Int4Weight | None = None) -> None:
        self.proj = Projection(self.weight, self.bias, int4)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        if self.proj is None or torch.is_grad_enabled():  # the packed ops have no backward
            _dense(self.weight)
            return super().forward(x)
        return self.proj(x, step)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, then round and scale in x's dtype, as Hugging Face Llama does (in
        # place where that saves a call: at one row per step the calls are what costs).
        y = x.float()
        return self.weight * (y * (y.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt_()).to(x.dtype)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """`torch.zeros(shape)`, but on a CPU in an anonymous memory map of its own: its pages read as
    zeros and take memory only once written. A cache sized for the longest context and the largest
    batch (the default model's: 1.6 GB) then holds resident only the positions its rows have used;
    `torch.zeros` writes every page at once. Reading a page never written costs no memory either.
    What a row once wrote stays resident (freed rows are overwritten, not handed back): a cache
    grows toward the longest contexts its rows have held (the default model: 46 kB a position)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # (Windows: no such map)
        return torch.zeros(shape, dtype=dtype, device=device)
    # Private: a page read before it is written is the system's shared zero page (a shared
    # anonymous map would give it memory of its own). The tensor keeps the map alive
    # (torch.frombuffer holds a reference to it).
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where huge pages are always on, one write would take 2 MB
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    """Static cache of every layer, (L, B_max + 1, S + 1, H_kv, D) for k and for v, written in
    place by index. Row and position lead each layer's layout so that writing by (row, position)
    is a cheap index_put on the leading dims; with heads in front, torch restrides the whole
    cache per write. On a CPU it is `lazy_zeros`: resident only where written."""

    def __init__(self, n_layers: int, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, max_batch_size + 1, max_seq_len + 1, n_kv_heads, head_dim)
        self.k = lazy_zeros(shape, dtype, device)
        self.v = lazy_zeros(shape, dtype, device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per-layer views, made once
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len

    @property
    def scratch_row(self) -> int:
        """A cache row no request owns: padding rows of a fixed-shape batch write here."""
        return self.max_batch_size

    @property
    def scratch_pos(self) -> int:
        """A cache position no token owns: padding slots of a window write here."""
        return self.max_seq_len

    def update(self, layer: int, rows: Tensor, positions: Tensor, k: Tensor, v: Tensor,
               kv_len: int, row: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, Hkv, D) at (rows (B,), positions (B, T)); return (B, Hkv, K, D).
        `row`: rows[0] as an int where the batch is that one row on a CPU (the keys are then a
        view of the cache, not a copy). Where k carries gradients (training a drafter over a
        cached prefix), nothing is written: the returned keys are the cache's with k, v put in
        their place."""
        k_layer, v_layer = self._layers[layer]  # views: the writes land in the cache
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            b = torch.arange(rows.shape[0], device=rows.device)[:, None]
            k_rows = k_layer.index_select(0, rows).to(k.dtype).index_put((b, positions), k)
            v_rows = v_layer.index_select(0, rows).to(v.dtype).index_put((b, positions), v)
            return k_rows[:, :kv_len].transpose(1, 2), v_rows[:, :kv_len].transpose(1, 2)
        r = rows[:, None]  # (B, 1) broadcasts against positions (B, T)
        k_layer[r, positions] = k if k.dtype == k_layer.dtype else k.to(k_layer.dtype)
        v_layer[r, positions] = v if v.dtype == v_layer.dtype else v.to(v_layer.dtype)
        if row is not None:  # one row: a view, no copy (but for a cache in another dtype)
            k_rows, v_rows = k_layer[row:row + 1, :kv_len], v_layer[row:row + 1, :kv_len]
        else:
            # Slice first (a view), then gather the rows: only K positions are copied. index_select
            # copies whole (K, Hkv, D) slabs; advanced indexing computes every element's offset
            # (about twice as slow on CPU).
            k_rows = k_layer[:, :kv_len].index_select(0, rows)  # (B, K, Hkv, D)
            v_rows = v_layer[:, :kv_len].index_select(0, rows)
        if k_rows.dtype != k.dtype:  # a float16 cache of a float32 model (`Transformer.use_half_cache`)
            k_rows, v_rows = k_rows.to(k.dtype), v_rows.to(v.dtype)
        return k_rows.transpose(1, 2), v_rows.transpose(1, 2)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention q (B, H, T, D), k, v (B, Hkv, K, D), mask (B or 1, 1, T, K): bool,
    or float64 additive (`exact_mask`) -> (B, H, T, D) in q's dtype, computed in float64: a
    product of two bf16 numbers is exact
    there, and so is a sum of D of them unless their magnitudes span more than ~2^37, so the
    scores do not depend on the summation order; the softmax and the weighted sum differ by
    ~1e-16 at most, far below a bf16 rounding step. Each query's result is therefore the same
    whatever the other queries, the key padding or the batch are. One fused SDPA call (fewer
    calls than the explicit products: at one query per row the calls are what costs)."""
    y = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                       enable_gqa=k.shape[1] != q.shape[1])
    return y.to(q.dtype)


def exact_mask(mask: Tensor) -> Tensor:
    """A bool mask as exact_attention's additive float64 mask (0 where True, -inf elsewhere):
    made once per forward, so that no layer converts it again."""
    return torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill_(~mask, float("-inf"))


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate-half RoPE on x (..., D): x * cos + (-x2, x1) * sin, with the sign folded into the
    table ((-sin, sin) halves) so that the rotation is one roll; the same bits as with a negation."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_dim = config.n_heads * config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        self.q_proj = Linear(config.dim, q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    qkv: Projection | BlockProjection | None = None

    def pack(self, int4: dict[str, Int4Weight]) -> None:
        """q, k, v as one projection (one call instead of three), and o; `int4`: the int4 weights
        of this layer's projections by name ("q", "k", "v", "o"), where the checkpoint has them
        (the fused q, k, v run int4 where `Int4Weight.cat` can fuse them)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight.detach() for p in projs])
        bias = None if projs[0].bias is None else torch.cat([p.bias.detach() for p in projs])
        parts = [int4.get(name) for name in ("q", "k", "v")]
        self.qkv = Projection(weight, bias, Int4Weight.cat(parts))
        self.o_proj.pack(int4.get("o"))

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor, draft: tuple[LayerAdapter, int] | None,
             step: int) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, H, D), k, v (B, T, Hkv, D), RoPE applied to q and k."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv is not None and not torch.is_grad_enabled():
            qkv = self.qkv(x, step)
            if draft is not None:
                qkv = draft[0].update(("q", "k", "v"), x, qkv, draft[1])
            if self.q_norm is None:  # q and k side by side: one RoPE call for both
                qk = apply_rope(qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin)
                return qk[:, :, :H], qk[:, :, H:], qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if draft is not None:
                lora, start = draft
                q, k, v = (lora.update((name,), x, y, start) for name, y in (("q", q), ("k", k), ("v", v)))
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # cos, sin (B, T, 1, D) in x's dtype

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: tuple[KVCache, int, Tensor, Tensor, int | None] | None,
                draft: tuple[LayerAdapter, int] | None = None, step: int = 0,
                exact: Tensor | None = None) -> Tensor:
        """cache: (the cache, this layer's index, rows (B,), write positions (B, T), rows[0] as
        an int where the batch is one row on a CPU, else None) or None;
        draft: (this layer's adapter, first mask-slot position) or None; step: the leading
        positions that run the step kernels (`Projection`); exact: `exact_mask(mask)` where
        this forward runs exact attention (bf16 on CPU), made once for every layer."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._qkv(x, cos, sin, draft, step)  # (B, T, heads, D)
        if cache is not None:
            kv_cache, layer, rows, positions, row = cache
            k, v = kv_cache.update(layer, rows, positions, k, v, mask.shape[-1], row)  # (B, Hkv, K, D)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)  # (B, H, T, D)
        # Grouped-query attention inside SDPA: no (B, H, K, D) copy of the keys where the kernel
        # supports it (the math fallback expands them itself).
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            # Low-precision attention depends, in its last bits, on how many queries and keys the
            # call holds, and in bf16 one flipped bit grows into a different token a few layers
            # on. Text positions therefore use `exact_attention` (whose result does not depend on
            # the rest of the forward), so a forward that verifies several tokens reproduces the
            # one-token-per-step logits bit for bit; mask slots (drafts only) keep the fast kernel.
            # Training (gradients on) needs no such bits and always takes the fast kernel.
            start = T if draft is None else draft[1]
            y = exact_attention(q[:, :, :start], k, v, (exact_mask(mask) if exact is None else exact)[:, :, :start])
            if start < T:
                fast = F.scaled_dot_product_attention(q[:, :, start:], k, v, attn_mask=mask[:, :, start:],
                                                      enable_gqa=Hkv != H)
                y = torch.cat([y, fast], dim=2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        out = self.o_proj(y, step)
        return out if draft is None else draft[0].update(("o",), y, out, draft[1])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.dim, bias=False)

    gate_up: Projection | BlockProjection | None = None

    def pack(self, int4: dict[str, Int4Weight]) -> None:
        """gate and up as one projection, and down (`int4` as in Attention.pack)."""
        weight = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        parts = [int4.get("gate"), int4.get("up")]
        self.gate_up = Projection(weight, None, Int4Weight.cat(parts))
        self.down_proj.pack(int4.get("down"))

    def forward(self, x: Tensor, draft: tuple[LayerAdapter, int] | None = None, step: int = 0) -> Tensor:
        if self.gate_up is not None and not torch.is_grad_enabled():
            gate_up = self.gate_up(x, step)
            if draft is not None:
                gate_up = draft[0].update(("gate", "up"), x, gate_up, draft[1])
            gate, up = gate_up.chunk(2, dim=-1)
        elif draft is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate = draft[0].update(("gate",), x, self.gate_proj(x), draft[1])
            up = draft[0].update(("up",), x, self.up_proj(x), draft[1])
        h = F.silu(gate) * up
        out = self.down_proj(h, step)
        return out if draft is None else draft[0].update(("down",), h, out, draft[1])


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: tuple[KVCache, int, Tensor, Tensor, int | None] | None,
                draft: tuple[LayerAdapter, int] | None = None, step: int = 0,
                exact: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, draft, step, exact)
        return x + self.mlp(self.post_attention_layernorm(x), draft, step)


class _Backbone(nn.Module):
    """The `model.` prefix of the Hugging Face names."""

    def __init__(self, config: ModelConfig, init: bool = True) -> None:
        super().__init__()
        weight = None if init else torch.empty(config.vocab_size, config.dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, *, init: bool = True) -> None:
        """init False, for a model built on the meta device whose tensors are assigned or allocated
        after: the input embedding is left uninitialised and the RoPE tables unbuilt (the caller
        calls `build_rope(device)`). Random numbers and arange on meta tensors import torch._dynamo:
        a second of every load."""
        super().__init__()
        self.config = config
        self.model = _Backbone(config, init)
        # Tied: no lm_head parameter at all, so the state dict has no lm_head.weight.
        self.lm_head = None if config.tie_embeddings else Linear(config.dim, config.vocab_size, bias=False)
        self._head: Projection | BlockProjection | None = None  # the output head, packed (pack_linears, use_blocks)
        self._block_layers: BlockLayers | None = None  # every layer in one call (use_blocks), for forwards with a cache
        self._embed_blocks: BlockEmbedding | None = None  # the input embedding from blocks (use_block_embedding)
        self.kv_dtype: torch.dtype | None = None  # new caches' dtype where not the model's (`use_half_cache`)
        self._fused_only = False  # `without_low_rank`'s models: the fused block forward or nothing
        if init:
            self.build_rope()

    @property
    def device(self) -> torch.device:
        """Where the model runs (its final norm's device: a weight no format releases)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's activations and dense weights (its final norm's)."""
        return self.model.norm.weight.dtype

    def embed(self, tokens: Tensor) -> Tensor:
        """The input embeddings of tokens (...) -> (..., dim): from the table, or from its blocks
        after `use_block_embedding` (the same values)."""
        if self._embed_blocks is not None:
            return self._embed_blocks(tokens)
        return self.model.embed_tokens(tokens)

    # -- oneDNN packed weights ------------------------------------------------------------
    def pack_linears(self, int4: dict[str, Int4Weight | Int8AsInt4Weight] | None = None, *,
                     head_amx: bool = True) -> bool:
        """Prepack every projection and the output head for oneDNN (bf16 on CPU); False (and
        nothing done) where `can_pack_linears` says no. Call again after changing weights.
        `int4`: int4 weights by state-dict name ("model.layers.0.mlp.down_proj.weight", ...) that
        the decoding steps run instead (see `Projection`); projections without one, fused groups
        with a member without one run the packed bf16 weights only; the output head runs its int4
        weight ("lm_head.weight", or the tied "model.embed_tokens.weight") at step positions, and
        everywhere with `head_amx=False` (no bf16 copy of the head: the prefill needs logits of
        one position per prompt; keep the copy where many positions need logits at once, as
        draft-and-verify's draft blocks do)."""
        self._shares_weights("pack_linears()")
        weight = self.model.embed_tokens.weight
        if not can_pack_linears(weight.dtype, weight.device):
            return False
        int4 = int4 or {}
        for i, layer in enumerate(self.model.layers):  # q, k, v and gate, up packed fused only (that is what runs)
            mine = {short: int4[f"model.layers.{i}.{name}.weight"] for short, name in PROJECTIONS.items()
                    if f"model.layers.{i}.{name}.weight" in int4}
            layer.self_attn.pack(mine)
            layer.mlp.pack(mine)
        head_int4 = int4.get("lm_head.weight" if self.lm_head is not None else "model.embed_tokens.weight")
        head = self.lm_head.weight if self.lm_head is not None else weight
        self._head = Projection(head, None, head_int4, amx=head_amx or head_int4 is None)
        return True

    def use_blocks(self, blocks: dict[str, BlockWeight]) -> None:
        """Run every projection and the output head on float32 block weights, by state-dict name
        (the tied head: "model.embed_tokens.weight"); see the module docstring. ValueError naming
        the first projection without one: a model runs on blocks whole or not at all."""
        self._shares_weights("use_blocks()")
        weight = self.model.embed_tokens.weight  # on "meta" where the load left the blocks' weights out
        if weight.dtype != torch.float32 or weight.device.type not in ("cpu", "meta"):
            raise ValueError(f"float32 block weights need a float32 model on a CPU, not {weight.dtype} on {weight.device}")
        head_name = "lm_head.weight" if self.lm_head is not None else "model.embed_tokens.weight"
        names = [f"model.layers.{i}.{name}.weight" for i in range(len(self.model.layers)) for name in PROJECTIONS.values()]
        missing = [name for name in [*names, head_name] if name not in blocks]
        if missing:
            raise ValueError(f"no block weights for {missing[0]} (and {len(missing) - 1} more): "
                             "every projection and the output head need Q4_0, Q4_1 or Q8_0 blocks")

        def fused(i: int, parts: tuple[str, ...], bias: Tensor | None) -> BlockProjection:
            weight = BlockWeight.cat([blocks[f"model.layers.{i}.{PROJECTIONS[p]}.weight"] for p in parts])
            if weight is None:
                raise ValueError(f"layer {i}: the block weights of {', '.join(parts)} are of different kinds")
            return BlockProjection(weight, bias)

        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            bias = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            attn.qkv = fused(i, ("q", "k", "v"), bias)
            attn.o_proj.proj = fused(i, ("o",), None)
            mlp.gate_up = fused(i, ("gate", "up"), None)
            mlp.down_proj.proj = fused(i, ("down",), None)
        self._head = BlockProjection(blocks[head_name], None)
        c = self.config
        if not c.qk_norm and BlockLayers.supported(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size) is None:
            self._block_layers = BlockLayers(
                [LayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                              layer.self_attn.qkv.weight, layer.self_attn.qkv.bias, layer.self_attn.o_proj.proj.weight,
                              layer.mlp.gate_up.weight, layer.mlp.down_proj.proj.weight) for layer in self.model.layers],
                n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, eps=c.norm_eps)

    def without_low_rank(self) -> Transformer:
        """This model on the same weights and tables (no copy) without the low-rank updates its block
        weights carry (an adapter's, unmerged: `load_model(..., adapter=...)` on blocks): the base
        model, for another reader of the same GGUF in the process (the text end-of-turn score beside
        the adapted LLM) at no memory. It runs forwards with a cache on the fused block forward
        (`forward(..., cache=...)` without gradients, a float32 or float16 cache) and refuses the
        others, whose projections would still add the updates. ValueError where the model has no
        fused block forward. Forwards of both may run at once from different threads (neither
        writes the model's state); what would change the shared modules (to(), train(), packing,
        releasing, RoPE tables, `use_half_cache`) is refused on it. Make it once this model is
        final: it keeps this model's `kv_dtype`, output head and embedding lookup as they are then."""
        if self._block_layers is None:
            raise ValueError("only a model on the fused block forward (use_blocks) runs without its low-rank updates")
        base = copy.copy(self)  # shares the submodules, parameters, buffers and block weights
        for name, value in vars(self).items():
            if name in ("_modules", "_parameters", "_buffers"):  # setting or deleting one on it stays its own
                base.__dict__[name] = type(value)(value)
            elif "hooks" in name and isinstance(value, dict):  # none of this model's hooks; its own stay its own
                base.__dict__[name] = type(value)()
        base._block_layers = self._block_layers.without_low_rank()
        base._fused_only = True
        return base

    def _shares_weights(self, what: str) -> None:
        """ValueError where this is a `without_low_rank` model: `what` would change the model whose
        modules, parameters and buffers it shares."""
        if getattr(self, "_fused_only", False):
            raise ValueError(f"{what} on a model without its low-rank updates (`without_low_rank`) would change the "
                             "model it shares its weights with; do it on that model")

    def _apply(self, fn: Any, recurse: bool = True) -> Transformer:  # to(), float(), to_empty(), ...
        self._shares_weights("moving or converting its tensors")
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Transformer:
        if mode:
            self._shares_weights("train()")
        return super().train(mode)

    def use_block_embedding(self, q: Tensor, scale: Tensor, minimum: Tensor) -> None:
        """Look the input embedding up in its GGUF blocks (`BlockEmbedding`), so that
        `release_dense_weights()` frees the float32 table too (the tied output head already runs
        its own blocks after `use_blocks`). ValueError where a row differs from the table's by a
        bit (a fine-tune merged into it, other blocks than the table's): the table stays then.
        A table on the meta device (a load that left the GGUF's block weights out: these blocks
        are its only source) takes them without the comparison."""
        self._shares_weights("use_block_embedding()")
        table = self.model.embed_tokens.weight
        if table.dtype != torch.float32 or table.device.type not in ("cpu", "meta"):
            raise ValueError(f"the embedding from blocks replaces a float32 table on a CPU, not {table.dtype} on "
                             f"{table.device}")
        blocks = BlockEmbedding(q, scale, minimum)
        if blocks.q.shape != table.shape:
            raise ValueError(f"embedding blocks of {tuple(blocks.q.shape)} for a table of {tuple(table.shape)}")
        if table.is_meta:
            self._embed_blocks = blocks
            return
        with torch.no_grad():
            for start in range(0, table.shape[0], 4096):  # every row, a slab at a time
                ids = torch.arange(start, min(start + 4096, table.shape[0]))
                if not torch.equal(blocks(ids), table[start:start + len(ids)]):
                    raise ValueError(f"embedding blocks differ from the table in rows {start}..{start + len(ids) - 1}")
        self._embed_blocks = blocks

    def unpack_linears(self) -> None:
        self._shares_weights("unpack_linears()")
        for module in self.model.layers.modules():
            if isinstance(module, Linear):
                _dense(module.weight)
        for module in self.modules():
            if isinstance(module, Linear):
                module.proj = None
            elif isinstance(module, Attention):
                module.qkv = None
            elif isinstance(module, MLP):
                module.gate_up = None
        self._head = None
        self._block_layers = None
        self.kv_dtype = None

    def use_half_cache(self) -> None:
        """Make new KV caches float16 (`new_cache`): each K and V rounded to the nearest float16 as
        the fused block forward writes it (dlm.blocks.BlockLayers), half the bytes a long context's
        attention reads at every forward; the logits move by about that rounding, so a greedy reply
        can differ from the float32 cache's (`llm.kv_cache`: "auto" asks for it where the products
        round their inputs anyway, voice_agent.llm). ValueError where the fused
        forward does not run (the torch layers compute in the model's dtype)."""
        self._shares_weights("use_half_cache()")
        if self._block_layers is None:
            raise ValueError("a float16 KV cache needs the fused block forward (llm.weights blocks, blocks-int16, "
                             "blocks-int8, blocks-amx or blocks-bf16 on a CPU with AVX-512), which this model does not run")
        self.kv_dtype = torch.float16

    def block_products(self) -> int | None:
        """The products of the block weights the model runs (`use_blocks`; dlm.blocks: 0 float32,
        AMX_BF16, AMX_SPLIT, VNNI_INT8, VNNI_INT16), None where it runs none."""
        return self._head.weight.products if isinstance(self._head, BlockProjection) else None

    def release_dense_weights(self) -> int:
        """Free the dense copies of the packed projections (inference only from then on: a
        forward with gradients, a state dict or unpacking fails); returns the bytes freed. The
        embedding table stays (the lookup table, and the tied head's source), unless
        `use_block_embedding` gave the lookups its blocks and the output head does not read it
        (untied, or packed). An untied output head's dense weight stays."""
        self._shares_weights("release_dense_weights()")
        if not self.packed:
            raise RuntimeError("pack_linears() or use_blocks() first: the packed copies are what runs")
        freed = 0
        dense = [module for module in self.model.layers.modules() if isinstance(module, Linear)]
        if self._embed_blocks is not None and (self.lm_head is not None or self._head is not None):
            dense.append(self.model.embed_tokens)
        for module in dense:
            if not module.weight.is_meta:
                freed += module.weight.nbytes
                module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)
        return freed

    @property
    def packed(self) -> bool:
        return self.model.layers[0].mlp.gate_up is not None

    @property
    def fused_layers(self) -> bool:
        """True where a forward over a KV cache runs every layer in the block kernel's one call
        (`use_blocks`, `_blocks_forward`), False where the torch layers run."""
        return self._block_layers is not None

    @property
    def step_kernels(self) -> bool:
        """True where decoding steps run other kernels (int4) than the prefill: a position's K/V
        then depend on whether a prefill or a step computed it (dlm.decode's prefix reuse keeps
        prefilled positions only)."""
        return self.packed and self.model.layers[0].mlp.gate_up.step_kernels

    def weight_bytes(self) -> int:
        """Bytes of every tensor the forward reads (dense parameters, packed copies)."""
        total = sum(p.nbytes for p in self.parameters() if not p.is_meta)
        if self._embed_blocks is not None:  # float32 blocks of a tied head share its Q8 data: counted once
            head = self._head.weight if isinstance(self._head, BlockProjection) else None
            held = set() if head is None else {t.untyped_storage().data_ptr() for t in (head.data, head.scales)}
            total += sum(t.nbytes for t in self._embed_blocks.tensors if t.untyped_storage().data_ptr() not in held)
        for module in self.modules():
            for proj in (getattr(module, "proj", None), getattr(module, "qkv", None), getattr(module, "gate_up", None)):
                if isinstance(proj, Projection | BlockProjection):
                    total += proj.nbytes
                    if self._fused_only and isinstance(proj, BlockProjection) and proj.weight.low_rank is not None:
                        total -= proj.weight.low_rank.nbytes  # `without_low_rank`: its forward reads no update
        return total + (self._head.nbytes if self._head is not None else 0)

    # -- RoPE -----------------------------------------------------------------------------
    def build_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables for positions 0..max_seq_len (one spare for the cache's
        scratch position) on `device`: needed after building the model on the meta device."""
        self._shares_weights("build_rope()")
        D = self.config.head_dim
        n_positions = self.config.max_seq_len + 1
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))
        t = torch.arange(n_positions, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)  # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D): rotate-half layout, as in HF Llama
        self.register_buffer("rope_cos", emb.cos().float(), persistent=False)
        sin = emb.sin().float()
        sin[:, : D // 2] *= -1  # the rotation's sign (apply_rope)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- cache ----------------------------------------------------------------------------
    def new_cache(self, max_batch_size: int, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        """A static KV cache for this model, allocated once: rows 0..max_batch_size-1 plus one
        scratch row, positions 0..max_seq_len-1 plus one scratch position; in `dtype`, else the
        model's `kv_dtype` (`use_half_cache`), else its own. The caller owns it."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.config.max_seq_len} "
                             "(load the model with a larger max_seq_len)")
        return KVCache(self.config.n_layers, max_batch_size, max_seq_len, self.config.n_kv_heads,
                       self.config.head_dim, dtype or self.kv_dtype or self.dtype, device or self.device)

    # -- forward --------------------------------------------------------------------------
    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor, *, cache: KVCache | None = None,
                cache_rows: Tensor | None = None, out_index: Tensor | None = None,
                write_positions: Tensor | None = None, draft: DraftInputs | None = None,
                hidden: bool = False, step: bool = False) -> Tensor:
        """tokens, positions (B, T); mask bool (B or 1, 1, T, T) without cache, (B, 1, T, K) with;
        cache and cache_rows (B,) (the cache row of each batch row) together or not at all;
        out_index (B, N): logits only there; write_positions (B, T): cache positions of the
        inputs' K/V (default: `positions`); draft: mask slots and their adapter (see the module
        docstring); step: a decoding step of a few rows (AR, verification): its text positions
        run the step kernels where the model has them (int4, see `Projection`), mask slots and
        every other forward the packed bf16 ones. Returns logits (B, T or N, V) in float32, or
        with `hidden` the final normed hidden states (B, T or N, dim) in the model's dtype."""
        if (cache is None) != (cache_rows is None):
            raise ValueError("pass cache and cache_rows together")
        x = self.embed(tokens)  # (B, T, dim)
        if draft is not None:
            slots = draft.adapter.slot_embedding(draft.slot_index, x.dtype)  # (B, T - start, dim)
            x = torch.cat([x[:, :draft.start], slots], dim=1)
        # (B, T, 1, D) in the model's dtype, once for every layer
        cos, sin = self.rope_cos[positions, None].to(x.dtype), self.rope_sin[positions, None].to(x.dtype)
        writes = positions if write_positions is None else write_positions
        if (self._block_layers is not None and cache is not None and not torch.is_grad_enabled()
                and mask.dtype == torch.bool and cache.k.dtype in (torch.float32, torch.float16)):
            x = self._blocks_forward(x, cos, sin, mask, cache, cache_rows, writes, draft)  # normed
            normed = True
        else:
            if self._fused_only:  # its projections' own weights still carry the updates
                raise ValueError("a model without its low-rank updates (`without_low_rank`) runs forwards with a "
                                 "float32 or float16 cache, without gradients, on the fused block forward only")
            n_step = 0 if not step else x.shape[1] if draft is None else draft.start
            exact = exact_mask(mask) if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else None
            row = int(cache_rows[0]) if cache_rows is not None and cache_rows.shape[0] == 1 and x.device.type == "cpu" else None
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, mask, None if cache is None else (cache, i, cache_rows, writes, row),
                          None if draft is None else (draft.adapter.layers[i], draft.start), n_step, exact)
            normed = False
        if out_index is not None:
            x = x.gather(1, out_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, dim)
        if not normed:  # the torch path norms only the rows asked for
            x = self.model.norm(x)
        return x if hidden else self.logits(x, normed=True, step=x.shape[1] if step and draft is None else 0)

    def _blocks_forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache, cache_rows: Tensor,
                        writes: Tensor, draft: DraftInputs | None) -> Tensor:
        """Every layer and the final norm in one call of the block kernel (use_blocks): the same
        formulas as the layers' own forward and the norm, each row from its own inputs and cache
        row only; a draft's mask slots add the drafter's updates (`Drafter.block_updates`). Padding
        (positions written at the cache's scratch position) is not computed: its outputs are its
        inputs, which no caller reads."""
        B, T, D = x.shape
        writes = writes.reshape(-1).to(torch.int64)
        live = writes != cache.scratch_pos
        index = None if bool(live.all()) else live.nonzero().squeeze(1)

        def take(t: Tensor) -> Tensor:
            return (t if index is None else t[index]).contiguous()

        flat_x = x.reshape(B * T, D)
        rows = cache_rows[:, None].expand(B, T).reshape(-1)
        flat_mask = mask.expand(B, 1, T, mask.shape[-1]).reshape(B * T, -1)
        drafts = drafted = None
        if draft is not None:
            drafts = draft.adapter.block_updates()
            drafted = take((torch.arange(T) >= draft.start).expand(B, T).reshape(-1))
        h = take(flat_x)
        if h.shape[0]:
            self._block_layers(h, take(cos.reshape(B * T, -1)), take(sin.reshape(B * T, -1)), cache.k, cache.v,
                               take(rows.to(torch.int64)), take(writes), take(flat_mask), drafts, drafted,
                               self.model.norm.weight.detach())
        if index is None:
            return h.view(B, T, D)
        out = flat_x.clone()
        out[index] = h
        return out.view(B, T, D)

    def logits(self, h: Tensor, *, normed: bool = True, step: int = 0) -> Tensor:
        """Logits (..., V) in float32 of final hidden states h (B, T, dim), normed or not; the
        first `step` positions (dim 1) are decoding-step positions (see `Projection`)."""
        if not normed:
            h = self.model.norm(h)
        if self._head is not None and not torch.is_grad_enabled():
            return self._head(h, step).float()
        if self.lm_head is not None:
            return self.lm_head(h).float()
        return F.linear(h, self.model.embed_tokens.weight).float()  # (..., V)
