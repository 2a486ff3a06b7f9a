"""Evaluation of a student on the held-out prompts, against the teacher.

Contract: `evaluate(student, spec, teacher, heldout, ...) -> EvalReport` decodes every held-out
prompt greedily with `diffusion_decode` at each threshold and measures:
- the teacher's NLL per token of the student's replies, and its ratio to the NLL per token of
  the teacher's own greedy replies to the same prompts (token-weighted means);
- tokens per denoising forward pass (all reply tokens / all passes), and per pass counting the
  one extra "block write" pass an exact-cache engine spends per finished block;
- the share of replies that end with EOS within `max_new_tokens` (64), and the share that loop;
- ten example replies side by side with the teacher's.
`EvalReport.bars` checks the quality bars of docs/models.md at threshold 0.9.

`diffusion_decode` is a compact uncached reference of the engine's decoding (dlm.decode,
cache="none"): blocks aligned to absolute positions, token shift, sub-blocks, the threshold
policy committing at least one slot per step, EOS ending a row once everything before it is final.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from dlm.adapt.data import Example
from dlm.adapt.quality import ends_with_eos, has_loop
from dlm.adapt.teacher import reply_nll
from dlm.config import DiffusionSpec
from dlm.masks import block_causal_mask
from dlm.model import Transformer

__all__ = ["BARS", "DecodeResult", "EvalReport", "diffusion_decode", "evaluate"]

THRESHOLDS = (0.7, 0.8, 0.9)
# The quality bars (issue 4), checked at threshold 0.9.
BARS = {"max_nll_ratio": 1.3, "min_tokens_per_pass": 2.5, "min_eos_rate": 0.95, "max_loop_rate": 0.0}


@dataclass
class DecodeResult:
    ids: list[int]  # the reply, EOS included where it ended with one
    passes: int  # denoising forward passes spent on this row
    blocks: int  # blocks this row decoded (completed or ended in)
    eos: bool  # ended with EOS within max_new_tokens


@torch.inference_mode()
def diffusion_decode(model: Transformer, spec: DiffusionSpec, prompts: list[list[int]], *, threshold: float,
                     max_new_tokens: int = 64, batch_size: int = 64, block_size: int = 0,
                     sub_block_size: int = 0, desc: str = "decode") -> list[DecodeResult]:
    bs = block_size or spec.block_size
    sub = sub_block_size or spec.sub_block_size or bs
    if spec.mask_token_id is None or not spec.logit_shift or spec.attention != "block_causal":
        raise ValueError("diffusion_decode expects a block-causal model with a mask token and token shift")
    device = model.model.embed_tokens.weight.device
    eos = set(spec.eos_token_ids)
    results: list[DecodeResult] = []
    for b in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", mininterval=2.0):
        results += _decode_batch(model, prompts[b:b + batch_size], threshold, max_new_tokens, bs, sub,
                                 spec.mask_token_id, eos, device)
    return results


def _decode_batch(model: Transformer, prompts: list[list[int]], threshold: float, max_new_tokens: int, bs: int,
                  sub: int, mask_id: int, eos: set[int], device: torch.device) -> list[DecodeResult]:
    B = len(prompts)
    P = [len(p) for p in prompts]
    origin = [p // bs * bs for p in P]
    gen_end = [p + max_new_tokens for p in P]
    total = max(o + -(-(g - o) // bs) * bs for o, g in zip(origin, gen_end, strict=True))
    canvas = torch.full((B, total), mask_id, dtype=torch.long)
    committed = torch.zeros((B, total), dtype=torch.bool)
    for r, p in enumerate(prompts):
        canvas[r, :len(p)] = torch.tensor(p)
        committed[r, :len(p)] = True
    block_start = list(origin)
    eos_pos: list[int | None] = [None] * B
    passes, blocks = [0] * B, [1] * B
    active = list(range(B))
    while active:
        T = max(block_start[r] + bs for r in active)
        rows = torch.tensor(active)
        tokens = canvas[rows, :T].to(device)
        positions = torch.arange(T, device=device)[None].expand(len(active), -1)
        # Token shift: slot j of the block is predicted at position j - 1.
        out_index = torch.tensor([[max(block_start[r] + j - 1, 0) for j in range(bs)] for r in active], device=device)
        logits = model(tokens, positions, block_causal_mask(T, bs, device), out_index=out_index)  # (A, bs, V)
        conf, proposal = logits.softmax(-1).max(-1)
        conf, proposal = conf.cpu(), proposal.cpu()
        still = []
        for a, r in enumerate(active):
            passes[r] += 1
            s = block_start[r]
            needed = min(s + bs, gen_end[r], (eos_pos[r] + 1) if eos_pos[r] is not None else total)
            first_open = next(j for j in range(s, needed) if not committed[r, j])
            unit = s + (first_open - s) // sub * sub
            cand = [j for j in range(max(unit, s), min(unit + sub, needed)) if not committed[r, j]]
            commit = [j for j in cand if conf[a, j - s] >= threshold]
            if not commit:
                commit = [max(cand, key=lambda j: conf[a, j - s].item())]
            for j in commit:
                canvas[r, j] = proposal[a, j - s]
                committed[r, j] = True
                if int(proposal[a, j - s]) in eos and j >= P[r] and (eos_pos[r] is None or j < eos_pos[r]):
                    eos_pos[r] = j
            needed = min(s + bs, gen_end[r], (eos_pos[r] + 1) if eos_pos[r] is not None else total)
            if not bool(committed[r, s:needed].all()):
                still.append(r)
            elif eos_pos[r] is None and needed < gen_end[r]:
                block_start[r] += bs  # the block is final: move on
                blocks[r] += 1
                still.append(r)
        active = still
    out = []
    for r in range(B):
        end = eos_pos[r] + 1 if eos_pos[r] is not None else gen_end[r]
        out.append(DecodeResult(canvas[r, P[r]:end].tolist(), passes[r], blocks[r], eos_pos[r] is not None))
    return out


@dataclass
class ThresholdReport:
    threshold: float
    student_nll_per_token: float  # teacher NLL per token of the student's replies
    nll_ratio: float  # student_nll_per_token / teacher's own
    tokens_per_pass: float  # reply tokens / denoising passes
    tokens_per_pass_with_writes: float  # counting one block-write pass per block (exact cache)
    eos_rate: float  # share ending with EOS within max_new_tokens
    loop_rate: float  # share with a loop (dlm.adapt.quality.has_loop)
    mean_reply_tokens: float


@dataclass
class EvalReport:
    n_prompts: int
    teacher_nll_per_token: float  # teacher NLL per token of its own greedy replies
    teacher_mean_reply_tokens: float
    thresholds: list[ThresholdReport]
    examples: list[dict[str, str]]  # prompt / teacher / student (threshold 0.9)
    bars: dict[str, Any] = field(default_factory=dict)  # bar -> {"value", "limit", "pass"}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"held-out prompts: {self.n_prompts}; teacher NLL/token of its own replies: "
                 f"{self.teacher_nll_per_token:.3f} (mean {self.teacher_mean_reply_tokens:.1f} tokens)", "",
                 "| threshold | NLL/token | ratio | tokens/pass | tokens/pass (with block writes) | EOS ≤64 | loops | mean tokens |",
                 "|---|---|---|---|---|---|---|---|"]
        for t in self.thresholds:
            lines.append(f"| {t.threshold} | {t.student_nll_per_token:.3f} | {t.nll_ratio:.2f} | {t.tokens_per_pass:.2f} | "
                         f"{t.tokens_per_pass_with_writes:.2f} | {t.eos_rate:.1%} | {t.loop_rate:.1%} | {t.mean_reply_tokens:.1f} |")
        lines += ["", "| bar (threshold 0.9) | value | limit | pass |", "|---|---|---|---|"]
        for name, bar in self.bars.items():
            lines.append(f"| {name} | {bar['value']:.3f} | {bar['limit']} | {'yes' if bar['pass'] else 'NO'} |")
        lines += ["", "Examples (threshold 0.9):", ""]
        for ex in self.examples:
            lines += [f"- **prompt**: {ex['prompt']}", f"  - teacher: {ex['teacher']}", f"  - student: {ex['student']}"]
        return "\n".join(lines) + "\n"


def _mean_nll(pairs: list[tuple[float, int]]) -> float:
    return sum(n for n, _ in pairs) / max(sum(k for _, k in pairs), 1)


def evaluate(student: Transformer, spec: DiffusionSpec, teacher: Any, tokenizer: Any, heldout: list[Example], *,
             thresholds: tuple[float, ...] = THRESHOLDS, max_new_tokens: int = 64, batch_size: int = 64,
             n_examples: int = 10) -> EvalReport:
    """`heldout`: one example per held-out prompt holding the teacher's greedy reply."""
    prompts = [e.prompt_ids for e in heldout]
    teacher_pairs = reply_nll(teacher, prompts, [e.reply_ids for e in heldout], batch_size=batch_size)
    teacher_nll = _mean_nll(teacher_pairs)
    eos = set(spec.eos_token_ids)
    reports, examples = [], []
    for threshold in thresholds:
        decoded = diffusion_decode(student, spec, prompts, threshold=threshold, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, desc=f"decode@{threshold}")
        replies = [d.ids if d.ids else [spec.eos_token_ids[0]] for d in decoded]
        nll = _mean_nll(reply_nll(teacher, prompts, replies, batch_size=batch_size))
        n_tok = sum(len(d.ids) for d in decoded)
        passes = sum(d.passes for d in decoded)
        reports.append(ThresholdReport(
            threshold=threshold,
            student_nll_per_token=nll,
            nll_ratio=nll / max(teacher_nll, 1e-9),
            tokens_per_pass=n_tok / max(passes, 1),
            tokens_per_pass_with_writes=n_tok / max(passes + sum(d.blocks for d in decoded), 1),
            eos_rate=sum(ends_with_eos(d.ids, eos, max_new_tokens) for d in decoded) / max(len(decoded), 1),
            loop_rate=sum(has_loop(d.ids) for d in decoded) / max(len(decoded), 1),
            mean_reply_tokens=n_tok / max(len(decoded), 1),
        ))
        if threshold == max(thresholds):
            for e, d in list(zip(heldout, decoded, strict=True))[:n_examples]:
                examples.append({
                    "prompt": " / ".join(m["content"] for m in e.messages if m["role"] != "system"),
                    "teacher": tokenizer.decode(e.reply_ids, skip_special_tokens=True),
                    "student": tokenizer.decode(d.ids, skip_special_tokens=True),
                })
    report = EvalReport(len(heldout), teacher_nll, sum(len(e.reply_ids) for e in heldout) / max(len(heldout), 1),
                        reports, examples)
    at = next((t for t in reports if t.threshold == 0.9), reports[-1])
    report.bars = {
        "nll_ratio": {"value": at.nll_ratio, "limit": f"<= {BARS['max_nll_ratio']}", "pass": at.nll_ratio <= BARS["max_nll_ratio"]},
        "tokens_per_pass": {"value": at.tokens_per_pass, "limit": f">= {BARS['min_tokens_per_pass']}",
                            "pass": at.tokens_per_pass >= BARS["min_tokens_per_pass"]},
        "eos_rate": {"value": at.eos_rate, "limit": f">= {BARS['min_eos_rate']}", "pass": at.eos_rate >= BARS["min_eos_rate"]},
        "loop_rate": {"value": at.loop_rate, "limit": f"<= {BARS['max_loop_rate']}", "pass": at.loop_rate <= BARS["max_loop_rate"]},
    }
    return report
