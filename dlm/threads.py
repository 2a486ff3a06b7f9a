"""Who gets the CPU's OpenMP threads: the engines' worker threads, and no other thread.

Why: torch runs its parallel work in OpenMP (libgomp), and libgomp keeps one pool of worker
threads for every thread that ever started a parallel region with more than one thread. Once the
pools' threads outnumber the cores, libgomp stops letting idle workers spin and puts them to
sleep after each region, and waking them costs more than the small products of a decoding step
save (measured on a 2-core VM: a 1x576 @ 576x1536 float32 product 30 us in the first thread to
use OpenMP, 117 us in any later one; a SmolLM2 step 13.6 ms in the main thread, 25-26 ms in an
engine's worker thread when the main thread had loaded the model with two threads). A server
runs torch in several threads (the model loads, the engine's worker, the turn scorer's calls in
executor threads), so every one of them was on the slow path.

Contract:
- `confine_to_engines(threads=None)`: call first thing in a process (before any torch work; the
  `voice-agent` command does): every thread then runs torch with one thread (no pool), and
  engines' worker threads with `threads` (default: torch's count at that moment, the cores).
  Calling it again changes nothing. Without it (a library user, the tests) torch's own defaults
  stay: every thread may use every core.
- `claim_for_engine()`: an engine's worker thread calls it once at its start: after
  `confine_to_engines`, this thread's own OpenMP team size becomes the engines' count (libgomp's
  per-thread setting; torch's process-wide count stays 1). Otherwise it does nothing.
- `in_engine_thread(fn)`: fn() run in a new thread that claimed the engines' count (timings of
  single forwards that should see what an engine's forward sees); fn's result or exception.

The same holds between engines: each open engine's worker keeps a team of the engines' count, so
two engines open at once in one process (or an engine beside another thread that claimed and ran
parallel work) put libgomp on its sleeping path, and every engine runs at about half speed on two
cores (session 32: a throwaway comparison script that kept its engines open read the dLLM 1.24x
the AR engine where one engine at a time read 1.08x). Time engines one at a time, as `voice-agent
bench llm` and `calibrate` do.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["claim_for_engine", "confine_to_engines", "engine_threads", "in_engine_thread"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_engine_threads: int | None = None


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    try:  # torch's own copy is loaded already (same soname): this names it
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None


def engine_threads() -> int | None:
    """The engines' thread count where `confine_to_engines` ran, else None."""
    return _engine_threads


def confine_to_engines(threads: int | None = None) -> None:
    global _engine_threads
    if _engine_threads is not None:
        return
    if torch.__config__.parallel_info().find("OpenMP") < 0 or _libgomp() is None:
        log.debug("torch does not run on libgomp here: thread counts left as they are")
        return
    _engine_threads = max(1, threads or torch.get_num_threads())
    torch.set_num_threads(1)


def claim_for_engine() -> None:
    if _engine_threads is None or _engine_threads == 1:
        return
    torch.get_num_threads()  # torch's per-thread set-up first: it would set the process-wide count
    gomp = _libgomp()
    if gomp is not None:
        gomp.omp_set_num_threads(_engine_threads)


def in_engine_thread(fn: Callable[[], T]) -> T:
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        claim_for_engine()
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=target, name="dlm-engine-timing")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
