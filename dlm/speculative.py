"""Exact draft-and-verify decoding: an AR model with a learned drafter (mask slots, dlm/drafter.py,
or a draft head, dlm/draft_head.py), or a block-diffusion model drafting for itself.

Contract: `SpeculativeEngine(loaded, drafter, draft_len=None, tree=True, ...)` behaves like
`dlm.ar.AREngine` (submit, abort, abort_owner, load, close, Delta streams, prefix reuse, stop
strings, fair admission) and produces the same tokens: at temperature 0 every reply is the AR
model's greedy reply, token for token (unless a request opts into lossy acceptance, `accept` < 1:
below, "Decided"); at temperature > 0 the speculative-sampling acceptance rule
keeps the AR model's (top-p) sampling distribution. What changes is how many tokens one forward
pass yields. `SpeculativeDecoder` (mask slots) and `HeadSpeculativeDecoder` (a draft head) are its
step, without threads (`dlm.ar.ARDecoder`s, whose prefill, prefix reuse and row bookkeeping they
keep); both verify alike (below, "Decided").

Self-speculation (`drafter=None`; S2D2, arXiv 2603.25702): a block-diffusion model with a logit
shift and block-causal attention (this project's bd format, Fast-dLLM v2) is at block size 1 an AR
model, so the same weights verify their own drafts: the mask slots below are the model's own mask
token, a draft block attends its whole self (as the model denoises a block), and the verifier's
positions run causally. Training-free, and exact with respect to the model's one-token-per-step
decoding (`dlm.ar.AREngine` on its weights). `self_drafting_reason(spec)` says why a model cannot
(SDAR and LLaDA predict a position from itself, not from the one before; Dream attends in full).

One step of a row with mask slots (I-DLM / Medusa-style, in one forward over the whole batch):
- State: the final text up to position c - 1; the K/V of positions < c - 1 are in the cache (the
  last final token x at c - 1 is not yet fed); drafts d_1..d_k for positions c..c+k-1 (k = 0
  after the prefill, whose logits give the first token at once, in the prefill's step, as in AR).
- Fed: x, d_1..d_k at their positions, causally (the verifier: unchanged base weights, exact
  K/V), then draft blocks of n mask slots (n = the draft length): the block for acceptance j
  sits at positions c+j..c+j+n-1 and sees x, d_1..d_j and its own earlier slots (`tree`: one
  block for every j in 0..k; otherwise only j = k, and a rejection leaves the next step without
  drafts). Blocks write their K/V at spare positions past the row's text (`write_positions`),
  so they never touch the verified cache.
- Decided: greedy rows accept the longest prefix of drafts equal to the base's argmax, then take
  the base's own next token (the correction, or a bonus where all k were accepted): j + 1 tokens
  final at once. (Lossy, opt-in: with `GenerationParams.accept` a < 1 a greedy row accepts the
  longest prefix of drafts whose base probability is at least a times the top token's; the
  replies are then no longer the AR model's.) Sampled rows accept d_i with probability
  min(1, p(d_i) / q(d_i)) and, on a rejection, sample the correction from max(p - q, 0)
  normalised (Leviathan et al. 2023), which leaves the output distributed as the base's. The
  block of the accepted j gives the next drafts (argmax, or samples from its distribution q).
- A row yields between 1 and n + 1 tokens per forward: 1 with a drafter that is always wrong, n + 1
  with an oracle. The cache stays exact: positions < c + j hold the verified K/V, everything past
  them is overwritten before it is ever attended.
With a draft head the forward holds only x, d_1..d_k (1 + k positions): the hidden states of the
accepted positions, each paired with the token it made final, extend the row's window, and the
head drafts the next n tokens from it after the forward, knowing the token just decided (see
`HeadSpeculativeDecoder`); a row keeps only the leading drafts the head is sure enough of
(`draft_confidence`: each kept draft is a row of the next forward), which changes how many
tokens a forward may yield, never which; and a forward verifies, of its greedy rows' drafts, the
surest ones that pay for their positions at the machine's price of a position where it holds
more than one row (`RowCost`: in a batch of many rows on a CPU, few; a row alone keeps what its
bar kept; `HeadSpeculativeDecoder._within_budget`). Where the row's own text offers more (prompt
lookup, as
Saxena's prompt lookup decoding and vLLM's n-gram drafter: the last 2-4 final tokens occurred
before, in the prompt or the reply, and what followed them there is taken as the drafts, up to
`prompt_lookup` of them), a row verifies that continuation instead of shorter head drafts: a
spoken reply often repeats the caller's words or its own. A sampled row's copy is a draft from a
point mass (q = 1 at the token copied), which the acceptance rule above takes as any other.
With `draft_branches` k > 1 a greedy row's head drafts are a tree (EAGLE-2's, from each place's k
top tokens, the surest paths first: `draft_tree`): each node a position of the forward that sees
the row's text and its ancestors only, its K/V written, on the block kernel, in the 16-lane
position of its place in the text (`tree_writes`: the kernel's sums, and the logits, are then the
AR step's bit for bit; on the torch layers to within float rounding, as a chain's); the
verifier's argmax walks down it as far as a child carries it (`_walk`), and the accepted nodes'
K/V move to their places. More tokens a forward for more rows: on a CPU without AMX the rows cost
more than the tokens bring (docs/models.md, "A tree of drafts"), so the default is one chain.
Rows accept different numbers of tokens and leave or join between steps (continuous batching);
padding rows and slots use the cache's scratch row and position. The forward is eager
(`compile_mode` is not supported here).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.ar import ARDecoder, AREngine
from dlm.blocks import AMX_BF16, AMX_SPLIT, VNNI_INT8, VNNI_INT16, row_argmax, row_top
from dlm.config import DiffusionSpec
from dlm.constraints import mask_logits
from dlm.decode import BlockDecoder, DecodeSettings, RowUpdate, _batch_bucket, _bucket, _Entry, _Row
from dlm.draft_head import DraftHead
from dlm.drafter import Drafter
from dlm.engine import GenerationParams
from dlm.errors import InvalidRequestError
from dlm.masks import limit_mask
from dlm.model import DraftInputs, Transformer
from dlm.policies import sampling_probs

__all__ = ["DEFAULT_DRAFT_LEN", "DEFAULT_HEAD_DRAFT_CONFIDENCE", "DEFAULT_HEAD_DRAFT_LEN", "DEFAULT_PROMPT_LOOKUP",
           "DEFAULT_SELF_DRAFT_LEN", "LOOKUP_NGRAM", "LOOKUP_SURE", "MAX_DRAFT_BRANCHES", "TREE_MAX_NODES",
           "DraftAcceptance", "HeadSpeculativeDecoder", "RowCost",
           "SpeculativeDecoder", "SpeculativeEngine", "draft_tree", "row_cost_of", "self_drafting_reason", "tree_writes"]

# One mask slot per draft block: the fastest length for the mask-slot drafter on a 2-core CPU
# (each slot row costs a share of an AR step, and its later slots are rarely accepted:
# docs/benchmarks.md, session 16). A draft head's drafts cost one row each in the verifying forward
# and nothing more (a tenth of a step with AMX, a sixth without): all six of the shipped head's
# slots, cut where the head's chain confidence falls below 0.15 (session 27, the README's 24
# held-out prompts: 2.37 tokens per forward with 2.71 drafts verified a forward, against 2.32 with
# 3.99 at a fixed 4; fewer forwards and fewer rows at once; docs/benchmarks.md, "Session 27").
# `voice-agent calibrate` measures both on the machine at hand.
DEFAULT_DRAFT_LEN = 1
DEFAULT_HEAD_DRAFT_LEN = 6
DEFAULT_HEAD_DRAFT_CONFIDENCE = 0.15
DEFAULT_SELF_DRAFT_LEN = 4  # a block-diffusion model's own drafts (at most its block size)
# Prompt lookup beside a draft head: at most 4 drafts copied from the row's own text where its
# last 2 to 4 tokens occurred before (session 31, the shipped head on blocks-int16: tokens per
# forward 1.64 -> 1.81 on bench llm's 8 spoken prompts, 2.00 -> 2.29 on 24 held-out requests the
# teacher wrote itself, 2.65 -> 2.71 on the README's 24 template prompts. Of the lengths 3-6, 3
# and 4 cost least for their tokens with this CPU's rows (within 2 %: 3 verifies fewer rows, 4
# makes more tokens a forward, which pays more where rows are cheaper); docs/models.md, "Prompt
# lookup". `voice-agent calibrate` measures it against none on the machine at hand.
DEFAULT_PROMPT_LOOKUP = 4
LOOKUP_NGRAM = (2, 4)  # the shortest and longest run of final tokens that prompt lookup matches
# How often a copied draft is accepted after the ones before it (session 33: the shipped head,
# blocks-int16, bench llm's 8 spoken prompts and 24 self-written held-out requests, 105 rows
# verifying 4 copies: the first accepted 0.67 of the time, the first two 0.45, three 0.33, four
# 0.23): a copy's chain confidence is LOOKUP_SURE ** its place (`_within_budget`). `voice-agent
# bench llm` prints the shares measured beside the model (`DraftAcceptance`).
LOOKUP_SURE = 0.7
# Where the head is at least this sure of its top token for the next position and a copy starts
# with another one, the head's drafts are verified instead of the copy (`_draft`). Session 37, the
# shipped head on blocks-int16, copies that disagreed with the head's top token on 64 self-written
# held-out requests: with the head 0.6-1 sure the copy's drafts were accepted 0.63 a forward and
# the head's first draft was right in half of them at least, with it less sure 1.6-1.75 (the
# copy's) against 0.1 (the head's). Tokens per forward, a throwaway count (no timing): 8 spoken
# prompts 1.804 -> 1.854, 64 self-written 2.209 -> 2.216, 64 CLINC150 2.649 -> 2.667, 64 template
# 2.854 -> 2.851, each with fewer drafts verified a forward.
LOOKUP_HEAD_SURE = 0.6
# Under a budget, a greedy row whose drafts did not pay skips the head's pass for IDLE_PROBE
# forwards, then tries again; each try that does not pay doubles the wait, up to IDLE_PROBE_MAX
# (`HeadSpeculativeDecoder._draft`; session 33, 8 calls at once on the EPYC, a throwaway script,
# one engine alive at a time, fastest of four rounds: a fixed wait of 4 / 8 / 16 forwards 3.01 /
# 2.90 / 2.79 s against the AR engine's 2.66: in such batches drafts rarely pay on that CPU).
IDLE_PROBE = 4
IDLE_PROBE_MAX = 64
# A tree of a draft head's drafts (`draft_branches` > 1, `draft_tree`): at most this many nodes
# a row. Where rows cost next to nothing (a GPU), wider trees make more tokens a forward; on a CPU
# each node is a row of the verifying forward (docs/models.md, "A tree of drafts").
TREE_MAX_NODES = 12
MAX_DRAFT_BRANCHES = 8  # the most top tokens a place that a tree may branch into (`llm.draft_branches`)
# The block kernel's softmax sums a row's keys in 16 lanes by their cache position (dlm/blocks.c,
# `softmax_weights`; its weighted values in position order): there a tree's node is written where
# its key falls in the lane its place in the text gives it, after its parent, so that the
# verifier's sums, and bits, are the AR step's. (The torch layers' attention, on a CPU or a GPU,
# reduces keys in blocks of its own: there the nodes lie side by side, and a node's logits are
# the AR step's to within float rounding, as a chain's positions there are; `tree_writes`.)
TREE_LANES = 16
# What a draft head's pass costs a row, as a share of what a verified position costs (session 33,
# the AMD EPYC on 16-bit integer products: 0.15 + 0.44 ms a row for 1-8 rows against about 1.2 ms
# a position; `RowCost.head`).
HEAD_ROW_SHARE = 0.37


@dataclass(frozen=True)
class RowCost:
    """What a verifying forward costs by its positions on a machine, in forwards of one position:
    up to `free` positions cost one (the weights are read once whatever the rows: bound by
    memory), each one more costs `each` (bound by arithmetic). `row_cost_of(model)` gives the
    measured figures of the model's arithmetic (`llm.row_cost` sets `each` by hand)."""

    free: int
    each: float

    def __post_init__(self) -> None:
        if self.free < 1 or not 0.0 <= self.each <= 16.0:
            raise ValueError(f"a row cost needs free >= 1 positions and each in [0, 16], not {self.free}, {self.each}")

    def forward(self, positions: int) -> float:
        return 1.0 + self.each * max(0, positions - self.free)

    def head(self) -> float:
        """A draft head's pass for one more row (two layers on 10 positions without a long
        context: 0.44 ms a row on the EPYC against 1.2 ms a verified position, HEAD_ROW_SHARE)."""
        return HEAD_ROW_SHARE * self.each


