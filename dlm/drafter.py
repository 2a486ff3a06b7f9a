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
  shapes, and the adapter merged into the base while training (dlm.adapter: name and sha256) or
  none: a drafter predicts the model it was trained on, so the adapter must match too (the file
  format is dlm.tuned_file's). Loading checks all of it against the model it is applied to and
  raises `DrafterError` naming both files where anything differs or the file is damaged: never a
  silent fallback.
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
from dlm.draft_head import DRAFT_HEAD_FORMAT, DraftHead, DraftHeadConfig
from dlm.errors import DlmError
from dlm.model import PROJECTIONS, projection_shapes, projection_subset

__all__ = ["DRAFTER_FORMAT", "TARGETS", "DraftLayer", "Drafter", "DrafterConfig", "DrafterError",
           "base_fingerprint", "load_drafter", "read_drafter_meta", "save_drafter"]

DRAFTER_FORMAT = "voice-agent-drafter/1"
META_KEY = "voice_agent_drafter"
TARGETS = tuple(PROJECTIONS)


class DrafterError(DlmError):
    """A drafter file that is damaged or does not belong to the base model it is applied to."""


@dataclass
class DrafterConfig:
    rank: int = 32
    alpha: float = 32.0
    n_slots: int = 8  # the longest draft block it was trained for
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.targets = projection_subset(self.targets)
        if self.rank < 1 or self.n_slots < 1:
            raise ValueError("rank and n_slots must be >= 1")


class DraftLayer(nn.Module):
    """One layer's low-rank updates: y += (x A^T) B^T * alpha / rank at the mask slots. Fused
    projections (q, k, v or gate, up in one packed matmul) get their updates in one pair of
    products too. The pairs (scale folded in) are cached while decoding: change the weights under
    torch.no_grad() and call `Drafter.refresh()`."""

    def __init__(self, model_config: ModelConfig, config: DrafterConfig) -> None:
        super().__init__()
        shapes = self.shapes = projection_shapes(model_config)
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
        self._block_updates: Any = None  # dlm.blocks.DraftUpdates, built on first use (block_updates)

    @property
    def n_slots(self) -> int:
        return self.config.n_slots

    def refresh(self) -> None:
        """Forget the update pairs cached for decoding (after changing the weights)."""
        for layer in self.layers:
            layer._pairs.clear()
        self._block_updates = None

    def block_updates(self) -> Any:
        """Every layer's updates in the fused block kernel's layout (a dlm.blocks.DraftUpdates: q/k/v
        and gate/up fused, the scale folded in, kept in bf16 by the kernel), built once until
        `refresh()`: what a model on block weights (Transformer.use_blocks) adds at the mask slots."""
        if self._block_updates is None:
            from dlm.blocks import FUSED_PROJECTIONS, DraftUpdates, LowRank

            with torch.no_grad():
                layers = [{name: LowRank.cat([LowRank.of(layer.a[p], layer.b[p] * layer.scale) if p in layer.a else None
                                              for p in parts], [layer.shapes[p][1] for p in parts])
                           for name, parts in FUSED_PROJECTIONS.items()} for layer in self.layers]
            self._block_updates = DraftUpdates(layers)
        return self._block_updates

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
    return tuned_file.base_fingerprint(path, DrafterError)


def save_drafter(path: str | Path, drafter: Drafter | DraftHead, base_path: str | Path,
                 info: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16,
                 adapter: str | Path | None = None) -> Path:
    """Write the drafter (mask slots, or a draft head: dlm/draft_head.py; weights in `dtype`)
    with its config and its base's fingerprint, and that of the adapter merged into the base
    while it was trained (dlm.adapter), if any."""
    base = tuned_file.base_record(drafter.model_config, base_path)
    base["adapter"] = None if adapter is None else {"name": Path(adapter).name, "sha256": tuned_file.file_sha256(adapter)}
    fmt = DRAFT_HEAD_FORMAT if isinstance(drafter, DraftHead) else DRAFTER_FORMAT
    record = {"format": fmt, "config": asdict(drafter.config), "base": base, "info": info or {}}
    state = drafter.state_dict()
    if any(t.is_meta for t in state.values()):
        raise ValueError("this drafter was loaded for inference only (its float32 weights were released): load it "
                         "with load_drafter(..., inference_only=False) to save or train it")
    return tuned_file.write(path, state, META_KEY, record, dtype)


def read_drafter_meta(path: str | Path) -> dict[str, Any]:
    """The file's metadata, or DrafterError where it is not a readable drafter file."""
    return tuned_file.read_record(path, META_KEY, (DRAFTER_FORMAT, DRAFT_HEAD_FORMAT), "drafter", DrafterError)


def load_drafter(path: str | Path, loaded: Any, *, check_base: bool = True,
                 inference_only: bool = False) -> Drafter | DraftHead:
    """The drafter in `path` for `loaded` (a dlm.checkpoints.LoadedModel): mask slots (Drafter) or
    a draft head (attached to the model, and on Q8 blocks, `DraftHead.use_blocks`, or packed,
    `DraftHead.pack`, where either applies), whichever the file holds, in float32 on the model's
    device (a draft head in packed bf16 where that is what applies). `inference_only`: a head on
    Q8 blocks frees its float32 weights (`DraftHead.release_dense_weights`; it can no longer be
    trained or saved). Raises
    DrafterError naming both files where the file is damaged or was made for another base
    (fingerprint, layers, width, vocabulary) or another adapter of it (`check_base=False`: the
    shapes only, for a drafter to start training from)."""
    path = Path(path)
    meta = read_drafter_meta(path)
    base = meta.get("base", {})
    where = f"drafter {path} (made for {base.get('name')!r}, sha256 {str(base.get('sha256'))[:12]}...)"
    tuned_file.check_base(meta, loaded.config, loaded.path, where, DrafterError, check_sha=check_base,
                          retrain=": retrain it for this base (voice-agent adapt drafter) or install the base it was "
                                  "made for")
    if check_base:
        _check_adapter(where, base.get("adapter"), getattr(loaded, "adapter", None))
    try:
        if meta["format"] == DRAFT_HEAD_FORMAT:
            drafter = DraftHead(loaded.config, DraftHeadConfig(**meta["config"]))
        else:
            drafter = Drafter(loaded.config, DrafterConfig(**meta["config"]))
    except Exception as e:
        raise DrafterError(f"{where}: damaged ({type(e).__name__}: {e})") from e
    tuned_file.read_tensors(path, drafter, where, DrafterError, meta.get("tensors_sha256"))
    if isinstance(drafter, DraftHead) and not bool(((drafter.vocab >= 0) & (drafter.vocab < loaded.config.vocab_size)).all()):
        raise DrafterError(f"{where}: damaged (token ids outside the vocabulary)")
    if not all(bool(t.isfinite().all()) for t in drafter.state_dict().values() if t.is_floating_point()):
        raise DrafterError(f"{where}: damaged (weights that are not finite numbers)")
    device = loaded.model.device
    drafter = drafter.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    if isinstance(drafter, DraftHead):
        drafter.attach(loaded.model)
        # Q8 blocks in one C call where the kernel runs, else bf16 on packed weights where oneDNN
        # has bf16: each several times faster in an engine's thread than float32 torch ops
        if not drafter.use_blocks():
            drafter.pack()
        elif inference_only:
            drafter.release_dense_weights()
    return drafter


def _check_adapter(where: str, made_with: dict[str, str] | None, merged: Path | None) -> None:
    """A drafter predicts the model it was trained on: the base with the same adapter, or none."""
    actual = None if merged is None else tuned_file.file_sha256(merged)
    expected = None if not made_with else made_with.get("sha256")
    if actual == expected:
        return
    trained = "no adapter" if not made_with else f"the adapter {made_with.get('name')!r}" + (
        f" (sha256 {expected[:12]}...)" if isinstance(expected, str) else " (no sha256 recorded)")
    loaded = f"the adapter {merged} (sha256 {actual[:12]}...)" if actual is not None else "no adapter"
    raise DrafterError(f"{where} was trained on the base with {trained}, but the model is loaded with {loaded}: "
                       "retrain it on this model's replies (voice-agent adapt drafter --adapter ...)")
