"""Plain dataclasses shared by the model, the checkpoint families and the engine.

`ModelConfig` describes the transformer's shapes (one Llama/Qwen-style decoder for every family).
`DiffusionSpec` describes how a checkpoint is decoded: attention shape, mask token, logit shift,
block sizes, and decoding defaults. A family loader turns a checkpoint's own config.json (or GGUF
metadata) into these two, and its tensor names into the model's (Hugging Face Llama) names:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight      (+ .bias for q/k/v where qkv_bias)
    model.layers.{i}.self_attn.{q,k}_norm.weight          (where qk_norm, per head_dim)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                        (absent where tie_embeddings)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ATTENTION_MODES", "AttentionMode", "DiffusionSpec", "ModelConfig"]

AttentionMode = Literal["causal", "full", "block_causal"]
ATTENTION_MODES: tuple[str, ...] = ("causal", "full", "block_causal")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention)
    intermediate_size: int  # SwiGLU hidden size
    head_dim: int = 0  # 0: dim // n_heads (filled in __post_init__)
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048  # size of the static KV cache and the RoPE table
    qkv_bias: bool = False  # Qwen2 / Qwen2.5 have biases on q, k, v
    qk_norm: bool = False  # Qwen3 (SDAR) normalises q and k per head
    tie_embeddings: bool = False  # lm_head shares model.embed_tokens.weight

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")


@dataclass
class DiffusionSpec:
    family: str  # "bd" (this project's), "fast_dllm_v2", "sdar", "llada", "dream", "ar"
    attention: AttentionMode
    mask_token_id: int | None  # None for a plain AR model
    eos_token_ids: list[int] = field(default_factory=list)
    # True: the logits at position i predict the token at i + 1 (AR-style "token shift":
    # Dream, Fast-dLLM v2, this project's models). False: position i predicts itself (LLaDA, SDAR).
    logit_shift: bool = True
    block_size: int = 32  # tokens denoised together; 1 for AR
    sub_block_size: int = 0  # 0: no sub-blocks (the whole block is decoded at once)
    # Decoding defaults from the checkpoint's metadata; the engine's parameters override them.
    threshold: float = 0.9
    steps_per_block: int = 0  # 0: as many as needed under the threshold policy
