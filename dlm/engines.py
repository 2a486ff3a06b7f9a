"""Which engine decodes a loaded model.

Contract: `make_engine(loaded, kind="auto", **kwargs)` returns a started engine (the
`dlm.engine.Engine` API) for a `dlm.checkpoints.LoadedModel`:
- "auto": exact draft-and-verify (`dlm.speculative.SpeculativeEngine`) where the model carries a
  drafter, block diffusion (`dlm.engine.Engine`) where it has a mask token and non-causal
  attention, the AR engine (`dlm.ar.AREngine`) otherwise;
- "ar": the AR engine on the same weights (the baseline of every comparison);
- "speculative": exact draft-and-verify, with the model's drafter, or a block-diffusion model
  drafting for itself (`dlm.speculative.self_drafting_reason`: ValueError where it cannot), which
  writes the model's own one-token-per-step (AR) replies in fewer forwards.
`decoding(loaded, kind)` names what `make_engine` would run ("draft-and-verify",
"self-speculative", "block diffusion", "AR"); `parallel(loaded)` says whether the model decodes
more than one token per forward at all. kwargs go to the engine (max_batch_size, max_seq_len,
compile_mode, and for draft-and-verify draft_len and tree, with a draft head draft_confidence,
prompt_lookup, row_cost and draft_branches; draft_len 0 or None: the engine's default); the keys
an engine does not take are dropped.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENGINE_KINDS", "decoding", "make_engine", "parallel"]

ENGINE_KINDS = ("auto", "ar", "speculative")


def _diffusion(loaded: Any) -> bool:
    return loaded.spec.attention != "causal" and loaded.spec.mask_token_id is not None


def parallel(loaded: Any) -> bool:
    return getattr(loaded, "drafter", None) is not None or _diffusion(loaded)


def decoding(loaded: Any, kind: str = "auto") -> str:
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind must be one of {ENGINE_KINDS}, not {kind!r}")
    if getattr(loaded, "drafter", None) is not None and kind != "ar":
        return "draft-and-verify"
    if kind == "speculative":
        from dlm.speculative import self_drafting_reason

        reason = self_drafting_reason(loaded.spec)
        if reason is not None:
            raise ValueError(f"engine 'speculative' cannot decode this model: {reason}")
        return "self-speculative"
    if kind == "ar" or not parallel(loaded):
        return "AR"
    return "block diffusion"


def make_engine(loaded: Any, kind: str = "auto", **kwargs: Any):
    name = decoding(loaded, kind)
    if not kwargs.get("draft_len"):  # 0 / None: the engine's default
        kwargs.pop("draft_len", None)
    if name not in ("draft-and-verify", "self-speculative"):
        kwargs.pop("draft_len", None)
        kwargs.pop("tree", None)
    from dlm.draft_head import DraftHead

    if not isinstance(getattr(loaded, "drafter", None), DraftHead) or name != "draft-and-verify":
        kwargs.pop("draft_confidence", None)  # a draft head's knobs
        kwargs.pop("prompt_lookup", None)
        kwargs.pop("row_cost", None)
        kwargs.pop("draft_branches", None)
    if name == "AR":
        from dlm.ar import AREngine

        return AREngine(loaded, **kwargs)
    if name == "block diffusion":
        from dlm.engine import Engine

        return Engine(loaded, **kwargs)
    from dlm.speculative import SpeculativeEngine

    return SpeculativeEngine(loaded, getattr(loaded, "drafter", None), **kwargs)
