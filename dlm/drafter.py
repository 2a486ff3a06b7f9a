"""The drafter: a small learned adapter that lets an AR model draft several tokens per forward.

Contract:
- `Drafter(model_config, DrafterConfig(...))` holds, per layer of the base transformer, low-rank
  updates (LoRA, rank `rank`, scale alpha / rank) of the projections named in `targets`, and
  `n_slots` learned mask-slot embeddings. It is active only at mask slots (dlm.model.DraftInputs):
  the base's weights are never changed, so every position holding real text runs the unchanged
  base model, and a forward that drafts also verifies exactly (dlm/speculative.py).
- A draft block is `n` mask slots placed right after a context whose last real token sits at
  position q: slot i (0-based) sits at position q + 1 + i and its output predicts the token at
  q + 2 + i. Slot 0 stands where the base's own next token will go (the verifier computes that
  one exactly), so a block of n slots drafts the n tokens after it. Slots attend to the context
  and causally to the earlier slots of their block, so any prefix of a block is a valid block.
- File format: one safetensors file, `save_drafter(path, drafter, base_path, info)` /
  `load_drafter(path, loaded)`. Metadata "voice_agent_drafter" holds the format, the config, and
  the base's fingerprint (`base_fingerprint`: sha256 of the base's weight files) with its name and
  shapes. Loading checks all of it against the model it is applied to and raises `DrafterError`
  naming both files where anything differs or the file is damaged: never a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from dlm.config import ModelConfig
from dlm.errors import DlmError

__all__ = ["DRAFTER_FORMAT", "TARGETS", "DraftLayer", "Drafter", "DrafterConfig", "DrafterError",
           "base_fingerprint", "load_drafter", "read_drafter_meta", "save_drafter"]

DRAFTER_FORMAT = "voice-agent-drafter/1"
META_KEY = "voice_agent_drafter"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class DrafterError(DlmError):
    """A drafter file that is damaged or does not belong to the base model it is applied to."""


@dataclass
class DrafterConfig:
    rank: int = 32
    alpha: float = 32.0
    n_slots: int = 8  # the longest draft block it was trained for
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, not {self.targets}")
        if self.rank < 1 or self.n_slots < 1:
            raise ValueError("rank and n_slots must be >= 1")


def _shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {"q": (c.dim, q), "k": (c.dim, kv), "v": (c.dim, kv), "o": (q, c.dim),
            "gate": (c.dim, c.intermediate_size), "up": (c.dim, c.intermediate_size),
            "down": (c.intermediate_size, c.dim)}


class DraftLayer(nn.Module):
    """One layer's low-rank updates: y += (x A^T) B^T * alpha / rank at the mask slots. Fused
    projections (q, k, v or gate, up in one packed matmul) get their updates in one pair of
    products too. The pairs (scale folded in) are cached while decoding: change the weights under
    torch.no_grad() and call `Drafter.refresh()`."""

    def __init__(self, model_config: ModelConfig, config: DrafterConfig) -> None:
        super().__init__()
        shapes = self.shapes = _shapes(model_config)
        self.scale = config.alpha / config.rank
        self._pairs: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}  # decoding: see _pair
        self.a = nn.ParameterDict({n: nn.Parameter(torch.empty(config.rank, shapes[n][0])) for n in config.targets})
        self.b = nn.ParameterDict({n: nn.Parameter(torch.zeros(shapes[n][1], config.rank)) for n in config.targets})
        for a in self.a.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA (B = 0: the update starts at 0)

    def _pair(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor] | None:
        """(A, B) of the projections `names` side by side, the scale folded into B: A stacks
        their A's (rank r each), B is block-diagonal. None where none of them is adapted. Without
        gradients (decoding) the pair is built once and kept; with them, always anew."""
        if not torch.is_grad_enabled() and names in self._pairs:
            return self._pairs[names]
        if not any(n in self.a for n in names):
            return None
        if len(names) == 1:
            a, b = self.a[names[0]], self.b[names[0]] * self.scale
        else:
            r = next(iter(self.a.values())).shape[0]
            a = torch.cat([self.a[n] if n in self.a else self._zero_a(n, r) for n in names])
            b = torch.block_diag(*[self.b[n] * self.scale if n in self.b else self._zero_b(n, r) for n in names])
        if not torch.is_grad_enabled():
            self._pairs[names] = (a, b)
        return a, b

    def _zero_a(self, name: str, r: int) -> Tensor:
        return torch.zeros(r, self.shapes[name][0], dtype=next(self.parameters()).dtype)

    def _zero_b(self, name: str, r: int) -> Tensor:
        return torch.zeros(self.shapes[name][1], r, dtype=next(self.parameters()).dtype)

    def update(self, names: tuple[str, ...], x: Tensor, y: Tensor, start: int) -> Tensor:
        pair = self._pair(names)
        if pair is None:
            return y
        a, b = pair
        # In the adapter's own dtype (float32 in use): a rank-r product of a few rows is far
        # cheaper in float32 than through the bf16 kernels, which pay a fixed cost per call.
        delta = F.linear(F.linear(x[:, start:].to(a.dtype), a), b)
        if torch.is_grad_enabled():
            return torch.cat([y[:, :start], y[:, start:] + delta.to(y.dtype)], dim=1)
        y[:, start:] += delta.to(y.dtype)
        return y


class Drafter(nn.Module):
    def __init__(self, model_config: ModelConfig, config: DrafterConfig | None = None) -> None:
        super().__init__()
        self.config = config or DrafterConfig()
        self.model_config = model_config
        self.layers = nn.ModuleList(DraftLayer(model_config, self.config) for _ in range(model_config.n_layers))
        self.slots = nn.Parameter(torch.zeros(self.config.n_slots, model_config.dim))

    @property
    def n_slots(self) -> int:
        return self.config.n_slots

    def refresh(self) -> None:
        """Forget the update pairs cached for decoding (after changing the weights)."""
        for layer in self.layers:
            layer._pairs.clear()

    def _apply(self, fn, *args, **kwargs):  # .to() / .float() etc.: the cached pairs are stale
        self.refresh()
        return super()._apply(fn, *args, **kwargs)

    def init_slots(self, embedding: Tensor) -> None:
        """Start every slot embedding at the mean token embedding (a neutral input)."""
        with torch.no_grad():
            self.slots.copy_(embedding.float().mean(0, keepdim=True).expand_as(self.slots))

    def slot_embedding(self, slot_index: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, N) slot indices -> (B, N, dim) inputs of the mask slots."""
        return self.slots[slot_index].to(dtype)


