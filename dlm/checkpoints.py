"""Find, recognise and load a checkpoint of any supported family into our `Transformer`.

Contract:
- `load_model(path, *, device="cpu", dtype=None, max_seq_len=None, drafter=None, adapter=None,
  weights="dense", inference_only=False) -> LoadedModel` (`weights`: one of `WEIGHT_FORMATS`, see
  load_model) with `.model` (dlm.model.Transformer, eval mode), `.config`, `.spec`, `.tokenizer`,
  `.family`, `.path`, `.adapter` (the adapter file merged into the weights, dlm.adapter, or None)
  and `.drafter` (a dlm.drafter.Drafter where a drafter file was given, else None).
- `detect_family(path) -> str`, one of `SUPPORTED_FAMILIES`, from what the checkpoint says about
  itself: the bd format marker in a safetensors header, the GGUF magic and
  `general.architecture`, or config.json's `architectures` / `model_type`. Never from file names.
- Accepted paths: a bd .safetensors file or a folder holding exactly one; a GGUF file or a folder
  holding exactly one; a Hugging Face folder (config.json + *.safetensors + tokenizer); a Hugging
  Face cache entry (`.../hub/models--ORG--NAME`), which resolves to its snapshot.
- Errors: `ModelNotFoundError` for a path that does not exist, `UnsupportedCheckpointError`
  naming what was found (architectures, model_type, GGUF architecture) and the supported families.
- A GGUF is converted once into a float32 bd file under `cache_dir` (default
  `dlm.gguf_file.default_cache_dir()`); later loads memory-map that file. The block formats convert
  only what they do not run as blocks (`convert_gguf(dense=False)`: the tokenizer, the norms, an
  untied output head; 2 MB for SmolLM2); those weights stay on the meta device, their shapes
  checked, until the blocks replace them.
- dtype (a torch dtype or "float32" / "bfloat16" / "float16" / "auto") None: float32 on CPU, bfloat16 elsewhere. max_seq_len None: the checkpoint's context
  length capped at `DEFAULT_MAX_SEQ_LEN` (it sizes the RoPE table and the default KV cache).
Nothing here downloads anything or runs code shipped with a checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dlm.bd_format import is_bd_checkpoint, read_bd_checkpoint
from dlm.blocks import UNIT as BLOCK_UNIT
from dlm.blocks import VNNI_INT8, VNNI_INT16, BlockWeight, amx_available, available, vnni_available
from dlm.config import DiffusionSpec, ModelConfig
from dlm.errors import ModelNotFoundError, UnsupportedCheckpointError
from dlm.families import Family, family_for_config, stop_token_ids
from dlm.gguf_file import (
    SUPPORTED_GGUF_ARCHITECTURES,
    ConversionNotCached,
    block_codes,
    cached_gguf,
    default_cache_dir,
    gguf_architecture,
    is_gguf,
    read_block_bytes,
    read_quant_blocks,
)
from dlm.memory import release_free_memory
from dlm.model import Int4Weight, Int8AsInt4Weight, Transformer, can_pack_linears

__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "FORMAT_DTYPES",
    "SUPPORTED_FAMILIES",
    "WEIGHT_FORMATS",
    "LoadedModel",
    "detect_family",
    "load_model",
    "reads_dense_conversion",
    "resolve_checkpoint",
    "resolve_dtype",
    "runnable_weights",
]

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("bd", "fast_dllm_v2", "sdar", "llada", "dream", "ar")
DEFAULT_MAX_SEQ_LEN = 4096
WEIGHT_FORMATS = ("dense", "int4", "blocks", "blocks-amx", "blocks-bf16", "blocks-int8", "blocks-int16")
# The dtype of the model each of a GGUF's quantized formats runs in (load_model's `weights`;
# "blocks-bf16" / "blocks-int8" / "blocks-int16": a float32 model whose matrix products round their
# inputs to bf16 / 8 bits / 16 bits per block of 32).
FORMAT_DTYPES = {"int4": torch.bfloat16, "blocks": torch.float32, "blocks-amx": torch.float32,
                 "blocks-bf16": torch.float32, "blocks-int8": torch.float32, "blocks-int16": torch.float32}
# The formats that run a GGUF's blocks at every position (dlm.blocks), and those that need AMX
BLOCK_FORMATS = ("blocks", "blocks-amx", "blocks-bf16", "blocks-int8", "blocks-int16")
VNNI_FORMATS = ("blocks-int8", "blocks-int16")
AMX_FORMATS = ("blocks-amx", "blocks-bf16")
# Where a format's kernel cannot run here, the next format of the same accuracy (runnable_weights),
# or (near=True, for serving) the next of nearly the same: 16-bit integer products on VNNI stand in
# for float32-accurate ones on AMX (inputs rounded to 1/65024 of their block's largest; a measured
# 1 in 24 greedy replies of the default model differ from float32's, at a 1.4x faster dLLM)
_SAME_ACCURACY = {"blocks-amx": "blocks", "blocks": "dense"}
_NEARLY_SAME = {"blocks-amx": "blocks-int16", "blocks-int16": "blocks", "blocks": "dense"}


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    spec: DiffusionSpec
    tokenizer: Any  # a transformers tokenizer
    family: str  # one of SUPPORTED_FAMILIES
    path: Path  # the file or folder actually loaded (a HF cache entry resolves to its snapshot)
    drafter: Any = None  # a dlm.drafter.Drafter applied to this model (load_model(..., drafter=...)), or None
    adapter: Path | None = None  # the adapter file merged into the weights (load_model(..., adapter=...)), or None
    weights: str = "dense"  # the weight format it runs (one of WEIGHT_FORMATS: load_model's `weights`)


def _unsupported(path: Path, found: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"{path}: not a supported checkpoint ({found}); supported families: {', '.join(SUPPORTED_FAMILIES)}")


# -- locating the checkpoint ----------------------------------------------------------------------

def _hf_cache_snapshot(folder: Path) -> Path | None:
    """models--ORG--NAME/ -> snapshots/<revision of refs/main, else the newest snapshot>."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The file or folder to load: expands ~, resolves a HF cache entry, picks the single bd or
    GGUF file of a folder without config.json."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        return path
    snapshot = _hf_cache_snapshot(path)
    if snapshot is not None:
        path = snapshot
    if (path / "config.json").is_file():
        return path
    singles = [p for p in sorted(path.iterdir()) if p.is_file() and (is_gguf(p) or is_bd_checkpoint(p))]
    if len(singles) == 1:
        return singles[0]
    if len(singles) > 1:
        raise UnsupportedCheckpointError(
            f"{path} holds several checkpoint files ({', '.join(p.name for p in singles)}); point at one of them")
    return path


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _unsupported(folder, f"config.json unreadable: {exc}") from exc


