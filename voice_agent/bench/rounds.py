"""Measuring settings in rounds of rotating order, each keeping its fastest round.

Contract: `in_rounds(candidates, rounds, run, report, key=...)` runs each candidate (a dict: a
setting) `rounds` times, round r starting at candidate r * n / rounds and going round, so that no
setting is always first or last; it returns, per candidate in the given order, the candidate
merged with its fastest round's measurement (the lowest `key`). On a shared machine other work
only slows a run, and a machine that speeds up or slows down over the minutes of a measurement
does so for every setting alike. `voice-agent calibrate` (draft settings, batch prices) and
`voice-agent bench llm --repeats` (engines at each concurrency level) measure so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["in_rounds"]


def in_rounds(candidates: list[dict[str, Any]], rounds: int, run: Callable[[dict[str, Any]], dict[str, Any]],
              report: Callable[[int, int, int, dict[str, Any]], None] = lambda done, total, r, result: None,
              *, key: str = "ms_per_token") -> list[dict[str, Any]]:
    """Each candidate run `rounds` times in rotating order (see the module docstring); per
    candidate, in order, the candidate with its fastest round's measurement (lowest `key`).
    `report(done, total, round, result)` after each run."""
    n = len(candidates)
    best: list[dict[str, Any] | None] = [None] * n
    done = 0
    for r in range(rounds):
        start = r * n // rounds
        for i in [(start + j) % n for j in range(n)]:
            result = {**candidates[i], **run(candidates[i])}
            done += 1
            report(done, rounds * n, r, result)
            if best[i] is None or result[key] < best[i][key]:
                best[i] = result
    return [b for b in best if b is not None]