def row_cost_of(model: Transformer) -> RowCost | None:
    """The cost of a verifying forward's positions with `model`'s arithmetic, as measured on a
    2-core CPU (docs/benchmarks.md), a forward's other costs (the draft head's pass, the step's
    torch calls) counted in its unit; None on a GPU, whose rows cost next to nothing at these
    batches (every draft a row keeps is verified)."""
    if model.device.type != "cpu":
        return None
    products = model.block_products()
    if products is not None:
        if products in (VNNI_INT8, VNNI_INT16):
            # AMD EPYC without AMX, session 33 (one row, 160 positions of context, logits at every
            # position): 1 position 4.7 ms, 2: 4.4, 3: 5.1, 4: 6.4, 5: 7.5, 7: 10.1; 8 rows of one
            # 13.3; with the head's pass and the step's torch calls a forward of 1-2 costs ~6 ms.
            return RowCost(2, 0.2)
        if products in (AMX_BF16, AMX_SPLIT):
            return RowCost(1, 0.1)  # the Xeon with AMX, sessions 19-21: 16 positions 2.4-2.7 steps
        return RowCost(1, 0.3)  # float32 products, session 22: 16 positions 5.2-5.8 steps
    return RowCost(1, 0.06)  # dense weights (memory-bound up to many rows), session 22: 16 positions 1.9 steps


def self_drafting_reason(spec: DiffusionSpec) -> str | None:
    """None where a model can draft for itself (see the module docstring), else why not."""
    if spec.mask_token_id is None:
        return "it has no mask token (an AR model needs a drafter)"
    if spec.attention != "block_causal" or not spec.logit_shift:
        return (f"its {spec.family} decoding is not causal at block size 1 (self-speculation needs block-causal "
                "attention and a logit shift: this project's bd format, Fast-dLLM v2)")
    return None


@dataclass
class _Drafts:
    tokens: list[int]  # drafts for the positions final_upto, final_upto + 1, ... (a chain), or a tree's nodes
    probs: Tensor | None  # (k, V): the distribution each was sampled from (sampled rows only)
    # Each draft's chance that it and every draft before it are accepted, as the drafter sees it
    # (a draft head's chain confidence; None: not known, as for mask slots): `_within_budget`.
    sure: list[float] | None = None
    copied: bool = False  # prompt lookup's copies of the row's own text, not the head's drafts
    # A tree of drafts (`draft_tree`; greedy exact rows only): each node's parent, -1 for the row's
    # last final token, else an earlier node; None: a chain (node i follows node i - 1). Nodes come
    # surest first, each after its parent, so that any leading part of them is a tree. `writes`:
    # where the verifying forward writes each node's K/V (`tree_writes`, for the row's text as it
    # stands when the tree is drafted; a leading part of the nodes keeps its part of them).
    parents: list[int] | None = None
    writes: list[int] | None = None

    def first(self, k: int) -> _Drafts:
        """The first k drafts (a tree's k surest nodes: still a tree)."""
        return _Drafts(self.tokens[:k], None if self.probs is None else self.probs[:k],
                       None if self.sure is None else self.sure[:k], self.copied,
                       None if self.parents is None else self.parents[:k],
                       None if self.writes is None else self.writes[:k])

    def path(self, accepted: list[int]) -> list[int]:
        """The drafts that the accepted tokens (the first j of a verification's) were: node
        indices, one per token (siblings never share a token, so the tokens name the path)."""
        if self.parents is None:
            return list(range(len(accepted)))
        out: list[int] = []
        for token in accepted:
            parent = out[-1] if out else -1
            out.append(next(i for i, (t, p) in enumerate(zip(self.tokens, self.parents, strict=True))
                            if p == parent and t == token))
        return out

    def depths(self) -> list[int]:
        """Each draft's place after the row's last final token: 1, 2, ... (a chain's i + 1)."""
        if self.parents is None:
            return list(range(1, len(self.tokens) + 1))
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out


