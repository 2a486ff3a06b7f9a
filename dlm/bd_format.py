"""The project's self-contained block-diffusion checkpoint: one .safetensors file.

Contract: `save_bd_checkpoint(path, state_dict, config, spec, tokenizer)` writes the weights (our
Hugging Face Llama names, see `dlm/config.py`) and, in the safetensors string metadata, everything
needed to decode without any other file:

    format            "voice-agent-bd/1"
    model_config      JSON of `ModelConfig`
    diffusion_spec    JSON of `DiffusionSpec` (mask id, eos ids, logit shift, block sizes, defaults)
    tokenizer_json    the `tokenizers` serialisation (tokenizer.json text)
    tokenizer_config  JSON: chat_template and the bos/eos/pad/unk/mask token strings
    quantization      "none" or "int8"
    extra             JSON object of free-form strings (provenance, recipe) from the exporter

With `quantization="int8"` every 2-D weight is stored as int8 with one float32 scale per output
row in `<name>_scale` (symmetric, scale = max|row| / 127); 1-D tensors stay in the float dtype.
`read_bd_checkpoint(path)` returns the float state dict (int8 dequantised), the config, the
spec, the tokenizer and the extra metadata. `is_bd_checkpoint(path)` reads only the header.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from dlm.config import DiffusionSpec, ModelConfig
from dlm.errors import UnsupportedCheckpointError

__all__ = [
    "BD_FORMAT",
    "BdCheckpoint",
    "is_bd_checkpoint",
    "read_bd_checkpoint",
    "save_bd_checkpoint",
    "tokenizer_from_strings",
    "tokenizer_to_strings",
]

BD_FORMAT = "voice-agent-bd/1"
QUANTIZATIONS = ("none", "int8")
_SCALE_SUFFIX = "_scale"
_SPECIAL_TOKEN_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


@dataclass
class BdCheckpoint:
    state_dict: dict[str, torch.Tensor]  # float tensors, our names
    config: ModelConfig
    spec: DiffusionSpec
    tokenizer: PreTrainedTokenizerFast
    extra: dict[str, str]  # free-form provenance written by the exporter


def tokenizer_to_strings(tokenizer: Any) -> tuple[str, str]:
    """(tokenizer.json text, tokenizer_config JSON) of a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} has no `tokenizers` backend to serialise")
    config: dict[str, Any] = {"chat_template": getattr(tokenizer, "chat_template", None)}
    for attr in _SPECIAL_TOKEN_ATTRS:
        value = getattr(tokenizer, attr, None)
        config[attr] = str(value) if value is not None else None
    return backend.to_str(), json.dumps(config)


def tokenizer_from_strings(tokenizer_json: str, tokenizer_config: str) -> PreTrainedTokenizerFast:
    config = json.loads(tokenizer_config)
    special = {attr: config[attr] for attr in _SPECIAL_TOKEN_ATTRS if config.get(attr)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        chat_template=config.get("chat_template"),
        clean_up_tokenization_spaces=False,
        **special,
    )


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight (R, C) -> (q int8 (R, C), scale float32 (R,))."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (R,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def save_bd_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    spec: DiffusionSpec,
    tokenizer: Any,
    *,
    quantization: str = "none",
    dtype: torch.dtype = torch.bfloat16,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write one self-contained .safetensors file; returns its path.

    `dtype` is the storage type of float tensors (the 1-D ones only, under int8).
    A tied model (`config.tie_embeddings`) must not carry lm_head.weight.
    OSError where the file cannot be written (safetensors' own write error included).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if config.tie_embeddings and "lm_head.weight" in state_dict:
        raise ValueError("config.tie_embeddings is set but the state dict has lm_head.weight")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if quantization == "int8" and tensor.ndim == 2:
            tensors[name], tensors[name + _SCALE_SUFFIX] = _quantize_int8(tensor)
        else:
            tensors[name] = tensor.to(dtype).contiguous()
    tokenizer_json, tokenizer_config = tokenizer_to_strings(tokenizer)
    metadata = {
        "format": BD_FORMAT,
        "model_config": json.dumps(asdict(config)),
        "diffusion_spec": json.dumps(asdict(spec)),
        "tokenizer_json": tokenizer_json,
        "tokenizer_config": tokenizer_config,
        "quantization": quantization,
        "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of this writer's own (two processes converting one GGUF at once), renamed below.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as e:  # raised for a read-only folder, a full disk, ...
        tmp.unlink(missing_ok=True)
        raise OSError(f"{tmp}: {e}") from e
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def is_bd_checkpoint(path: str | Path) -> bool:
    """True where `path` is a .safetensors file whose header declares this format."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return _metadata(path).get("format", "").startswith("voice-agent-bd/")
    except Exception:  # not a safetensors file at all: a caller asks "is it ours?", not "is it valid?"
        return False


def read_bd_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> BdCheckpoint:
    """Read a file written by `save_bd_checkpoint`; float tensors come back in `dtype`."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != BD_FORMAT:
            raise UnsupportedCheckpointError(f"{path}: format {meta.get('format')!r}, expected {BD_FORMAT!r}")
        names = list(f.keys())
        raw = {name: f.get_tensor(name) for name in names}
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(_SCALE_SUFFIX) and name.removesuffix(_SCALE_SUFFIX) in raw:
            continue
        if tensor.dtype == torch.int8:
            scale = raw[name + _SCALE_SUFFIX]  # (R,)
            state_dict[name] = (tensor.to(torch.float32) * scale[:, None]).to(dtype)
        else:
            state_dict[name] = tensor.to(dtype)
    return BdCheckpoint(
        state_dict=state_dict,
        config=ModelConfig(**json.loads(meta["model_config"])),
        spec=DiffusionSpec(**json.loads(meta["diffusion_spec"])),
        tokenizer=tokenizer_from_strings(meta["tokenizer_json"], meta["tokenizer_config"]),
        extra=json.loads(meta.get("extra", "{}")),
    )
