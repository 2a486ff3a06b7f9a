"""The autoregressive baseline: the same transformer, causal attention, the same Engine API.

Contract: `AREngine(loaded, ...)` behaves like `dlm.engine.Engine` (submit, abort, close, Delta
streams) but decodes one token per forward pass with the exact KV cache. Meant for checkpoints
trained with a token shift (AR models and the diffusion adaptations of them, whose AR teacher ran
causally): attention is switched to causal. Policy parameters are ignored; temperature, top_p,
seed, stop and max_new_tokens apply as for the dLLM.

`ARDecoder` is its step, without threads: a `dlm.decode.BlockDecoder` (whose prefill, prefix
reuse and row bookkeeping it keeps) with a lean decoding step. The prefill's logits give a row's
first token at once; after that, each step feeds every row's last final token at its position in
one forward (`step=True`: the model's step kernels, dlm.model.Projection) and takes the next token
from its logits: argmax, or a sample of the (top-p) distribution with the row's own generator.
No canvas, policy or block bookkeeping runs per token. `dlm.speculative.SpeculativeDecoder`
builds on it (the same first token, then drafts verified in the same kind of forward).

A request with a constraint (`GenerationParams.constraint`, dlm/constraints.py) has its logits
masked before each pick, and every token it commits advances the constraint.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from dlm.blocks import row_argmax
from dlm.config import DiffusionSpec
from dlm.constraints import mask_logits
from dlm.decode import BlockDecoder, RowUpdate, StepTrace, _batch_bucket, _bucket, _Row
from dlm.engine import Engine, GenerationParams
from dlm.masks import limit_mask
from dlm.model import Transformer
from dlm.policies import sampling_probs

__all__ = ["ARDecoder", "AREngine", "ar_spec"]

log = logging.getLogger(__name__)


def ar_spec(spec: DiffusionSpec) -> DiffusionSpec:
    """The checkpoint's spec decoded autoregressively."""
    return replace(spec, attention="causal", logit_shift=True, block_size=1, sub_block_size=0,
                   steps_per_block=0)


