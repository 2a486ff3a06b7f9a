"""Autoregressive Llama / Qwen2 / Qwen3 checkpoints in one GGUF file (llama.cpp's format).

Contract: `convert_gguf(path)` reads the GGUF metadata into Hugging Face config keys, dequantises
every tensor to float32 and renames it to our Hugging Face Llama names; the tokenizer (with its
chat template) is rebuilt from the GGUF by transformers, offline. `cached_gguf(path, cache_dir)`
writes that conversion once as a `dlm.bd_format` file (float32, family "ar") and returns its
path, so later loads are a memory map instead of a conversion (about 6 s for SmolLM2-135M on two
cores, most of it transformers rebuilding the tokenizer); the cache key is the file's resolved
path, size and modification time (`cache_file`); where the cache cannot be written it raises
`ConversionNotCached`, an OSError that holds the conversion for a caller that goes on in memory
(`write_converted` writes one, an OSError where it cannot). `dense=False` (`convert_gguf`, `cache_file`,
`cached_gguf`) leaves out the weights `read_quant_blocks` reads as blocks: what a load on the block
formats needs besides them (the tokenizer, the configuration, norms and any tensor of another
type; an untied output head stays whole, a draft head reads its rows), 2 MB instead of SmolLM2's
540. Writing a conversion removes the cache's stale ones (`prune_cache`): those of a GGUF that is
gone or has changed since (its size or modification time, as a reinstall changes them), another
cache version's after 30 days, and half-written files over an hour old.

`read_block_bytes(path)` gives the Q4_0 / Q4_1 / Q8_0 weights as stored (what the block formats
run), `block_codes` one of them unpacked, `read_quant_blocks` all of them unpacked.

`read_gguf(path)` reads a GGUF's header: its scalar and string metadata, the lengths of its arrays
(a tokenizer's 49k tokens and merges are skipped, not decoded: gguf's `GGUFReader` builds a numpy
view of every one of them, 2.4 s of a 5.6 s load of the default model on a 2-core CPU) and its
tensors as views of a memory map, shaped as `GGUFReader` shapes them (quantized types as bytes,
(rows, bytes a row)). A file that is no GGUF, a version other than 2 and 3, a damaged header (with
the byte where it broke) or a tensor past the end of the file raises `UnsupportedCheckpointError`
naming the file. So does metadata that describes no model (`_hf_config`: a size of 0 or far past
any model's, heads that do not divide the width, an eos id outside the vocabulary), a tensor type
the gguf package cannot dequantize, or a tokenizer transformers cannot build from it.

llama.cpp stores the q/k projections of the "llama" architecture with each head's rows
interleaved for its adjacent-pair RoPE; `_unpermute` restores the rotate-half layout that
Hugging Face (and our Transformer) use. "qwen2"/"qwen3" GGUFs are not permuted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlm.bd_format import save_bd_checkpoint
from dlm.errors import UnsupportedCheckpointError
from dlm.families import FAMILIES, stop_token_ids

__all__ = ["BLOCK_BYTES", "SUPPORTED_GGUF_ARCHITECTURES", "ConversionNotCached", "GgufFile", "GgufTensor", "block_codes",
           "block_scales", "cache_file", "cached_gguf", "convert_gguf", "default_cache_dir", "gguf_architecture", "is_gguf",
           "prune_cache", "read_block_bytes", "read_gguf", "read_quant_blocks", "write_converted"]

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_CACHE_VERSION = "1"  # bump where a conversion's content changes (what dense=False leaves out included)
_WITHOUT_BLOCKS = ".without-blocks"  # the name's mark of a conversion made with dense=False
# A name `cache_file` gives, and a half-written one (`save_bd_checkpoint`'s temporary file beside it).
_CACHE_NAME = re.compile(r".+-[0-9a-f]{16}(\.without-blocks)?\.safetensors", re.DOTALL)
_CACHE_TMP = re.compile(r".+-[0-9a-f]{16}(\.without-blocks)?\.safetensors(\..+)?\.tmp", re.DOTALL)

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


# -- the header ------------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 counted in 32 bits; 2 and 3 lay out the header alike
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_MAX_STRING = 16 << 20  # bytes of one key, value or name: a chat template is some kB; a flipped length is not
_MAX_NESTING = 8  # arrays of arrays: none in llama.cpp's files; bounded, so a crafted file cannot recurse
# GGUF value type -> struct format of a scalar; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_U32_TYPE, _STRING, _ARRAY = 4, 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GgufTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # rows first (the file's dimensions reversed), in weights
    data: np.ndarray  # read-only view of the file: items of the type, or (rows, bytes a row) for quantized types


@dataclass
class GgufFile:
    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars (int, float, bool) and strings
    array_lengths: dict[str, int] = field(default_factory=dict)  # each array's item count (not its items)
    tensors: list[GgufTensor] = field(default_factory=list)


class _Header:
    """A cursor over a GGUF's bytes; every read past the end is a damaged file, named."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path, self.data, self.pos, self.size = path, data, 0, len(data)

    def damaged(self, what: str) -> UnsupportedCheckpointError:
        return UnsupportedCheckpointError(f"{self.path}: damaged GGUF header at byte {self.pos}: {what}")

    def scalar(self, fmt: str) -> Any:
        try:
            value = struct.unpack_from(fmt, self.data, self.pos)[0]
        except (struct.error, OverflowError):
            raise self.damaged("the file ends inside a value") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > self.size - self.pos:
            raise self.damaged(f"a string of {n} bytes runs past the end of the file")
        if n > _MAX_STRING:
            raise self.damaged(f"a string of {n} bytes (at most {_MAX_STRING} are read)")
        try:
            text = bytes(self.data[self.pos:self.pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.damaged("a string that is not UTF-8") from None
        self.pos += n
        return text

    def skip_array(self, depth: int = 0) -> int:
        """Skip an array's items -> their count."""
        if depth > _MAX_NESTING:
            raise self.damaged(f"arrays nested more than {_MAX_NESTING} deep")
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _SCALARS:
            n = struct.calcsize(_SCALARS[item_type]) * count
            if n > self.size - self.pos:
                raise self.damaged(f"an array of {count} items runs past the end of the file")
            self.pos += n
        elif item_type == _STRING:  # each string its length then its bytes (a tokenizer's: ~100k of them)
            pos, data, unpack = self.pos, self.data, _U64.unpack_from
            try:
                for _ in range(count):
                    pos += 8 + unpack(data, pos)[0]
            except (struct.error, OverflowError):  # past the end (or past any offset at all)
                raise self.damaged(f"an array of {count} strings runs past the end of the file") from None
            if pos > self.size:
                raise self.damaged(f"an array of {count} strings runs past the end of the file")
            self.pos = pos
        elif item_type == _ARRAY:
            for _ in range(count):
                self.skip_array(depth + 1)
        else:
            raise self.damaged(f"an array of value type {item_type}")
        return count

    def entries(self):
        """The metadata's (key, value type, value) in order; an array's value is its item count."""
        for _ in range(self.scalar("<Q")):
            key, vtype = self.string(), self.scalar("<I")
            if vtype in _SCALARS:
                yield key, vtype, self.scalar(_SCALARS[vtype])
            elif vtype == _STRING:
                yield key, vtype, self.string()
            elif vtype == _ARRAY:
                yield key, vtype, self.skip_array()
            else:
                raise self.damaged(f"metadata {key!r} has value type {vtype}")


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic."""
    with path.open("rb") as f:
        return f.read(4) == _MAGIC


def _open_header(path: Path) -> tuple[_Header, int, int]:
    """The header after its counts -> (cursor at the metadata's count, version, tensor count)."""
    data = np.memmap(path, mode="r") if path.stat().st_size else b""
    header = _Header(path, data)
    if bytes(data[:4]) != _MAGIC:
        raise UnsupportedCheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    header.pos = 4
    version = header.scalar("<I")
    if version not in _VERSIONS:
        order = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise UnsupportedCheckpointError(f"{path}: GGUF version {version}{order}: versions "
                                         f"{', '.join(map(str, _VERSIONS))} are supported")
    return header, version, header.scalar("<Q")


def read_gguf(path: str | Path) -> GgufFile:
    """A GGUF's header and its tensors as views of a memory map (module docstring)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    path = Path(path)
    header, version, n_tensors = _open_header(path)
    out = GgufFile(path=path, version=version)
    for key, vtype, value in header.entries():
        if key in out.metadata or key in out.array_lengths:
            raise header.damaged(f"metadata {key!r} twice")
        if key == "general.alignment" and vtype != _U32_TYPE:  # as gguf's reader and llama.cpp have it
            raise header.damaged(f"general.alignment of value type {vtype}, not a uint32")
        (out.array_lengths if vtype == _ARRAY else out.metadata)[key] = value
    infos = []
    for _ in range(n_tensors):
        name, n_dims = header.string(), header.scalar("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise header.damaged(f"tensor {name!r} has {n_dims} dimensions")
        dims = [header.scalar("<Q") for _ in range(n_dims)]
        if not all(1 <= d < 1 << 62 for d in dims):  # each at most the product, which the file's size bounds
            raise header.damaged(f"tensor {name!r} has dimensions {dims}")
        raw_type, offset = header.scalar("<I"), header.scalar("<Q")
        try:
            tensor_type = GGMLQuantizationType(raw_type)
        except ValueError:
            tensor_type = None
        if tensor_type not in GGML_QUANT_SIZES:
            raise header.damaged(f"tensor {name!r} has type {raw_type}, unknown to this gguf package")
        infos.append((name, dims, tensor_type, offset))
    alignment = out.metadata.get("general.alignment", 32)
    if alignment <= 0 or alignment & (alignment - 1):
        raise header.damaged(f"general.alignment {alignment!r} is not a power of two")
    start = -(-header.pos // alignment) * alignment
    items = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
             GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
             GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
             GGMLQuantizationType.I64: np.int64}
    names = set()
    for name, dims, tensor_type, offset in infos:
        if name in names:
            raise header.damaged(f"tensor {name!r} twice")
        names.add(name)
        shape = tuple(reversed(dims))
        block, type_size = GGML_QUANT_SIZES[tensor_type]
        n = math.prod(dims)
        if dims[0] % block:
            raise header.damaged(f"tensor {name!r}: rows of {dims[0]} in blocks of {block}")
        first, end = start + offset, start + offset + n * type_size // block
        if end > header.size:
            raise UnsupportedCheckpointError(f"{path}: tensor {name!r} ends at byte {end}, past the end of the "
                                             f"file ({header.size} bytes): a truncated GGUF")
        item = items.get(tensor_type)
        view = header.data[first:end]
        data = (view.view(item) if item is not None else view).reshape(
            shape if item is not None else quant_shape_to_byte_shape(shape, tensor_type))
        out.tensors.append(GgufTensor(name, tensor_type, shape, data))
    return out


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file ("" where it names none): the header is read up to
    that key only. UnsupportedCheckpointError where the file is no GGUF or its header is damaged."""
    header, _, _ = _open_header(Path(path))
    for key, vtype, value in header.entries():
        if key == "general.architecture":
            return value if vtype == _STRING else ""
    return ""


def _hf_config(parsed: GgufFile) -> dict[str, Any]:
    """GGUF metadata -> the Hugging Face config.json keys the "ar" family reads."""
    meta = parsed.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedCheckpointError(f"{parsed.path}: GGUF architecture {arch!r} is not supported (supported: "
                                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    needed = [f"{arch}.{key}" for key in ("attention.head_count", "embedding_length", "block_count",
                                          "feed_forward_length")]
    if missing := [key for key in needed if key not in meta]:
        raise UnsupportedCheckpointError(f"{parsed.path}: the GGUF's metadata lacks {', '.join(missing)}")
    try:
        config = _config_values(parsed, arch)
    except (TypeError, ValueError, OverflowError) as e:  # a number stored as a string, NaN, ...
        raise UnsupportedCheckpointError(f"{parsed.path}: the GGUF's metadata does not describe a model: {e}") from None
    sizes = {k: v for k, v in config.items() if k in _POSITIVE}
    if bad := {k: v for k, v in sizes.items() if not 1 <= v <= _POSITIVE[k]}:
        raise UnsupportedCheckpointError(f"{parsed.path}: the GGUF's metadata does not describe a model: {bad}")
    eos = config["eos_token_id"]
    if eos is not None and (type(eos) is not int or not 0 <= eos < config["vocab_size"]):
        raise UnsupportedCheckpointError(f"{parsed.path}: tokenizer.ggml.eos_token_id {eos!r} is no token of "
                                         f"its {config['vocab_size']}")
    return config


# The sizes a model's metadata must give, each at least 1 and at most (far beyond any real model's)
_POSITIVE = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10,
             "num_key_value_heads": 1 << 10, "intermediate_size": 1 << 18, "max_position_embeddings": 1 << 24}


def _config_values(parsed: GgufFile, arch: str) -> dict[str, Any]:
    meta = parsed.metadata
    n_heads = int(meta[f"{arch}.attention.head_count"])
    config = {
        "model_type": arch,
        "vocab_size": int(meta.get(f"{arch}.vocab_size", parsed.array_lengths.get("tokenizer.ggml.tokens", 0))),
        "hidden_size": int(meta[f"{arch}.embedding_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", 0)),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": all(t.name != "output.weight" for t in parsed.tensors),
    }
    if arch == "qwen3":
        config["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in parsed.tensors)
    if not 0 <= config["head_dim"] <= 1 << 12 or not config["rms_norm_eps"] > 0 or not config["rope_theta"] > 0:
        raise ValueError(f"head_dim {config['head_dim']}, rms_norm_eps {config['rms_norm_eps']}, "
                         f"rope_theta {config['rope_theta']}")
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


def _stored_as_blocks(tensor: GgufTensor) -> bool:
    """Whether `read_quant_blocks` reads this tensor (a weight of a block type it takes as stored)."""
    return tensor.tensor_type.name in _BLOCK_TYPES and tensor.name.endswith(".weight")


def convert_gguf(path: str | Path, *, dense: bool = True):
    """GGUF -> (ModelConfig, DiffusionSpec, float32 state dict in our names, tokenizer). dense=False:
    the state dict leaves out the weights `read_quant_blocks` reads (the block formats run them as
    blocks), and holds the rest; an untied output head stays (a draft head reads its rows)."""
    from gguf.quants import dequantize

    path = Path(path)
    parsed = read_gguf(path)
    hf_config = _hf_config(parsed)
    arch = hf_config["model_type"]
    family = next(f for f in FAMILIES if f.name == "ar")
    try:
        config = family.model_config(hf_config)
    except ValueError as e:  # heads that do not divide the width, ...
        raise UnsupportedCheckpointError(f"{path}: the GGUF's metadata does not describe a model: {e}") from None
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in parsed.tensors:
        name = _our_name(tensor.name)
        if not dense and _stored_as_blocks(tensor) and name != "lm_head.weight":
            continue
        try:
            weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:  # a type the gguf package cannot dequantize
            raise UnsupportedCheckpointError(f"{path}: tensor {tensor.name!r} of type {tensor.tensor_type.name}: "
                                             f"{e or type(e).__name__}") from None
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            weights = _unpermute(weights, config.n_heads)
        elif arch == "llama" and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            weights = _unpermute(weights, config.n_kv_heads)
        # F32 tensors are read-only views of the memory map: copy those (only those) into owned memory.
        state_dict[name] = torch.from_numpy(np.require(weights, requirements=["C", "W"]))
    try:
        tokenizer = _tokenizer(path)
    except Exception as e:  # transformers' own GGUF parse: whatever damage its tokenizer arrays hold
        raise UnsupportedCheckpointError(f"{path}: no tokenizer could be built from the GGUF: "
                                         f"{type(e).__name__}: {e}") from None
    spec = family.spec(hf_config)
    spec.eos_token_ids = stop_token_ids(hf_config, tokenizer)
    return config, spec, state_dict, tokenizer


# Block types read as they are stored: name -> (bytes per block of 32 weights, kind). Q4_0: fp16 d,
# then 16 bytes of nibbles, w = d * (q - 8); Q4_1: fp16 d, fp16 m, then the nibbles, w = d * q + m
# (byte j holds weight j in its low nibble and weight j + 16 in its high one: ggml's layout);
# Q8_0: fp16 d, then 32 int8, w = d * q.
_BLOCK_TYPES = {"Q4_0": (18, "q4_0"), "Q4_1": (20, "q4_1"), "Q8_0": (34, "q8_0")}
BLOCK_BYTES = {kind: size for size, kind in _BLOCK_TYPES.values()}  # read_block_bytes' kinds: bytes a block


def read_block_bytes(path: str | Path) -> dict[str, tuple[str, torch.Tensor]]:
    """The Q4_0, Q4_1 and Q8_0 weights of a GGUF as they are stored, by our name: (GGUF kind "q4_0",
    "q4_1" or "q8_0", blocks (N, K / 32, `BLOCK_BYTES[kind]`) uint8: a view of the file's read-only
    memory map, never to be written to (a write kills the process), or where llama's q/k rows are
    un-permuted (as `convert_gguf` does) a copy). Tensors of other types are left out.
    `block_codes` unpacks one (copies); the integer products lay them out as they are
    (`dlm.blocks.BlockWeight.from_gguf_blocks`, copies)."""
    path = Path(path)
    parsed = read_gguf(path)
    hf_config = _hf_config(parsed)
    arch = hf_config["model_type"]
    n_heads, n_kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    out: dict[str, tuple[str, torch.Tensor]] = {}
    # Views of a read-only map, read-only by contract (the docstring; their readers copy): torch's
    # warning about them says so. Filtered here, around the calls, not by a filter of the module's
    # import, which a test framework's per-test filters drop.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        for tensor in parsed.tensors:
            if not _stored_as_blocks(tensor):
                continue
            size, kind = _BLOCK_TYPES[tensor.tensor_type.name]
            blocks = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, size)  # (N, K / 32, bytes)
            if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
                blocks = _unpermute(blocks, n_heads if tensor.name.endswith("attn_q.weight") else n_kv_heads)
            out[_our_name(tensor.name)] = (kind, torch.from_numpy(blocks))
    return out


def block_scales(kind: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale d and minimum m (N, K / 32) float32 of stored blocks (`read_block_bytes`): w = d q + m
    (Q4_0: m = -8 d, Q8_0: m = 0)."""
    scale = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    if kind == "q4_1":
        return scale, blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    return scale, -8 * scale if kind == "q4_0" else torch.zeros_like(scale)


def block_codes(kind: str, blocks: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One `read_block_bytes` entry unpacked: ("q4" (q uint8 0..15) or "q8" (q int8), q (N, K),
    scale (N, K / 32) float32, minimum (N, K / 32) float32: 0 for Q8) with w = q * scale + minimum
    exactly as `convert_gguf` dequantises them."""
    n = blocks.shape[0]
    scale, minimum = block_scales(kind, blocks)
    if kind == "q8_0":  # a copy, never a view of the memory map
        q = blocks[..., 2:].clone(memory_format=torch.contiguous_format).view(torch.int8).reshape(n, -1)
        return "q8", q, scale, minimum
    nibbles = blocks[..., 4:] if kind == "q4_1" else blocks[..., 2:]
    return "q4", torch.cat([nibbles & 15, nibbles >> 4], dim=-1).reshape(n, -1), scale, minimum


def read_quant_blocks(path: str | Path) -> dict[str, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Q4_0, Q4_1 and Q8_0 weights of a GGUF, by our name, unpacked (`block_codes`: kind, q,
    scale, minimum) with w = q * scale + minimum exactly as `convert_gguf` dequantises them (q/k
    rows un-permuted the same way). Tensors of other types are left out."""
    return {name: block_codes(kind, blocks) for name, (kind, blocks) in read_block_bytes(path).items()}


def cache_file(path: str | Path, cache_dir: Path, *, dense: bool = True) -> Path:
    """Where `cached_gguf` keeps a GGUF's converted file (whether or not it exists yet); dense=False:
    its conversion without the weights stored as blocks (`convert_gguf`)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_VERSION}".encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{path.stem}-{key}{'' if dense else _WITHOUT_BLOCKS}.safetensors"


def write_converted(path: str | Path, converted: tuple[Any, Any, dict[str, torch.Tensor], Any], target: Path,
                    *, dense: bool = True) -> Path:
    """`convert_gguf(path, dense=dense)`'s result as the bd-format file `target`, recording its
    source, `dense` and the cache version. OSError where it cannot be written (a read-only cache)."""
    config, spec, state_dict, tokenizer = converted
    extra = {"source": str(Path(path).resolve()), "converted_from": "gguf", "cache_version": _CACHE_VERSION}
    if not dense:
        extra["without_blocks"] = "true"
    return save_bd_checkpoint(target, state_dict, config, spec, tokenizer, dtype=torch.float32, extra=extra)


class ConversionNotCached(OSError):
    """`cached_gguf` converted the GGUF but could not write the result (a read-only cache): the
    conversion is `converted` (`convert_gguf`'s tuple), for a caller that goes on in memory."""

    def __init__(self, message: str, converted: tuple[Any, Any, dict[str, torch.Tensor], Any]):
        super().__init__(message)
        self.converted = converted


def cached_gguf(path: str | Path, cache_dir: Path, *, dense: bool = True) -> Path:
    """The converted bd-format file of a GGUF (dense=False: without the weights stored as blocks),
    converting it on first use. `ConversionNotCached` (an OSError holding the conversion) where
    the cache cannot be written."""
    target = cache_file(path, cache_dir, dense=dense)
    if not target.exists():
        converted = convert_gguf(path, dense=dense)
        try:
            write_converted(path, converted, target, dense=dense)
        except OSError as e:
            raise ConversionNotCached(str(e), converted) from e
        prune_cache(cache_dir, keep=target)
    return target


_STALE_TMP_S = 3600  # a half-written conversion this old has lost its writer
_OTHER_VERSION_S = 30 * 86400  # another version's conversion of a GGUF still there: kept this long (another install may read it)


def prune_cache(cache_dir: Path, *, keep: Path | None = None) -> list[Path]:
    """Remove the GGUF conversions under `cache_dir` that no load will read again, and return
    them: those whose GGUF is gone or has changed since (another size or modification time: a
    reinstall, a new version of it; `cache_file` names them by both), those another cache version
    wrote over 30 days ago (another install sharing the cache reads its own until then), and
    half-written ones over an hour old. Only files named as `cache_file` names them and holding a
    conversion's metadata are candidates; `keep`, and files it cannot read or remove, stay. A
    process still reading a removed file keeps it until it lets it go (POSIX); one that has yet to
    open it converts again (`dlm.checkpoints`)."""
    from safetensors import safe_open

    removed: list[Path] = []
    folder = cache_dir / "gguf"
    now = time.time()
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            age_s = now - file.stat().st_mtime
            if _CACHE_TMP.fullmatch(file.name):
                stale = age_s > _STALE_TMP_S
            elif _CACHE_NAME.fullmatch(file.name) and file != keep:
                with safe_open(str(file), framework="pt") as f:
                    extra = json.loads((f.metadata() or {}).get("extra", "{}"))
                source = extra.get("source") if extra.get("converted_from") == "gguf" else None
                if source is None:
                    continue
                if extra.get("cache_version", "1") != _CACHE_VERSION:
                    stale = not Path(source).is_file() or age_s > _OTHER_VERSION_S
                else:
                    stale = not Path(source).is_file() or file != cache_file(
                        source, cache_dir, dense=extra.get("without_blocks") != "true")
            else:
                continue
            if stale:
                size = file.stat().st_size
                file.unlink()
                removed.append(file)
                log.info("removed the stale GGUF conversion %s (%.0f MB)", file, size / 1e6)
        except Exception as e:  # damaged, gone meanwhile, not removable: left as it is
            log.debug("left %s in the cache: %s", file, e)
    return removed
