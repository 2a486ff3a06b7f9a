"""Checkpoint families stored as Hugging Face folders (config.json + safetensors + tokenizer).

Contract: each `Family` recognises a checkpoint from its own config.json (`architectures`,
`model_type`), never from file names, and turns it into our `ModelConfig` and `DiffusionSpec`,
plus a `rename(name)` from the checkpoint's tensor names to ours (the Hugging Face Llama names of
`dlm/config.py`). Nothing here executes code shipped with a checkpoint (no trust_remote_code).

| family        | recognised by                                  | attention    | mask id (config) | shift |
|---------------|------------------------------------------------|--------------|------------------|-------|
| fast_dllm_v2  | Fast_dLLM_QwenForCausalLM / Fast_dLLM_Qwen     | block_causal | 151665           | yes   |
| sdar          | SDARForCausalLM / sdar (Qwen3: qk-norm)        | block_causal | mask_token_id    | no    |
| llada         | LLaDAModelLM / llada (own tensor names)        | full         | mask_token_id    | no    |
| dream         | DreamModel / Dream (Qwen2)                     | full         | mask_token_id    | yes   |
| ar            | Llama/Qwen2/Qwen3 *ForCausalLM                 | causal       | none             | yes   |

Mask ids come from the checkpoint's config where it states one; the constants above are the
published values used only where a config omits the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dlm.config import DiffusionSpec, ModelConfig
from dlm.errors import UnsupportedCheckpointError

__all__ = ["END_OF_TURN_TOKENS", "FAMILIES", "Family", "family_for_config", "qwen_llama_config", "stop_token_ids"]


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json "architectures" entries that identify the family
    model_types: tuple[str, ...]  # config.json "model_type" values that identify the family
    model_config: Callable[[dict[str, Any]], ModelConfig]
    spec: Callable[[dict[str, Any]], DiffusionSpec]  # eos ids are filled in by the loader
    rename: Callable[[str], str | None]  # checkpoint tensor name -> ours; None: not a weight

    def matches(self, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        return any(a in self.architectures for a in archs) or config.get("model_type") in self.model_types


def _int_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def qwen_llama_config(c: dict[str, Any], *, qkv_bias: bool, qk_norm: bool = False) -> ModelConfig:
    """The Hugging Face Llama / Qwen2 / Qwen3 config keys -> ModelConfig."""
    n_heads = c["num_attention_heads"]
    return ModelConfig(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        intermediate_size=c["intermediate_size"],
        head_dim=c.get("head_dim") or 0,
        rope_theta=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10_000.0),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(c.get("max_position_embeddings") or 2048),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def _same_names(name: str) -> str | None:
    """Qwen/Llama checkpoints already use our names; rotary tables are not weights."""
    return None if name.endswith("rotary_emb.inv_freq") else name


# -- Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B, _7B) ------------------------------

FAST_DLLM_V2_MASK_ID = 151665  # "|<MASK>|", added to the Qwen2.5 vocabulary by Fast-dLLM v2


def _fast_dllm_spec(c: dict[str, Any]) -> DiffusionSpec:
    return DiffusionSpec(
        family="fast_dllm_v2",
        attention="block_causal",
        mask_token_id=int(c.get("mask_token_id", FAST_DLLM_V2_MASK_ID)),
        logit_shift=True,
        block_size=int(c.get("bd_size", 32)),
        sub_block_size=8,  # the reference generator's small_block_size
        threshold=0.9,
    )


# -- SDAR (JetLM/SDAR-*-Chat): Qwen3 with qk-norm; logits predict their own position ------------

SDAR_MASK_ID = 151669  # "<|MASK|>" in the SDAR vocabulary


def _sdar_spec(c: dict[str, Any]) -> DiffusionSpec:
    block = int(c.get("block_size", 4))
    return DiffusionSpec(
        family="sdar",
        attention="block_causal",
        mask_token_id=int(c.get("mask_token_id", SDAR_MASK_ID)),
        logit_shift=False,  # the reference generate.py samples block position i from logits[i]
        block_size=block,
        threshold=0.85,  # the reference low_confidence_dynamic default
        steps_per_block=block,
    )


# -- LLaDA (GSAI-ML/LLaDA-8B-Instruct): OLMo-style names, full attention, no shift -------------

LLADA_MASK_ID = 126336

_LLADA_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_LLADA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # the activated branch: act(ff_proj(x)) * up_proj(x)
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_LLADA_BLOCK_RE = re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)")


def _llada_rename(name: str) -> str | None:
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    m = _LLADA_BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _LLADA_BLOCK:
        return f"model.layers.{m.group(1)}.{_LLADA_BLOCK[m.group(2)]}.{m.group(3)}"
    return name  # unknown: the loader reports it


def _llada_config(c: dict[str, Any]) -> ModelConfig:
    if c.get("block_type", "llama") != "llama":
        raise UnsupportedCheckpointError(
            f"LLaDA block_type {c.get('block_type')!r}: only the 'llama' block (separate q/k/v, SwiGLU) is supported")
    if c.get("layer_norm_type", "rms") != "rms" or c.get("alibi") or not c.get("rope", True):
        raise UnsupportedCheckpointError("LLaDA checkpoint without RMSNorm + RoPE is not supported")
    n_heads = c["n_heads"]
    return ModelConfig(
        vocab_size=c.get("embedding_size") or c["vocab_size"],  # wte rows (padded vocabulary)
        dim=c["d_model"],
        n_layers=c["n_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("n_kv_heads") or n_heads,
        intermediate_size=c["mlp_hidden_size"],
        rope_theta=float(c.get("rope_theta", 10_000.0)),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        max_seq_len=int(c.get("max_sequence_length", 4096)),
        qkv_bias=bool(c.get("include_bias") or c.get("include_qkv_bias")),
        tie_embeddings=bool(c.get("weight_tying", False)),
    )


def _llada_spec(c: dict[str, Any]) -> DiffusionSpec:
    return DiffusionSpec(
        family="llada",
        attention="full",
        mask_token_id=int(c.get("mask_token_id", LLADA_MASK_ID)),
        logit_shift=False,
        block_size=32,  # the reference generate.py block_length
        threshold=0.9,
    )


# -- Dream (Dream-org/Dream-v0-Instruct-7B): Qwen2 names, full attention, shifted logits --------

DREAM_MASK_ID = 151666


def _dream_spec(c: dict[str, Any]) -> DiffusionSpec:
    return DiffusionSpec(
        family="dream",
        attention="full",
        mask_token_id=int(c.get("mask_token_id", DREAM_MASK_ID)),
        logit_shift=True,
        block_size=32,
        threshold=0.9,
    )


# -- plain autoregressive Llama / Qwen2 / Qwen3 -------------------------------------------------

def _ar_config(c: dict[str, Any]) -> ModelConfig:
    model_type = c.get("model_type")
    if model_type == "qwen3":
        return qwen_llama_config(c, qkv_bias=bool(c.get("attention_bias", False)), qk_norm=True)
    qkv_bias = True if model_type == "qwen2" else bool(c.get("attention_bias", False))
    if c.get("mlp_bias"):
        raise UnsupportedCheckpointError("Llama checkpoint with mlp_bias is not supported")
    return qwen_llama_config(c, qkv_bias=qkv_bias)


def _ar_spec(c: dict[str, Any]) -> DiffusionSpec:
    return DiffusionSpec(family="ar", attention="causal", mask_token_id=None, logit_shift=True, block_size=1)


FAMILIES: tuple[Family, ...] = (
    Family("fast_dllm_v2", ("Fast_dLLM_QwenForCausalLM",), ("Fast_dLLM_Qwen",),
           lambda c: qwen_llama_config(c, qkv_bias=True), _fast_dllm_spec, _same_names),
    Family("sdar", ("SDARForCausalLM",), ("sdar",),
           lambda c: qwen_llama_config(c, qkv_bias=bool(c.get("attention_bias", False)), qk_norm=True),
           _sdar_spec, _same_names),
    Family("llada", ("LLaDAModelLM",), ("llada",), _llada_config, _llada_spec, _llada_rename),
    Family("dream", ("DreamModel",), ("Dream", "dream"),
           lambda c: qwen_llama_config(c, qkv_bias=True), _dream_spec, _same_names),
    Family("ar", ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"), ("llama", "qwen2", "qwen3"),
           _ar_config, _ar_spec, _same_names),
)


def family_for_config(config: dict[str, Any]) -> Family | None:
    """The first family whose architectures / model_type match; diffusion families come first
    because some of them reuse a base model's model_type."""
    return next((f for f in FAMILIES if f.matches(config)), None)


# End-of-turn tokens of the chat templates we know; any of them present in a vocabulary stops
# generation (a chat model may end its turn with one and pad with another, as LLaDA does).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>")


def stop_token_ids(config: dict[str, Any], tokenizer: Any, extra: list[int] | None = None) -> list[int]:
    """Stop ids: config (and generation_config) eos_token_id, the tokenizer's eos token, and the
    known end-of-turn tokens present in the tokenizer's vocabulary; sorted, no duplicates."""
    ids = set(_int_list(config.get("eos_token_id"))) | set(extra or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)
