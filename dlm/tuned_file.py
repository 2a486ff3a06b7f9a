"""The files that tune a base model without changing its file (a drafter, dlm/drafter.py; an
adapter, dlm/adapter.py): one safetensors file whose metadata, under a key of its own, holds a
JSON record of the format, the config and the base it was made for.

Contract:
- `file_sha256(path)`; `base_fingerprint(path)`: sha256 over a checkpoint's weight files (a GGUF
  file, a bd file, or a folder's *.safetensors, else *.gguf, in name order). Each is hashed once a
  process while its path, size, modification and change times and inode stay the same (a load checks the
  GGUF against the adapter's record and the drafter's, and `voice-agent models` each role's files;
  a file written in the last seconds is hashed each time: a file system's clock may not tell two
  writes that close apart).
- `base_record(config, base_path)`: {name, sha256, n_layers, dim, vocab_size} of the base.
- `write(path, tensors, key, record, dtype)`: the floating-point tensors in `dtype` (integer ones
  as they are) and the record, atomically; the record gains `tensors_sha256` (`tensors_sha256`:
  names, dtypes, shapes and bytes as written).
- `read_record(path, key, fmt, what, error)`: the record, or `error` (a DlmError subclass) saying
  the file cannot be read, is not such a file, has damaged metadata (its base and config, where
  present, records) or another format (`fmt`: one format or a tuple of those accepted).
- `check_base(record, config, base_path, where, error, check_sha)`: `error` where the record's
  shapes differ from `config` or (with check_sha) its sha256 from the base file's; `where` names
  the tuning file in the message, which names the base too.
- `read_tensors(path, module, where, error, expected_sha256=None)`: the file's tensors into
  `module` (floating-point ones as float32, strict), or `error` saying it is damaged (also where
  they do not hash to `expected_sha256`, the record's `tensors_sha256`: files written before it
  was recorded have none, and the registry checks the shipped ones whole).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dlm.config import ModelConfig
from dlm.errors import DlmError

__all__ = ["base_fingerprint", "base_record", "check_base", "file_sha256", "read_record", "read_tensors",
           "tensors_sha256", "write"]


_DIGESTS: dict[tuple[tuple[str, int, int, int, int, int], ...], str] = {}  # the files as they were -> their sha256
_DIGESTS_KEPT = 64
_SETTLED_S = 2.0  # a file modified longer ago than this has a modification time that tells a later write apart


def _sha256(files: list[Path]) -> str:
    now = time.time()  # before the stats: a file modified after this is not taken as settled
    stats = [(f.resolve(), f.stat()) for f in files]
    key = tuple((str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) for path, st in stats)
    if (digest := _DIGESTS.get(key)) is not None:
        return digest
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    if all(now - max(st.st_mtime, st.st_ctime) > _SETTLED_S for _, st in stats):
        if len(_DIGESTS) >= _DIGESTS_KEPT:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def file_sha256(path: str | Path) -> str:
    return _sha256([Path(path)])


def base_fingerprint(path: str | Path, error: type[DlmError] = DlmError) -> str:
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.gguf"))
    if not files:
        raise error(f"{path}: no weight files to fingerprint")
    return _sha256(files)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_record(config: ModelConfig, base_path: str | Path) -> dict[str, Any]:
    return {"name": Path(base_path).name, "sha256": base_fingerprint(base_path), "n_layers": config.n_layers,
            "dim": config.dim, "vocab_size": config.vocab_size}


def write(path: str | Path, tensors: dict[str, torch.Tensor], key: str, record: dict[str, Any],
          dtype: torch.dtype) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    stored = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
              for k, v in tensors.items()}
    save_file(stored, str(tmp), metadata={key: json.dumps({**record, "tensors_sha256": tensors_sha256(stored)})})
    tmp.replace(path)
    return path


def read_record(path: str | Path, key: str, fmt: str | tuple[str, ...], what: str,
                error: type[DlmError]) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
    except Exception as e:
        raise error(f"{what} {path}: cannot read it ({type(e).__name__}: {e})") from e
    if raw is None:
        raise error(f"{what} {path}: not {'an' if what[0] in 'aeiou' else 'a'} {what} file (no {key!r} metadata)")
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path}: damaged metadata ({e})") from e
    if not isinstance(record, dict):
        raise error(f"{what} {path}: damaged metadata (not a record)")
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if record.get("format") not in formats:
        raise error(f"{what} {path}: format {record.get('format')!r}, expected {' or '.join(map(repr, formats))}")
    for name in ("base", "config"):
        if not isinstance(record.get(name, {}), dict):
            raise error(f"{what} {path}: damaged metadata (its {name} is not a record)")
    return record


def check_base(record: dict[str, Any], config: ModelConfig, base_path: str | Path, where: str,
               error: type[DlmError], *, check_sha: bool = True, retrain: str = "") -> None:
    base = record.get("base", {})
    for k, value in {"n_layers": config.n_layers, "dim": config.dim, "vocab_size": config.vocab_size}.items():
        if base.get(k) != value:
            raise error(f"{where} does not fit the base {base_path}: {k} {base.get(k)} != {value}")
    if check_sha:
        actual = base_fingerprint(base_path, error)
        if base.get("sha256") != actual:
            raise error(f"{where} was not made for the base {base_path} (sha256 {actual[:12]}...){retrain}")


def read_tensors(path: str | Path, module: nn.Module, where: str, error: type[DlmError],
                 expected_sha256: str | None = None) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise error(f"{where}: damaged ({type(e).__name__}: {e})") from e
    if expected_sha256 is not None and tensors_sha256(state) != expected_sha256:
        raise error(f"{where}: damaged (its tensors do not hash to the sha256 recorded with them)")
    try:
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except Exception as e:
        raise error(f"{where}: damaged ({type(e).__name__}: {e})") from e
