"""dlm.speculative: exact draft-and-verify decoding (greedy = the AR reply; sampling = the AR
distribution), tokens per forward with oracle / wrong drafters, batching, aborts, bad input."""

from __future__ import annotations

import itertools
import math
import typing

import pytest
import torch
from dlm_tiny_models import COUNT_V, CharTokenizer, counting_loaded, random_loaded

import dlm.blocks
from dlm.ar import AREngine
from dlm.blocks import row_top
from dlm.decode import DecodeSettings
from dlm.draft_head import DraftHead, DraftHeadConfig
from dlm.drafter import Drafter, DrafterConfig
from dlm.engine import GenerationParams
from dlm.errors import InvalidRequestError
from dlm.masks import causal_mask
from dlm.model import can_pack_linears
from dlm.policies import POLICIES
from dlm.speculative import (
    LOOKUP_SURE,
    TREE_LANES,
    TREE_MAX_NODES,
    HeadSpeculativeDecoder,
    RowCost,
    SpeculativeDecoder,
    SpeculativeEngine,
    _Drafts,
    draft_tree,
    row_cost_of,
    tree_writes,
)

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [3, 3], [21, 22, 23, 24, 25]]


def _random_drafter(loaded, n_slots: int = 4, seed: int = 0, scale: float = 0.5) -> Drafter:
    torch.manual_seed(seed)
    drafter = Drafter(loaded.config, DrafterConfig(rank=4, n_slots=n_slots))
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0.0, scale)
    return drafter.eval()


def _random_head(loaded, n_slots: int = 4, seed: int = 0, scale: float = 0.5, vocab: int = 0,
                 causal: bool = False) -> DraftHead:
    """A draft head with random weights over the first `vocab` token ids (0: all)."""
    torch.manual_seed(seed)
    V = vocab or loaded.config.vocab_size
    head = DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=n_slots, vocab_size=V, causal=causal))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, scale)
        head.vocab.copy_(torch.arange(V))
    head.attach(loaded.model)
    return head.eval()


def _drafter(kind: str, loaded, **kwargs) -> Drafter | DraftHead:
    if kind in ("head", "causal head"):
        return _random_head(loaded, causal=kind == "causal head", **kwargs)
    return _random_drafter(loaded, **kwargs)


def _run(handle) -> tuple[list[int], int, str]:
    deltas = list(handle)
    return [t for d in deltas for t in d.token_ids], deltas[-1].steps, deltas[-1].finish_reason


def _decoding_forwards(handle) -> int:
    """A reply's forwards after its prompt's prefill (whose chunks are sized by the measured
    prefill speed: on a loaded machine a short prompt can take two); handle: a request's handle
    or its deltas."""
    last = list(handle)[-1]
    return last.steps - last.prefill_steps


def ar_alone_together(loaded, drafter, prompts, params, **kwargs) -> tuple[list, list, list]:
    """The AR engine's replies to `prompts`, then draft-and-verify's (drafter None: the model's own
    drafts) one request at a time, then all at once (more requests than the engine's 4 rows)."""
    with AREngine(loaded, max_batch_size=4) as ar, SpeculativeEngine(loaded, drafter, max_batch_size=4, **kwargs) as spec:
        expected = [_run(ar.submit(p, params))[0] for p in prompts]
        alone = [_run(spec.submit(p, params))[0] for p in prompts]
        together = [_run(h)[0] for h in [spec.submit(p, params) for p in prompts]]
    return expected, alone, together


@pytest.mark.parametrize("kind,draft_len,tree", [("slots", 1, True), ("slots", 3, True), ("slots", 4, False),
                                                  ("head", 1, True), ("head", 4, True), ("causal head", 4, True)])
def test_random_drafter_is_exact_and_batches_equal_each_alone(kind, draft_len, tree):
    loaded = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1)
    expected, alone, together = ar_alone_together(loaded, _drafter(kind, loaded), PROMPTS,
                                                  GenerationParams(max_new_tokens=20), draft_len=draft_len, tree=tree)
    assert alone == expected
    assert together == expected
    assert any(len(ids) < 20 for ids in expected)  # EOS is handled, not only the length limit


def _scripted_engine(rule, loaded, kind: str = "slots", scale: float = 0.5, **kwargs):
    """Drafts from a rule instead of the drafter: the verifier alone decides what is final (a
    head's own scores still say how sure it is: `draft_confidence`)."""
    base = HeadSpeculativeDecoder if kind == "head" else SpeculativeDecoder

    class Decoder(base):
        def _propose(self, rows, logits, *best):  # a head's decoder passes its argmax too
            n = logits.shape[1]
            return [[rule(row.ids[-1], i) for i in range(n)] for row in rows], [None] * len(rows)

    class Scripted(SpeculativeEngine):
        def make_decoder(self, **kw):
            kw["prefill_step_s"] = None  # a prompt in one prefill forward, whatever speed it measured
            if kind == "head":
                kw["draft_confidence"] = self.draft_confidence
                kw["prompt_lookup"] = self.prompt_lookup
            return Decoder(self.model, self.spec, self.drafter, draft_len=self.draft_len, tree=self.tree, **kw)

    if kind == "head":  # every draft verified unless a test asks for a confidence bar (a random head is unsure)
        kwargs.setdefault("draft_confidence", 0.0)
    return Scripted(loaded, _drafter(kind, loaded, n_slots=8, scale=scale), **kwargs)


# The counting model writes last + 1 (mod COUNT_V - 1) after every token.
def _oracle(last, i):
    return (last + 1 + i) % (COUNT_V - 1)


def _wrong(last, i):
    return (last + 5 + i) % (COUNT_V - 1)


@pytest.mark.parametrize("kind,draft_len", [("slots", 1), ("slots", 3), ("slots", 7), ("head", 1), ("head", 7)])
def test_oracle_drafter_gives_draft_len_plus_one_tokens_per_forward(kind, draft_len):
    loaded = counting_loaded(attention="causal", block_size=1)
    # Mask slots: the first decoding forward has no drafts yet (1 more token); a draft head drafts
    # from the prefill's hidden states at once.
    first = 1 if kind == "head" else 2
    params = GenerationParams(max_new_tokens=first + 5 * (draft_len + 1))
    with AREngine(loaded, max_batch_size=1) as ar, \
            _scripted_engine(_oracle, loaded, kind, draft_len=draft_len, max_batch_size=1) as spec:
        want, ar_steps, _ = _run(ar.submit([5], params))
        got, steps, finish = _run(spec.submit([5], params))
    assert got == want and finish == "length"
    # The prefill forward gives the first token, every later forward accepts all draft_len
    # drafts plus the verifier's own token.
    assert steps == first + 5
    assert ar_steps == params.max_new_tokens


@pytest.mark.parametrize("kind", ["slots", "head"])
def test_always_wrong_drafter_gives_one_token_per_forward_and_stays_exact(kind):
    loaded = counting_loaded(attention="causal", block_size=1)
    params = GenerationParams(max_new_tokens=17)
    with AREngine(loaded, max_batch_size=1) as ar, \
            _scripted_engine(_wrong, loaded, kind, draft_len=4, max_batch_size=1) as spec:
        want, ar_steps, _ = _run(ar.submit([7, 8], params))
        got, steps, _ = _run(spec.submit([7, 8], params))
    assert got == want
    assert steps == ar_steps


@pytest.mark.parametrize("kind", ["slots", "head"])
def test_stop_strings_prefix_reuse_and_abort_free_the_row(kind):
    loaded = counting_loaded(attention="causal", block_size=1, tokenizer=CharTokenizer())
    with _scripted_engine(_oracle, loaded, kind, draft_len=4, max_batch_size=1) as spec:
        # Counting from 'b' (1): "cdefgh..."; the text ends before the stop string.
        handle = spec.submit([1], GenerationParams(max_new_tokens=40, stop=["gh"]))
        assert handle.result() == "cdef" and handle.finish_reason == "stop"
        seen = []

        def on_delta(d):
            seen.append(d)
            if len(seen) == 1:
                spec.abort(long.request_id)

        long = spec.submit([1, 2, 3], GenerationParams(max_new_tokens=200), on_delta=on_delta)
        deltas = list(long)
        assert deltas[-1].finish_reason == "abort" and deltas[-1].steps <= seen[0].steps + 1
        assert spec.load().idle
        # The row is free again, and the next request reuses the prompt's cached prefix exactly.
        assert spec.submit([1, 2, 3], GenerationParams(max_new_tokens=6)).result() == "efghij"


