"""Moving files to and from the GPU machine in bounded parts, with checksums.

Contract:
- `split_file(path, out_dir, part_bytes)` writes `<name>.partNN` files of at most `part_bytes`
  and `<name>.manifest.json` (size, sha256 of the whole and of every part) into `out_dir`.
- `join_parts(manifest, out_path)` (parts looked up beside the manifest, or in `search_dirs`)
  reassembles the file and raises `ValueError` on a missing part or a checksum mismatch.
- `pack_for_gpu(out_dir, base_path)` prepares what a bare CUDA machine lacks for the recipe:
  the base GGUF in parts of at most 60 MB, split across `upload1/`, `upload2/`, ... so that each
  device call carries one folder under its 64 MiB limit, and the pure-Python `gguf` package
  (with its dist-info, so transformers sees its version) in `upload1/site/`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = ["GPU_PART_BYTES", "RETURN_PART_BYTES", "join_parts", "pack_for_gpu", "split_file"]

GPU_PART_BYTES = 60_000_000  # upload: one part per call beside the working tree (64 MiB in all)
RETURN_PART_BYTES = 16_000_000  # download: files back from $OUT are at most 16 MiB each
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def split_file(path: str | Path, out_dir: str | Path, part_bytes: int = RETURN_PART_BYTES) -> Path:
    """Split `path` into parts in `out_dir`; returns the manifest's path."""
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with path.open("rb") as f:
        index = 0
        while data := f.read(part_bytes):
            part = out_dir / f"{path.name}.part{index:02d}"
            part.write_bytes(data)
            parts.append({"name": part.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            index += 1
    manifest = out_dir / f"{path.name}.manifest.json"
    manifest.write_text(json.dumps({"name": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                                    "parts": parts}, indent=1))
    return manifest


def join_parts(manifest: str | Path, out_path: str | Path, search_dirs: Sequence[str | Path] = ()) -> Path:
    manifest = Path(manifest)
    info = json.loads(manifest.read_text())
    dirs = [manifest.parent, *map(Path, search_dirs)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".joining")
    with tmp.open("wb") as out:
        for part in info["parts"]:
            found = next((d / part["name"] for d in dirs if (d / part["name"]).is_file()), None)
            if found is None:
                tmp.unlink()
                raise ValueError(f"part {part['name']} of {info['name']} not found in {', '.join(map(str, dirs))}")
            data = found.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                tmp.unlink()
                raise ValueError(f"{found}: checksum mismatch")
            out.write(data)
    if _sha256(tmp) != info["sha256"]:
        tmp.unlink()
        raise ValueError(f"{info['name']}: the reassembled file's checksum does not match the manifest")
    tmp.replace(out_path)
    return out_path


def _vendor_gguf(site: Path) -> None:
    """Copy the installed pure-Python `gguf` package and its dist-info into `site`."""
    dist = importlib.metadata.distribution("gguf")
    root = Path(dist.locate_file(""))
    for entry in {Path(str(f)).parts[0] for f in dist.files or ()}:
        src = root / entry
        if src.is_dir() and not entry.endswith("__pycache__") and entry in ("gguf", f"gguf-{dist.version}.dist-info"):
            shutil.copytree(src, site / entry, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def pack_for_gpu(out_dir: str | Path, base_path: str | Path, part_bytes: int = GPU_PART_BYTES) -> list[Path]:
    """Fill `out_dir/upload1`, `upload2`, ...; returns those folders."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging = out_dir / "staging"
    manifest = split_file(base_path, staging, part_bytes)
    info = json.loads(manifest.read_text())
    folders = []
    for i, part in enumerate(info["parts"]):
        folder = out_dir / f"upload{i + 1}"
        folder.mkdir(parents=True)
        (staging / part["name"]).replace(folder / part["name"])
        shutil.copy2(manifest, folder / manifest.name)
        folders.append(folder)
    _vendor_gguf(folders[0] / "site")
    shutil.rmtree(staging)
    return folders
