"""A fine-tune of a model's weights as a small low-rank file (LoRA), merged into the weights at load.

Contract:
- `Adapter(model_config, AdapterConfig(rank, alpha, targets))` holds, per layer, low-rank updates
  W' = W + (alpha / rank) B A of the projections named in `targets` (q, k, v, o, gate, up, down),
  A (rank, in) and B (out, rank), B starting at zero (the adapted model starts as the base).
- Training: `adapter.attach(model)` hooks every targeted projection so its output gains
  x A^T B^T (alpha / rank) while gradients are on (the packed inference path never runs with
  gradients, see dlm.model.Linear); it returns the hook handles (`detach(handles)` removes them).
  Only the adapter's parameters need gradients; the base stays frozen.
- Inference: `merge_adapter(model, adapter)` adds the updates into the dense weights, once, before
  they are packed (dlm.checkpoints.load_model(adapter=...)): decoding then costs exactly what the
  base costs. With int4 weights (the GGUF's 4-bit blocks are the base's, and the update is smaller
  than a 4-bit step: re-quantising would erase it) the decoding steps run the blocks plus the
  update unmerged (`unmerged_update`, dlm.model.Int4Weight.with_low_rank: two small products per
  projection); the prefill's packed bf16 copies are the merged weights.
- File: one safetensors file (dlm.tuned_file), `save_adapter(path, adapter, base_path, info)` / `load_adapter(path,
  loaded_config, base_path)`. Metadata "voice_agent_adapter" holds the format, the config and the
  base's fingerprint (dlm.tuned_file.base_fingerprint) with its name and shapes; loading checks all of
  it and raises `AdapterError` naming both files where anything differs or the file is damaged.
- `adapter_fingerprint(path)`: sha256 of the adapter file. A drafter trained on an adapted model
  records it (dlm.drafter), so it cannot be applied to the base without it, or with another one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlm import tuned_file
from dlm.config import ModelConfig
from dlm.errors import DlmError
from dlm.model import PROJECTIONS, Int4Weight, projection_shapes, projection_subset

__all__ = ["ADAPTER_FORMAT", "Adapter", "AdapterConfig", "AdapterError", "adapter_fingerprint", "load_adapter",
           "merge_adapter", "read_adapter_meta", "save_adapter", "unmerged_update"]

ADAPTER_FORMAT = "voice-agent-adapter/1"
META_KEY = "voice_agent_adapter"
TARGETS = tuple(PROJECTIONS)


class AdapterError(DlmError):
    """An adapter file that is damaged or does not belong to the base model it is applied to."""


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.targets = projection_subset(self.targets)
        if self.rank < 1:
            raise ValueError("rank must be >= 1")


class Adapter(nn.Module):
    def __init__(self, model_config: ModelConfig, config: AdapterConfig | None = None) -> None:
        super().__init__()
        self.config = config or AdapterConfig()
        self.model_config = model_config
        self.scale = self.config.alpha / self.config.rank
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        shapes = projection_shapes(model_config)
        for i in range(model_config.n_layers):
            for name in self.config.targets:
                n_in, n_out = shapes[name]
                key = f"{i}_{name}"
                self.a[key] = nn.Parameter(torch.empty(self.config.rank, n_in))
                nn.init.kaiming_uniform_(self.a[key], a=math.sqrt(5))
                self.b[key] = nn.Parameter(torch.zeros(n_out, self.config.rank))

    def _modules_of(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        layers = model.model.layers
        if len(layers) != self.model_config.n_layers:
            raise AdapterError(f"the adapter has {self.model_config.n_layers} layers, the model {len(layers)}")
        return [(f"{i}_{name}", layer.get_submodule(PROJECTIONS[name]))
                for i, layer in enumerate(layers) for name in self.config.targets]

    def attach(self, model: nn.Module) -> list[Any]:
        """Hook the targeted projections of `model` (training; see the module docstring)."""
        handles = []
        for key, module in self._modules_of(model):
            a, b = self.a[key], self.b[key]

            def hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor, a: Tensor = a, b: Tensor = b) -> Tensor:
                if not torch.is_grad_enabled():
                    raise RuntimeError("an attached adapter runs with gradients only (training); merge it to decode")
                delta = F.linear(F.linear(args[0].to(a.dtype), a), b) * self.scale
                return out + delta.to(out.dtype)

            handles.append(module.register_forward_hook(hook))
        return handles

    @staticmethod
    def detach(handles: list[Any]) -> None:
        for h in handles:
            h.remove()

    def delta(self, key: str) -> Tensor:
        """The update of one projection, (out, in), float32."""
        return (self.b[key].float() @ self.a[key].float()) * self.scale


def merge_adapter(model: nn.Module, adapter: Adapter) -> None:
    """W += the adapter's update, for every targeted projection (dense weights, before packing)."""
    with torch.no_grad():
        for key, module in adapter._modules_of(model):
            w = module.weight
            if w.is_meta:
                raise AdapterError("the model's dense weights were released: merge the adapter before packing")
            # A new tensor, not an in-place add: the loaded weights may be a read-only memory map.
            w.data = (w.float() + adapter.delta(key).to(w.device)).to(w.dtype)