@pytest.mark.parametrize("kind", ["slots", "head"])
@pytest.mark.parametrize("stop", [["gh"], ["e"], ["k"], ["fgh", "i"]])
def test_a_stop_inside_a_forwards_tokens_ends_the_reply_where_the_ar_engines_ends(kind, stop):
    """A forward that makes several tokens final may run past a stop string: the reply's token ids
    and token count end where the AR engine's do, at the token that completed it, not at the
    forward's last (what an API reports as the reply's usage)."""
    loaded = counting_loaded(attention="causal", block_size=1, tokenizer=CharTokenizer())
    params = GenerationParams(max_new_tokens=40, stop=stop)
    with AREngine(loaded, max_batch_size=1) as ar, _scripted_engine(_oracle, loaded, kind, draft_len=4,
                                                                    max_batch_size=1) as spec:
        want = list(ar.submit([1], params))
        got = list(spec.submit([1], params))
    assert [t for d in got for t in d.token_ids] == [t for d in want for t in d.token_ids]
    assert "".join(d.text for d in got) == "".join(d.text for d in want)
    assert (got[-1].tokens, got[-1].finish_reason) == (want[-1].tokens, "stop")
    if want[-1].tokens > 5:  # several tokens a forward
        assert _decoding_forwards(got) < _decoding_forwards(want)


def test_a_heads_drafts_stop_where_its_chain_confidence_falls_below_the_bar():
    loaded = counting_loaded(attention="causal", block_size=1)
    with _scripted_engine(_oracle, loaded, "head", draft_len=4, max_batch_size=1, draft_confidence=0.5) as spec:
        decoder = spec.make_decoder(max_batch_size=1, max_seq_len=32)
    top = torch.tensor([[0.9, 0.9, 0.5, 0.99], [0.4, 0.99, 0.99, 0.99], [0.99, 0.99, 0.99, 0.99]])
    scores = torch.log(torch.stack([top, (1 - top) / 2, (1 - top) / 2], dim=-1))  # (3 rows, 4 slots, 3 tokens)
    assert decoder._confident_len(row_top(scores)[1].cumprod(-1).tolist()) == [2, 0, 4]  # chains 0.9, 0.81, 0.41 | 0.4 | 0.99 ... 0.96
    decoder.draft_confidence = 0.0
    assert decoder._confident_len(row_top(scores)[1].cumprod(-1).tolist()) == [8, 8, 8]  # every slot: the draft length decides
    # An oracle whose head is unsure (uniform scores: all weights zero) drafts nothing: one token
    # a forward, as the AR engine, and the same tokens; sure or not, the verifier decides.
    params = GenerationParams(max_new_tokens=12)
    with AREngine(loaded, max_batch_size=1) as ar, \
            _scripted_engine(_oracle, loaded, "head", scale=0.0, draft_len=4, max_batch_size=1,
                             draft_confidence=0.5) as unsure, \
            _scripted_engine(_oracle, loaded, "head", scale=0.0, draft_len=4, max_batch_size=1) as always:
        want, ar_steps, _ = _run(ar.submit([5], params))
        assert _run(unsure.submit([5], params))[:2] == (want, ar_steps)
        got, steps, _ = _run(always.submit([5], params))
        assert got == want and steps < ar_steps


def test_a_heads_first_token_goes_out_before_its_first_drafts_are_made():
    """The step whose prefill gives a row its first token returns that token without running
    the head (its pass would delay the token); the row's first drafts, from the prefill's
    window, are made as its next forward starts, which then accepts them all (an oracle)."""
    loaded = counting_loaded(attention="causal", block_size=1)
    with _scripted_engine(_oracle, loaded, "head", draft_len=3, max_batch_size=1) as spec:
        decoder = spec.make_decoder(max_batch_size=1, max_seq_len=32)
    passes = []
    head_call = decoder.head.forward
    decoder.head.forward = lambda *a, **k: passes.append(1) or head_call(*a, **k)
    settings = spec.prepare([5], GenerationParams(max_new_tokens=9))[1]
    decoder.add(0, [5], settings)
    made = []
    while not made:  # the prefill's steps, up to the first token
        made = [t for u in decoder.step() for t in u.new_ids]
    assert made == [6] and passes == []
    assert [t for u in decoder.step() for t in u.new_ids] == [7, 8, 9, 10] and passes == [1, 1]  # first drafts, next ones


def test_prompt_lookup_copies_what_followed_the_longest_latest_earlier_run():
    """`_look_up`: the tokens after the latest earlier occurrence of the longest run (2 to 4
    tokens) that ends the row's final text, at most `most` and not past the text; none where only
    the last token occurred before; the index grows with the text."""
    from types import SimpleNamespace

    loaded = counting_loaded(attention="causal", block_size=1)
    decoder = HeadSpeculativeDecoder(loaded.model, loaded.spec, _random_head(loaded, n_slots=4), draft_len=4,
                                     max_batch_size=2, max_seq_len=64)

    def look(ids, most=4, slot=0):
        decoder.seen.pop(slot, None)
        return decoder._look_up(SimpleNamespace(slot=slot, ids=ids, final_upto=len(ids)), most)

    assert look([1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3]) == [4, 9, 2, 3]  # [1, 2, 3] beats the later [2, 3]
    assert look([1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3], most=2) == [4, 9]
    assert look([2, 3, 5, 8, 2, 3, 6, 0, 2, 3]) == [6, 0, 2, 3]  # equal runs: the latest
    assert look([4, 7, 1, 5, 7]) == []  # only the last token occurred before
    assert look([6, 8, 6, 8]) == [6, 8]  # what followed runs into the text's end
    assert look([9]) == [] and look([3, 3, 3]) == [3]
    # Indexed once: a row's text grows, its index with it (final tokens only).
    row = SimpleNamespace(slot=1, ids=[10, 11, 12, 13, 10, 11, 0, 0], final_upto=6)
    assert decoder._look_up(row, 4) == [12, 13, 10, 11]
    assert decoder.seen[1].upto == 6
    row.ids[6:8], row.final_upto = [12, 20], 8
    assert decoder._look_up(row, 4) == []  # [12, 20] never occurred before
    row.ids += [11, 12]
    row.final_upto = 10
    assert decoder._look_up(row, 4) == [20, 11, 12]  # [11, 12] again: the latest, at 5-6
    decoder.remove(1)
    assert 1 not in decoder.seen


def test_prompt_lookup_drafts_where_the_head_is_unsure_and_the_replies_stay_the_ars():
    """A head sure of nothing drafts nothing (one token a forward, as AR); with prompt lookup, a
    reply that runs through a span of its prompt again is drafted from it: fewer forwards, the
    same tokens. Off (0), the AR engine's forwards again; refused where no draft head drafts."""
    loaded = counting_loaded(attention="causal", block_size=1)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 5, 6]  # the counting model goes on 7, 8, 9, ...
    params = GenerationParams(max_new_tokens=9)
    with AREngine(loaded, max_batch_size=1) as ar:
        want, ar_steps, _ = _run(ar.submit(prompt, params))
    assert want == list(range(7, 16))
    for lookup, fewer in [(4, True), (0, False)]:
        with _scripted_engine(_oracle, loaded, "head", scale=0.0, draft_len=4, max_batch_size=1,
                              draft_confidence=0.5, prompt_lookup=lookup) as spec:
            got, steps, _ = _run(spec.submit(prompt, params))
        assert got == want
        assert (steps < ar_steps) == fewer, (lookup, steps, ar_steps)
    with pytest.raises(ValueError, match="beside a draft head only"):
        SpeculativeEngine(loaded, _random_drafter(loaded), prompt_lookup=2)
    with pytest.raises(ValueError, match="prompt_lookup -1 must be an integer >= 0"):
        SpeculativeEngine(loaded, _random_head(loaded, n_slots=4), prompt_lookup=-1)
    with SpeculativeEngine(loaded, _random_head(loaded, n_slots=2, scale=0.0), max_batch_size=1, draft_confidence=0.5) as two:
        assert two.prompt_lookup == 4  # the default: a row copies at most its draft length (2 here)
        got, steps, _ = _run(two.submit(prompt, params))
    assert got == want and steps < ar_steps


class _SureOfTheNext(DraftHead):
    """A head 0.9 sure of the counting model's next token and sure of nothing after it (uniform)."""

    def forward(self, feats, tokens, valid, n, prev=None, bar=0.0):
        V = self.model_config.vocab_size
        probs = torch.full((tokens.shape[0], n, V), 1 / V)
        probs[:, 0] = 0.1 / (V - 1)
        probs[torch.arange(tokens.shape[0]), 0, (tokens[:, -1] + 1) % (COUNT_V - 1)] = 0.9
        return probs.log()