# -- detection ------------------------------------------------------------------------------------

def _detect(path: Path) -> tuple[str, Family | None]:
    if path.is_file():
        if is_bd_checkpoint(path):
            return "bd", None
        if is_gguf(path):
            arch = gguf_architecture(path)
            if arch in SUPPORTED_GGUF_ARCHITECTURES:
                return "ar", None
            raise _unsupported(path, f"GGUF general.architecture={arch!r}")
        raise _unsupported(path, "neither a bd .safetensors file nor a GGUF file")
    if not (path / "config.json").is_file():
        names = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "empty folder"
        raise _unsupported(path, f"no config.json, no bd or GGUF file; found: {names}")
    config = _read_config(path)
    family = family_for_config(config)
    if family is None:
        raise _unsupported(path, f"architectures={config.get('architectures')}, model_type={config.get('model_type')!r}")
    return family.name, family


def detect_family(path: str | Path) -> str:
    return _detect(resolve_checkpoint(path))[0]


# -- Hugging Face folders -------------------------------------------------------------------------

def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        found = f"only {', '.join(bins)}" if bins else "no weight files"
        raise _unsupported(folder, f"{found}; convert the weights to safetensors")
    return files


def _read_hf_tensors(folder: Path, family: Family, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                ours = family.rename(name)
                if ours is not None:
                    state_dict[ours] = f.get_tensor(name).to(dtype)
    return state_dict


def _hf_tokenizer(folder: Path):
    """The checkpoint's tokenizer without running its code. A custom tokenizer class (Dream's
    DreamTokenizer) is a byte-level BPE underneath: fall back to tokenizer.json, then to the
    Qwen2 BPE files (vocab.json + merges.txt) every Qwen-based family ships."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, AttributeError, ImportError) as exc:
        auto_error = exc
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    raise UnsupportedCheckpointError(f"{folder}: no usable tokenizer ({auto_error})")


def _generation_eos(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _load_hf_folder(folder: Path, family: Family, dtype: torch.dtype):
    hf_config = _read_config(folder)
    config = family.model_config(hf_config)
    tokenizer = _hf_tokenizer(folder)
    spec = family.spec(hf_config)
    spec.eos_token_ids = stop_token_ids(hf_config, tokenizer, _generation_eos(folder))
    state_dict = _read_hf_tensors(folder, family, dtype)
    return config, spec, state_dict, tokenizer


# -- building the model ---------------------------------------------------------------------------

def _build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], path: Path,
                 device: torch.device, dtype: torch.dtype, *, absent: frozenset[str] = frozenset()) -> Transformer:
    """`absent`: weights the state dict leaves out on purpose (a GGUF's blocks, run as blocks: the
    caller replaces them); they stay on the meta device."""
    # Tied checkpoints may still carry a copy of the embedding as lm_head; untied ones never lack it.
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state_dict and "lm_head.weight" not in absent:
        config.tie_embeddings = True
    with torch.device("meta"):  # no random init, no memory: the checkpoint's tensors are assigned
        model = Transformer(config, init=False)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict) - absent), sorted((set(state_dict) | absent) - expected)
    if missing or unexpected:
        raise _unsupported(path, f"tensor names do not map onto the model: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]} ({len(missing)} / {len(unexpected)} in all)")
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=not absent, assign=True)
    except RuntimeError as e:  # a tensor whose shape is not the configuration's
        raise _unsupported(path, f"tensor shapes do not fit its configuration: {str(e).strip()[:400]}") from None
    # Norms and biases in memory of their own (a few kB; packed formats hold on to them): once the
    # big weights are released or packed, nothing keeps a safetensors checkpoint's memory map open,
    # and the pages read from it leave the process's resident size.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.data = param.data.clone()
    # The RoPE tables are non-persistent buffers built on "meta" above: rebuild them for real.
    model.build_rope(device)
    if absent:  # a CPU model (the block formats) whose absent weights stay on "meta" until replaced
        return model.eval()
    return model.to(device).eval()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None / "auto": float32 on CPU (fast kernels, exact), bfloat16 on an accelerator."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} or 'auto', not {dtype!r}")
        return _DTYPES[dtype]
    return dtype


def _load_bd(path: Path, dtype: torch.dtype, *, cached: bool = False):
    """`cached`: a conversion in the GGUF cache (one without the block weights is expected there)."""
    bd = read_bd_checkpoint(path, dtype=dtype)
    if bd.extra.get("without_blocks") == "true" and not cached:
        raise UnsupportedCheckpointError(f"{path}: a cached conversion of {bd.extra.get('source', 'a GGUF')} without "
                                         "its block weights; load that GGUF instead")
    return bd.config, bd.spec, bd.state_dict, bd.tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, cache_dir: Path, *, dense: bool = True):
    """dense=False: without the weights stored as blocks (`convert_gguf`)."""
    for attempt in range(2):
        try:
            target = cached_gguf(path, cache_dir, dense=dense)
        except ConversionNotCached as e:  # a read-only cache location: this conversion, in memory (and at every load)
            log.warning("%s: its converted copy cannot be cached (%s); converted in memory", path, e)
            config, spec, state_dict, tokenizer = e.converted
            return config, spec, {k: v.to(dtype) for k, v in state_dict.items()}, tokenizer
        try:
            return _load_bd(target, dtype, cached=True)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e)[:300]}"
            if attempt:
                raise UnsupportedCheckpointError(f"{target}: the cached conversion of {path} cannot be read ({why})"
                                                 ) from e
            if not target.exists():  # another process's prune, between the check and the opening
                log.info("%s: its cached conversion was removed as it was opened; converting again", path)
                continue
            log.warning("%s: its cached conversion %s cannot be read (%s); converting again", path, target, why)
            try:
                target.unlink()
            except OSError as gone:
                raise UnsupportedCheckpointError(f"{target}: the cached conversion of {path} cannot be read ({why}) "
                                                 f"nor removed ({gone}); delete it to convert again") from e
    raise AssertionError("unreachable")


def reads_dense_conversion(weights: str) -> bool:
    """Whether a GGUF load in format `weights` reads its whole float32 conversion (`cached_gguf`'s
    `dense`), not the one without its block weights (the block formats run those from the GGUF)."""
    return weights not in BLOCK_FORMATS


def _block_weights(stored: dict[str, tuple[str, torch.Tensor]], weights: str) -> dict[str, BlockWeight]:
    """A GGUF's stored blocks (`read_block_bytes`) whose K the kernel takes, as `BlockWeight`s: laid
    out for the integer products straight from their bytes (`BlockWeight.from_gguf_blocks`: what
    the codes' `int8()` / `int16()` make, in one copy), else their codes as the float32 products
    read them (`bf16()` and `split()` come after an adapter's update is attached)."""
    out = {}
    for name, (kind, raw) in stored.items():
        if raw.shape[1] * 32 % BLOCK_UNIT:
            continue
        if weights in VNNI_FORMATS:
            out[name] = BlockWeight.from_gguf_blocks(kind, raw, VNNI_INT8 if weights == "blocks-int8" else VNNI_INT16)
        else:
            code, q, scale, minimum = block_codes(kind, raw)
            out[name] = BlockWeight.q4(q, scale, minimum) if code == "q4" else BlockWeight.q8(q, scale)
    return out


def _kernel_reason(weights: str) -> str | None:
    """None where `weights`' kernel runs on this machine (always, for dense and int4), else why not."""
    if weights not in BLOCK_FORMATS:
        return None
    if weights in VNNI_FORMATS:
        return vnni_available()
    return amx_available() if weights in AMX_FORMATS else available()


def runnable_weights(weights: str, *, near: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """`weights`, or where its kernel cannot run on this machine the next format of the same
    accuracy that can (blocks-amx -> blocks -> dense; near: of nearly the same, blocks-amx ->
    blocks-int16 -> blocks -> dense): (that format, [(each format passed over, why it cannot run)])."""
    chain = _NEARLY_SAME if near else _SAME_ACCURACY
    passed: list[tuple[str, str]] = []
    while weights in chain and (reason := _kernel_reason(weights)) is not None:
        passed.append((weights, reason))
        weights = chain[weights]
    return weights, passed


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               max_seq_len: int | None = None, cache_dir: str | Path | None = None, pack: bool = True,
               drafter: str | Path | None = None, adapter: str | Path | None = None, weights: str = "dense",
               inference_only: bool = False) -> LoadedModel:
    """See the module docstring; `pack`: prepack the weights for oneDNN where that applies
    (bfloat16 on CPU, `Transformer.pack_linears`); `adapter`: a fine-tune of this model
    (dlm.adapter), merged into its weights before they are packed (AdapterError where it belongs
    to another base; with int4 weights the decoding steps add it unmerged, dlm.adapter.unmerged_update);
    `drafter`: a drafter file for this model, adapter included (dlm.drafter), checked against it
    (DrafterError where it belongs to another base or adapter);
    `weights`: "dense", or "int4": a GGUF's own Q4_0 / Q4_1 projections run the decoding steps
    (`dlm.model.Int4Weight`), packed bf16 copies the prefill, and the dense copies are released
    (inference only: `Transformer.release_dense_weights`); bfloat16 on CPU only; or "blocks": a
    GGUF's own Q4_0 / Q4_1 / Q8_0 blocks run every position in float32 (dlm.blocks: the float32
    weights bit for bit, a sixth of their bytes), inference only; float32 on a CPU with AVX-512;
    or "blocks-amx": the same, the matrix products float32-accurate on AMX (`BlockWeight.split`: the
    inputs split into three bf16 parts, the blocks' integers exact; float32's accuracy, not its
    bits; several rows for about the price of one), on a CPU with AMX;
    or "blocks-bf16": the same, the matrix products in bf16 on AMX (`BlockWeight.bf16`: weights and
    inputs rounded to bf16, sums in float32; many rows for about the price of one; other greedy
    replies than float32's on some prompts), on a CPU with AMX;
    or "blocks-int8": the same, with llama.cpp-style inputs (`BlockWeight.int8`: inputs rounded to 8
    bits per block of 32, exact integer products on VNNI, float32 scales; about a third of the
    float32 path's arithmetic; other greedy replies than float32's on some prompts), on a CPU with
    AVX512-VNNI; or "blocks-int16": the same with inputs rounded to 16 bits (`BlockWeight.int16`:
    errors some 250 times smaller, about half the float32 path's arithmetic).
    `inference_only`: where the weights were packed, release their dense copies too (serving
    runs the packed ones; about 210 MB for SmolLM2 in bf16), and a draft head's float32 weights
    where it runs on Q8 blocks (about 50 MB)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    resolved = resolve_checkpoint(path)
    family_name, family = _detect(resolved)
    device = torch.device(device)
    if weights in FORMAT_DTYPES:
        dtype = FORMAT_DTYPES[weights] if dtype in (None, "auto") else dtype
        if not is_gguf(resolved):
            raise UnsupportedCheckpointError(f"{resolved}: weights={weights!r} runs a GGUF's own quantized "
                                             "blocks; this is not a GGUF file")
    if weights == "int4" and (resolve_dtype(dtype, device) != torch.bfloat16
                              or not can_pack_linears(torch.bfloat16, device)):
        raise ValueError(f"weights='int4' needs bfloat16 on a CPU with oneDNN bf16 (asked: {dtype}, {device})")
    if weights in BLOCK_FORMATS:
        if resolve_dtype(dtype, device) != torch.float32 or device.type != "cpu":
            raise ValueError(f"weights={weights!r} needs float32 on a CPU (asked: {dtype}, {device})")
        if (reason := _kernel_reason(weights)) is not None:
            raise ValueError(f"weights={weights!r}: {reason}")
    dtype = resolve_dtype(dtype, device)
    stored = None
    if family is not None:
        config, spec, state_dict, tokenizer = _load_hf_folder(resolved, family, dtype)
    elif family_name == "bd":
        config, spec, state_dict, tokenizer = _load_bd(resolved, dtype)
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        dense = reads_dense_conversion(weights)
        if not dense and not (stored := read_block_bytes(resolved)):  # before any conversion is written
            raise UnsupportedCheckpointError(f"{resolved}: weights={weights!r} runs a GGUF's Q4_0, Q4_1 or Q8_0 "
                                             "blocks; this one has none")
        config, spec, state_dict, tokenizer = _load_gguf(resolved, dtype, cache, dense=dense)
    config.max_seq_len = max_seq_len or min(config.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    absent = frozenset(stored or ()) - set(state_dict)
    model = _build_model(config, state_dict, resolved, device, dtype, absent=absent)
    params = dict(model.named_parameters())
    for name in sorted(absent):  # what load_state_dict checks of the weights it loads
        rows, n_blocks, _ = stored[name][1].shape
        if (rows, n_blocks * 32) != tuple(params[name].shape):
            raise _unsupported(resolved, f"tensor shapes do not fit its configuration: {name} is "
                                         f"{(rows, n_blocks * 32)} in the GGUF, {tuple(params[name].shape)} "
                                         "in the model it describes")
    fine_tune = None
    if adapter is not None:
        from dlm.adapter import load_adapter, merge_adapter, unmerged_update

        fine_tune = load_adapter(adapter, config, resolved)
        if weights not in BLOCK_FORMATS:  # blocks carry the update unmerged and release the dense weights
            merge_adapter(model, fine_tune)
    if weights == "int4":
        int4 = {name: Int4Weight.from_blocks(q, scale, minimum) if kind == "q4" else Int8AsInt4Weight(q, scale)
                for name, (kind, q, scale, minimum) in read_quant_blocks(resolved).items()}
        if not any(isinstance(w, Int4Weight) for w in int4.values()):
            raise UnsupportedCheckpointError(f"{resolved}: weights='int4' needs Q4_0 or Q4_1 tensors; this GGUF has none")
        if fine_tune is not None:
            int4 = unmerged_update(int4, fine_tune)
        # The output head's bf16 copy only serves draft blocks (many positions' logits at once).
        model.pack_linears(int4, head_amx=drafter is not None)
        model.release_dense_weights()
        del int4
    elif weights in BLOCK_FORMATS:
        embedding = stored.get("model.embed_tokens.weight")
        try:
            blocks = _block_weights(stored, weights)
            del stored
            if fine_tune is not None:
                blocks = unmerged_update(blocks, fine_tune)
            if weights == "blocks-bf16":
                blocks = {name: w.bf16() for name, w in blocks.items()}
            elif weights == "blocks-amx":
                blocks = {name: w.split() for name, w in blocks.items()}
            model.use_blocks(blocks)
        except ValueError as e:
            raise UnsupportedCheckpointError(f"{resolved}: weights={weights!r}: {e}") from e
        if embedding is not None:  # the lookups from the blocks too: the float32 table is freed below
            try:
                model.use_block_embedding(*block_codes(*embedding)[1:])
            except ValueError as e:  # the table stays (113 MB for SmolLM2): the same replies either way
                if model.model.embed_tokens.weight.is_meta:  # no table was loaded: the blocks are the only one
                    raise UnsupportedCheckpointError(f"{resolved}: weights={weights!r}: {e}") from e
                log.warning("%s: the input embedding stays a float32 table: %s", resolved, e)
        model.release_dense_weights()
        del blocks, embedding
    elif pack and model.pack_linears() and inference_only:
        model.release_dense_weights()
    del state_dict
    loaded = LoadedModel(model=model, config=config, spec=spec, tokenizer=tokenizer, family=family_name, path=resolved,
                         adapter=None if adapter is None else Path(adapter), weights=weights)
    if drafter is not None:
        from dlm.drafter import load_drafter

        loaded.drafter = load_drafter(drafter, loaded, inference_only=inference_only)
    # The conversions' freed buffers (about 250 MB after an int4 load of SmolLM2, more with a
    # drafter: `voice-agent bench llm`'s memory line) go back to the system; glibc keeps them otherwise.
    release_free_memory()
    return loaded
