"""End-of-turn verdicts, and the text score: our own chat LM's probability that the caller's
message is over, from what was said.

Contract:
- `TurnVerdict(over, audio_p, text_p)`: a judged pause; `decide(audio_p, text_p, threshold,
  text_threshold)` is the rule. One score: over when it reaches its threshold (the audio model's
  P >= `threshold`, the text score >= `text_threshold`). Both: their evidence multiplies, as two
  independent witnesses' odds do: over when (text_p / text_threshold) x (odds(audio_p) /
  odds(threshold)) >= 1, so each threshold is where its score is neutral, a clear verdict of one
  outweighs a doubtful one of the other, and two doubtful ones ("over" and "goes on") leave it to
  the surer. The text score's say against an end is bounded (`TEXT_EVIDENCE_FLOOR`: at most
  1:55, about as far as it reaches for one at the default text_threshold, 1/0.03 = 33:1): it
  reads whisper's transcript, and a finished sentence garbled into a fragment must not outvote
  a voice sure it has finished (an
  e2e run over /twilio, session 26: "Remind me how to make a cup of green tea." at P 0.9996 and
  text 0.0000 waited 1.5 s for the silence fallback); so at threshold 0.5, P >= 0.982 ends a
  turn whatever the words. A text score of 0 is an empty transcript (nothing heard), which
  never ends one. On the training sentences of the prosody model, held out (docs/turn-taking.md,
  session 25), this rule without the bound ended 89 % of finished sentences at the first pause
  against 81 % when both had to agree (P >= 0.2), and 3.6 % of mid-sentence pauses against
  2.7 % (the text score alone: 88 % and 25 %). The two scores live on different scales (the
  text score is a raw next-token probability, below 0.5 even for finished requests), hence two
  thresholds. `unsure_silence_ms(avg_logprob, unsure_logprob, silence_ms)`: where a verdict is not
  "over", the shorter silence for a transcript whisper was unsure of (turn.unsure_*), else 0.
- `TextTurnScorer(loaded)`: `loaded` is a dlm `LoadedModel` of a causal chat model with a chat
  template (the embedded SmolLM2-135M-Instruct; `load_text_scorer(name)` loads one by registry
  name: in bfloat16, the fastest dtype on AMX; on a CPU without AMX but with AVX512-VNNI a GGUF's
  blocks in 16-bit integer products, 2.3x faster there and float32's scores within 0.001).
  `load_text_scorer(name, share=loaded)`: where `loaded` (the local LLM's model, `LocalDLM.loaded`)
  is that same GGUF on those same blocks, the scorer runs on its weights without its adapter
  (`Transformer.without_low_rank`, the same bits as a model of its own) instead of loading a
  second copy: about 140 MB resident and a second of start-up less for the default models.
- `.probability(transcript) -> float`: the transcript so far is lower-cased and stripped of
  punctuation (`normalize_transcript`: ASR punctuation says little about a fragment), placed as the user's message in the
  chat template, and the model reads the next token: the probability of the template's
  end-of-message token or of sentence-final punctuation (".", "?", "!"), summed. A finished
  request ("what time do you close tonight") scores high, a fragment ("i would like to book a
  table for") low; "" scores 0. The idea is LiveKit's text turn detector's (a small LM reading
  the transcript); this model is not fine-tuned for it. The newest `MAX_TOKENS` tokens count.
  The chat template's prefix (system prompt, user header) is run once into a small KV cache of
  the scorer's own; each call runs only the transcript's tokens over it (where the tokenizer
  would merge a token across the boundary, the whole text is run from position 0 and the prefix
  is cached again after). Calls are
  serialized by a lock; the model's weights are shared and never written, so it may run beside
  the engine's own thread.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from voice_agent.transcription import normalize_transcript

__all__ = ["MAX_TOKENS", "TEXT_EVIDENCE_FLOOR", "TextTurnScorer", "TurnVerdict", "decide", "load_text_scorer",
           "unsure_silence_ms"]

MAX_TOKENS = 96
TEXT_EVIDENCE_FLOOR = -4.0  # the lower bound of log(text_p / text_threshold): at most 4 nats against an end
_MARK = "\x00turn\x00"


@dataclass(frozen=True)
class TurnVerdict:
    over: bool
    audio_p: float | None = None  # the audio model's P(turn over) (Smart Turn or prosody), where it ran
    text_p: float | None = None  # the text score, where it ran


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def decide(audio_p: float | None, text_p: float | None, threshold: float, text_threshold: float) -> bool:
    """Over or not, from the scores there are (see the module docstring); no score: never over."""
    if audio_p is None or text_p is None:
        if audio_p is not None:
            return audio_p >= threshold
        return text_p is not None and text_p >= text_threshold
    if text_p <= 0.0:
        return False  # an empty transcript: nothing heard, and the sound alone does not end the turn
    text_evidence = max(math.log(text_p / max(text_threshold, 1e-12)), TEXT_EVIDENCE_FLOOR)
    return text_evidence + _logit(audio_p) - _logit(threshold) >= 0.0


def unsure_silence_ms(avg_logprob: float | None, unsure_logprob: float, silence_ms: int) -> int:
    """The shorter silence that ends a turn at a pause whose transcript whisper was unsure of:
    `silence_ms` where its mean log-probability per token is below `unsure_logprob` (garbled
    words, which the text score cannot judge), else 0; 0 also where the rule is off."""
    if not silence_ms or avg_logprob is None or avg_logprob >= unsure_logprob:
        return 0
    return silence_ms


class TextTurnScorer:
    def __init__(self, loaded: Any, *, cache_dtype: Any = None) -> None:
        """cache_dtype: its KV cache's (torch) dtype, else the model's choice (`Transformer.new_cache`)."""
        tokenizer = loaded.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the text end-of-turn score needs a model with a tokenizer and a chat template")
        self._model = loaded.model
        self._tokenizer = tokenizer
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
        self._prefix, suffix = rendered.split(_MARK, 1)
        end_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if not end_ids:
            raise ValueError("the chat template puts nothing after the user's message: no end-of-message token to read")
        ends = {end_ids[0]}
        for mark in (".", "?", "!"):
            ids = tokenizer(mark, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                ends.add(ids[0])
        self._end_ids = sorted(ends)
        self._lock = threading.Lock()
        self._prefix_ids = tokenizer(self._prefix, add_special_tokens=False)["input_ids"]
        self._cache = self._model.new_cache(1, max_seq_len=len(self._prefix_ids) + MAX_TOKENS, dtype=cache_dtype)
        self._next_token_probs(self._prefix_ids, 0)  # fills the cache with the prefix

    def _next_token_probs(self, ids: list[int], start: int) -> Any:
        """Run `ids` at positions start.. over the cached positions before `start`; the
        next-token distribution after the last one."""
        import torch

        n = len(ids)
        device = self._model.device
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=device)
            positions = torch.arange(start, start + n, device=device)[None]
            mask = torch.ones(n, start + n, dtype=torch.bool, device=device).tril(diagonal=start)[None, None]
            logits = self._model(tokens, positions, mask, cache=self._cache, cache_rows=torch.zeros(1, dtype=torch.long, device=device),
                                 out_index=torch.tensor([[n - 1]], device=device))[0, -1]
            return torch.softmax(logits.float(), dim=-1)

    def probability(self, transcript: str) -> float:
        text = normalize_transcript(transcript)
        if not text:
            return 0.0
        ids = self._tokenizer(self._prefix + text, add_special_tokens=False)["input_ids"]
        p = len(self._prefix_ids)
        with self._lock:
            if ids[:p] == self._prefix_ids:
                probs = self._next_token_probs(ids[p:][-MAX_TOKENS:], p)
            else:  # the tokenizer merged across the boundary: the whole text, cache rewritten
                ids = ids[-MAX_TOKENS - p :]
                probs = self._next_token_probs(ids, 0)
                self._next_token_probs(self._prefix_ids, 0)
            return float(probs[self._end_ids].sum().clamp(0.0, 1.0))


def load_text_scorer(name: str, *, device: str = "cpu", share: Any = None) -> TextTurnScorer:
    """The scorer on a model from the registry (or a path): dense bfloat16, or, on a CPU without
    AMX where the integer block products run, a GGUF's blocks with 16-bit inputs (a score there
    took 15.5 ms against 35.6 in bf16 at one thread on an AMD EPYC: docs/turn-taking.md). `share`:
    a dlm LoadedModel already in the process (the local LLM's); where it holds the blocks this
    would load (the same file, the same format, on the CPU; a scorer model without an adapter of
    its own), the scorer runs on them without their adapter instead (the module docstring)."""
    import torch

    from voice_agent.llm import load_local_llm
    from voice_agent.models import resolve_llm_model

    resolved = resolve_llm_model(name)
    dtype, weights = text_scorer_format(resolved, device)
    if (weights == "blocks-int16" and share is not None and resolved.adapter is None
            and getattr(share, "weights", None) == weights and share.model.device.type == "cpu"
            and Path(share.path).resolve() == resolved.path.resolve()):
        try:
            base = share.model.without_low_rank()
        except ValueError:  # no fused block forward: a model of its own
            pass
        else:  # a float32 cache, as a model of its own has (the LLM's may be float16)
            return TextTurnScorer(SimpleNamespace(model=base, tokenizer=share.tokenizer), cache_dtype=torch.float32)
    loaded, _resolved = load_local_llm(name, device=device, dtype=dtype, weights=weights)
    return TextTurnScorer(loaded)


def text_scorer_format(resolved: Any, device: str) -> tuple[str, str]:
    """(dtype, weights) that `load_text_scorer` loads a registry entry (voice_agent.models.ResolvedLlm)
    with: "blocks-int16" on a CPU without AMX where the integer block products run and the entry
    is a float32 GGUF (not an int4 one), else bfloat16 in the registry's format for it."""
    from dlm.blocks import amx_available, vnni_available
    from voice_agent.llm import load_format

    float32_gguf = resolved.path.suffix == ".gguf" and resolved.dtype in (None, "float32")  # not an int4 entry
    if device == "cpu" and float32_gguf and amx_available() is not None and vnni_available() is None:
        return load_format(resolved, device=device, dtype="auto", weights="blocks-int16")
    return load_format(resolved, device=device, dtype="bfloat16")