def test_a_copy_gives_way_to_a_head_sure_of_another_next_token(monkeypatch):
    """Prompt lookup replaces the head's drafts where it copies more, except where the head is at
    least LOOKUP_HEAD_SURE sure of its next token and the copy starts with another one: then the
    head's draft is verified. Here every copy is wrong (each pair of the reply was followed by 30
    in the prompt) and the head's first draft right: one token a forward where copies win, two
    where the head does; the AR engine's reply either way."""
    import dlm.speculative

    loaded = counting_loaded(attention="causal", block_size=1)
    head = _SureOfTheNext(loaded.config, DraftHeadConfig(window=3, n_slots=4, vocab_size=loaded.config.vocab_size))
    head.vocab.copy_(torch.arange(loaded.config.vocab_size))
    head.attach(loaded.model)
    prompt = [6, 7, 30, 7, 8, 30, 8, 9, 30, 9, 10, 30, 10, 11, 30, 11, 12, 30, 12, 13, 30, 5, 6]
    params = GenerationParams(max_new_tokens=7)
    with AREngine(loaded, max_batch_size=1) as ar:
        want, _, _ = _run(ar.submit(prompt, params))
    assert want == list(range(7, 14))
    steps, default = {}, dlm.speculative.LOOKUP_HEAD_SURE
    assert default < 0.9
    for bar in (default, 1.0):  # 1.0: copies always win
        monkeypatch.setattr(dlm.speculative, "LOOKUP_HEAD_SURE", bar)
        with SpeculativeEngine(loaded, head.eval(), max_batch_size=1, draft_confidence=0.5, prompt_lookup=4) as spec:
            got, steps[bar], _ = _run(spec.submit(prompt, params))
            copies = spec.draft_acceptance()["copies"]
        assert got == want
        assert bool(copies) == (bar == 1.0)  # copies verified only where they win
    assert steps[1.0] == 1 + 6  # the first token from the prefill, then one a forward
    assert steps[default] == 1 + 3  # the head's right draft and the verifier's own token a forward


def test_the_engine_counts_which_drafts_were_accepted_by_confidence_and_copies_by_place():
    """`draft_acceptance()`: an oracle head's drafts are all accepted, an always-wrong head's none,
    each counted in the tenth of its chain confidence; prompt lookup's copies by place, a later
    place accepted only where the earlier one was; a reset starts afresh; mask slots count none."""
    loaded = counting_loaded(attention="causal", block_size=1)
    params = GenerationParams(max_new_tokens=13)
    for rule, accepted in [(_oracle, True), (_wrong, False)]:
        with _scripted_engine(rule, loaded, "head", draft_len=3, max_batch_size=1, prompt_lookup=0) as spec:
            _, steps, _ = _run(spec.submit([5], params))
            counted = spec.draft_acceptance()
        verified = sum(b["verified"] for b in counted["head"])
        assert counted["copies"] == []
        assert sum(b["accepted"] for b in counted["head"]) == (verified if accepted else 0)
        # Each decoding forward verified three drafts, fewer where the reply's end is closer: the
        # oracle's 3 forwards of 4 tokens; a wrong head's forward i (i tokens final) min(3, 12 - i).
        assert verified == (3 * (steps - 1) if accepted else sum(min(3, 12 - i) for i in range(1, steps)))
        for b in counted["head"]:
            assert b["confidence"][1] == pytest.approx(b["confidence"][0] + 0.1)
            assert b["rate"] == pytest.approx(b["accepted"] / b["verified"], abs=1e-4)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 5, 6]  # copies of 7, 8, ... (right), then of 5, 6 after 13 (wrong)
    with _scripted_engine(_oracle, loaded, "head", scale=0.0, draft_len=4, max_batch_size=1,
                          draft_confidence=0.5, prompt_lookup=4) as spec:
        _run(spec.submit(prompt, params))
        counted = spec.draft_acceptance(reset=True)
        assert spec.draft_acceptance() == {"head": [], "copies": []}  # counting afresh
    assert counted["head"] == []  # a head sure of nothing drafts nothing: only copies were verified
    copies = counted["copies"]
    assert [c["place"] for c in copies] == list(range(1, len(copies) + 1)) and len(copies) >= 2
    assert copies[0]["accepted"] > 0 and any(c["accepted"] < c["verified"] for c in copies)
    assert all(later["accepted"] <= earlier["accepted"] for earlier, later in itertools.pairwise(copies))
    assert [c["modelled"] for c in copies[:2]] == [pytest.approx(LOOKUP_SURE), pytest.approx(LOOKUP_SURE ** 2)]
    with _scripted_engine(_oracle, loaded, "slots", draft_len=1, max_batch_size=1) as slots:
        _run(slots.submit([5], params))
        assert slots.draft_acceptance() is None


def test_a_draft_tree_keeps_the_surest_paths_each_after_its_parent_and_writes_them_in_their_lanes():
    tops = [[(5, 0.6), (6, 0.3)], [(7, 0.5), (8, 0.4)], [(9, 0.9), (10, 0.05)]]
    tokens, parents, sure = draft_tree(tops, 0.1, 12)
    tree = _Drafts(tokens, None, sure, parents=parents)
    depths = tree.depths()
    paths = []
    for i in range(len(tokens)):  # each node's path of tokens, from the row's last final token
        path, node = [], i
        while node >= 0:
            path.insert(0, tokens[node])
            node = parents[node]
        paths.append(tuple(path))
    expected = {(5,): 0.6, (6,): 0.3, (5, 7): 0.3, (5, 8): 0.24, (6, 7): 0.15, (6, 8): 0.12, (5, 7, 9): 0.27,
                (5, 8, 9): 0.216, (6, 7, 9): 0.135, (6, 8, 9): 0.108}  # every path at least 0.1 sure
    assert dict(zip(paths, sure, strict=True)) == pytest.approx(expected)
    assert sure == sorted(sure, reverse=True) and all(p < i for i, p in enumerate(parents))
    assert [len(p) for p in paths] == depths
    assert tree.path([5, 8, 9]) == [0, paths.index((5, 8)), paths.index((5, 8, 9))]
    # Fewer nodes: the surest, still a tree; one token a place: the chain above the bar.
    assert draft_tree(tops, 0.1, 4) == (tokens[:4], parents[:4], sure[:4])
    assert draft_tree([t[:1] for t in tops], 0.1, 12) == ([5, 7, 9], [-1, 0, 1], pytest.approx([0.6, 0.3, 0.27]))
    assert draft_tree([t[:1] for t in tops], 0.35, 12)[0] == [5]
    assert draft_tree(tops, 0.7, 12) == ([], [], [])
    # K/V positions: the row's last final token at 39; each node in the lane of its place in the
    # text (39 + depth), after its parent, no two alike; a chain where it is.
    at = tree_writes(40, parents, depths)
    assert len(set(at)) == len(at) and min(at) >= 40
    assert all((w - 39 - d) % TREE_LANES == 0 for w, d in zip(at, depths, strict=True))
    assert all(p < 0 or at[p] < w for w, p in zip(at, parents, strict=True))
    assert tree_writes(40, [-1, 0, 1], [1, 2, 3]) == [40, 41, 42]
    assert tree_writes(40, parents[:5], depths[:5]) == at[:5]  # a leading part writes where the whole does
    # For the torch layers (one lane): side by side, each after its parent.
    assert tree_writes(40, parents, depths, 1) == list(range(40, 40 + len(tokens)))


class _TreeOracle(HeadSpeculativeDecoder):
    """Trees whose first choice at every place is wrong (0.6 sure) and whose second is the reply
    the AR engine writes (0.4; `replies`: prompt -> its reply and EOS): at two places the right
    path is the tree's last node (0.4 x 0.4), and the K/V of both its nodes are written away from
    their places (their lanes' first positions hold the wrong first choices) and must be moved."""

    replies: typing.ClassVar[dict[tuple[int, ...], list[int]]] = {}

    def _branching(self, row):  # one branch too: a chain of the first choices
        return self._greedy(row)

    def _draft(self, rows):
        super()._draft(rows)
        for row in rows:  # the scripted tree, whatever the random head drafted
            self._keep_tree(row, self._n(row.settings), None, None)

    def _keep_tree(self, row, n, ids, probs):
        text = row.ids[: row.prompt_len] + self.replies[tuple(row.ids[: row.prompt_len])]
        right = [text[c] if c < len(text) else 0 for c in range(row.final_upto, row.final_upto + n)]
        V, k = self.model.config.vocab_size, self.branches
        super()._keep_tree(row, n, [[(t + 1) % V, t][:k] for t in right], [[0.6, 0.4][:k]] * n)


