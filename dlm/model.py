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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.config import ModelConfig

__all__ = ["Attention", "DecoderLayer", "DraftInputs", "KVCache", "RMSNorm", "Transformer", "can_pack_linears"]


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


class Linear(nn.Linear):
    """nn.Linear that uses a prepacked oneDNN weight once `pack()` made one (see pack_linears)."""

    packed: Tensor | None = None

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKED_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is None or torch.is_grad_enabled():  # the packed op has no backward
            return super().forward(x)
        return packed_linear(x, self.packed, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (as Hugging Face Llama does) so bf16 matches the reference.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Static cache of every layer, (L, B_max + 1, S + 1, H_kv, D) for k and for v, written in
    place by index. Row and position lead each layer's layout so that writing by (row, position)
    is a cheap index_put on the leading dims; with heads in front, torch restrides the whole
    cache per write."""

    def __init__(self, n_layers: int, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, max_batch_size + 1, max_seq_len + 1, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
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
               kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) at (rows (B,), positions (B, T)); return (B, Hkv, K, D).
        Where k carries gradients (training a drafter over a cached prefix), nothing is written:
        the returned keys are the cache's with k, v put in their place."""
        r = rows[:, None]  # (B, 1) broadcasts against positions (B, T)
        k_layer, v_layer = self.k[layer], self.v[layer]  # views: the writes land in the cache
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            b = torch.arange(rows.shape[0], device=rows.device)[:, None]
            k_rows = k_layer.index_select(0, rows).to(k.dtype).index_put((b, positions), k.transpose(1, 2))
            v_rows = v_layer.index_select(0, rows).to(v.dtype).index_put((b, positions), v.transpose(1, 2))
            return k_rows[:, :kv_len].transpose(1, 2), v_rows[:, :kv_len].transpose(1, 2)
        k_layer[r, positions] = k.transpose(1, 2).to(k_layer.dtype)  # (B, T, Hkv, D)
        v_layer[r, positions] = v.transpose(1, 2).to(v_layer.dtype)
        # Slice first (a view), then gather the rows: only K positions are copied. index_select
        # copies whole (K, Hkv, D) slabs; advanced indexing computes every element's offset
        # (about twice as slow on CPU).
        k_rows = k_layer[:, :kv_len].index_select(0, rows)  # (B, K, Hkv, D)
        v_rows = v_layer[:, :kv_len].index_select(0, rows)
        return k_rows.transpose(1, 2), v_rows.transpose(1, 2)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention q (B, H, T, D), k, v (B, Hkv, K, D), bool mask (B or 1, 1, T, K)
    -> (B, H, T, D) in q's dtype, computed in float64: a product of two bf16 numbers is exact
    there, and so is a sum of D of them unless their magnitudes span more than ~2^37, so the
    scores do not depend on the summation order; the softmax and the weighted sum differ by
    ~1e-16 at most, far below a bf16 rounding step. Each query's result is therefore the same
    whatever the other queries, the key padding or the batch are."""
    B, H, T, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    G = H // Hkv
    qd = q.to(torch.float64).reshape(B, Hkv, G * T, D)  # query head h = kv head h // G
    scores = (qd @ k.to(torch.float64).transpose(-1, -2)).view(B, Hkv, G, T, K) * (1.0 / D**0.5)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).view(B, Hkv, G * T, K)
    return (probs @ v.to(torch.float64)).view(B, H, T, D).to(q.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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

    def pack(self) -> None:
        """q, k, v packed as one weight (one call instead of three), and o."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight.detach() for p in projs])
        self.qkv_packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_ROWS)
        self.qkv_bias = None if projs[0].bias is None else torch.cat([p.bias.detach() for p in projs])
        self.o_proj.pack()

    qkv_packed: Tensor | None = None
    qkv_bias: Tensor | None = None

    def _qkv(self, x: Tensor, draft: tuple[LayerAdapter, int] | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_packed is not None and not torch.is_grad_enabled():
            qkv = packed_linear(x, self.qkv_packed, self.qkv_bias)
            if draft is not None:
                qkv = draft[0].update(("q", "k", "v"), x, qkv, draft[1])
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            return qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if draft is not None:
            lora, start = draft
            q, k, v = (lora.update((name,), x, y, start) for name, y in (("q", q), ("k", k), ("v", v)))
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: tuple[KVCache, int, Tensor, Tensor] | None,
                draft: tuple[LayerAdapter, int] | None = None) -> Tensor:
        """cache: (the cache, this layer's index, rows (B,), write positions (B, T)) or None;
        draft: (this layer's adapter, first mask-slot position) or None."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._qkv(x, draft)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # (B, 1, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            kv_cache, layer, rows, positions = cache
            k, v = kv_cache.update(layer, rows, positions, k, v, mask.shape[-1])  # (B, Hkv, K, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Grouped-query attention inside SDPA: no (B, H, K, D) copy of the keys where the kernel
        # supports it (the math fallback expands them itself).
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # Low-precision attention depends, in its last bits, on how many queries and keys the
            # call holds, and in bf16 one flipped bit grows into a different token a few layers
            # on. Text positions therefore use `exact_attention` (whose result does not depend on
            # the rest of the forward), so a forward that verifies several tokens reproduces the
            # one-token-per-step logits bit for bit; mask slots (drafts only) keep the fast kernel.
            start = T if draft is None else draft[1]
            y = exact_attention(q[:, :, :start], k, v, mask[:, :, :start])
            if start < T:
                fast = F.scaled_dot_product_attention(q[:, :, start:], k, v, attn_mask=mask[:, :, start:],
                                                      enable_gqa=Hkv != H)
                y = torch.cat([y, fast], dim=2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y) if draft is None else draft[0].update(("o",), y, self.o_proj(y), draft[1])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.dim, bias=False)

    gate_up_packed: Tensor | None = None

    def pack(self) -> None:
        """gate and up packed as one weight, and down."""
        weight = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        self.gate_up_packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_ROWS)
        self.down_proj.pack()

    def forward(self, x: Tensor, draft: tuple[LayerAdapter, int] | None = None) -> Tensor:
        if self.gate_up_packed is not None and not torch.is_grad_enabled():
            gate_up = packed_linear(x, self.gate_up_packed, None)
            if draft is not None:
                gate_up = draft[0].update(("gate", "up"), x, gate_up, draft[1])
            gate, up = gate_up.chunk(2, dim=-1)
        elif draft is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate = draft[0].update(("gate",), x, self.gate_proj(x), draft[1])
            up = draft[0].update(("up",), x, self.up_proj(x), draft[1])
        h = F.silu(gate) * up
        return self.down_proj(h) if draft is None else draft[0].update(("down",), h, self.down_proj(h), draft[1])


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache: tuple[KVCache, int, Tensor, Tensor] | None,
                draft: tuple[LayerAdapter, int] | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, draft)
        return x + self.mlp(self.post_attention_layernorm(x), draft)


class _Backbone(nn.Module):
    """The `model.` prefix of the Hugging Face names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        # Tied: no lm_head parameter at all, so the state dict has no lm_head.weight.
        self.lm_head = None if config.tie_embeddings else Linear(config.dim, config.vocab_size, bias=False)
        self._packed_head: Tensor | None = None  # the tied output head, packed (pack_linears)
        self.build_rope()

    # -- oneDNN packed weights ------------------------------------------------------------
    def pack_linears(self) -> bool:
        """Prepack every projection and the output head for oneDNN (bf16 on CPU); False (and
        nothing done) where `can_pack_linears` says no. Call again after changing weights."""
        weight = self.model.embed_tokens.weight
        if not can_pack_linears(weight.dtype, weight.device):
            return False
        for layer in self.model.layers:  # q, k, v and gate, up packed fused only (that is what runs)
            layer.self_attn.pack()
            layer.mlp.pack()
        if self.lm_head is not None:
            self.lm_head.pack()
        else:
            self._packed_head = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_ROWS)
        return True

    def unpack_linears(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = None
            elif isinstance(module, Attention):
                module.qkv_packed = module.qkv_bias = None
            elif isinstance(module, MLP):
                module.gate_up_packed = None
        self._packed_head = None

    @property
    def packed(self) -> bool:
        return self.model.layers[0].mlp.gate_up_packed is not None

    # -- RoPE -----------------------------------------------------------------------------
    def build_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables for positions 0..max_seq_len (one spare for the cache's
        scratch position) on `device`: needed after building the model on the meta device."""
        D = self.config.head_dim
        n_positions = self.config.max_seq_len + 1
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))
        t = torch.arange(n_positions, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)  # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D): rotate-half layout, as in HF Llama
        self.register_buffer("rope_cos", emb.cos().float(), persistent=False)
        self.register_buffer("rope_sin", emb.sin().float(), persistent=False)

    # -- cache ----------------------------------------------------------------------------
    def new_cache(self, max_batch_size: int, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KVCache:
        """A static KV cache for this model, allocated once: rows 0..max_batch_size-1 plus one
        scratch row, positions 0..max_seq_len-1 plus one scratch position. The caller owns it."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.config.max_seq_len} "
                             "(load the model with a larger max_seq_len)")
        param = self.model.embed_tokens.weight
        return KVCache(self.config.n_layers, max_batch_size, max_seq_len, self.config.n_kv_heads,
                       self.config.head_dim, dtype or param.dtype, device or param.device)

    # -- forward --------------------------------------------------------------------------
    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor, *, cache: KVCache | None = None,
                cache_rows: Tensor | None = None, out_index: Tensor | None = None,
                write_positions: Tensor | None = None, draft: DraftInputs | None = None,
                hidden: bool = False) -> Tensor:
        """tokens, positions (B, T); mask bool (B or 1, 1, T, T) without cache, (B, 1, T, K) with;
        cache and cache_rows (B,) (the cache row of each batch row) together or not at all;
        out_index (B, N): logits only there; write_positions (B, T): cache positions of the
        inputs' K/V (default: `positions`); draft: mask slots and their adapter (see the module
        docstring). Returns logits (B, T or N, V) in float32, or with `hidden` the final normed
        hidden states (B, T or N, dim) in the model's dtype."""
        if (cache is None) != (cache_rows is None):
            raise ValueError("pass cache and cache_rows together")
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        if draft is not None:
            slots = draft.adapter.slot_embedding(draft.slot_index, x.dtype)  # (B, T - start, dim)
            x = torch.cat([x[:, :draft.start], slots], dim=1)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
        writes = positions if write_positions is None else write_positions
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if cache is None else (cache, i, cache_rows, writes),
                      None if draft is None else (draft.adapter.layers[i], draft.start))
        if out_index is not None:
            x = x.gather(1, out_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, dim)
        x = self.model.norm(x)
        return x if hidden else self.logits(x, normed=True)

    def logits(self, h: Tensor, *, normed: bool = True) -> Tensor:
        """Logits (..., V) in float32 of final hidden states h (..., dim), normed or not."""
        if not normed:
            h = self.model.norm(h)
        if self.lm_head is not None:
            return self.lm_head(h).float()
        if self._packed_head is not None and not torch.is_grad_enabled():
            return packed_linear(h, self._packed_head, None).float()
        return F.linear(h, self.model.embed_tokens.weight).float()  # (..., V)
