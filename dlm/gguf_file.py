"""Autoregressive Llama / Qwen2 / Qwen3 checkpoints in one GGUF file (llama.cpp's format).

Contract: `convert_gguf(path)` reads the GGUF metadata into Hugging Face config keys, dequantises
every tensor to float32 and renames it to our Hugging Face Llama names; the tokenizer (with its
chat template) is rebuilt from the GGUF by transformers, offline. `cached_gguf(path, cache_dir)`
writes that conversion once as a `dlm.bd_format` file (float32, family "ar") and returns its
path, so later loads are a memory map instead of a ~20 s parse; the cache key is the file's
resolved path, size and modification time.

llama.cpp stores the q/k projections of the "llama" architecture with each head's rows
interleaved for its adjacent-pair RoPE; `_unpermute` restores the rotate-half layout that
Hugging Face (and our Transformer) use. "qwen2"/"qwen3" GGUFs are not permuted.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.bd_format import save_bd_checkpoint
from dlm.errors import UnsupportedCheckpointError
from dlm.families import FAMILIES, stop_token_ids

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "cached_gguf", "convert_gguf", "default_cache_dir", "gguf_architecture",
           "read_quant_blocks"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_CACHE_VERSION = "1"

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_cache_dir() -> Path:
    """$VOICE_AGENT_CACHE_DIR, else $XDG_CACHE_HOME/voice-agent, else ~/.cache/voice-agent."""
    if os.environ.get("VOICE_AGENT_CACHE_DIR"):
        return Path(os.environ["VOICE_AGENT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "voice-agent"


def _reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file (reads the header only through gguf's memory map)."""
    return str(_field(_reader(Path(path)), "general.architecture", ""))


def _hf_config(reader) -> dict[str, Any]:
    """GGUF metadata -> the Hugging Face config.json keys the "ar" family reads."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    config = {
        "model_type": arch,
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens.data) if tokens else 0)),
        "hidden_size": int(_field(reader, f"{arch}.embedding_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", 0)),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
    }
    if arch == "qwen3":
        config["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in reader.tensors)
    return config


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of q/k (rows = n_heads * head_dim)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _our_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise UnsupportedCheckpointError(f"GGUF tensor {name!r} has no counterpart in the supported architectures")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    # transformers rebuilds a fast tokenizer (and the chat template) from the GGUF metadata.
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def convert_gguf(path: str | Path):
    """GGUF -> (ModelConfig, DiffusionSpec, float32 state dict in our names, tokenizer)."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = _reader(path)
    hf_config = _hf_config(reader)
    arch = hf_config["model_type"]
    family = next(f for f in FAMILIES if f.name == "ar")
    config = family.model_config(hf_config)
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            weights = _unpermute(weights, config.n_heads)
        elif arch == "llama" and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            weights = _unpermute(weights, config.n_kv_heads)
        # F32 tensors are read-only views of the memory map: copy those (only those) into owned memory.
        state_dict[_our_name(tensor.name)] = torch.from_numpy(np.require(weights, requirements=["C", "W"]))
    config.tie_embeddings = "lm_head.weight" not in state_dict
    tokenizer = _tokenizer(path)
    spec = family.spec(hf_config)
    spec.eos_token_ids = stop_token_ids(hf_config, tokenizer)
    return config, spec, state_dict, tokenizer


# Block types read as they are stored: name -> (bytes per block of 32 weights, kind). Q4_0: fp16 d,
# then 16 bytes of nibbles, w = d * (q - 8); Q4_1: fp16 d, fp16 m, then the nibbles, w = d * q + m
# (byte j holds weight j in its low nibble and weight j + 16 in its high one: ggml's layout);
# Q8_0: fp16 d, then 32 int8, w = d * q.
_BLOCK_TYPES = {"Q4_0": (18, "q4_0"), "Q4_1": (20, "q4_1"), "Q8_0": (34, "q8_0")}


def read_quant_blocks(path: str | Path) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Q4_0, Q4_1 and Q8_0 weights of a GGUF as they are stored, by our name: (kind, q (N, K),
    scale (N, K / 32) float32, minimum (N, K / 32) float32) with w = q * scale + minimum exactly as
    `convert_gguf` dequantises them (q/k rows un-permuted the same way); kind "q4" (q uint8
    0..15) or "q8" (q int8, minimum 0). Tensors of other types are left out."""
    path = Path(path)
    reader = _reader(path)
    hf_config = _hf_config(reader)
    arch = hf_config["model_type"]
    n_heads, n_kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for tensor in reader.tensors:
        block = _BLOCK_TYPES.get(tensor.tensor_type.name)
        if block is None or not tensor.name.endswith(".weight"):
            continue
        size, kind = block
        blocks = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, size)  # (N, K / 32, bytes)
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == "q8_0":
            q = blocks[..., 2:].copy().view(np.int8).reshape(blocks.shape[0], -1)
            minimum = np.zeros_like(scale)
        else:
            nibbles = blocks[..., 4:] if kind == "q4_1" else blocks[..., 2:]
            q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(blocks.shape[0], -1)
            minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "q4_1" else -8 * scale
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_heads if tensor.name.endswith("attn_q.weight") else n_kv_heads
            q, scale, minimum = (_unpermute(a, heads) for a in (q, scale, minimum))
        tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, scale, minimum))
        out[_our_name(tensor.name)] = ("q8" if kind == "q8_0" else "q4", *tensors)
    return out


def cached_gguf(path: str | Path, cache_dir: Path) -> Path:
    """The converted bd-format file of a GGUF, converting it on first use."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_VERSION}".encode()).hexdigest()[:16]
    target = cache_dir / "gguf" / f"{path.stem}-{key}.safetensors"
    if target.exists():
        return target
    config, spec, state_dict, tokenizer = convert_gguf(path)
    save_bd_checkpoint(target, state_dict, config, spec, tokenizer, dtype=torch.float32,
                       extra={"source": str(path), "converted_from": "gguf"})
    return target
