"""Sampling and unmasking policies for one denoising step.

Contract: everything here works on device tensors of fixed shape and never synchronizes with the
host (no `.item()`, no Python branching on tensor values), so a step can run asynchronously.

- `sample_tokens(logits, temperature, top_p, uniform)`: a token proposal and its confidence for
  every slot. Greedy rows (temperature 0) and sampled rows mix in one batch: the parameters are
  per-row tensors.
- An `UnmaskPolicy` decides which masked slots to commit at this step, from the confidences and a
  `StepInputs` of per-row tensors. Every policy commits at least one candidate per row that has
  one (`FixedSteps` follows LLaDA's schedule exactly, which may commit zero when a block has fewer
  masked slots than steps).
  * `FixedSteps`: LLaDA's low-confidence remasking; a fixed number of steps per block (or per
    sub-block), committing the most confident slots on a linear schedule.
  * `Threshold`: Fast-dLLM; commit every candidate whose confidence >= threshold.
  * `Factor`: Fast-dLLM factor-based parallel decoding; commit the n most confident slots where
    the i-th most confident (1-based) has confidence >= 1 - factor / (i + 1).
- `POLICIES` maps the names in `GenerationParams.policy` to policy objects; only the engine's
  request validation looks names up, never the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "POLICIES",
    "Factor",
    "FixedSteps",
    "StepInputs",
    "Threshold",
    "UnmaskPolicy",
    "fixed_steps_schedule",
    "sample_tokens",
    "sampling_probs",
]


@dataclass
class StepInputs:
    """Per-row policy parameters for one step; every tensor is (B,) on the model's device."""

    threshold: Tensor  # float: Threshold policy's confidence bar
    factor: Tensor  # float: Factor policy's f
    n_commit: Tensor  # long: FixedSteps' number of slots to commit at this step (its schedule)


def fixed_steps_schedule(n_masked: int, steps: int, step: int) -> int:
    """LLaDA's `get_num_transfer_tokens`: n_masked spread over `steps`, remainder first."""
    base, remainder = divmod(n_masked, steps)
    return base + (1 if step < remainder else 0)


def _rank(confidence: Tensor, candidates: Tensor) -> Tensor:
    """(B, N) rank of each candidate by descending confidence (0 = most confident);
    non-candidates rank after every candidate."""
    conf = confidence.masked_fill(~candidates, float("-inf"))
    order = conf.argsort(dim=-1, descending=True, stable=True)  # (B, N) slot ids, best first
    return order.argsort(dim=-1)  # inverse permutation: slot -> rank


class UnmaskPolicy(Protocol):
    name: str

    def select(self, confidence: Tensor, candidates: Tensor, inputs: StepInputs) -> Tensor:
        """confidence (B, N) float, candidates (B, N) bool -> commit (B, N) bool ⊆ candidates."""
        ...


class FixedSteps:
    name = "fixed_steps"

    def select(self, confidence: Tensor, candidates: Tensor, inputs: StepInputs) -> Tensor:
        return candidates & (_rank(confidence, candidates) < inputs.n_commit[:, None])


class Threshold:
    name = "threshold"

    def select(self, confidence: Tensor, candidates: Tensor, inputs: StepInputs) -> Tensor:
        above = candidates & (confidence >= inputs.threshold[:, None])
        best = candidates & (_rank(confidence, candidates) == 0)  # at least one per step
        return above | best


class Factor:
    name = "factor"

    def select(self, confidence: Tensor, candidates: Tensor, inputs: StepInputs) -> Tensor:
        N = confidence.shape[-1]
        conf = confidence.masked_fill(~candidates, float("-inf"))
        ordered = conf.sort(dim=-1, descending=True).values  # (B, N)
        n = torch.arange(1, N + 1, device=conf.device, dtype=conf.dtype)  # 1-based rank
        bar = 1.0 - inputs.factor[:, None].to(conf.dtype) / (n[None, :] + 1.0)  # (B, N)
        ok = ordered >= bar
        ok[:, 0] = True  # the most confident always goes
        count = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B,) length of the passing prefix
        return candidates & (_rank(confidence, candidates) < count[:, None])


POLICIES: dict[str, UnmaskPolicy] = {p.name: p for p in (FixedSteps(), Threshold(), Factor())}


def _sampling_logits(logits: Tensor, temperature: Tensor, top_p: Tensor) -> Tensor:
    """logits (B, N, V) / temperature with the top-p tail at -inf (always keeping the best token);
    greedy rows (temperature 0) are left unscaled and unfiltered."""
    greedy = temperature <= 0  # (B,)
    t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None, None]
    scaled = logits / t  # (B, N, V)
    # Top-p: drop the tail of the sorted distribution beyond top_p (always keep the best token).
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    return scaled.masked_fill(drop & ~greedy[:, None, None], float("-inf"))


def sampling_probs(logits: Tensor, temperature: Tensor, top_p: Tensor) -> Tensor:
    """The distribution a sampled row draws from: softmax(logits / temperature) restricted to
    the top-p nucleus, (B, N, V). For speculative sampling, where the probabilities themselves
    (not only a draw) are needed."""
    return _sampling_logits(logits, temperature, top_p).softmax(dim=-1)


def sample_tokens(logits: Tensor, temperature: Tensor, top_p: Tensor, uniform: Tensor | None) -> tuple[Tensor, Tensor]:
    """logits (B, N, V) float32; temperature, top_p (B,); uniform (B, N, V) in (0, 1) or None
    where every row is greedy. Returns tokens (B, N) long and confidence (B, N): the
    probability of the chosen token under the row's sampling distribution (plain softmax for
    greedy rows, as in LLaDA's low-confidence remasking)."""
    greedy = temperature <= 0  # (B,)
    if uniform is None:
        probs = logits.softmax(dim=-1)
        tokens = probs.argmax(dim=-1)
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)
    scaled = _sampling_logits(logits, temperature, top_p)
    probs = scaled.softmax(dim=-1)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))  # Gumbel-max: sample without a sync
    sampled = (scaled + gumbel).argmax(dim=-1)
    tokens = torch.where(greedy[:, None], probs.argmax(dim=-1), sampled)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)