def tree_writes(start: int, parents: list[int], depths: list[int], lanes: int = TREE_LANES) -> list[int]:
    """Cache positions for a tree's nodes (parents, depths: `_Drafts`), the row's last final token
    at start - 1: each at the first position from its place in the text (start - 1 + depth) on, a
    multiple of `lanes` further, that no other node took and that lies past its parent's (lanes 1:
    the nodes side by side, for the torch layers). A chain's drafts get their own places; any
    leading part of the nodes gets what it gets here."""
    used: set[int] = set()
    out: list[int] = []
    for parent, depth in zip(parents, depths, strict=True):
        at = start - 1 + depth
        floor = out[parent] + 1 if parent >= 0 else start
        while at < floor or at in used:
            at += lanes
        used.add(at)
        out.append(at)
    return out


def draft_tree(tops: list[list[tuple[int, float]]], bar: float, most: int) -> tuple[list[int], list[int], list[float]]:
    """A tree of drafts from a drafter's top tokens for each place after the row's last final token
    (tops[d]: (token, probability) pairs for place d + 1, its surest first): (tokens, parents,
    confidences) of at most `most` nodes, the surest first. A node's confidence is the product of
    its own and its ancestors' probabilities (the chance that the path to it is right, where the
    places are independent, as the draft head's slots take them: EAGLE-2's ranking); only nodes at
    least `bar` sure are kept, each after its parent (ties keep the order they were found in), so
    any leading part of the result is a tree. One token per place is a chain: the confident drafts
    `_confident_len` keeps."""
    heap: list[tuple[float, int, int, int, int]] = []  # (-confidence, order found, token, parent, place)
    found = itertools.count()
    if tops:
        for token, p in tops[0]:
            if p >= bar:
                heapq.heappush(heap, (-p, next(found), token, -1, 0))
    tokens: list[int] = []
    parents: list[int] = []
    sure: list[float] = []
    while heap and len(tokens) < most:
        minus, _, token, parent, place = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(token)
        parents.append(parent)
        sure.append(-minus)
        if place + 1 < len(tops):
            for child, p in tops[place + 1]:
                if -minus * p >= bar:
                    heapq.heappush(heap, (minus * p, next(found), child, node, place + 1))
    return tokens, parents, sure


class DraftAcceptance:
    """How often a draft head's greedy exact rows had their drafts accepted, as counts: the head's
    drafts by their chain confidence (tenths: 0.0-0.1 .. 0.9-1.0; a tree's nodes among them, by
    their path's confidence) and prompt lookup's copies by their place (1..). A draft counts as
    accepted where it and every draft before it (a node: its ancestors) were the verifier's
    tokens, which is what the chain confidence claims to be the chance of, and what
    LOOKUP_SURE ** place models for copies: each bucket's accepted share is a check of the
    confidence (EAGLE-2's calibration) and of LOOKUP_SURE on the machine's model and prompts.
    Only the decoder's thread counts; `snapshot()` may be read from any thread."""

    BUCKETS = 10

    def __init__(self) -> None:
        self.head = [[0, 0] for _ in range(self.BUCKETS)]  # per tenth of chain confidence: [verified, accepted]
        self.copies: list[list[int]] = []  # per place: [verified, accepted]

    def count(self, drafts: _Drafts, path: list[int]) -> None:
        """A row's verified drafts, of which those at the indices `path` were accepted (a chain's
        first j, a tree's nodes down to the last accepted: `_Drafts.path`)."""
        on = set(path)
        if drafts.copied:
            while len(self.copies) < len(drafts.tokens):
                self.copies.append([0, 0])
            for i in range(len(drafts.tokens)):
                self.copies[i][0] += 1
                self.copies[i][1] += i in on
        elif drafts.sure is not None:
            for i, s in enumerate(drafts.sure[: len(drafts.tokens)]):
                tenth = self.head[min(int(s * self.BUCKETS), self.BUCKETS - 1)]
                tenth[0] += 1
                tenth[1] += i in on

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """{"head": [{"confidence": [lo, hi], "verified", "accepted", "rate"}...] (buckets with
        drafts only), "copies": [{"place", "verified", "accepted", "rate", "modelled"}...]}."""
        head = [{"confidence": [t / self.BUCKETS, (t + 1) / self.BUCKETS], "verified": v, "accepted": a,
                 "rate": round(a / v, 4)} for t, (v, a) in enumerate([list(x) for x in self.head]) if v]
        copies = [{"place": i + 1, "verified": v, "accepted": a, "rate": round(a / v, 4),
                   "modelled": round(LOOKUP_SURE ** (i + 1), 4)}
                  for i, (v, a) in enumerate([list(x) for x in list(self.copies)]) if v]
        return {"head": head, "copies": copies}


@dataclass
class _Seen:
    """Prompt lookup's index of a row's final text: each token's positions, ascending, below upto."""
    at: dict[int, list[int]] = field(default_factory=dict)
    upto: int = 0