def _tree_oracle(loaded, prompts, params, branches: int = 2, lanes: int | None = None) -> tuple[list, type]:
    """The AR engine's (reply, forwards, finish reason) for each prompt, and an engine whose rows
    draft `_TreeOracle`'s trees of those replies (two places, a bar of 0.05, no prompt lookup;
    lanes: the nodes' K/V placed as for that many kernel lanes, `tree_writes`, else as the model's
    forward needs)."""
    with AREngine(loaded, max_batch_size=4) as ar:
        expected = [_run(ar.submit(p, params)) for p in prompts]
    _TreeOracle.replies = {tuple(p): e[0] + [1] for p, e in zip(prompts, expected, strict=True)}  # EOS too

    class Engine(SpeculativeEngine):
        def make_decoder(self, **kw):
            decoder = _TreeOracle(self.model, self.spec, self.drafter, draft_len=2, draft_confidence=0.05,
                                  prompt_lookup=0, branches=branches, **kw)
            decoder.tree_lanes = lanes or decoder.tree_lanes
            return decoder

    return expected, Engine


@pytest.mark.parametrize("branches", [2, 1])
def test_a_tree_of_drafts_finds_second_choices_and_writes_the_ar_replies_alone_and_batched(branches):
    """A random model (its attention matters: a node that saw the wrong keys, or K/V left where
    the tree wrote them, would change the tokens after it) and a drafter right only in its second
    choices: a tree (two branches a place) accepts both places' drafts at every forward, a chain
    (one branch) none; every reply is the AR engine's, one request at a time and all at once."""
    loaded = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1)
    params = GenerationParams(max_new_tokens=20)
    expected, Engine = _tree_oracle(loaded, PROMPTS, params, branches)
    with Engine(loaded, _random_head(loaded, n_slots=4), max_batch_size=4) as spec:
        alone = [_run(spec.submit(p, params)) for p in PROMPTS]
        decoding = [_decoding_forwards(spec.submit(p, params)) for p in PROMPTS]
        together = [_run(h) for h in [spec.submit(p, params) for p in PROMPTS]]
        counted = {round(c["confidence"][0], 1): c for c in spec.draft_acceptance()["head"]}
    assert [r[0] for r in alone] == [r[0] for r in together] == [r[0] for r in expected]
    assert any(r[2] == "eos" for r in expected) and any(r[2] == "length" for r in expected)
    made = [len(r[0]) + (r[2] == "eos") for r in expected]  # EOS is a token made too
    # Forwards after the prefill (whose chunks depend on timing), which makes the first token.
    if branches == 1:
        assert decoding == [m - 1 for m in made]  # its first choices are all wrong: a token a forward
        assert counted[0.6]["accepted"] == 0
        return
    assert decoding == [math.ceil((m - 1) / 3) for m in made]  # 3 a forward
    # Counted by confidence: the right nodes accepted (the second, 0.16 sure, not where an EOS
    # ended the reply at the first), the others never.
    assert counted[0.4]["rate"] == 1.0 and 0.9 < counted[0.1]["rate"] < 1.0
    assert counted[0.6]["accepted"] == counted[0.3]["accepted"] == counted[0.2]["accepted"] == 0


def test_a_tree_keeps_only_the_nodes_whose_kv_fit_the_cache():
    """Near the end of a small cache a tree's nodes written a lane further (16 positions, as the
    block kernel has them) would fall outside it: the row keeps the leading nodes that fit
    (`_keep_tree`), fewer drafts but the same replies, no error."""
    loaded = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1)
    params = GenerationParams(max_new_tokens=20)
    expected, Engine = _tree_oracle(loaded, PROMPTS, params, lanes=TREE_LANES)
    steps = {}
    for S in (40, 256):  # 40: every row's second branch lies past the cache from position 24 on
        with Engine(loaded, _random_head(loaded, n_slots=4), max_batch_size=4, max_seq_len=S) as spec:
            got = [_run(h) for h in [spec.submit(p, params) for p in PROMPTS]]
        assert [r[0] for r in got] == [r[0] for r in expected]
        steps[S] = sum(r[1] for r in got)
    assert steps[256] < steps[40] < sum(r[1] for r in expected)


@pytest.mark.parametrize("branches", [1, 3])
def test_a_head_engine_serves_every_request_that_fits_the_context_as_the_ar_engine_does(branches):
    """A head's drafts stop before the reply's length limit (and a tree's nodes where the cache
    ends), so a prompt plus max_new_tokens that fills the context exactly is served, not refused
    for room past it (it was, 3-5 positions short), and its reply is the AR engine's."""
    loaded = random_loaded("causal", seed=3, eos=[], scale=3.0, block_size=1)
    S = loaded.config.max_seq_len
    prompt, params = ([5, 6, 7] * S)[: S - 20], GenerationParams(max_new_tokens=20)
    with AREngine(loaded, max_batch_size=1) as ar:
        expected = _run(ar.submit(prompt, params))[0]
        with pytest.raises(InvalidRequestError, match="exceeds the context"):
            ar.submit([*prompt, 9], params)
    with SpeculativeEngine(loaded, _random_head(loaded, n_slots=4), max_batch_size=1, draft_len=4,
                           draft_confidence=0.0, draft_branches=branches) as spec:
        assert _run(spec.submit(prompt, params))[0] == expected
        with pytest.raises(InvalidRequestError, match="exceeds the context"):
            spec.submit([*prompt, 9], params)


def test_trees_are_for_greedy_exact_rows_and_bad_branches_are_refused():
    loaded = counting_loaded(attention="causal", block_size=1)
    head = _random_head(loaded, n_slots=4)
    with SpeculativeEngine(loaded, head, max_batch_size=4, draft_branches=3) as spec:
        decoder = spec.make_decoder(max_batch_size=4, max_seq_len=256)
        for slot, params in enumerate([GenerationParams(), GenerationParams(temperature=0.7, seed=1),
                                       GenerationParams(accept=0.8)]):
            decoder.add(slot, [2, 3], spec.prepare([2, 3], params)[1])
    assert decoder.branches == 3
    assert [decoder._branching(decoder.rows[slot]) for slot in range(3)] == [True, False, False]
    for bad in (0, 9, 1.5):
        with pytest.raises(ValueError, match="branches"):
            HeadSpeculativeDecoder(loaded.model, loaded.spec, head, max_batch_size=1, max_seq_len=64, branches=bad)
    with pytest.raises(ValueError, match="draft head"):
        SpeculativeEngine(loaded, _random_drafter(loaded), draft_branches=2)
    assert head.n_slots <= TREE_MAX_NODES


def test_rows_whose_drafts_are_cut_to_different_lengths_batch_as_each_alone():
    """Rows of one batch keep different numbers of drafts (here 0 to 3 by their batch place, as
    the confidence bar cuts them): each still writes what the AR engine writes, alone or batched,
    and the rows that keep drafts take fewer forwards."""
    loaded = counting_loaded(attention="causal", block_size=1)

    class Cut(HeadSpeculativeDecoder):
        def _propose(self, rows, scores, best):
            return [[_oracle(row.ids[-1], i) for i in range(scores.shape[1])] for row in rows], [None] * len(rows)

        def _confident_len(self, chain):
            return [i % 4 for i in range(len(chain))]

    class Engine(SpeculativeEngine):
        def make_decoder(self, **kw):
            kw["prefill_step_s"] = None  # as in _scripted_engine: the step counts below assume it
            return Cut(self.model, self.spec, self.drafter, draft_len=4, **kw)

    prompts = [[3], [5, 6], [9], [2, 4, 7]]
    params = GenerationParams(max_new_tokens=13)
    with AREngine(loaded, max_batch_size=4) as ar, Engine(loaded, _random_head(loaded, n_slots=4), max_batch_size=4) as spec:
        expected = [_run(ar.submit(p, params)) for p in prompts]
        alone = [_run(spec.submit(p, params)) for p in prompts]
        together = [_run(h) for h in [spec.submit(p, params) for p in prompts]]
    assert [r[0] for r in alone] == [r[0] for r in together] == [r[0] for r in expected]
    assert alone[0][1] == expected[0][1]  # alone, every row is the batch's first: no drafts, AR's forwards
    assert together[0][1] == expected[0][1] and all(t[1] < e[1] for t, e in zip(together[1:], expected[1:], strict=True))


