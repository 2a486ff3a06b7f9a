"""dlm.constraints in the engines: a request's constraint masks every token it commits, under AR
decoding and under draft-and-verify (same output), greedy and sampled; engines that cannot honour
one refuse it; the llguidance grammar on a real tokenizer."""

from __future__ import annotations

import itertools
import json
from typing import ClassVar

import pytest
import torch
from dlm_tiny_models import V, random_loaded
from test_speculative import _random_drafter, _random_head, _run

from dlm.ar import AREngine
from dlm.constraints import mask_logits
from dlm.engine import Engine, GenerationParams
from dlm.errors import InvalidRequestError
from dlm.speculative import SpeculativeEngine

EOS = 1
PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16]]


class Staircase:
    """A toy grammar: strictly increasing even tokens, then EOS once 30 is passed."""

    made: ClassVar[list[Staircase]] = []

    def __init__(self) -> None:
        self.last = 0
        self.consumed: list[int] = []
        Staircase.made.append(self)

    def _mask(self, last: int) -> torch.Tensor:
        mask = torch.zeros(V, dtype=torch.bool)
        if last > 30:
            mask[EOS] = True
        else:
            mask[last + 2 : V - 1 : 2] = True  # not the mask token
        return mask

    def allowed(self) -> torch.Tensor:
        return self._mask(self.last)

    def consume(self, token: int) -> bool:
        if not self._mask(self.last)[token]:
            return False
        self.last = token
        self.consumed.append(token)
        return True

    def lookahead(self, tokens: list[int]) -> list[torch.Tensor]:
        masks, last = [self._mask(self.last)], self.last
        for token in tokens:
            if not masks[-1][token]:
                break
            last = token
            masks.append(self._mask(last))
        return masks


def _staircase(ids: list[int]) -> bool:
    return all(t % 2 == 0 for t in ids) and all(a < b for a, b in itertools.pairwise(ids))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ar_and_draft_and_verify_decode_under_the_constraint_alike(temperature):
    loaded = random_loaded("causal", seed=5, eos=[EOS], scale=3.0, block_size=1)
    params = GenerationParams(max_new_tokens=24, constraint=Staircase, temperature=temperature, seed=7)
    free = GenerationParams(max_new_tokens=24)
    with AREngine(loaded, max_batch_size=4) as ar, SpeculativeEngine(loaded, _random_drafter(loaded), draft_len=3,
                                                                      max_batch_size=4) as spec:
        unconstrained = [_run(ar.submit(p, free))[0] for p in PROMPTS]
        expected = [_run(ar.submit(p, params)) for p in PROMPTS]
        drafted = [_run(h) for h in [spec.submit(p, params) for p in PROMPTS]]  # batched together
    assert not all(_staircase(ids) for ids in unconstrained)  # the model alone does not climb stairs
    for ids, _, finish in expected:
        assert _staircase(ids) and finish == "eos"
    if temperature == 0.0:  # greedy: draft-and-verify writes what constrained AR writes
        assert [ids for ids, _, _ in drafted] == [ids for ids, _, _ in expected]
    for ids, _, finish in drafted:
        assert _staircase(ids) and finish == "eos"


def test_constrained_rows_beside_tree_rows_decode_as_constrained_ar():
    """A draft head's trees (`draft_branches`) are for unconstrained greedy rows: in one batch the
    constrained rows keep chains and write what constrained AR writes, the others the AR replies."""
    loaded = random_loaded("causal", seed=5, eos=[EOS], scale=3.0, block_size=1)
    params = GenerationParams(max_new_tokens=24, constraint=Staircase)
    free = GenerationParams(max_new_tokens=24)
    with AREngine(loaded, max_batch_size=4) as ar, SpeculativeEngine(
            loaded, _random_head(loaded, n_slots=4), max_batch_size=4, draft_confidence=0.0, draft_branches=3) as spec:
        expected = [_run(ar.submit(p, params))[0] for p in PROMPTS[:3]] + [_run(ar.submit(p, free))[0] for p in PROMPTS[3:]]
        handles = [spec.submit(p, params) for p in PROMPTS[:3]] + [spec.submit(p, free) for p in PROMPTS[3:]]
        got = [_run(h)[0] for h in handles]
    assert got == expected
    assert all(_staircase(ids) for ids in got[:3])


def test_every_committed_token_advances_the_constraint():
    Staircase.made.clear()
    loaded = random_loaded("causal", seed=5, eos=[EOS], scale=3.0, block_size=1)
    with AREngine(loaded, max_batch_size=2) as ar:
        ids, _, _ = _run(ar.submit([2, 3], GenerationParams(max_new_tokens=24, constraint=Staircase)))
    (made,) = Staircase.made
    assert made.consumed == ids  # EOS is not consumed: it ends the request


def test_a_block_diffusion_engine_refuses_a_constraint():
    loaded = random_loaded("block_causal", seed=1, block_size=4)
    with Engine(loaded, max_batch_size=2) as engine, pytest.raises(InvalidRequestError, match="constraint"):
        engine.submit([2, 3], GenerationParams(max_new_tokens=4, constraint=Staircase))


def test_mask_logits_leaves_the_input_alone_and_masks_past_the_vocabulary():
    logits = torch.zeros(6)
    masked = mask_logits(logits, torch.tensor([True, False, True, False]))
    assert masked.tolist() == [0.0, float("-inf"), 0.0, float("-inf"), float("-inf"), float("-inf")]
    assert logits.tolist() == [0.0] * 6
    assert mask_logits(logits, None) is logits


def test_a_grammar_on_the_real_tokenizer_accepts_only_its_sentences():
    from dlm.constraints import Grammar
    from voice_agent.llm import load_local_llm

    tokenizer = load_local_llm("smollm2-135m-instruct", device="cpu", dtype="auto")[0].tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    grammar = Grammar(f"start: \"<x>\" obj\nobj: %json {json.dumps(schema)}\n", tokenizer)
    good = tokenizer('<x>{"n": 42}', add_special_tokens=False)["input_ids"]
    constraint = grammar.constraint()
    masks = constraint.lookahead(good)
    assert len(masks) == len(good) + 1 and constraint.allowed().sum() == masks[0].sum()  # lookahead advanced nothing
    for token in good:
        assert constraint.allowed()[token] and constraint.consume(token)
    assert constraint.accepting
    assert constraint.allowed().sum() == 1 and constraint.allowed()[tokenizer.eos_token_id]  # then only the end
    bad = grammar.constraint()
    assert not bad.consume(tokenizer('{"n"', add_special_tokens=False)["input_ids"][0])  # "<x>" must come first
    with pytest.raises(ValueError, match="grammar"):
        Grammar('start: %json {"type": "strnig"}', tokenizer)
