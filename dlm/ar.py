"""The autoregressive baseline: the same transformer, causal attention, the same Engine API.

Contract: `AREngine(loaded, ...)` behaves like `dlm.engine.Engine` (submit, abort, close, Delta
streams) but decodes one token per forward pass with the exact KV cache: the block size is forced
to 1 and the logits of the last committed token predict the next one (the decoder's "carry"), so
the denoising step needs no forward and each token costs exactly one forward (its cache write).
Meant for checkpoints trained with a token shift (AR models and the diffusion adaptations of
them, whose AR teacher ran causally): attention is switched to causal. Policy parameters are ignored (one slot: any policy commits it);
temperature, top_p, seed, stop and max_new_tokens apply as for the dLLM.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dlm.config import DiffusionSpec
from dlm.engine import Engine, GenerationParams

__all__ = ["AREngine", "ar_spec"]


def ar_spec(spec: DiffusionSpec) -> DiffusionSpec:
    """The checkpoint's spec decoded autoregressively."""
    return replace(spec, attention="causal", logit_shift=True, block_size=1, sub_block_size=0,
                   steps_per_block=0)


class AREngine(Engine):
    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        kwargs.setdefault("cache", "exact")
        super().__init__(loaded, **kwargs)

    def _engine_spec(self, spec: DiffusionSpec) -> DiffusionSpec:
        return ar_spec(spec)

    def _force(self, params: GenerationParams) -> GenerationParams:
        return replace(params, block_size=1, sub_block_size=0, steps_per_block=0, policy="threshold")