def test_a_forward_verifies_the_drafts_that_pay_for_their_positions():
    """`_within_budget` with a 2-core CPU's costs (two positions for the price of one, each more
    0.2 of a forward): alone, a row's first draft comes free and each later one goes in while it
    raises the expected tokens per cost; in a batch of eight greedy rows only the near-certain
    ones do. Sampled rows, lossy rows and drafts without a confidence keep what they have; no
    budget keeps every draft."""
    from types import SimpleNamespace

    loaded = counting_loaded(attention="causal", block_size=1)
    decoder = HeadSpeculativeDecoder(loaded.model, loaded.spec, _random_head(loaded, n_slots=4), draft_len=4,
                                     max_batch_size=8, max_seq_len=64, row_cost=RowCost(2, 0.2))
    def row(slot, generator=None, accept=1.0):
        return SimpleNamespace(slot=slot, generator=generator, settings=SimpleNamespace(accept=accept))

    greedy = [row(slot) for slot in range(8)]
    sampled, lossy = row(6, torch.Generator()), row(7, accept=0.8)

    def kept(rows, sures):
        drafts = [_Drafts([7] * len(s), None, s) if s is not None else _Drafts([7, 7], None) for s in sures]
        return [len(d.tokens) for d in decoder._within_budget(rows, drafts)]

    # Alone, a row keeps what its confidence bar kept (the bar is timed on the machine).
    assert kept(greedy[:1], [[0.9, 0.8, 0.5, 0.3]]) == [4]
    assert decoder.idle == {}
    # Two rows (2 positions: 1 forward, the free ones taken): 0.9 x 1 >= 0.2 x 2; 0.8 x 1.2 >= 0.2
    # x 2.9; then 0.5 x 1.4 < 0.2 x 3.7, and the other row's 0.2 less still: that row idles.
    assert kept(greedy[:2], [[0.9, 0.8, 0.5, 0.3], [0.2, 0.19]]) == [2, 0]
    assert decoder.idle == {1: [1, 4]}  # [forwards since its head pass, forwards to wait]
    decoder.idle.clear()
    # Eight rows (8 positions: 2.2 forwards): every 0.95 pays for its position (the eighth: 0.95 x
    # 3.6 >= 0.2 x 14.65), no 0.5 after them (0.5 x 3.8 < 0.2 x 15.6), but not for the next head
    # pass too (0.95 x 3.8 / 15.6 - 0.2 < 0.37 x 0.2): the rows idle; drafts of 0.6 never pay.
    assert kept(greedy, [[0.95, 0.5]] * 8) == [1] * 8
    assert decoder.idle == {slot: [1, 4] for slot in range(8)}
    assert kept(greedy, [[0.6, 0.5]] * 8) == [0] * 8
    assert decoder.idle == {slot: [1, 8] for slot in range(8)}  # again: twice the wait
    # The surest across rows, each row's in order; the others keep theirs and count. Row 0's two
    # drafts pay for their head pass too (1.97 x 3.2 / 10.27 - 0.4 >= 0.074); only greedy rows idle.
    assert kept([*greedy[:6], sampled, lossy], [[0.99, 0.98, 0.3]] + [[0.6]] * 5 + [[0.1, 0.1], [0.1]]) == \
        [2, 0, 0, 0, 0, 0, 2, 1]
    assert decoder.idle == {**{slot: [1, 16] for slot in range(1, 6)}, 6: [1, 8], 7: [1, 8]}
    assert kept(greedy[1:2], [[0.1]]) == [1] and 1 not in decoder.idle  # alone again: no idling
    assert kept(greedy[:2], [None, [0.9, 0.1]]) == [2, 1]  # no confidence: verified as kept (4 positions)
    decoder.row_cost = None
    assert kept(greedy, [[0.6, 0.5]] * 8) == [2] * 8


@pytest.mark.parametrize("sure,together_steps,head_rows", [
    ([0.99, 0.9, 0.5, 0.5], 8, 4 * 7),  # two drafts each pay: drafted after the prefill and every forward but the last
    ([0.5, 0.5, 0.5, 0.5], 21, 4 * 3),  # none pays: after the prefill and forwards 4 and 12 (waits of 4, 8, 16)
])
def test_a_budget_drafts_less_in_a_batch_and_leaves_every_reply_as_it_was(sure, together_steps, head_rows):
    """With drafts that are right and a budget, a request alone verifies all four drafts a
    forward; four requests at once verify only the drafts that pay for their positions (one each,
    or none: then the rows skip the head's pass, waiting longer after each try). Greedy replies
    are the AR engine's either way; a seeded sampled reply is the same alone and beside greedy
    rows (its drafts are not cut: its draws follow them)."""
    loaded = counting_loaded(attention="causal", block_size=1)
    passes = []

    class Sure(HeadSpeculativeDecoder):
        def _propose(self, rows, scores, best):
            passes.append(len(rows))
            return [[_oracle(row.ids[-1], i) for i in range(scores.shape[1])] for row in rows], [None] * len(rows)

        def _keep_drafts(self, row, n, tokens, dist, sure_=None):
            super()._keep_drafts(row, n, tokens, dist, sure)

    class Engine(SpeculativeEngine):
        def make_decoder(self, **kw):
            kw["prefill_step_s"] = None  # as in _scripted_engine: the step counts below assume it
            return Sure(self.model, self.spec, self.drafter, draft_len=4, draft_confidence=0.0,
                        row_cost=RowCost(2, 0.2), **kw)

    prompts = [[3], [5, 6], [9], [2, 4, 7]]
    params = GenerationParams(max_new_tokens=21)
    with AREngine(loaded, max_batch_size=4) as ar, Engine(loaded, _random_head(loaded, n_slots=4), max_batch_size=4) as spec:
        expected = [_run(ar.submit(p, params))[0] for p in prompts]
        alone = [_run(spec.submit(p, params)) for p in prompts]
        passes.clear()
        together = [_run(h) for h in [spec.submit(p, params) for p in prompts]]
    assert [r[0] for r in alone] == [r[0] for r in together] == expected
    assert [r[1] for r in alone] == [5] * 4  # the prefill's token, then 5 a forward
    assert [r[1] for r in together] == [together_steps] * 4  # the prefill's, then 3 (or 1) a forward
    assert sum(passes) == head_rows  # the rows' head passes (none after a row's last forward)


@pytest.mark.parametrize("blocks", [False, True], ids=["torch-layers", "q8-blocks"])
def test_a_causal_head_drafts_only_the_places_its_rows_ask_for(blocks):
    """A causal head's places depend only on those before them: a pass drafts up to the longest
    draft its rows ask for (not the head's whole block) and stops where no row's chain is sure
    enough (`bar`: no later draft could be kept); the replies stay the AR engine's, greedy and
    sampled rows side by side; on Q8 blocks too (the places in one C call)."""
    if blocks and dlm.blocks.available() is not None:
        pytest.skip(f"block kernel unavailable: {dlm.blocks.available()}")
    loaded = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1, dim=64, n_heads=4, n_kv_heads=2,
                           intermediate_size=128)
    head = _random_head(loaded, n_slots=4, causal=True, scale=2.0)
    if blocks:
        assert head.use_blocks()
    asked, forward = [], head.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        asked.append((args[3], kwargs["bar"], int((out != 0).any(-1).sum(1).max())))  # n, bar, places drafted
        return out

    head.forward = spy
    greedy, short = GenerationParams(max_new_tokens=16), GenerationParams(max_new_tokens=16, draft_len=2)
    sampling = GenerationParams(max_new_tokens=16, temperature=1.0, seed=7, draft_len=2)
    with AREngine(loaded, max_batch_size=4) as ar:
        expected = [_run(ar.submit(p, greedy))[0] for p in PROMPTS[:2]]
    with SpeculativeEngine(loaded, head, max_batch_size=4, draft_len=3, draft_confidence=0.0) as spec:
        assert [_run(spec.submit(p, short))[0] for p in PROMPTS[:2]] == expected
        assert {a[:2] for a in asked} == {(2, 0.0)}
        asked.clear()
        alone = _run(spec.submit(PROMPTS[2], sampling))[0]
        together = [_run(h)[0] for h in [spec.submit(PROMPTS[0], greedy), spec.submit(PROMPTS[2], sampling)]]
        assert together == [expected[0], alone]
        assert {a[0] for a in asked} == {2, 3}  # alone 2; beside a row of the engine's 3: 3
    with SpeculativeEngine(loaded, head, max_batch_size=4, draft_len=4, draft_confidence=0.9) as spec:
        asked.clear()
        assert [_run(spec.submit(p, greedy))[0] for p in PROMPTS[:2]] == expected
    assert {a[:2] for a in asked} == {(4, 0.9)} and min(a[2] for a in asked) < 4  # a random head is rarely that sure