def unmerged_update(weights: dict[str, Any], adapter: Adapter) -> dict[str, Any]:
    """The quantized weights of an adapted model (dlm.checkpoints.load_model(weights="int4" or
    "blocks", adapter=...)), by state-dict name: each targeted projection's `Int4Weight` or
    `dlm.blocks.BlockWeight` carries the adapter's update unmerged (`with_low_rank`: rounding it
    into 4-bit blocks would erase it); a targeted projection of another kind (int4: 8-bit blocks)
    is left out, so it runs the packed bf16 copy of the merged weights."""
    from dlm.blocks import BlockWeight

    out = dict(weights)
    for i in range(adapter.model_config.n_layers):
        for name in adapter.config.targets:
            key, weight_name = f"{i}_{name}", f"model.layers.{i}.{PROJECTIONS[name]}.weight"
            weight = out.get(weight_name)
            if isinstance(weight, Int4Weight | BlockWeight):
                out[weight_name] = weight.with_low_rank(adapter.a[key].detach(), adapter.b[key].detach() * adapter.scale)
            else:
                out.pop(weight_name, None)
    return out


def adapter_fingerprint(path: str | Path) -> str:
    return tuned_file.file_sha256(path)


def save_adapter(path: str | Path, adapter: Adapter, base_path: str | Path, info: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the adapter (weights in `dtype`) with its config and its base's fingerprint."""
    record = {"format": ADAPTER_FORMAT, "config": asdict(adapter.config),
              "base": tuned_file.base_record(adapter.model_config, base_path), "info": info or {}}
    return tuned_file.write(path, adapter.state_dict(), META_KEY, record, dtype)


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The file's metadata, or AdapterError where it is not a readable adapter file."""
    return tuned_file.read_record(path, META_KEY, ADAPTER_FORMAT, "adapter", AdapterError)


def load_adapter(path: str | Path, model_config: ModelConfig, base_path: str | Path, *,
                 check_base: bool = True) -> Adapter:
    """The adapter in `path` for the model of `model_config` loaded from `base_path`, in float32.
    AdapterError naming both files where the file is damaged or made for another base."""
    path = Path(path)
    meta = read_adapter_meta(path)
    base = meta.get("base", {})
    where = f"adapter {path} (made for {base.get('name')!r}, sha256 {str(base.get('sha256'))[:12]}...)"
    tuned_file.check_base(meta, model_config, base_path, where, AdapterError, check_sha=check_base)
    try:
        adapter = Adapter(model_config, AdapterConfig(**meta["config"]))
    except Exception as e:
        raise AdapterError(f"{where}: damaged ({type(e).__name__}: {e})") from e
    tuned_file.read_tensors(path, adapter, where, AdapterError, meta.get("tensors_sha256"))
    return adapter