class ARDecoder(BlockDecoder):
    def __init__(self, model: Transformer, spec: DiffusionSpec, *, max_batch_size: int, max_seq_len: int,
                 cache: str = "exact", compile_mode: str | None = None, **prefill: Any) -> None:
        """spec: a causal model whose logits predict the next token (`ar_spec`); `prefill`:
        BlockDecoder's prefill knobs."""
        if cache not in ("auto", "exact"):
            raise ValueError(f"AR decoding keeps an exact KV cache, not {cache!r}")
        if spec.attention != "causal" or not spec.logit_shift:
            raise ValueError("AR decoding needs a causal model whose logits predict the next token")
        super().__init__(model, spec, max_batch_size=max_batch_size, max_seq_len=max_seq_len, cache="exact",
                         compile_mode=compile_mode, **prefill)

    # -- committing ----------------------------------------------------------------------------
    def _commit(self, row: _Row, tokens: list[int], new_ids: list[int]) -> str | None:
        """Make tokens final (up to EOS / the length limit); the finish reason or None."""
        constraint = row.settings.constraint
        for t in tokens:
            if row.final_upto >= row.gen_end:
                break
            if constraint is not None and t not in self.eos and not constraint.consume(t):
                log.error("row %d: token %d breaks its constraint; the request fails", row.slot, t)  # a decoder bug
                return "error"
            row.ids.append(t)
            row.final_upto += 1
            if t in self.eos:
                row.eos_pos = row.final_upto - 1
                return "eos"
            new_ids.append(t)
        return "length" if row.final_upto >= row.gen_end else None

    def _trace_tokens(self, row: _Row) -> list[int]:
        """The tokens a trace shows as still open after a step (drafts; none in AR decoding)."""
        return []

    def _update(self, row: _Row, new_ids: list[int], finish: str | None) -> RowUpdate:
        trace = None
        if row.settings.trace:
            tokens = self._trace_tokens(row) if finish is None else []
            trace = StepTrace(step=row.steps, block_start=row.final_upto, token_ids=tokens, masked=[True] * len(tokens))
        return RowUpdate(slot=row.slot, new_ids=new_ids, finish_reason=finish, steps=row.steps,
                         tokens=row.final_upto - row.prompt_len - (1 if finish == "eos" else 0), trace=trace,
                         prefill_steps=row.prefill_steps, eos_id=row.ids[row.eos_pos] if finish == "eos" else None)

    def _params(self, rows: list[_Row]) -> tuple[Tensor, Tensor]:
        sampling = self.sampling[torch.tensor([r.slot for r in rows], device=self.device)]
        return sampling[:, 0], sampling[:, 1]  # temperature, top_p

    def _constrain(self, rows: list[_Row], logits: Tensor) -> Tensor:
        """logits (n, 1, V) with each constrained row's disallowed tokens at -inf."""
        if all(row.settings.constraint is None for row in rows):
            return logits
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.settings.constraint is not None:
                logits[i, 0] = mask_logits(logits[i, 0], row.settings.constraint.allowed())
        return logits

    def _pick(self, rows: list[_Row], logits: Tensor, places: list[int] | None = None
              ) -> tuple[list[list[int]], list[Tensor | None]]:
        """logits (n, N, V) -> per row N tokens (argmax, or samples) and, for sampled rows, the
        distribution (N, V) they were drawn from. `places`: per row, how many leading places it
        wants (default all N): a sampled row draws only those from its generator, so its draws
        never depend on how many places the other rows of the batch asked for."""
        greedy = row_argmax(logits).tolist()
        if all(r.generator is None for r in rows):
            return greedy, [None] * len(rows)
        temperature, top_p = self._params(rows)
        probs = sampling_probs(logits, temperature, top_p)
        tokens, dists = [], []
        for i, row in enumerate(rows):
            if row.generator is None:
                tokens.append(greedy[i])
                dists.append(None)
            else:
                wanted = probs[i] if places is None else probs[i, :places[i]]
                tokens.append(torch.multinomial(wanted, 1, generator=row.generator)[:, 0].tolist())
                dists.append(wanted)
        return tokens, dists

    # -- the step ------------------------------------------------------------------------------
    def _decode_step(self, rows: list[_Row]) -> list[RowUpdate]:
        updates: dict[int, RowUpdate] = {}
        new: dict[int, list[int]] = {row.slot: [] for row in rows}
        # Rows whose prefill just finished: their first token comes from the prefill's logits and
        # goes out at once; they join the stepping forward from the next step.
        fresh = [row for row in rows if row.clean_upto >= row.final_upto]
        if fresh:
            carry = self.carry[torch.tensor([r.slot for r in fresh], device=self.device)][:, None]
            first, _ = self._pick(fresh, self._constrain(fresh, carry))
            for row, tokens in zip(fresh, first, strict=True):
                updates[row.slot] = self._update(row, new[row.slot], self._commit(row, tokens, new[row.slot]))
        active = [row for row in rows if row.slot not in updates]
        if active:
            self._forward_and_decide(active, new, updates)
        return [updates[row.slot] for row in rows]

    def _forward_and_decide(self, rows: list[_Row], new: dict[int, list[int]], updates: dict[int, RowUpdate]) -> None:
        """One forward of every row's last final token (position c - 1, seeing keys < c)."""
        n = len(rows)
        B = _batch_bucket(n)
        plan = [[0] * B, [self.kv.scratch_pos] * B, [1] * B, [self.kv.scratch_row] * B]  # token, position, limit, slot
        for b, row in enumerate(rows):
            c = row.final_upto
            plan[0][b], plan[1][b], plan[2][b], plan[3][b] = row.ids[c - 1], c - 1, c, row.slot
        K = min(_bucket(max(row.final_upto for row in rows)), self.S)
        tok_t, pos_t, lim_t, rows_t = self._upload(torch.tensor(plan, dtype=torch.long))
        logits = self._step_fn(tok_t[:, None], pos_t[:, None], limit_mask(lim_t[:, None], K), cache=self.kv,
                               cache_rows=rows_t, step=True)  # (B, 1, V)
        tokens, _ = self._pick(rows, self._constrain(rows, logits[:n]))
        for row, picked in zip(rows, tokens, strict=True):
            row.steps += 1
            row.clean_upto = row.final_upto  # the fed token's K/V are in the cache now
            updates[row.slot] = self._update(row, new[row.slot], self._commit(row, picked, new[row.slot]))


class AREngine(Engine):
    supports_constraints = True

    def __init__(self, loaded: Any, **kwargs: Any) -> None:
        kwargs.setdefault("cache", "exact")
        super().__init__(loaded, **kwargs)

    def _engine_spec(self, spec: DiffusionSpec) -> DiffusionSpec:
        return ar_spec(spec)

    def _force(self, params: GenerationParams) -> GenerationParams:
        return replace(params, block_size=1, sub_block_size=0, steps_per_block=0, policy="threshold")

    def make_decoder(self, **kwargs: Any) -> BlockDecoder:
        return ARDecoder(self.model, self.spec, **kwargs)

