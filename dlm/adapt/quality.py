"""Checks on a reply's token ids that need no model: EOS, loops.

`has_loop(ids)` is True where some n-gram (n = 1..8 tokens) repeats back to back enough times
to cover at least 12 tokens, or where a 4-gram occurs three or more times anywhere: short spoken
replies never legitimately do either, and degenerate diffusion or AR output does.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["ends_with_eos", "has_loop"]

_MIN_LOOP_TOKENS = 12


def has_loop(ids: list[int]) -> bool:
    for n in range(1, 9):
        reps_needed = max(2, -(-_MIN_LOOP_TOKENS // n))
        for start in range(len(ids) - n * reps_needed + 1):
            unit = ids[start:start + n]
            if all(ids[start + k * n:start + (k + 1) * n] == unit for k in range(1, reps_needed)):
                return True
    grams = Counter(tuple(ids[i:i + 4]) for i in range(len(ids) - 3))
    return any(c >= 3 for c in grams.values())


def ends_with_eos(ids: list[int], eos_ids: set[int] | list[int], max_tokens: int) -> bool:
    """True where an EOS id occurs within the first `max_tokens` ids."""
    eos = set(eos_ids)
    return any(t in eos for t in ids[:max_tokens])
