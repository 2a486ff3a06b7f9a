"""Evaluation of a student on the held-out prompts, against the teacher.

Contract: `evaluate(student, spec, teacher, heldout, ...) -> EvalReport` decodes every held-out
prompt greedily with `diffusion_decode` (the engine's `BlockDecoder`: exact cache, the finished
block's clean write fused into the next block's first pass) at each threshold and measures:
- the teacher's NLL per token of the student's replies, and its ratio to the NLL per token of
  the teacher's own greedy replies to the same prompts (token-weighted means);
- tokens per denoising forward pass (all reply tokens / all passes; the prompt's prefill forward
  is not counted: it does not depend on the reply);
- the share of replies that end with EOS within `max_new_tokens` (64), and the share that loop;
- ten example replies side by side with the teacher's.
`EvalReport.bars` checks the quality bars of docs/models.md at threshold 0.9.

`diffusion_decode` drives `dlm.decode.BlockDecoder` itself (no engine thread): what the
evaluation measures is what the engine will do.
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
from dlm.decode import BlockDecoder, DecodeSettings
from dlm.model import Transformer
from dlm.policies import FixedSteps, Threshold

__all__ = ["BARS", "DecodeResult", "EvalReport", "diffusion_decode", "evaluate"]

# 1.0 means one token per step (FixedSteps, the most confident slot): the student's own best
# quality, which the "same quality as one-token-per-step decoding" compares against.
THRESHOLDS = (0.7, 0.8, 0.9, 1.0)
# The quality bars (issue 4), checked at threshold 0.9.
BARS = {"max_nll_ratio": 1.3, "min_tokens_per_pass": 2.5, "min_eos_rate": 0.95, "max_loop_rate": 0.0}


@dataclass
class DecodeResult:
    ids: list[int]  # the reply, EOS included where it ended with one
    passes: int  # denoising forward passes spent on this row (the prompt's prefill not counted)
    eos: bool  # ended with EOS within max_new_tokens


@torch.inference_mode()
def diffusion_decode(model: Transformer, spec: DiffusionSpec, prompts: list[list[int]], *, threshold: float,
                     max_new_tokens: int = 64, batch_size: int = 64, block_size: int = 0,
                     sub_block_size: int = 0, desc: str = "decode") -> list[DecodeResult]:
    """Greedy threshold decoding of every prompt with the engine's own step loop
    (`dlm.decode.BlockDecoder`, exact cache), `batch_size` rows at a time. threshold >= 1.0:
    one token per step (the most confident slot)."""
    bs = block_size or spec.block_size
    sub = sub_block_size or (spec.sub_block_size if not block_size else 0) or bs
    if spec.mask_token_id is None or not spec.logit_shift or spec.attention != "block_causal":
        raise ValueError("diffusion_decode expects a block-causal model with a mask token and token shift")
    one_per_step = threshold >= 1.0
    settings = DecodeSettings(block_size=bs, sub_block_size=sub, max_new_tokens=max_new_tokens,
                              policy=FixedSteps() if one_per_step else Threshold(), threshold=min(threshold, 1.0),
                              factor=1.0, steps_per_block=sub, temperature=0.0, top_p=1.0, seed=None)
    results: list[DecodeResult] = []
    for b in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", mininterval=2.0):
        batch = prompts[b:b + batch_size]
        longest = max(len(p) for p in batch) + max_new_tokens + 2 * bs
        decoder = BlockDecoder(model, spec, max_batch_size=len(batch), max_seq_len=longest,
                               prefill_budget_tokens=sum(len(p) for p in batch))
        done: list[DecodeResult | None] = [None] * len(batch)
        passes = [0] * len(batch)
        for slot, prompt in enumerate(batch):
            decoder.add(slot, prompt, settings)
        while decoder.rows:
            for update in decoder.step():  # one update per row per denoising forward
                passes[update.slot] += 1
                if update.finish_reason is not None:
                    # The row's final tokens, EOS included (RowUpdate.new_ids leaves EOS out).
                    reply = decoder.rows[update.slot].ids[len(batch[update.slot]):]
                    done[update.slot] = DecodeResult(reply, passes[update.slot], update.finish_reason == "eos")
                    decoder.remove(update.slot)
        results += [d for d in done if d is not None]
    return results


@dataclass
class ThresholdReport:
    threshold: float
    student_nll_per_token: float  # teacher NLL per token of the student's replies
    nll_ratio: float  # student_nll_per_token / teacher's own
    tokens_per_pass: float  # reply tokens / denoising passes (block writes are fused into them)
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
                 "| threshold | NLL/token | ratio | tokens/pass | EOS ≤64 | loops | mean tokens |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.thresholds:
            lines.append(f"| {t.threshold} | {t.student_nll_per_token:.3f} | {t.nll_ratio:.2f} | {t.tokens_per_pass:.2f} | "
                         f"{t.eos_rate:.1%} | {t.loop_rate:.1%} | {t.mean_reply_tokens:.1f} |")
        by = {t.threshold: t for t in self.thresholds}
        if 1.0 in by:
            lines += ["", "Threshold 1.0 is one token per step (the most confident slot)."]
            if 0.9 in by:
                lines.append(f"Quality at 0.9 against one token per step: NLL/token {by[0.9].student_nll_per_token:.3f} vs "
                             f"{by[1.0].student_nll_per_token:.3f} (x{by[0.9].student_nll_per_token / max(by[1.0].student_nll_per_token, 1e-9):.2f}).")
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
            eos_rate=sum(ends_with_eos(d.ids, eos, max_new_tokens) for d in decoded) / max(len(decoded), 1),
            loop_rate=sum(has_loop(d.ids) for d in decoded) / max(len(decoded), 1),
            mean_reply_tokens=n_tok / max(len(decoded), 1),
        ))
        if threshold == 0.9 or (0.9 not in thresholds and threshold == max(thresholds)):
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