class _DraftVerifyDecoder(ARDecoder):
    """What both drafters' decoders share: each row's pending drafts and their verification."""

    def __init__(self, model: Transformer, spec: DiffusionSpec, n_slots: int, *, draft_len: int, max_batch_size: int,
                 max_seq_len: int, cache: str = "exact", compile_mode: str | None = None, **prefill: Any) -> None:
        if compile_mode is not None:
            raise ValueError("compile_mode is not supported by speculative decoding (its forward is eager)")
        if not 1 <= draft_len <= n_slots:
            raise ValueError(f"draft_len {draft_len} must lie in [1, {n_slots}] (the drafter's slots)")
        super().__init__(model, spec, max_batch_size=max_batch_size, max_seq_len=max_seq_len, cache=cache,
                         **prefill)
        self.draft_len = draft_len
        self.drafts: dict[int, _Drafts] = {}

    def _n(self, settings: DecodeSettings) -> int:
        return settings.draft_len or self.draft_len

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.drafts.pop(slot, None)

    def _trace_tokens(self, row: _Row) -> list[int]:
        drafts = self.drafts.get(row.slot)
        if drafts is None:
            return []
        if drafts.parents is None:
            return list(drafts.tokens)
        path, node = [], -1  # a tree: its surest path (each node's first child, the surest)
        while (node := next((i for i, p in enumerate(drafts.parents) if p == node), None)) is not None:
            path.append(drafts.tokens[node])
        return path

    def _keep_drafts(self, row: _Row, n: int, tokens: list[int] | None, dist: Tensor | None,
                     sure: list[float] | None = None, copied: bool = False) -> None:
        """A row's next drafts (None: none), at most n and none past its length limit; sure: their
        chain confidences (`_Drafts.sure`); copied: prompt lookup's (`_Drafts.copied`)."""
        room = max(0, row.gen_end - row.final_upto - 1)  # drafts past the length limit are useless
        count = min(n, room)
        if tokens is None or count == 0:
            self.drafts.pop(row.slot, None)
        else:
            self.drafts[row.slot] = _Drafts(tokens[:count], None if dist is None else dist[:count],
                                            None if sure is None else sure[:count], copied)

    def _settle(self, rows: list[_Row], verify: Tensor, drafts: list[_Drafts], new: dict[int, list[int]],
                updates: dict[int, RowUpdate]) -> list[tuple[int, _Row, int, list[int]]]:
        """After a verifying forward: each row's accepted drafts and the base's own token made
        final; finished rows get their update here. Returns (batch index, row, accepted drafts j,
        the tokens made final) of the rows that go on (their updates are the caller's, after it
        set their next drafts)."""
        going = []
        for b, (row, (j, tokens)) in enumerate(zip(rows, self._verify(rows, verify, drafts), strict=True)):
            self._accepted(row, drafts[b], tokens[:j])
            row.steps += 1
            c = row.final_upto
            finish = self._commit(row, tokens, new[row.slot])
            row.clean_upto = c + j  # x and the accepted drafts hold verified K/V now
            if finish is None:
                going.append((b, row, j, tokens))
            else:
                self.drafts.pop(row.slot, None)
                updates[row.slot] = self._update(row, new[row.slot], finish)
        return going

    def _accepted(self, row: _Row, drafts: _Drafts, accepted: list[int]) -> None:
        """A row's verified drafts, of which these tokens were accepted (`HeadSpeculativeDecoder`
        counts them, and moves a tree's accepted K/V to their places), before they are committed."""

    def _verify(self, rows: list[_Row], verify: Tensor, drafts: list[_Drafts]) -> list[tuple[int, list[int]]]:
        """Per row: (accepted drafts j, the tokens that become final: d_1..d_j and the base's own;
        a tree's path down it, `_walk`). A constrained row's verifier logits are masked position by position (the masks after
        each accepted prefix of its drafts): what it commits is what constrained AR would."""
        if any(row.settings.constraint is not None for row in rows):
            verify = verify.clone()
            for b, row in enumerate(rows):
                if row.settings.constraint is not None:
                    for j, mask in enumerate(row.settings.constraint.lookahead(drafts[b].tokens)):
                        verify[b, j] = mask_logits(verify[b, j], mask)
        best = row_argmax(verify).tolist()  # (n, Wv)
        out = []
        sampled = [b for b, row in enumerate(rows) if row.generator is not None]
        probs = None
        if sampled:
            temperature, top_p = self._params([rows[b] for b in sampled])
            probs = sampling_probs(verify[sampled], temperature, top_p)  # (s, Wv, V)
        for b, row in enumerate(rows):
            d = drafts[b].tokens
            if drafts[b].parents is not None:  # a tree (greedy exact rows only): follow the verifier's tokens down it
                out.append(self._walk(drafts[b], best[b]))
                continue
            if row.generator is None:
                j = 0
                if row.settings.accept < 1.0 and d:  # lossy: a draft close enough to the top token
                    p = torch.softmax(verify[b, : len(d)].float(), dim=-1)
                    near = (p[torch.arange(len(d)), torch.tensor(d, device=p.device)]
                            >= row.settings.accept * p.max(dim=-1).values).tolist()
                    while j < len(d) and near[j]:
                        j += 1
                else:
                    while j < len(d) and d[j] == best[b][j]:
                        j += 1
                out.append((j, [*d[:j], best[b][j]]))
                continue
            p = probs[sampled.index(b)]
            q = drafts[b].probs
            j, token = 0, None
            while j < len(d):
                u = torch.rand((), generator=row.generator, device=self.device)
                if u * q[j, d[j]] <= p[j, d[j]]:
                    j += 1
                    continue
                residual = (p[j] - q[j]).clamp_min(0)
                if float(residual.sum()) <= 0:  # q == p where it matters: any draw from p is right
                    residual = p[j]
                token = int(torch.multinomial(residual, 1, generator=row.generator))
                break
            if token is None:
                token = int(torch.multinomial(p[j], 1, generator=row.generator))
            out.append((j, [*d[:j], token]))
        return out

    @staticmethod
    def _walk(drafts: _Drafts, best: list[int]) -> tuple[int, list[int]]:
        """A tree's verification: from the row's last final token (forward position 0), the child
        whose token is the verifier's argmax at the node's position (its node index + 1), as long
        as there is one; then the verifier's own token. (accepted j, the tokens made final)."""
        tokens: list[int] = []
        at, node = 0, -1
        while True:
            want = best[at]
            child = next((i for i, (t, p) in enumerate(zip(drafts.tokens, drafts.parents, strict=True))
                          if p == node and t == want), None)
            if child is None:
                return len(tokens), [*tokens, want]
            tokens.append(want)
            node, at = child, child + 1


class SpeculativeDecoder(_DraftVerifyDecoder):
    """Drafts from mask slots inside the verifying forward: a drafter's (dlm/drafter.py), or the
    model's own (drafter None: self-speculation, see the module docstring)."""

    def __init__(self, model: Transformer, spec: DiffusionSpec, drafter: Drafter | None, *,
                 draft_len: int = DEFAULT_DRAFT_LEN, tree: bool = True, block_size: int = 0, **kwargs: Any) -> None:
        """spec: the model decoded as AR (`dlm.ar.ar_spec`: causal, logit shift); drafter None:
        the model drafts for itself in blocks of at most `block_size` mask slots (its checkpoint's:
        `self_drafting_reason` of that spec is the caller's check); draft_len: default mask slots
        per draft block (1..drafter.n_slots or block_size; a request may ask for fewer); tree: one
        draft block per possible acceptance length (see the module docstring). kwargs:
        ARDecoder's (batch and length limits, BlockDecoder's prefill knobs)."""
        if drafter is None and (spec.mask_token_id is None or block_size < 1):
            raise ValueError("self-drafting needs the model's mask token and its block size")
        super().__init__(model, spec, block_size if drafter is None else drafter.n_slots, draft_len=draft_len,
                         **kwargs)
        self.drafter = drafter
        self.tree = tree
        # A self-drafting block is the model's mask tokens, denoised together; a drafter's slots
        # are its own embeddings (DraftInputs), each seeing its block's earlier slots.
        self.slot_token = spec.mask_token_id if drafter is None else 0

    def required_len(self, prompt_len: int, settings: DecodeSettings) -> int:
        """The text, plus room past it for the drafts and the draft blocks' K/V."""
        n = self._n(settings)
        blocks = n + 1 if self.tree else 1
        return prompt_len + settings.max_new_tokens + n + blocks * n

    def _propose(self, rows: list[_Row], logits: Tensor, places: list[int]) -> tuple[list[list[int]], list[Tensor | None]]:
        """The next drafts from the accepted block's logits (n, m, V): tokens per row (a sampled
        row's first `places` of its own) and, for sampled rows, the distribution q they were drawn from."""
        return self._pick(rows, logits, places)

    def _forward_and_decide(self, rows: list[_Row], new: dict[int, list[int]], updates: dict[int, RowUpdate]) -> None:
        n = len(rows)
        B = _batch_bucket(n)
        S, scratch = self.S, self.kv.scratch_pos
        drafts = [self.drafts.get(row.slot, _Drafts([], None)) for row in rows]
        ks = [len(d.tokens) for d in drafts]
        ns = [self._n(row.settings) for row in rows]
        blocks = [list(range(k + 1)) if self.tree else [k] for k in ks]
        Wv = 1 + max(ks)
        Wm = max(len(b) * m for b, m in zip(blocks, ns, strict=True))
        T = Wv + Wm
        # Host plan, per batch row and column: token, RoPE position, cache position, key limit,
        # and an extra visible key range [lo, hi) (a slot's own block); slot index of mask slots.
        tok = [[0] * T for _ in range(B)]
        pos = [[scratch] * T for _ in range(B)]
        wpos = [[scratch] * T for _ in range(B)]
        lim = [[1] * T for _ in range(B)]
        lo = [[0] * T for _ in range(B)]
        hi = [[0] * T for _ in range(B)]
        slot_index = [[0] * Wm for _ in range(B)]
        key_end = 1
        for b, row in enumerate(rows):
            c, k, m = row.final_upto, ks[b], ns[b]
            for t, token in enumerate([row.ids[c - 1], *drafts[b].tokens]):  # the verifier: causal
                tok[b][t], pos[b][t], wpos[b][t], lim[b][t] = token, c - 1 + t, c - 1 + t, c + t
            for blk, j in enumerate(blocks[b]):
                spare = c + k + blk * m  # where this block's K/V go
                for i in range(m):
                    col = Wv + blk * m + i
                    tok[b][col], pos[b][col], wpos[b][col], lim[b][col] = self.slot_token, c + j + i, spare + i, c + j
                    lo[b][col], hi[b][col] = spare, spare + (m if self.drafter is None else i + 1)
                    slot_index[b][col - Wv] = i
            key_end = max(key_end, c + k + len(blocks[b]) * m)
        K = min(_bucket(key_end), S)
        slots = [row.slot for row in rows] + [self.kv.scratch_row] * (B - n)
        plan = self._upload(torch.tensor([tok, pos, wpos, lim, lo, hi], dtype=torch.long))  # (6, B, T)
        tok_t, pos_t, wpos_t, lim_t, lo_t, hi_t = plan
        keys = torch.arange(K, device=self.device)[None, None, :]
        mask = (keys < lim_t[..., None]) | ((keys >= lo_t[..., None]) & (keys < hi_t[..., None]))  # (B, T, K)
        rows_t = self._upload(torch.tensor(slots, dtype=torch.long))
        draft = None if self.drafter is None else \
            DraftInputs(self.drafter, Wv, self._upload(torch.tensor(slot_index, dtype=torch.long)))
        h = self.model(tok_t, pos_t, mask[:, None], cache=self.kv, cache_rows=rows_t, write_positions=wpos_t,
                       draft=draft, hidden=True, step=True)  # (B, T, dim)
        # One pass through the output head for the verifier's positions and every draft block
        # (a call costs about the same for 1 or 32 rows: it reads the whole head either way).
        logits = self.model.logits(h[:n], step=Wv)  # (n, T, V): the verifier's positions are steps
        verify = logits[:, :Wv]  # the base's next-token logits
        # The accepted block of each row that goes on gives its next drafts.
        going = []
        for b, row, j, _ in self._settle(rows, verify, drafts, new, updates):
            start = Wv + blocks[b].index(j) * ns[b] if j in blocks[b] else -1
            going.append((b, row, start))
        picked = [(b, row, start) for b, row, start in going if start >= 0]
        if picked:
            m = max(ns[b] for b, _, _ in picked)
            index = torch.tensor([[min(start + i, T - 1) for i in range(m)] for _, _, start in picked], device=self.device)
            lb = logits[torch.tensor([b for b, _, _ in picked], device=self.device)[:, None], index]  # (p, m, V)
            picks = self._propose([row for _, row, _ in picked], lb, [ns[b] for b, _, _ in picked])
        by_slot = {row.slot: i for i, (_, row, _) in enumerate(picked)}
        for b, row, _ in going:
            i = by_slot.get(row.slot)
            self._keep_drafts(row, ns[b], None if i is None else picks[0][i], None if i is None else picks[1][i])
            updates[row.slot] = self._update(row, new[row.slot], None)


