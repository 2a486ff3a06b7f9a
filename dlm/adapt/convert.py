"""Conversion: an autoregressive checkpoint becomes the starting point of a block-diffusion model.

Contract: `to_block_diffusion(loaded, block_size, sub_block_size)` keeps the AR weights unchanged
and returns the `DiffusionSpec` of the project's "bd" family: block-causal attention, token shift
(the AR model's own convention, so the first masked slot is predicted like a next token), and an
unused special token of the tokenizer as the mask token, so the vocabulary does not change.

`choose_mask_token(tokenizer)` picks that token: the first of `MASK_TOKEN_CANDIDATES` that the
tokenizer knows as a single special id. User text must be encoded with special-token parsing off
(see `dlm.chat.ChatFormatter`), so no caller can type the mask token.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dlm.checkpoints import LoadedModel
from dlm.config import DiffusionSpec

__all__ = ["BLOCK_SIZES", "MASK_TOKEN_CANDIDATES", "choose_mask_token", "to_block_diffusion"]

BLOCK_SIZES = (16, 32)
# SmolLM2's tokenizer carries code-dataset markers that a chat model never emits.
MASK_TOKEN_CANDIDATES = ("<empty_output>", "<jupyter_script>", "<jupyter_output>", "<jupyter_code>",
                         "<jupyter_text>", "<jupyter_start>", "<gh_stars>", "<mask>")


def choose_mask_token(tokenizer: Any) -> tuple[str, int]:
    """(token string, id) of an unused special token; ValueError where there is none."""
    vocab = tokenizer.get_vocab()
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    for token in MASK_TOKEN_CANDIDATES:
        if token in vocab and token in specials:
            return token, vocab[token]
    raise ValueError(f"the tokenizer has none of the spare special tokens {MASK_TOKEN_CANDIDATES}")


def to_block_diffusion(loaded: LoadedModel, *, block_size: int, sub_block_size: int = 8,
                       threshold: float = 0.9) -> DiffusionSpec:
    """The bd spec for `loaded` (an AR model); also sets the tokenizer's mask_token."""
    if loaded.spec.attention != "causal" or not loaded.spec.logit_shift:
        raise ValueError(f"expected an autoregressive model, got family {loaded.family!r} ({loaded.spec.attention})")
    if block_size < 1 or (sub_block_size and block_size % sub_block_size):
        raise ValueError(f"block size {block_size} is not a multiple of the sub-block size {sub_block_size}")
    token, mask_id = choose_mask_token(loaded.tokenizer)
    loaded.tokenizer.mask_token = token
    return replace(loaded.spec, family="bd", attention="block_causal", mask_token_id=mask_id, logit_shift=True,
                   block_size=block_size, sub_block_size=sub_block_size, threshold=threshold, steps_per_block=0)