# -- the file ---------------------------------------------------------------------------------------

def base_fingerprint(path: str | Path) -> str:
    """sha256 over the base checkpoint's weight files (a GGUF file, a bd file, or a folder's
    *.safetensors in name order): what a drafter was trained on."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.gguf"))
    if not files:
        raise DrafterError(f"{path}: no weight files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def save_drafter(path: str | Path, drafter: Drafter, base_path: str | Path, info: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the drafter (weights in `dtype`) with its config and its base's fingerprint."""
    path = Path(path)
    c = drafter.model_config
    meta = {
        "format": DRAFTER_FORMAT,
        "config": asdict(drafter.config),
        "base": {"name": Path(base_path).name, "sha256": base_fingerprint(base_path), "n_layers": c.n_layers,
                 "dim": c.dim, "vocab_size": c.vocab_size},
        "info": info or {},
    }
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in drafter.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_drafter_meta(path: str | Path) -> dict[str, Any]:
    """The file's metadata, or DrafterError where it is not a readable drafter file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:
        raise DrafterError(f"drafter {path}: cannot read it ({type(e).__name__}: {e})") from e
    if raw is None:
        raise DrafterError(f"drafter {path}: not a drafter file (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DrafterError(f"drafter {path}: damaged metadata ({e})") from e
    if meta.get("format") != DRAFTER_FORMAT:
        raise DrafterError(f"drafter {path}: format {meta.get('format')!r}, expected {DRAFTER_FORMAT!r}")
    return meta


def load_drafter(path: str | Path, loaded: Any, *, check_base: bool = True) -> Drafter:
    """The drafter in `path` for `loaded` (a dlm.checkpoints.LoadedModel), in float32 on the
    model's device (its products are small: float32 is the fast dtype for them on CPU). Raises DrafterError naming both files where the file is damaged or was
    made for another base (fingerprint, layers, width, vocabulary)."""
    path = Path(path)
    meta = read_drafter_meta(path)
    base = meta.get("base", {})
    c = loaded.config
    where = f"drafter {path} (made for {base.get('name')!r}, sha256 {str(base.get('sha256'))[:12]}...)"
    shapes = {"n_layers": c.n_layers, "dim": c.dim, "vocab_size": c.vocab_size}
    for key, value in shapes.items():
        if base.get(key) != value:
            raise DrafterError(f"{where} does not fit the base {loaded.path}: {key} {base.get(key)} != {value}")
    if check_base:
        actual = base_fingerprint(loaded.path)
        if base.get("sha256") != actual:
            raise DrafterError(f"{where} was not made for the base {loaded.path} (sha256 {actual[:12]}...): "
                               "retrain it for this base (voice-agent adapt drafter) or install the base it was made for")
    try:
        config = DrafterConfig(**meta["config"])
        drafter = Drafter(c, config)
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        drafter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except Exception as e:
        raise DrafterError(f"{where}: damaged ({type(e).__name__}: {e})") from e
    device = loaded.model.model.embed_tokens.weight.device
    return drafter.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

