"""Format-constrained decoding: a grammar says which tokens may come next, and the decoder never
commits another one.

Contract:
- `TokenConstraint` is one request's constraint, stateful: `allowed()` is the mask of the tokens
  that may come next (bool, vocabulary-sized; None: any), `consume(token)` advances it by a token
  that became final (False: the token was not allowed, and nothing changed), `lookahead(tokens)`
  gives the masks after each prefix of proposed tokens without advancing (for draft-and-verify:
  masks for positions 0..k, where k is the number of leading proposals the grammar accepts; at
  most len(tokens) + 1 masks).
- `GrammarConstraint` is one over llguidance (the grammar engine of vLLM, SGLang and
  llama.cpp): a Lark grammar with embedded JSON schemas, compiled once per grammar and tokenizer
  (`Grammar`), one `LLMatcher` per request (`Grammar.constraint()`). Masks cost about a
  millisecond per token on a 49k vocabulary. `Grammar.forced()`: the tokens every sentence
  starts with, which a caller may prefill with the prompt (`constraint(after=...)` starts past
  them).
- `mask_logits(logits, mask)` sets the disallowed entries of one position's logits to -inf.
- Engines that honour constraints (`dlm.ar.AREngine` and its draft-and-verify subclass) take a
  constraint factory in `GenerationParams.constraint`; the others refuse it. An AR model needs
  the mask at every step (a grammar mask); under draft-and-verify the drafts stay free proposals
  and the verifier's logits are masked position by position, so the output is the constrained
  AR output, drafted.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["Grammar", "GrammarConstraint", "TokenConstraint", "mask_logits"]


class TokenConstraint(Protocol):
    def allowed(self) -> Tensor | None: ...

    def consume(self, token: int) -> bool: ...

    def lookahead(self, tokens: list[int]) -> list[Tensor | None]: ...


def mask_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    """`logits` (V,) with the tokens outside `mask` at -inf (a copy; the input is unchanged)."""
    if mask is None:
        return logits
    out = logits.clone()
    n = min(out.shape[-1], mask.shape[-1])
    out[..., :n].masked_fill_(~mask[:n].to(out.device), float("-inf"))
    if out.shape[-1] > n:  # padding rows of the head past the tokenizer's vocabulary
        out[..., n:] = float("-inf")
    return out


class Grammar:
    """A Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema) compiled for
    one tokenizer. Raises ValueError for a grammar llguidance refuses."""

    # id(hf tokenizer) -> (llguidance's tokenizer, the hf tokenizer, kept alive so the id stays its own)
    _tokenizers: ClassVar[dict[int, tuple[Any, Any]]] = {}
    _lock = threading.Lock()

    def __init__(self, lark: str, tokenizer: Any) -> None:
        import llguidance

        self.lark = lark
        self._tokenizer = self.llg_tokenizer(tokenizer)
        self._grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        probe = llguidance.LLMatcher(self._tokenizer, self._grammar)
        if probe.is_error():
            raise ValueError(f"invalid grammar: {probe.get_error()}")
        self.vocab_size = self._tokenizer.vocab_size
        self._forced = list(probe.compute_ff_tokens())

    @classmethod
    def llg_tokenizer(cls, tokenizer: Any) -> Any:
        """llguidance's view of a Hugging Face fast tokenizer (about 0.6 s; made once each)."""
        with cls._lock:
            llg = cls._tokenizers.get(id(tokenizer))
            if llg is None:
                import llguidance.hf

                llg = cls._tokenizers[id(tokenizer)] = (llguidance.hf.from_tokenizer(tokenizer), tokenizer)
            return llg[0]

    def constraint(self, after: list[int] | None = None) -> GrammarConstraint:
        """A fresh constraint at the start of the grammar (one per request), or past `after`
        (tokens the grammar forces, which the caller puts in the prompt: `forced()`)."""
        import llguidance

        constraint = GrammarConstraint(llguidance.LLMatcher(self._tokenizer, self._grammar), self.vocab_size)
        for token in after or ():
            if not constraint.consume(token):
                raise ValueError(f"token {token} is not allowed here by the grammar")
        return constraint

    def forced(self) -> list[int]:
        """The tokens every sentence of the grammar starts with (llguidance's fast-forward
        tokens, found once per grammar): a decoder may prefill them with the prompt instead of
        decoding them one by one."""
        return list(self._forced)


class GrammarConstraint:
    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._bits = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self._vocab_size = vocab_size

    def allowed(self) -> Tensor | None:
        import llguidance.numpy

        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bits)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self._vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def consume(self, token: int) -> bool:
        return bool(self._matcher.consume_token(int(token)))

    def lookahead(self, tokens: list[int]) -> list[Tensor | None]:
        masks: list[Tensor | None] = [self.allowed()]
        if not tokens:
            return masks
        # On a copy: a matcher that reached the end of its grammar does not roll back.
        probe = GrammarConstraint(self._matcher.deep_copy(), self._vocab_size)
        for token in tokens:
            mask = masks[-1]
            if (mask is not None and not (0 <= token < mask.shape[0] and bool(mask[token]))) or not probe.consume(token):
                break
            masks.append(probe.allowed())
        return masks

    @property
    def accepting(self) -> bool:
        """The text so far is a whole sentence of the grammar."""
        return bool(self._matcher.is_accepting())
