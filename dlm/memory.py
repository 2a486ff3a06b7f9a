"""The process's C heap: `release_free_memory()` hands the pages that glibc's malloc keeps after
big frees (a model load's conversion buffers, a flood of calls' prompts and audio) back to the
system with `malloc_trim(0)`. False, and nothing done, where the C library has no such call (musl,
macOS). `resident_bytes(pid)`: a process's resident size (VmRSS), None where /proc has none.
Imports nothing heavy: the voice server uses it too."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_free_memory", "resident_bytes"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    # Looked up once: each ctypes.CDLL is a small reference cycle of its own.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """`malloc_trim(0)`: return the C heap's free pages to the system; False where there is none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes(pid: int | str = "self") -> int | None:
    """Process `pid`'s resident size in bytes (VmRSS of /proc/<pid>/status; default this one),
    None where there is no such file or line (not Linux, a process gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), None)
    except OSError:
        return None