class HeadSpeculativeDecoder(_DraftVerifyDecoder):
    """Drafts from a draft head (dlm/draft_head.py) after the verifying forward: a forward feeds
    each row's last final token and its drafts (1 + k positions, no mask slots); the verifier's
    final hidden states at the accepted positions, paired with the tokens they made final, join
    the row's context window, and the head denoises the next n drafts from it in one small pass
    (a causal head: place by place, each after the draft before it, `DraftHeadConfig.causal`),
    knowing the token just decided. The prefill keeps the hidden states of a row's last prompt
    positions, so the first drafts come with the first token."""

    def __init__(self, model: Transformer, spec: DiffusionSpec, head: DraftHead, *,
                 draft_len: int = DEFAULT_HEAD_DRAFT_LEN, tree: bool = True,
                 draft_confidence: float = DEFAULT_HEAD_DRAFT_CONFIDENCE,
                 prompt_lookup: int = DEFAULT_PROMPT_LOOKUP, row_cost: RowCost | None = None,
                 branches: int = 1, **kwargs: Any) -> None:
        """draft_len: default drafts per forward (1..head.n_slots); tree: ignored (the mask slots'
        layout of draft blocks; a head drafts after the acceptance is known, its tree is
        `branches`); draft_confidence: a row's drafts end
        before the first whose chain confidence (the product of the head's top probabilities up
        to it) is below this (0: always draft_len; see `_confident_len`); prompt_lookup: at most
        this many drafts (and at most the row's draft length) copied from the row's own text where
        that is longer (0: none; see `_look_up`); row_cost: what a verifying forward's positions
        cost on this machine, by which a forward verifies only the drafts that pay for their rows
        (None: every draft a row keeps; see `_within_budget`); branches: the head's top tokens a
        place that a greedy exact row's drafts branch into (1: one chain; more: a tree of at most
        TREE_MAX_NODES drafts, `draft_tree`, each at least draft_confidence sure). kwargs: ARDecoder's."""
        if not 0.0 <= draft_confidence < 1.0:
            raise ValueError(f"draft_confidence {draft_confidence!r} must lie in [0, 1)")
        if not isinstance(prompt_lookup, int) or prompt_lookup < 0:
            raise ValueError(f"prompt_lookup {prompt_lookup!r} must be an integer >= 0 (0: off; a row copies at "
                             "most its draft length)")
        if not isinstance(branches, int) or not 1 <= branches <= MAX_DRAFT_BRANCHES:
            raise ValueError(f"branches {branches!r} must be an integer in [1, {MAX_DRAFT_BRANCHES}] (1: a chain of drafts)")
        if head.config.feature_layers:
            raise ValueError(f"this draft head reads the outputs of base layers {list(head.config.feature_layers)}; "
                             "the engine feeds it the final hidden states only")
        super().__init__(model, spec, head.n_slots, draft_len=draft_len, **kwargs)
        self.head = head
        self.draft_confidence = draft_confidence
        self.prompt_lookup = prompt_lookup
        self.row_cost = row_cost
        self.branches = branches
        self.tree_lanes = TREE_LANES if model.fused_layers else 1  # `tree_writes`
        self.seen: dict[int, _Seen] = {}  # per row: where each of its final tokens occurs (prompt lookup)
        W, D = head.config.window, model.config.dim
        rows = self.kv.max_batch_size + 1
        self.window_h = torch.zeros(rows, W, D, device=self.device)  # per cache row: the context window
        self.window_t = torch.zeros(rows, W, dtype=torch.long, device=self.device)
        self.window_n: dict[int, int] = {}
        # Per greedy row under a budget whose drafts did not pay for their positions and its head
        # pass (`_within_budget`): [forwards since its last head pass, forwards to wait before
        # the next] (`_draft`).
        self.idle: dict[int, list[int]] = {}
        # Rows whose first token came from the prefill's logits and went out at once: their first
        # drafts (from the prefill's window) are made as their first decoding forward starts.
        self.undrafted: set[int] = set()
        self.acceptance = DraftAcceptance()  # greedy exact rows' drafts, verified and accepted

    def add(self, slot: int, prompt_ids: list[int], settings: DecodeSettings) -> None:
        super().add(slot, prompt_ids, settings)
        self.window_n.pop(slot, None)  # the prefill's chunks fill it (`_prefill_and_keep`)

    def prefix_match(self, slot: int, prompt_ids: list[int], settings: DecodeSettings) -> int:
        """The cached prefix, less the prompt's last window positions: the prefill computes their
        hidden states for the head's window (a cache holds K/V only), so the first drafts, and a
        seeded sampled row's draws, are the same whether the prompt was cached or not."""
        return min(super().prefix_match(slot, prompt_ids, settings), max(0, len(prompt_ids) - self.window_h.shape[1]))

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.window_n.pop(slot, None)
        self.seen.pop(slot, None)
        self.idle.pop(slot, None)
        self.undrafted.discard(slot)

    def _accepted(self, row: _Row, drafts: _Drafts, accepted: list[int]) -> None:
        if drafts.tokens and self._greedy(row):
            path = drafts.path(accepted)
            self.acceptance.count(drafts, path)
            if drafts.writes is not None:  # a tree's accepted nodes: their K/V to the places of their tokens
                c, writes = row.final_upto, drafts.writes
                moved = [(writes[node], c + k) for k, node in enumerate(path) if writes[node] != c + k]
                if moved:
                    src, dst = ([m[i] for m in moved] for i in (0, 1))
                    for cache in (self.kv.k, self.kv.v):
                        cache[:, row.slot, dst] = cache[:, row.slot, src]

    def _forward_and_decide(self, rows: list[_Row], new: dict[int, list[int]], updates: dict[int, RowUpdate]) -> None:
        first = [row for row in rows if row.slot in self.undrafted]
        if first:
            self.undrafted.difference_update(row.slot for row in first)
            self._draft(first)
        n = len(rows)
        B = _batch_bucket(n)
        scratch = self.kv.scratch_pos
        drafts = self._within_budget(rows, [self.drafts.get(row.slot, _Drafts([], None)) for row in rows])
        Wv = 1 + max(len(d.tokens) for d in drafts)
        # Host plan (B, Wv): token, position (a chain's: also where its K/V go), key limit. Causal;
        # a tree's nodes see the row's text and their ancestors (`seen`: (b, t, key)), their K/V
        # written at `_Drafts.writes`.
        tok = [[0] * Wv for _ in range(B)]
        pos = [[scratch] * Wv for _ in range(B)]
        lim = [[1] * Wv for _ in range(B)]
        trees: dict[int, list[int]] = {}  # batch index -> its tree's `_Drafts.writes`
        seen, key_end = [], 1
        for b, row in enumerate(rows):
            c, d = row.final_upto, drafts[b]
            tok[b][0], pos[b][0], lim[b][0] = row.ids[c - 1], c - 1, c
            if d.parents is None:
                for t, token in enumerate(d.tokens, 1):
                    tok[b][t], pos[b][t], lim[b][t] = token, c - 1 + t, c + t
                key_end = max(key_end, c + len(d.tokens))
                continue
            at = trees[b] = d.writes
            for t, (token, depth) in enumerate(zip(d.tokens, d.depths(), strict=True), 1):
                tok[b][t], pos[b][t], lim[b][t] = token, c - 1 + depth, c
                node = t - 1
                while node >= 0:  # itself and its ancestors
                    seen.append((b, t, at[node]))
                    node = d.parents[node]
            key_end = max(key_end, c, *(w + 1 for w in at))
        writes = None
        if trees:  # the rest (chains, padding) write where they are
            writes = [list(p) for p in pos]
            for b, at in trees.items():
                writes[b][1: 1 + len(at)] = at
        K = min(_bucket(key_end), self.S)
        slots = [row.slot for row in rows] + [self.kv.scratch_row] * (B - n)
        tok_t, pos_t, lim_t = self._upload(torch.tensor([tok, pos, lim], dtype=torch.long))  # (3, B, Wv)
        rows_t = self._upload(torch.tensor(slots, dtype=torch.long))
        mask = limit_mask(lim_t, K)
        if seen:
            index = torch.tensor(seen, dtype=torch.long, device=self.device).T
            mask[index[0], 0, index[1], index[2]] = True
        h = self.model(tok_t, pos_t, mask, cache=self.kv, cache_rows=rows_t, hidden=True, step=True,
                       write_positions=None if writes is None else self._upload(torch.tensor(writes, dtype=torch.long))
                       )  # (B, Wv, dim)
        logits = self._verifier_logits(h[:n], [1 + len(d.tokens) for d in drafts])  # (n, Wv, V)
        going = []
        for b, row, j, tokens in self._settle(rows, logits, drafts, new, updates):
            if drafts[b].parents is None:
                self._extend_window(row.slot, h[b, : j + 1], tokens)
            else:  # the root's and the accepted nodes' states
                at = [0, *(1 + node for node in drafts[b].path(tokens[:j]))]
                self._extend_window(row.slot, h[b, at], tokens)
            going.append(row)
        self._draft(going)
        for row in going:
            updates[row.slot] = self._update(row, new[row.slot], None)

    def _verifier_logits(self, h: Tensor, live: list[int]) -> Tensor:
        """Logits (n, Wv, V) of a verifying forward's final states h (n, Wv, dim) at each row's
        first live[b] positions; the output head (a fifth of a position's cost on a CPU) skips the
        padding of rows with fewer drafts, whose logits are zeros. A position's logits never depend
        on the other rows of the call (the head's kernels compute each row alone)."""
        n, Wv, D = h.shape
        if min(live) == Wv:
            return self.model.logits(h, step=Wv)
        at = (torch.arange(Wv) < torch.tensor(live)[:, None]).reshape(-1).to(self.device)  # (n * Wv,): live
        flat = self.model.logits(h.reshape(1, n * Wv, D)[:, at], step=sum(live))[0]  # (live positions, V)
        logits = flat.new_empty(n * Wv, flat.shape[-1])
        logits[at] = flat
        logits[~at] = 0.0
        return logits.view(n, Wv, -1)

    def _within_budget(self, rows: list[_Row], drafts: list[_Drafts]) -> list[_Drafts]:
        """The drafts a verifying forward verifies: of the greedy rows' drafts, the surest ones
        that pay for their positions. A forward of P positions costs `row_cost.forward(P)`; the
        forward is worth its expected tokens T (each row's own token plus, per draft, its chain
        confidence: the chance that it and every draft before it are accepted), so a draft of
        confidence s is worth its position where s / (its marginal cost) is at least T / (the
        forward's cost): it raises the batch's tokens per second (a rate, as SmartSpec's goodput
        and EAGLE-2's ranking of draft trees by chain confidence). Drafts go in from the surest
        down, across rows, until the next one would lower the rate: in a batch of two on a CPU
        without AMX a draft needs a confidence of about 0.4, in a batch of eight, where every
        position costs, near certainty. A row whose kept drafts are worth less than their
        positions and its next head pass idles (`_draft`). Which tokens become final never depends
        on any of it. Sampled rows (their draws follow their drafts: a seed repeats a reply
        whatever the batch; their head drafts count at the head's chain confidence), lossy ones
        (`accept` < 1: their replies follow their drafts) and drafts without a confidence are
        verified as kept, as are a row's alone in its forward: its confidence bar is timed on the
        machine (`voice-agent calibrate`), while the rows' shared price is what the bar cannot
        see."""
        if self.row_cost is None:
            return drafts
        if len(rows) < 2:  # a row alone: its drafts are the bar's (`voice-agent calibrate` times that)
            for row in rows:
                self.idle.pop(row.slot, None)
            return drafts
        positions, tokens = len(rows), float(len(rows))
        cut = [d.sure is not None and self._greedy(row) for row, d in zip(rows, drafts, strict=True)]
        candidates = []
        for b, d in enumerate(drafts):
            if cut[b]:
                candidates += [(-s, b, i) for i, s in enumerate(d.sure)]
            else:
                positions += len(d.tokens)
                tokens += sum(d.sure or ())
        candidates.sort()  # surest first; within a row in order (its chain never rises)
        cost = self.row_cost.forward
        kept, gain, spent = [0] * len(rows), [0.0] * len(rows), [0.0] * len(rows)
        for minus_s, b, _ in candidates:
            s = -minus_s
            more = cost(positions + 1) - cost(positions)
            if s * cost(positions) < more * tokens:
                break
            kept[b] += 1
            gain[b] += s
            spent[b] += more
            positions += 1
            tokens += s
        # A row whose kept drafts are worth less than their positions and its next head pass (in
        # forwards: the tokens they add at the forward's cost per token) idles (`_draft`).
        per_token = cost(positions) / tokens
        for b, row in enumerate(rows):
            if cut[b] and drafts[b].tokens:
                if kept[b] and gain[b] * per_token - spent[b] >= self.row_cost.head():
                    self.idle.pop(row.slot, None)
                else:
                    self._idle(row.slot)
        return [d.first(kept[b]) if cut[b] else d for b, d in enumerate(drafts)]

    def _idle(self, slot: int) -> None:
        """A row's head pass did not pay: it waits IDLE_PROBE forwards, or twice its last wait."""
        since_wait = self.idle.get(slot)
        self.idle[slot] = [1, IDLE_PROBE if since_wait is None else min(2 * since_wait[1], IDLE_PROBE_MAX)]

    @staticmethod
    def _greedy(row: _Row) -> bool:
        """A row whose tokens never depend on which drafts it verifies: greedy and exact."""
        return row.generator is None and row.settings.accept >= 1.0

    def _forward(self, entries: list[_Entry], fn: Any, *, eager_prefill: bool = False) -> Tensor:
        """The prefill's forward keeps each row's last hidden states: its window, so that the
        head drafts as soon as the first token is known (`_decode_step`)."""
        return super()._forward(entries, self._prefill_and_keep if fn is self.model else fn, eager_prefill=eager_prefill)

    def _prefill_and_keep(self, tokens: Tensor, positions: Tensor, mask: Tensor, *, cache: Any, cache_rows: Tensor,
                          out_index: Tensor) -> Tensor:
        """model(...) of a prefill forward (logits at out_index, whose first column is each row's
        last position), also adding the hidden states of the chunk's last positions to the row's
        window, after those of its earlier chunks (a short last chunk leaves the window as full
        as one chunk would); the window's last token (the first reply token) comes with the commit."""
        W = self.window_h.shape[1]
        last = out_index[:, :1]  # (B, 1)
        index = (last + torch.arange(-W + 1, 1, device=self.device)[None]).clamp_min(0)  # (B, W)
        h = self.model(tokens, positions, mask, cache=cache, cache_rows=cache_rows, out_index=index, hidden=True)
        logits = self.model.logits(h[:, -1:])  # (B, 1, V): the model's own prefill logits at `last`
        following = tokens.gather(1, (index + 1).clamp_max(tokens.shape[1] - 1))  # the token after each position
        for b, slot in enumerate(cache_rows.tolist()):
            if slot == self.kv.scratch_row:
                continue
            k = min(W, int(last[b]) + 1)  # this chunk's positions in the window
            if slot in self.window_n:  # a later chunk: the earlier one's last position made this one's first token
                self.window_t[slot, -1] = tokens[b, 0]
            self._extend_window(slot, h[b, W - k:], following[b, W - k:].tolist())
        return logits.expand(-1, out_index.shape[1], -1)

    def _decode_step(self, rows: list[_Row]) -> list[RowUpdate]:
        """The AR decoder's step; a row whose first token has just come from the prefill's logits
        gets its first drafts from the prefill's window as its first decoding forward starts
        (`_forward_and_decide`), so that the token goes out before the head's pass (about 1 ms
        sooner on a 2-core AMD EPYC: docs/benchmarks.md, "Session 37")."""
        fresh = [row for row in rows if row.clean_upto >= row.final_upto]
        updates = super()._decode_step(rows)
        done = {u.slot for u in updates if u.finish_reason is not None}
        for row in fresh:
            if row.slot not in done and row.slot in self.window_n:
                self.window_t[row.slot, -1] = row.ids[row.final_upto - 1]
                self.undrafted.add(row.slot)
        return updates

    def _draft(self, rows: list[_Row]) -> None:
        """Each row's next drafts from its window. Under a budget, a greedy row whose last drafts
        did not pay for their positions and its head pass (`idle`, `_within_budget`) skips the
        pass (HEAD_ROW_SHARE of a position a row) until it has waited its turn (`_idle`)."""
        if self.row_cost is not None and len(self.rows) > 1:
            # (only greedy rows idle: `_within_budget`)
            skipping = [row for row in rows if row.slot in self.idle and self.idle[row.slot][0] < self.idle[row.slot][1]]
            for row in skipping:
                self.idle[row.slot][0] += 1
                self.drafts.pop(row.slot, None)
            rows = [row for row in rows if row not in skipping]
        if not rows:
            return
        # A parallel head's full block (the slots see each other: a shorter block is another
        # input than it was trained on); a causal head's places up to the longest draft a row asks
        # for, none after every row's chain fell below the confidence bar (no draft there could
        # pass it; a causal head drafts chains, `_branching`). Each row keeps the drafts it asked for.
        index = torch.tensor([row.slot for row in rows], device=self.device)
        valid = torch.tensor([self.window_n[row.slot] for row in rows], device=self.device)
        n = max(self._n(row.settings) for row in rows) if self.head.config.causal else self.head.n_slots
        scores = self.head(self.window_h[index], self.window_t[index], valid, n, bar=self.draft_confidence)  # (p, n, V')
        best, top = row_top(scores)  # each slot's top token and its probability, in one pass
        tokens, dists = self._propose(rows, scores, best)
        sure = top.cumprod(dim=-1).tolist()  # (p, n): each draft's chance that it and those before it are accepted
        confident = self._confident_len(sure)
        tops = None  # a tree's: each place's top tokens and their probabilities, per row
        if self.branches > 1 and any(self._branching(row) for row in rows):
            probs, index = torch.softmax(scores.float(), dim=-1).topk(min(self.branches, scores.shape[-1]), dim=-1)
            tops = (self.head.draft_ids(index).tolist(), probs.tolist())
        for i, row in enumerate(rows):
            n = self._n(row.settings)
            kept = min(n, confident[i])
            # A copy is looked up only where it could be longer than the head's drafts. Which of
            # the two a row verifies depends on its text and the head's confidences and top tokens,
            # never on its sampled drafts, so a sampled row's copy is a draft from a point mass
            # (`_point_masses`).
            most = min(n, self.prompt_lookup)
            copied = self._look_up(row, most) if most > kept else []
            if copied and kept and sure[i][0] >= LOOKUP_HEAD_SURE and copied[0] != int(self.head.draft_ids(best[i, 0])):
                copied = []  # the head is sure of another next token than the copy's: its drafts
            if len(copied) > kept:  # the row's own text offers more: verify that instead
                self._keep_drafts(row, len(copied), copied, None if row.generator is None else self._point_masses(copied),
                                  [LOOKUP_SURE ** (j + 1) for j in range(len(copied))], copied=True)
            elif tops is not None and self._branching(row):
                self._keep_tree(row, n, tops[0][i], tops[1][i])
            else:
                self._keep_drafts(row, kept, tokens[i], dists[i], sure[i])
            if row.slot in self.idle and row.slot not in self.drafts:  # a try without drafts waits longer
                self._idle(row.slot)

    def _branching(self, row: _Row) -> bool:
        """Whether a row's drafts may branch into a tree (`branches` > 1): greedy exact rows
        without a constraint (a tree is walked down by the verifier's argmax alone, `_walk`),
        drafted by a parallel head (a causal head scores each place after the top drafts before
        it: another branch's children would be scored for a prefix they do not follow)."""
        return (self.branches > 1 and self._greedy(row) and row.settings.constraint is None
                and not self.head.config.causal)

    def _keep_tree(self, row: _Row, n: int, ids: list[list[int]], probs: list[list[float]]) -> None:
        """A row's next drafts as a tree (`draft_tree`) of its first n places' top tokens (ids,
        probs: per place, the surest first), none past its length limit, nor with K/V past the
        cache (`tree_writes`: the longest leading part of the nodes that fits)."""
        places = min(n, max(0, row.gen_end - row.final_upto - 1))
        tokens, parents, sure = draft_tree([list(zip(ids[d], probs[d], strict=True)) for d in range(places)],
                                           self.draft_confidence, TREE_MAX_NODES)
        tree = _Drafts(tokens, None, sure, parents=parents)
        tree.writes = at = tree_writes(row.final_upto, parents, tree.depths(), self.tree_lanes)
        fit = next((i for i, w in enumerate(at) if w >= self.S), len(at))
        if fit:
            self.drafts[row.slot] = tree.first(fit)
        else:
            self.drafts.pop(row.slot, None)

    def _point_masses(self, tokens: list[int]) -> Tensor:
        """q of copied drafts (k, V): all of each one's mass on the token copied. The acceptance
        rule then takes a copy c with the base's probability p(c) and, on a rejection, draws from
        p without c, renormalised: the base's distribution, as for any draft."""
        return F.one_hot(torch.tensor(tokens, device=self.device), self.model.config.vocab_size).float()

    def _look_up(self, row: _Row, most: int) -> list[int]:
        """Prompt lookup: up to `most` tokens that followed the latest earlier occurrence of the
        longest run (LOOKUP_NGRAM tokens) that ends the row's final text, in its prompt or its
        reply; [] where none of at least the shortest run occurred before. Each final token is
        indexed once (`_Seen`), so a lookup costs the earlier occurrences of the last token."""
        seen = self.seen.get(row.slot)
        if seen is None:
            seen = self.seen[row.slot] = _Seen()
        ids, end = row.ids, row.final_upto
        for i in range(seen.upto, end):
            seen.at.setdefault(ids[i], []).append(i)
        seen.upto = end
        shortest, longest = LOOKUP_NGRAM
        best, start = 0, -1
        for j in reversed(seen.at.get(ids[end - 1], ())[:-1] if end else ()):
            n = 1
            while n < longest and j - n >= 0 and ids[j - n] == ids[end - 1 - n]:
                n += 1
            if n > best:
                best, start = n, j + 1
                if n == longest:
                    break
        return ids[start: min(start + most, end)] if best >= shortest else []

    def _confident_len(self, chain: list[list[float]]) -> list[int]:
        """Per row, how many leading drafts the head is sure enough of to be worth verifying: each
        verified draft costs a row of the next forward (on a CPU without AMX about a sixth of a
        step), and the drafts after a rejected one are wasted, so a draft whose chain confidence
        (the product of the head's top probabilities up to it: the chance that it and every draft
        before it are accepted, as EAGLE-2 ranks its draft tree) is below `draft_confidence`, and
        every draft after it, is left out. Which tokens become final never depends on it. chain
        (p rows of n): each slot's chain confidence (the cumulative product of `row_top`'s
        probabilities: non-increasing), as lists (a step's few numbers: no tensor calls)."""
        if self.draft_confidence <= 0:
            return [self.head.n_slots] * len(chain)
        return [sum(s >= self.draft_confidence for s in row) for row in chain]

    def _extend_window(self, slot: int, h: Tensor, tokens: list[int]) -> None:
        """Append (hidden state, the token it made final) pairs to the row's window."""
        W = self.window_h.shape[1]
        k = min(len(tokens), W)
        # One shift of the whole window (its first k pairs drop out; past window_n, they are
        # padding that no pass reads), then the new pairs at its end.
        self.window_h[slot] = torch.cat([self.window_h[slot, k:], h[-k:].to(self.window_h.dtype)])
        self.window_t[slot] = torch.cat([self.window_t[slot, k:], torch.tensor(tokens[-k:], device=self.device)])
        self.window_n[slot] = min(self.window_n.get(slot, 0) + k, W)

    def _propose(self, rows: list[_Row], scores: Tensor, best: Tensor) -> tuple[list[list[int]], list[Tensor | None]]:
        """The head's scores (p, m, V') over its vocabulary and their argmax `best` -> drafts (and,
        for sampled rows, the distribution over the whole vocabulary they were drawn from: zero
        off the head's). A causal head's place i scored after the top drafts before it, so its
        sampled rows draft those too, as point masses (`_point_masses`): drafts its later places
        were made for, and no draw that depends on how many places the batch asked for."""
        if all(row.generator is None for row in rows) or self.head.config.causal:
            tokens = self.head.draft_ids(best).tolist()
            return tokens, [None if row.generator is None else self._point_masses(t) for row, t in zip(rows, tokens, strict=True)]
        full = torch.full((*scores.shape[:2], self.model.config.vocab_size), float("-inf"), device=self.device)
        full[..., self.head.vocab] = scores
        return self._pick(rows, full)