def test_a_seeded_sampled_reply_is_the_same_alone_and_beside_rows_under_a_budget():
    """Sampled rows keep their drafts under a budget (their draws follow them), so a seed repeats
    a reply whatever the batch holds."""
    loaded = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1)
    head = _random_head(loaded, n_slots=4, seed=2, scale=2.0)
    sampling = GenerationParams(max_new_tokens=20, temperature=1.0, seed=7)
    greedy = GenerationParams(max_new_tokens=20)
    with SpeculativeEngine(loaded, head, max_batch_size=4, draft_confidence=0.0, row_cost=0.5) as spec:
        alone = _run(spec.submit(PROMPTS[1], sampling))[0]
        handles = [spec.submit(PROMPTS[0], greedy), spec.submit(PROMPTS[1], sampling), spec.submit(PROMPTS[3], greedy)]
        together = [_run(h)[0] for h in handles]
    assert together[1] == alone


def test_a_seeded_sampled_reply_of_a_mask_slot_drafter_is_the_same_beside_rows_that_draft_more():
    """A batch's draft blocks are as long as its longest: a sampled row draws only its own
    places from its generator (drawing the others too and dropping them moved its later draws:
    beside a row of draft length 4, a row of 1 wrote another reply from its third token on)."""
    loaded = random_loaded("causal", seed=3, eos=[], scale=3.0, block_size=1)
    sampling = GenerationParams(max_new_tokens=30, temperature=1.0, seed=7, draft_len=1)
    with SpeculativeEngine(loaded, _random_drafter(loaded, n_slots=4, seed=1, scale=1.0), max_batch_size=4,
                           draft_len=1) as spec:
        alone = _run(spec.submit(PROMPTS[1], sampling))[0]
        for neighbour in (1, 4):
            handles = [spec.submit(PROMPTS[0], GenerationParams(max_new_tokens=60, draft_len=neighbour)),
                       spec.submit(PROMPTS[1], sampling)]
            assert [_run(h)[0] for h in handles][1] == alone, neighbour


@pytest.mark.parametrize("chunk", [64, 4, 1])
def test_the_heads_first_window_is_the_same_after_prefix_reuse_and_in_short_chunks(chunk):
    """The head's first drafts read the hidden states of the prompt's last positions: a prompt
    whose prefix the row holds from the last request recomputes them (the cache holds K/V only),
    and a prefill in chunks shorter than the window keeps those of the chunks before (a reused
    prompt read a window of 1, and a 10-token prompt in chunks of 8 one of 2). So a seeded sampled
    reply is the same on a fresh engine and after reuse."""
    loaded = random_loaded("causal", seed=3, eos=[], scale=3.0, block_size=1)
    head = _random_head(loaded, n_slots=4, seed=2, scale=2.0)
    W = head.config.window
    prompt = PROMPTS[3]
    sampling = GenerationParams(max_new_tokens=30, temperature=1.0, seed=7)
    with SpeculativeEngine(loaded, head, max_batch_size=1) as spec:
        fresh, reused = (_run(spec.submit(prompt, sampling))[0] for _ in range(2))
        settings = spec.prepare(prompt, GenerationParams(max_new_tokens=5))[1]
    assert reused == fresh
    windows = []
    for size in (64, chunk):
        decoder = HeadSpeculativeDecoder(loaded.model, spec.spec, head, draft_len=4, max_batch_size=1, max_seq_len=64,
                                         prefill_step_s=None, prefill_chunk_tokens=size, prefill_budget_tokens=size)
        for turn in range(2):
            decoder.add(0, prompt, settings)
            assert decoder.rows[0].prefill_upto == (0 if turn == 0 else len(prompt) - W)
            with torch.inference_mode():  # as in an engine's worker
                while decoder.rows[0].prefill_upto < decoder.rows[0].prefill_end:
                    decoder.step()
                windows.append((decoder.window_n[0], decoder.window_t[0, :-1].tolist(), decoder.window_h[0].clone()))
                while not any(u.finish_reason for u in decoder.step()):
                    pass
            decoder.remove(0)
    for n, tokens, h in windows:
        assert (n, tokens) == (W, prompt[-W + 1:])  # each pair's token: the one after its position
        torch.testing.assert_close(h, windows[0][2])


def test_tree_rows_beside_sampled_and_lossy_rows_under_a_budget_keep_every_reply():
    """A real (random) head's trees, sliced by a batch's budget (`_within_budget` keeps each
    tree's surest nodes), beside a seeded sampled row and a lossy one, which keep chains: the
    greedy rows write the AR replies, the sampled row what it writes alone."""
    loaded = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1)
    head = _random_head(loaded, n_slots=4, seed=2, scale=2.0)
    greedy = GenerationParams(max_new_tokens=20)
    sampling = GenerationParams(max_new_tokens=20, temperature=1.0, seed=7)
    lossy = GenerationParams(max_new_tokens=20, accept=0.5)
    with AREngine(loaded, max_batch_size=4) as ar:
        expected = [_run(ar.submit(p, greedy))[0] for p in (PROMPTS[0], PROMPTS[3])]
    with SpeculativeEngine(loaded, head, max_batch_size=4, draft_confidence=0.0, draft_branches=3, row_cost=0.1) as spec:
        alone = _run(spec.submit(PROMPTS[1], sampling))[0]
        handles = [spec.submit(PROMPTS[0], greedy), spec.submit(PROMPTS[1], sampling), spec.submit(PROMPTS[3], greedy),
                   spec.submit(PROMPTS[2], lossy)]
        together = [_run(h)[0] for h in handles]
        counted = spec.draft_acceptance()["head"]
    assert [together[0], together[2]] == expected
    assert together[1] == alone
    assert sum(c["verified"] for c in counted) > 0


