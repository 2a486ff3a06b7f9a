"""Export: the trained student as one compact, self-contained file of the engine's "bd" family.

Contract: `export_student(student_path, out_path, quantization="int8", extra=...)` reads a
training checkpoint (`dlm.bd_format`, float32) and writes it again with int8 weights (per-row
scales, `dlm.bd_format`), the decoding defaults of its `DiffusionSpec` (block size, sub-block
size, mask token id, threshold) and provenance in the metadata. It refuses to write a file over
`MAX_EXPORT_BYTES`, and checks that `dlm.checkpoints.load_model` loads the result as family "bd".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dlm.bd_format import read_bd_checkpoint, save_bd_checkpoint
from dlm.checkpoints import load_model

__all__ = ["MAX_EXPORT_BYTES", "export_student"]

MAX_EXPORT_BYTES = 150 * 1000 * 1000


def export_student(student_path: str | Path, out_path: str | Path, *, quantization: str = "int8",
                   threshold: float | None = None, sub_block_size: int | None = None,
                   extra: dict[str, str] | None = None) -> Path:
    ckpt = read_bd_checkpoint(student_path)
    spec = ckpt.spec
    if threshold is not None:
        spec = replace(spec, threshold=threshold)
    if sub_block_size is not None:
        spec = replace(spec, sub_block_size=sub_block_size)
    meta = {**ckpt.extra, **(extra or {})}
    meta.pop("train_config", None)
    meta["recipe"] = "dlm.adapt (block diffusion from an AR model: complementary masks, token shift)"
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".export")
    save_bd_checkpoint(tmp, ckpt.state_dict, ckpt.config, spec, ckpt.tokenizer, quantization=quantization,
                       dtype=torch.bfloat16, extra=meta)
    size = tmp.stat().st_size
    if size > MAX_EXPORT_BYTES:
        tmp.unlink()
        raise ValueError(f"the export is {size / 1e6:.1f} MB, over the {MAX_EXPORT_BYTES / 1e6:.0f} MB limit")
    loaded = load_model(tmp)
    if loaded.family != "bd" or loaded.spec.mask_token_id != spec.mask_token_id:
        raise RuntimeError(f"{tmp} loads as family {loaded.family!r}, not as the bd model written")
    tmp.chmod(0o644)  # package data: readable by everyone once installed
    tmp.replace(out_path)
    return out_path