class SpeculativeEngine(AREngine):
    """The AR engine's API and output, decoded by draft-and-verify (see the module docstring)."""

    def __init__(self, loaded: Any, drafter: Drafter | DraftHead | None, *, draft_len: int | None = None,
                 tree: bool = True, draft_confidence: float | None = None, prompt_lookup: int | None = None,
                 row_cost: float | str = "auto", draft_branches: int = 1, **kwargs: Any) -> None:
        """drafter: mask slots in the base's forward (Drafter), a draft head after it (DraftHead),
        or None: a block-diffusion model drafting for itself (ValueError where it cannot);
        draft_len None: DEFAULT_DRAFT_LEN, DEFAULT_HEAD_DRAFT_LEN for a head, DEFAULT_SELF_DRAFT_LEN
        for self-drafting (at most the drafter's slots, the model's block size); draft_confidence:
        a draft head's drafts stop where it is less sure (`HeadSpeculativeDecoder`; None:
        DEFAULT_HEAD_DRAFT_CONFIDENCE; ValueError with another drafter, which has no such measure);
        prompt_lookup: beside a draft head, at most this many drafts copied from a row's own text
        where that offers more (None: DEFAULT_PROMPT_LOOKUP; 0: off; ValueError with another drafter);
        row_cost: beside a draft head, what each verified position beyond the ones that come free
        costs, as a share of a forward ("auto": `row_cost_of` the model; 0: no budget, every draft a
        row keeps is verified; see `HeadSpeculativeDecoder._within_budget`); draft_branches: a
        draft head's top tokens a place that greedy rows' drafts branch into (1: a chain; more: a
        tree, `HeadSpeculativeDecoder`; ValueError above 1 with another drafter)."""
        head = isinstance(drafter, DraftHead)
        if draft_confidence is None:
            draft_confidence = DEFAULT_HEAD_DRAFT_CONFIDENCE if head else 0.0
        if draft_confidence and not head:
            raise ValueError("draft_confidence applies to a draft head's drafts only")
        if prompt_lookup is None:
            prompt_lookup = DEFAULT_PROMPT_LOOKUP if head else 0
        if prompt_lookup and not head:
            raise ValueError("prompt_lookup applies beside a draft head only")
        if row_cost not in ("auto", 0) and not head:
            raise ValueError("row_cost applies beside a draft head only")
        if draft_branches != 1 and not head:
            raise ValueError("draft_branches applies to a draft head's drafts only")
        self.draft_branches = draft_branches  # its range: the decoder's check, at start
        self.draft_confidence = draft_confidence  # their ranges: the decoder's checks, at start
        self.prompt_lookup = prompt_lookup
        self.row_cost = self._row_cost(loaded.model, row_cost) if head else None
        if drafter is None and (reason := self_drafting_reason(loaded.spec)) is not None:
            raise ValueError(f"this model cannot draft for itself: {reason}")
        self.n_slots = loaded.spec.block_size if drafter is None else drafter.n_slots
        if draft_len is None:
            draft_len = min(DEFAULT_SELF_DRAFT_LEN if drafter is None else DEFAULT_HEAD_DRAFT_LEN
                            if isinstance(drafter, DraftHead) else DEFAULT_DRAFT_LEN, self.n_slots)
        self.drafter, self.draft_len, self.tree = drafter, draft_len, tree
        super().__init__(loaded, **kwargs)  # its decoder checks draft_len

    @staticmethod
    def _row_cost(model: Transformer, row_cost: float | str) -> RowCost | None:
        measured = row_cost_of(model)
        if row_cost == "auto":
            return measured
        if isinstance(row_cost, str | bool) or not 0.0 <= row_cost <= 16.0:
            raise ValueError(f"row_cost {row_cost!r} must be 'auto' or a number in [0, 16] (0: no budget)")
        return RowCost(measured.free if measured else 1, float(row_cost)) if row_cost else None

    def make_decoder(self, **kwargs: Any) -> BlockDecoder:
        if isinstance(self.drafter, DraftHead):
            return HeadSpeculativeDecoder(self.model, self.spec, self.drafter, draft_len=self.draft_len,
                                          draft_confidence=self.draft_confidence, prompt_lookup=self.prompt_lookup,
                                          row_cost=self.row_cost, branches=self.draft_branches, **kwargs)
        return SpeculativeDecoder(self.model, self.spec, self.drafter, draft_len=self.draft_len, tree=self.tree,
                                  block_size=self.n_slots, **kwargs)

    def draft_acceptance(self, reset: bool = False) -> dict[str, list[dict[str, Any]]] | None:
        """A draft head's greedy rows' drafts, verified and accepted since the engine started or
        the last reset (`DraftAcceptance.snapshot`); None for other drafters. `reset` (call while
        the engine is idle): start counting afresh after this snapshot."""
        decoder = self._decoder
        if not isinstance(decoder, HeadSpeculativeDecoder):
            return None
        counted = decoder.acceptance.snapshot()
        if reset:
            decoder.acceptance = DraftAcceptance()
        return counted

    def _force(self, params: GenerationParams) -> GenerationParams:
        if params.draft_len and not 1 <= params.draft_len <= self.n_slots:
            raise InvalidRequestError(f"invalid parameter: draft_len {params.draft_len!r} must lie in "
                                      f"[0, {self.n_slots}] (0: the engine's {self.draft_len})")
        return super()._force(params)
