"""Exact draft-and-verify decoding: an AR model with a learned drafter (dlm/drafter.py).

Contract: `SpeculativeEngine(loaded, drafter, draft_len=4, tree=True, ...)` behaves like
`dlm.ar.AREngine` (submit, abort, abort_owner, load, close, Delta streams, prefix reuse, stop
strings, fair admission) and produces the same tokens: at temperature 0 every reply is the AR
model's greedy reply, token for token; at temperature > 0 the speculative-sampling acceptance rule
keeps the AR model's (top-p) sampling distribution. What changes is how many tokens one forward
pass yields. `SpeculativeDecoder` is its step, without threads (a `dlm.ar.ARDecoder`, whose
prefill, prefix reuse and row bookkeeping it keeps).

One step of a row (I-DLM / Medusa-style, in one forward over the whole batch):
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
  final at once. Sampled rows accept d_i with probability min(1, p(d_i) / q(d_i)) and, on a
  rejection, sample the correction from max(p - q, 0) normalised (Leviathan et al. 2023), which
  leaves the output distributed as the base's. The block of the accepted j gives the next drafts
  (argmax, or samples from its distribution q).
- A row yields between 1 and n + 1 tokens per forward: 1 with a drafter that is always wrong, n + 1
  with an oracle. The cache stays exact: positions < c + j hold the verified K/V, everything past
  them is overwritten before it is ever attended.
Rows accept different numbers of tokens and leave or join between steps (continuous batching);
padding rows and slots use the cache's scratch row and position. The forward is eager
(`compile_mode` is not supported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dlm.ar import ARDecoder, AREngine
from dlm.config import DiffusionSpec
from dlm.constraints import mask_logits
from dlm.decode import BlockDecoder, DecodeSettings, RowUpdate, _batch_bucket, _bucket, _Row
from dlm.drafter import Drafter
from dlm.engine import GenerationParams
from dlm.errors import InvalidRequestError
from dlm.model import DraftInputs, Transformer
from dlm.policies import sampling_probs

__all__ = ["DEFAULT_DRAFT_LEN", "SpeculativeDecoder", "SpeculativeEngine"]

# One mask slot per draft block: the fastest length for the shipped drafter on a 2-core CPU (each
# slot row costs a share of an AR step, and the drafter's later slots are rarely accepted:
# docs/benchmarks.md, session 16); `voice-agent calibrate` measures it on the machine at hand.
DEFAULT_DRAFT_LEN = 1


@dataclass
class _Drafts:
    tokens: list[int]  # drafts for the positions final_upto, final_upto + 1, ...
    probs: Tensor | None  # (k, V): the distribution each was sampled from (sampled rows only)


class SpeculativeDecoder(ARDecoder):
    def __init__(self, model: Transformer, spec: DiffusionSpec, drafter: Drafter, *, draft_len: int = DEFAULT_DRAFT_LEN,
                 tree: bool = True, max_batch_size: int, max_seq_len: int, cache: str = "exact",
                 compile_mode: str | None = None, **prefill: Any) -> None:
        """spec: the AR model's (causal, logit shift); draft_len: default mask slots per draft
        block (1..drafter.n_slots, a request may ask for fewer); tree: one draft block per
        possible acceptance length (see the module docstring). `prefill`: BlockDecoder's prefill
        knobs."""
        if compile_mode is not None:
            raise ValueError("compile_mode is not supported by speculative decoding (its forward is eager)")
        if not 1 <= draft_len <= drafter.n_slots:
            raise ValueError(f"draft_len {draft_len} must lie in [1, {drafter.n_slots}] (the drafter's slots)")
        super().__init__(model, spec, max_batch_size=max_batch_size, max_seq_len=max_seq_len, cache=cache,
                         **prefill)
        self.drafter = drafter
        self.draft_len = draft_len
        self.tree = tree
        self.drafts: dict[int, _Drafts] = {}

    def _n(self, settings: DecodeSettings) -> int:
        return settings.draft_len or self.draft_len

    def required_len(self, prompt_len: int, settings: DecodeSettings) -> int:
        """The text, plus room past it for the drafts and the draft blocks' K/V."""
        n = self._n(settings)
        blocks = n + 1 if self.tree else 1
        return prompt_len + settings.max_new_tokens + n + blocks * n

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.drafts.pop(slot, None)

    def _trace_tokens(self, row: _Row) -> list[int]:
        drafts = self.drafts.get(row.slot)
        return list(drafts.tokens) if drafts is not None else []

    def _propose(self, rows: list[_Row], logits: Tensor) -> tuple[list[list[int]], list[Tensor | None]]:
        """The next drafts from the accepted block's logits (n, m, V): tokens per row and, for
        sampled rows, the distribution q they were drawn from."""
        return self._pick(rows, logits)

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
                    pos[b][col], wpos[b][col], lim[b][col] = c + j + i, spare + i, c + j
                    lo[b][col], hi[b][col] = spare, spare + i + 1
                    slot_index[b][col - Wv] = i
            key_end = max(key_end, c + k + len(blocks[b]) * m)
        K = min(_bucket(key_end), S)
        slots = [row.slot for row in rows] + [self.kv.scratch_row] * (B - n)
        plan = self._upload(torch.tensor([tok, pos, wpos, lim, lo, hi], dtype=torch.long))  # (6, B, T)
        tok_t, pos_t, wpos_t, lim_t, lo_t, hi_t = plan
        keys = torch.arange(K, device=self.device)[None, None, :]
        mask = (keys < lim_t[..., None]) | ((keys >= lo_t[..., None]) & (keys < hi_t[..., None]))  # (B, T, K)
        rows_t = self._upload(torch.tensor(slots, dtype=torch.long))
        draft = DraftInputs(self.drafter, Wv, self._upload(torch.tensor(slot_index, dtype=torch.long)))
        h = self.model(tok_t, pos_t, mask[:, None], cache=self.kv, cache_rows=rows_t, write_positions=wpos_t,
                       draft=draft, hidden=True, step=True)  # (B, T, dim)
        # One pass through the output head for the verifier's positions and every draft block
        # (a call costs about the same for 1 or 32 rows: it reads the whole head either way).
        logits = self.model.logits(h[:n], step=Wv)  # (n, T, V): the verifier's positions are steps
        verify = logits[:, :Wv]  # the base's next-token logits
        for row in rows:
            row.steps += 1
        accepted = self._verify(rows, verify, drafts)
        # The accepted block of each row that goes on gives its next drafts.
        going = []
        for b, row in enumerate(rows):
            j, tokens = accepted[b]
            c = row.final_upto
            finish = self._commit(row, tokens, new[row.slot])
            row.clean_upto = c + j  # x and the accepted drafts hold verified K/V now
            if finish is not None:
                self.drafts.pop(row.slot, None)
                updates[row.slot] = self._update(row, new[row.slot], finish)
                continue
            start = Wv + blocks[b].index(j) * ns[b] if j in blocks[b] else -1
            going.append((b, row, start))
        picked = [(b, row, start) for b, row, start in going if start >= 0]
        if picked:
            m = max(ns[b] for b, _, _ in picked)
            index = torch.tensor([[min(start + i, T - 1) for i in range(m)] for _, _, start in picked], device=self.device)
            lb = logits[torch.tensor([b for b, _, _ in picked], device=self.device)[:, None], index]  # (p, m, V)
            picks = self._propose([row for _, row, _ in picked], lb)
        by_slot = {row.slot: i for i, (_, row, _) in enumerate(picked)}
        for b, row, _ in going:
            i = by_slot.get(row.slot)
            room = max(0, row.gen_end - row.final_upto - 1)  # drafts past the length limit are useless
            count = min(ns[b], room)
            if i is None or count == 0:
                self.drafts.pop(row.slot, None)
            else:
                tokens, dist = picks[0][i], picks[1][i]
                self.drafts[row.slot] = _Drafts(tokens[:count], None if dist is None else dist[:count])
            updates[row.slot] = self._update(row, new[row.slot], None)

    def _verify(self, rows: list[_Row], verify: Tensor, drafts: list[_Drafts]) -> list[tuple[int, list[int]]]:
        """Per row: (accepted drafts j, the tokens that become final: d_1..d_j and the base's own).
        A constrained row's verifier logits are masked position by position (the masks after
        each accepted prefix of its drafts): what it commits is what constrained AR would."""
        if any(row.settings.constraint is not None for row in rows):
            verify = verify.clone()
            for b, row in enumerate(rows):
                if row.settings.constraint is not None:
                    for j, mask in enumerate(row.settings.constraint.lookahead(drafts[b].tokens)):
                        verify[b, j] = mask_logits(verify[b, j], mask)
        best = verify.argmax(dim=-1).tolist()  # (n, Wv)
        out = []
        sampled = [b for b, row in enumerate(rows) if row.generator is not None]
        probs = None
        if sampled:
            temperature, top_p = self._params([rows[b] for b in sampled])
            probs = sampling_probs(verify[sampled], temperature, top_p)  # (s, Wv, V)
        for b, row in enumerate(rows):
            d = drafts[b].tokens
            if row.generator is None:
                j = 0
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


class SpeculativeEngine(AREngine):
    """The AR engine's API and output, decoded by draft-and-verify (see the module docstring)."""

    def __init__(self, loaded: Any, drafter: Drafter, *, draft_len: int = DEFAULT_DRAFT_LEN, tree: bool = True,
                 **kwargs: Any) -> None:
        self.drafter, self.draft_len, self.tree = drafter, draft_len, tree
        super().__init__(loaded, **kwargs)  # its decoder checks draft_len

    def make_decoder(self, **kwargs: Any) -> BlockDecoder:
        return SpeculativeDecoder(self.model, self.spec, self.drafter, draft_len=self.draft_len, tree=self.tree,
                                  **kwargs)

    def _force(self, params: GenerationParams) -> GenerationParams:
        if params.draft_len and not 1 <= params.draft_len <= self.drafter.n_slots:
            raise InvalidRequestError(f"invalid parameter: draft_len {params.draft_len!r} must lie in "
                                      f"[0, {self.drafter.n_slots}] (0: the engine's {self.draft_len})")
        return super()._force(params)