def test_the_verifier_skips_the_padding_of_rows_with_fewer_drafts():
    """`_verifier_logits`: each row's live positions get the output head's logits, as the whole
    padded batch would give them; the padding gets zeros."""
    loaded = random_loaded("causal", seed=3, block_size=1)
    decoder = HeadSpeculativeDecoder(loaded.model, loaded.spec, _random_head(loaded, n_slots=4), draft_len=4,
                                     max_batch_size=4, max_seq_len=64)
    h = torch.randn(3, 5, loaded.config.dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = loaded.model.logits(h, step=5)
        got = decoder._verifier_logits(h, [5, 1, 3])
        assert torch.equal(decoder._verifier_logits(h, [5, 5, 5]), full)
    for b, live in enumerate([5, 1, 3]):
        torch.testing.assert_close(got[b, :live], full[b, :live], rtol=0, atol=1e-5)
        assert not got[b, live:].any()


def test_row_costs_follow_the_arithmetic_and_bad_ones_are_refused():
    loaded = random_loaded("causal", seed=3, block_size=1)
    assert row_cost_of(loaded.model) == RowCost(1, 0.06)  # dense float32 on a CPU
    head = _random_head(loaded)
    assert SpeculativeEngine(loaded, head).row_cost == RowCost(1, 0.06)
    assert SpeculativeEngine(loaded, head, row_cost=0.25).row_cost == RowCost(1, 0.25)
    assert SpeculativeEngine(loaded, head, row_cost=0).row_cost is None
    for bad in (-0.1, 17, "high", True):
        with pytest.raises(ValueError, match=r"row_cost .* must be 'auto' or a number in \[0, 16\]"):
            SpeculativeEngine(loaded, head, row_cost=bad)
    with pytest.raises(ValueError, match="beside a draft head only"):
        SpeculativeEngine(loaded, _random_drafter(loaded), row_cost=0.2)
    with pytest.raises(ValueError, match="free >= 1"):
        RowCost(0, 0.1)
    assert RowCost(2, 0.2).forward(1) == RowCost(2, 0.2).forward(2) == 1.0
    assert RowCost(2, 0.2).forward(7) == pytest.approx(2.0)


def test_bad_draft_confidences_are_refused():
    loaded = random_loaded("causal", seed=3, block_size=1)
    with pytest.raises(ValueError, match=r"draft_confidence 1\.0 must lie in \[0, 1\)"):
        SpeculativeEngine(loaded, _random_head(loaded), draft_confidence=1.0)
    with pytest.raises(ValueError, match="draft head's drafts only"):
        SpeculativeEngine(loaded, _random_drafter(loaded), draft_confidence=0.3)


def test_bad_draft_lengths_are_refused():
    loaded = random_loaded("causal", seed=3, block_size=1)
    drafter = _random_drafter(loaded, n_slots=4)
    with pytest.raises(ValueError, match="draft_len"):
        SpeculativeEngine(loaded, drafter, draft_len=5)
    with SpeculativeEngine(loaded, drafter, draft_len=2, max_batch_size=2) as spec:
        with pytest.raises(InvalidRequestError, match="draft_len"):
            spec.submit([1, 2], GenerationParams(draft_len=9))
        with pytest.raises(InvalidRequestError, match="context"):
            spec.submit(list(range(1, 60)) * 5, GenerationParams(max_new_tokens=8))
        ok = spec.submit([1, 2], GenerationParams(max_new_tokens=5, draft_len=1))  # others unaffected
        assert len(_run(ok)[0]) == 5


def _constant_teacher(seed: int = 0, sharpness: float = 1.5):
    """A model whose next-token distribution is the same after any context: every token embeds to
    one vector (so the base's hidden state never depends on the text), and the mask slots (their
    own embeddings and the adapter) make the drafter's q differ from it. sharpness scales its
    logits (higher: fewer tokens take most of the mass)."""
    loaded = random_loaded("causal", seed=seed, block_size=1, scale=2.0, max_seq_len=512)
    with torch.no_grad():
        emb = loaded.model.model.embed_tokens.weight
        emb.copy_(emb[0].expand_as(emb))
        loaded.model.lm_head.weight.mul_(sharpness)
    return loaded


def _sampled_counts(decoder, vocab_size: int) -> torch.Tensor:
    """How often each token was generated: 3 waves of 8 rows of [1, 2, 3] sampled at temperature
    1 (50 new tokens each, fixed seeds), stepped until every row is done."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for wave in range(3):
        for slot in range(8):
            settings = DecodeSettings(block_size=1, sub_block_size=1, max_new_tokens=50, policy=POLICIES["threshold"],
                                      threshold=0.9, factor=1.0, steps_per_block=1, temperature=1.0, top_p=1.0,
                                      seed=1000 * wave + slot)
            decoder.add(slot, [1, 2, 3], settings)
        while decoder.rows:
            with torch.inference_mode():
                updates = decoder.step()
            for u in updates:
                for t in u.new_ids:
                    counts[t] += 1
                if u.finish_reason is not None:
                    decoder.remove(u.slot)
    return counts


def _every_draft_kept(out: list[tuple[int, list[int]]], drafts) -> list[tuple[int, list[int]]]:
    """A broken acceptance rule, on purpose: `_verify`'s result with every draft kept."""
    return [(len(d.tokens), [*d.tokens, tokens[-1]]) for (_, tokens), d in zip(out, drafts, strict=True)]


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of counts against p (tokens expected fewer than 5 times pooled into one
    cell) and about its 0.1 % critical value (Wilson-Hilferty, rounded up)."""
    n = counts.sum()
    expected = n * p
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rest_o, rest_e = counts[~keep].sum(), expected[~keep].sum()
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
    dof = int(keep.sum()) + (1 if rest_e > 0 else 0) - 1
    return float(stat), dof + 3.09 * math.sqrt(2 * dof) + 2


@pytest.mark.parametrize("kind", ["slots", "head"])
def test_speculative_sampling_keeps_the_teacher_distribution(kind):
    """At temperature 1 every generated token of the constant teacher is an independent draw from
    its distribution p, whatever the drafts were: a chi-square goodness-of-fit test over 1200
    tokens (fixed seeds) at the 0.1 % level. The same test rejects a rule that accepts every
    draft (the drafter's q shows through). The draft head drafts from half the vocabulary only
    (q is zero on the rest, which p still reaches through the corrections)."""
    loaded = _constant_teacher()
    if kind == "head":
        drafter = _random_head(loaded, n_slots=4, seed=1, scale=1.0, vocab=loaded.config.vocab_size // 2)
    else:
        drafter = _random_drafter(loaded, n_slots=4, seed=1, scale=1.0)
    base = HeadSpeculativeDecoder if kind == "head" else SpeculativeDecoder
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], causal_mask(3))[0]
        assert torch.allclose(logits[0], logits[2], atol=1e-4)  # the same after any context
        p = logits[-1].softmax(-1).double()

    def sample(decoder_cls) -> torch.Tensor:
        decoder = decoder_cls(loaded.model, loaded.spec, drafter, draft_len=4, max_batch_size=8, max_seq_len=512)
        return _sampled_counts(decoder, p.shape[0])

    class AcceptAll(base):
        def _verify(self, rows, verify, drafts):  # broken on purpose: every draft is kept
            return _every_draft_kept(super()._verify(rows, verify, drafts), drafts)

    good, critical = _chi2(sample(base), p)
    assert good < critical, (good, critical)
    bad, _ = _chi2(sample(AcceptAll), p)
    assert bad > critical, (bad, critical)


def test_sampled_rows_copy_drafts_from_their_text_and_keep_the_teacher_distribution():
    """Prompt lookup for sampled rows: a copied draft c is a draw from a point mass, accepted with
    the teacher's p(c). The constant teacher's tokens are independent draws from p, and a copy is
    fixed by the text before it, so wherever a copy is verified the token that becomes final
    equals it with probability p(c): the sum of 1[token = c] - p(c) over the verified copies has
    mean 0 and variance the sum of p(c)(1 - p(c)) (a martingale; 3.29 standard deviations: the
    0.1 % level). The tokens' frequencies pass the chi-square test too. (Frequencies alone could not
    tell a rule that keeps every copy: in an i.i.d. text what followed a run is itself a draw from
    p.) Two broken rules fail the first test: every copy kept, and copies verified against a flat
    q instead of their point mass (z above 40 with these seeds; a correction drawn from p itself
    instead of p without the copy fails it too: checked by hand)."""
    loaded = _constant_teacher(sharpness=2.25)  # repeated runs, so copies, are common
    head = _random_head(loaded, n_slots=4, seed=1, scale=0.0)  # sure of nothing: every draft is a copy
    p = _constant_p(loaded)

    class KeepsEvery(HeadSpeculativeDecoder):
        def _verify(self, rows, verify, drafts):  # broken on purpose: every copy is kept
            return _every_draft_kept(super()._verify(rows, verify, drafts), drafts)

    class AcceptAll(_Recording, KeepsEvery):  # records what KeepsEvery keeps
        pass

    class Flat(_Recording):
        def _point_masses(self, tokens):  # broken on purpose: the copies' q is not where they are
            return torch.full((len(tokens), self.model.config.vocab_size), 1.0 / self.model.config.vocab_size)

    def sample(decoder_cls) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        return _recorded_sample(decoder_cls, loaded, head, p, prompt_lookup=4)

    counts, checked = sample(_Recording)
    assert len(checked) > 300, len(checked)  # copies were verified, often
    assert abs(_z(checked, p)) < 3.29, _z(checked, p)
    stat, critical = _chi2(counts, p)
    assert stat < critical, (stat, critical)
    for broken in (AcceptAll, Flat):
        assert _z(sample(broken)[1], p) > 3.29, broken.__name__


def test_a_causal_heads_sampled_rows_keep_the_teacher_distribution():
    """A causal head's sampled rows verify its top drafts as point masses, as copies are verified:
    wherever one is verified the final token equals it with probability p(c) (the copies' test's
    martingale), and the tokens' frequencies pass the chi-square test. The same drafts verified
    against the head's own distribution, as a parallel head's sampled drafts are (broken on
    purpose: these drafts are its top tokens, not draws from it), fail the first."""
    loaded = _constant_teacher(sharpness=2.25)
    p = _constant_p(loaded)
    head = _random_head(loaded, n_slots=4, scale=0.0, causal=True)  # every score 0: its first token, the teacher's likeliest
    head.vocab.copy_(p.argsort(descending=True))

    class HeadsQ(_Recording):
        def _point_masses(self, tokens):  # broken on purpose: q where the drafts were not drawn from
            return self.q.pop(0)

        def _propose(self, rows, scores, best):
            full = torch.zeros(*scores.shape[:2], self.model.config.vocab_size)
            full[..., self.head.vocab] = scores.softmax(-1)
            self.q = list(full)
            return super()._propose(rows, scores, best)

    counts, checked = _recorded_sample(_Recording, loaded, head, p, prompt_lookup=0, draft_confidence=0.0)
    assert len(checked) > 300 and sum(c == t for c, t in checked) > 100, len(checked)  # often right, often not
    assert abs(_z(checked, p)) < 3.29, _z(checked, p)
    stat, critical = _chi2(counts, p)
    assert stat < critical, (stat, critical)
    assert abs(_z(_recorded_sample(HeadsQ, loaded, head, p, prompt_lookup=0, draft_confidence=0.0)[1], p)) > 3.29


def _constant_p(loaded) -> torch.Tensor:
    """The constant teacher's next-token distribution (float64)."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], causal_mask(3))[0]
    return logits[-1].softmax(-1).double()


class _Recording(HeadSpeculativeDecoder):
    """Records (draft, the token that became final at its place) for every verified draft."""

    def _verify(self, rows, verify, drafts):
        out = super()._verify(rows, verify, drafts)
        for (j, tokens), d in zip(out, drafts, strict=True):
            self.checked += [(c, tokens[i]) for i, c in enumerate(d.tokens[: j + 1])]
        return out


def _recorded_sample(decoder_cls, loaded, head, p, **kwargs) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`_sampled_counts` with a recording decoder: (token counts, verified (draft, final token))."""
    decoder = decoder_cls(loaded.model, loaded.spec, head, draft_len=4, max_batch_size=8, max_seq_len=512, **kwargs)
    decoder.checked = []
    return _sampled_counts(decoder, p.shape[0]), decoder.checked


def _z(checked: list[tuple[int, int]], p: torch.Tensor) -> float:
    """(hits - sum of p(c)) / its standard deviation over the verified drafts c: about N(0, 1)
    where each is final with probability p(c)."""
    q = p[torch.tensor([c for c, _ in checked])]
    hits = sum(c == token for c, token in checked)
    return float((hits - q.sum()) / (q * (1 - q)).sum().sqrt())


@pytest.mark.skipif(not can_pack_linears(torch.bfloat16, "cpu"), reason="no oneDNN bf16 on this CPU")
def test_bf16_packed_model_is_exact_whatever_the_batch_holds():
    """In bf16 the last bits of a matmul or an attention depend on the call's shapes; the packed
    weights (PACKED_ROWS rows per call) and float64 attention at text positions make a position's
    result independent of them, so draft-and-verify still writes the AR engine's replies, alone
    or batched, and the AR engine's own replies do not depend on its batch either."""
    # SmolLM2's widths: at tiny widths the kernels happen to give the same bits anyway (without
    # the packed rows and float64 attention, the AR engine's batched replies differ here).
    loaded = random_loaded("causal", seed=3, eos=[1], block_size=1, dim=576, n_heads=9, n_kv_heads=3,
                           intermediate_size=1536)
    loaded.model.to(torch.bfloat16)
    assert loaded.model.pack_linears()
    drafter = _random_drafter(loaded)
    params = GenerationParams(max_new_tokens=24)
    prompts = [p * 9 for p in PROMPTS]  # longer prompts: prefills of more than PACKED_ROWS rows
    with AREngine(loaded, max_batch_size=4) as ar, SpeculativeEngine(loaded, drafter, draft_len=4, max_batch_size=4) as spec:
        expected = [_run(ar.submit(p, params))[0] for p in prompts]
        ar_together = [_run(h)[0] for h in [ar.submit(p, params) for p in prompts]]
        together = [_run(h)[0] for h in [spec.submit(p, params) for p in prompts]]
    assert ar_together == expected
    assert together == expected


# -- self-speculation: a block-diffusion model drafting for itself -----------------------------------

@pytest.mark.parametrize("draft_len,tree", [(2, True), (4, False)])
def test_a_block_diffusion_model_drafting_for_itself_writes_its_ar_replies(draft_len, tree):
    """No drafter: the model's own mask-token blocks are the drafts, its causal forward the
    verifier; the replies are its AR (one token per step) replies, alone and batched."""
    loaded = random_loaded("block_causal", seed=5, eos=[1], scale=3.0, block_size=4)
    expected, alone, together = ar_alone_together(loaded, None, PROMPTS, GenerationParams(max_new_tokens=20),
                                                  draft_len=draft_len, tree=tree)
    assert alone == expected
    assert together == expected
    assert any(len(ids) > 3 for ids in expected)


def test_self_drafts_that_are_right_give_draft_len_plus_one_tokens_per_forward():
    """A model that writes token 0 whatever it sees (its final norm zeroed: flat logits) drafts
    right every time: after the first forward (no drafts yet), draft_len + 1 tokens each."""
    loaded = random_loaded("block_causal", seed=6, eos=[1], block_size=4)
    with torch.no_grad():
        loaded.model.model.norm.weight.zero_()
    params = GenerationParams(max_new_tokens=2 + 5 * 4)
    with AREngine(loaded, max_batch_size=1) as ar, SpeculativeEngine(loaded, None, draft_len=3, max_batch_size=1) as spec:
        want, _, _ = _run(ar.submit([5, 6], params))
        got, steps, finish = _run(spec.submit([5, 6], params))
    assert got == want == [0] * params.max_new_tokens and finish == "length"
    assert steps == 2 + 5


@pytest.mark.parametrize("attention,logit_shift,why", [("causal", True, "no mask token"),
                                                      ("block_causal", False, "not causal at block size 1"),
                                                      ("full", True, "not causal at block size 1")])
def test_models_that_cannot_draft_for_themselves_are_refused_with_the_reason(attention, logit_shift, why):
    from dlm.engines import decoding, make_engine

    loaded = random_loaded(attention, seed=1, logit_shift=logit_shift, block_size=1 if attention == "causal" else 4)
    if attention == "causal":
        loaded.spec.mask_token_id = None
    with pytest.raises(ValueError, match=why):
        SpeculativeEngine(loaded, None)
    with pytest.raises(ValueError, match=why):
        decoding(loaded, "speculative")
    with pytest.raises(ValueError, match=why):
        make_engine(loaded, "speculative")


def test_engine_kind_speculative_picks_the_drafter_or_the_model_itself():
    from dlm.engines import decoding, make_engine

    bd = random_loaded("block_causal", seed=2, block_size=4)
    assert decoding(bd, "speculative") == "self-speculative" and decoding(bd) == "block diffusion"
    with make_engine(bd, "speculative", max_batch_size=1, draft_len=2) as engine:
        assert isinstance(engine, SpeculativeEngine) and engine.drafter is None and engine.draft_len == 2
        with pytest.raises(InvalidRequestError, match=r"draft_len 5 must lie in \[0, 4\]"):
            engine.submit([3], GenerationParams(max_new_tokens=4, draft_len=5))
    causal = random_loaded("causal", seed=3, eos=[1], scale=3.0, block_size=1)
    causal.drafter = _random_drafter(causal)
    assert decoding(causal, "speculative") == decoding(causal) == "draft-and-verify"


def test_lossy_acceptance_takes_more_drafts_per_forward_and_leaves_sampled_rows_exact():
    """accept < 1 (opt-in): a greedy row also accepts drafts within that share of the top token's
    probability: fewer forwards for other replies; accept 1 is exact; sampled rows ignore it."""
    loaded = random_loaded("causal", seed=3, scale=1.0, block_size=1)
    head = _random_head(loaded, n_slots=4, seed=2)
    prompts = PROMPTS[:4]
    runs = {}
    # Every draft verified (a random head is unsure of its drafts: the default bar would drop them).
    with SpeculativeEngine(loaded, head, draft_len=4, max_batch_size=4, draft_confidence=0.0) as spec:
        for accept in (1.0, 0.5, 1e-6):
            params = GenerationParams(max_new_tokens=24, accept=accept)
            runs[accept] = [_run(spec.submit(p, params)) for p in prompts]
        with pytest.raises(InvalidRequestError, match="accept"):
            spec.submit(prompts[0], GenerationParams(accept=0.0))
        with pytest.raises(InvalidRequestError, match="accept"):
            spec.submit(prompts[0], GenerationParams(accept=1.5))
    sampled = []
    for accept in (1.0, 0.5):  # a fresh engine each: the same seed, the same state
        with SpeculativeEngine(loaded, head, draft_len=4, max_batch_size=4, draft_confidence=0.0) as spec:
            params = GenerationParams(max_new_tokens=24, temperature=0.8, seed=5, accept=accept)
            sampled.append(_run(spec.submit(prompts[0], params))[0])
    expected, _, _ = ar_alone_together(loaded, head, prompts, GenerationParams(max_new_tokens=24), draft_len=4)
    assert [r[0] for r in runs[1.0]] == expected  # exact
    steps = {a: sum(r[1] for r in rs) for a, rs in runs.items()}
    tokens = {a: sum(len(r[0]) for r in rs) for a, rs in runs.items()}
    assert tokens[1e-6] / steps[1e-6] > tokens[0.5] / steps[0.5] >= tokens[1.0] / steps[1.0]
    # Accepting nearly any draft: almost every forward takes all 4 drafts and the model's own token.
    assert tokens[1e-6] / steps[1e-6] > 3.0
    assert [r[0] for r in runs[1e-6]] != expected  # lossy: other replies
    assert sampled[0] == sampled[1]  # speculative sampling stays exact whatever accept says
