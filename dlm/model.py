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
  * `forward(tokens, positions, mask, cache_rows=rows)`: the cached forward. The K/V of the T
    input tokens are first written into the static cache at (row, position), then the queries
    attend over the first `K = mask.shape[-1]` cache positions of their rows. `mask` is
    (B, 1, T, K). Writing before attending makes one forward serve every cache strategy: an
    exact block cache, a prefix cache and a dual (prefix + suffix) cache differ only in which
    window of positions the caller feeds and which keys the mask allows.
- The cache is allocated once by `setup_cache` with one spare row and one spare position
  (`scratch_row`, `scratch_pos`): callers that pad a batch to a fixed shape point padding rows
  and padding positions there, so padding never overwrites live K/V.
- `out_index` (B, N) selects which of the T positions get logits, so a forward that only needs
  a few predictions does not pay for the (T, V) output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm.config import ModelConfig

__all__ = ["Attention", "DecoderLayer", "KVCache", "RMSNorm", "Transformer"]


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


class KVCache(nn.Module):
    """Static per-layer cache (B_max + 1, S + 1, H_kv, D), written in place by index.

    Row and position lead the layout so that writing by (row, position) index is a cheap
    index_put on the leading dims; with heads in front, torch restrides the whole cache per write."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        shape = (max_batch_size + 1, max_seq_len + 1, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: Tensor, positions: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) at (rows (B,), positions (B, T)); return (B, H, K, D) views."""
        r = rows[:, None]  # (B, 1) broadcasts against positions (B, T)
        self.k[r, positions] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, H, D)
        self.v[r, positions] = v.transpose(1, 2).to(self.v.dtype)
        # Slice first (a view), then gather the rows: only K positions are copied.
        return self.k[:, :kv_len][rows].transpose(1, 2), self.v[:, :kv_len][rows].transpose(1, 2)


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
        self.q_proj = nn.Linear(config.dim, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache_rows: Tensor | None, positions: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # (B, 1, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache_rows is not None:
            if self.kv_cache is None:
                raise RuntimeError("cached forward without setup_cache()")
            k, v = self.kv_cache.update(cache_rows, positions, k, v, mask.shape[-1])  # (B, Hkv, K, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, K, D)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                cache_rows: Tensor | None, positions: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_rows, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.max_batch_size = 0
        self.cache_seq_len = 0
        self._build_rope(config.max_seq_len + 1)

    # -- RoPE -----------------------------------------------------------------------------
    def _build_rope(self, n_positions: int, device: torch.device | str | None = None) -> None:
        D = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))
        t = torch.arange(n_positions, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)  # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D): rotate-half layout, as in HF Llama
        self.register_buffer("rope_cos", emb.cos().float(), persistent=False)
        self.register_buffer("rope_sin", emb.sin().float(), persistent=False)

    # -- cache ----------------------------------------------------------------------------
    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Allocate the static KV cache once: rows 0..max_batch_size-1 plus one scratch row,
        positions 0..max_seq_len-1 plus one scratch position."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        param = self.model.embed_tokens.weight
        dtype = dtype or param.dtype
        device = device or param.device
        if max_seq_len + 1 > self.rope_cos.shape[0] or self.rope_cos.device != torch.device(device):
            self._build_rope(max(max_seq_len, self.config.max_seq_len) + 1, device)
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, max_seq_len, self.config.n_kv_heads,
                                               self.config.head_dim, dtype, device)
        self.max_batch_size = max_batch_size
        self.cache_seq_len = max_seq_len

    @property
    def scratch_row(self) -> int:
        """A cache row no request owns: padding rows of a fixed-shape batch write here."""
        return self.max_batch_size

    @property
    def scratch_pos(self) -> int:
        """A cache position no token owns: padding slots of a window write here."""
        return self.cache_seq_len

    # -- forward --------------------------------------------------------------------------
    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor, *,
                cache_rows: Tensor | None = None, out_index: Tensor | None = None) -> Tensor:
        """tokens, positions (B, T); mask bool (B or 1, 1, T, T) without cache, (B, 1, T, K) with;
        cache_rows (B,) cache row per batch row; out_index (B, N): logits only there.
        Returns logits (B, T or N, V) in float32."""
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_rows, positions)
        if out_index is not None:
            x = x.gather(1, out_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, dim)
        x = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight).float()  # (B, T or N, V)
