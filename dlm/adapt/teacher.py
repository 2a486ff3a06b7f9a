"""The AR teacher: batched reply generation and per-token NLL scoring.

Contract:
- `hf_teacher(loaded)` wraps a loaded AR checkpoint (dlm.checkpoints: GGUF, HF folder, bd file of
  family "ar") as a Hugging Face `LlamaForCausalLM` sharing the same weights, for its batched
  `generate`. Llama-shaped models only (no q/k/v biases, no q/k norms).
- `generate_replies(...)` answers prompts (token ids) greedily or by sampling, in length-sorted
  batches, and returns per prompt the reply cut after its first EOS id, or None where the reply did
  not end with EOS within `max_new_tokens` or loops (such replies are not kept for training);
  with `keep_unfinished=True` such a reply is returned as generated (held-out references).
- `engine_replies(loaded, ...)`: the same on this project's AR engine (the GGUF's blocks on a CPU:
  several times faster than `generate` there).
- `written_prompts(loaded, starts, ...)`: prompts the model writes itself (Magpie, arXiv
  2406.08464): for each (system prompt, first words of a request), the chat template up to the
  user's turn and those words, continued by sampling on the AR engine until the model ends the
  turn; `clean_request` keeps it or not (None), and a request written before makes it None.
  Deterministic for a seed.
- `reply_nll(...)` is the teacher's mean negative log-likelihood per token of given replies
  (EOS included) after their prompts: the quality measure of evaluation.
A `deadline` (time.monotonic() value) stops generation between batches; unfinished prompts get None.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dlm.adapt.prompts import SELF_KIND, Prompt, clean_request
from dlm.adapt.quality import has_loop
from dlm.checkpoints import LoadedModel

__all__ = ["engine_replies", "generate_replies", "hf_teacher", "reply_nll", "written_prompts"]


def hf_teacher(loaded: LoadedModel, device: str | torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = loaded.config
    if c.qkv_bias or c.qk_norm:
        raise ValueError("the teacher must be Llama-shaped (no q/k/v biases, no q/k norms)")
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=None, eos_token_id=loaded.spec.eos_token_ids, pad_token_id=loaded.spec.eos_token_ids[0],
    )
    model = LlamaForCausalLM(hf_config)
    state = {k: v.float() for k, v in loaded.model.state_dict().items()}
    if c.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def generate_replies(model, prompts: Sequence[list[int]], *, eos_ids: list[int], max_new_tokens: int,
                     batch_size: int, do_sample: bool, temperature: float = 0.7, top_p: float = 0.9,
                     seed: int = 0, deadline: float | None = None, desc: str = "teacher",
                     keep_unfinished: bool = False) -> list[list[int] | None]:
    device = next(model.parameters()).device
    pad_id = eos_ids[0]
    eos = set(eos_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[list[int] | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", mininterval=2.0)
    n_tokens, t0 = 0, time.monotonic()
    for b in range(0, len(order), batch_size):
        if deadline is not None and time.monotonic() > deadline:
            bar.write(f"{desc}: time budget reached after {b} of {len(prompts)} prompts")
            break
        idx = order[b:b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every row's reply starts at column `width`
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[r, width - len(prompts[i]):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample \
            else {"do_sample": False}
        out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                             **sampling).cpu()
        for r, i in enumerate(idx):
            reply = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(reply) if t in eos), None)
            if cut is not None and not has_loop(reply[:cut]):
                replies[i] = reply[:cut + 1]
            elif keep_unfinished:
                replies[i] = reply[:cut + 1] if cut is not None else reply
            n_tokens += len(replies[i] or ())
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{n_tokens / max(time.monotonic() - t0, 1e-9):.0f}")
    bar.close()
    return replies


def engine_replies(loaded: LoadedModel, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                   do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                   deadline: float | None = None, desc: str = "teacher", keep_unfinished: bool = False,
                   **_: object) -> list[list[int] | None]:
    """`generate_replies`' contract on this project's AR engine (dlm.ar.AREngine, continuous
    batching of `batch_size` rows) instead of Hugging Face `generate`: on a CPU with the GGUF's
    blocks about 190 reply tokens/s against 10-40 (2 cores). Replies end with the EOS id the
    model wrote; sampled ones use seed + the prompt's index."""
    from dlm.engine import GenerationParams

    replies: list[list[int] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", mininterval=2.0)
    n_tokens, t0 = 0, time.monotonic()

    def params(i: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0, seed=seed + i if do_sample else None)

    for i, deltas in _engine_runs(loaded, prompts, params, batch_size=batch_size, deadline=deadline, bar=bar,
                                  desc=desc):
        reply = [t for d in deltas for t in d.token_ids]
        end = [deltas[-1].eos_id] if deltas[-1].finish_reason == "eos" else []
        if (end and not has_loop(reply)) or keep_unfinished:  # as generate_replies keeps them
            replies[i] = reply + end
        n_tokens += len(replies[i] or ())
        bar.set_postfix(tok_s=f"{n_tokens / max(time.monotonic() - t0, 1e-9):.0f}", refresh=False)
    bar.close()
    return replies


def _engine_runs(loaded: LoadedModel, prompts: Sequence[list[int]], params, *, batch_size: int,
                 deadline: float | None, bar: tqdm, desc: str, stop=None) -> Iterator[tuple[int, list]]:
    """(index, the engine's deltas) per prompt, in order, on this project's AR engine with
    `batch_size` rows; `params(i)` gives prompt i's GenerationParams. A few rows' worth are queued
    at a time, so `stop()` (true: enough) and the deadline are checked between those waves; each
    says on the bar (`desc`) after how many prompts it ended the run."""
    from dlm.ar import AREngine

    with AREngine(loaded, max_batch_size=batch_size) as engine:
        for b in range(0, len(prompts), 4 * batch_size):
            if stop is not None and stop():
                bar.write(f"{desc}: enough after {b} of {len(prompts)} prompts")
                return
            if deadline is not None and time.monotonic() > deadline:
                bar.write(f"{desc}: time budget reached after {b} of {len(prompts)} prompts")
                return
            wave = range(b, min(b + 4 * batch_size, len(prompts)))
            handles = [engine.submit(prompts[i], params(i)) for i in wave]
            for i, handle in zip(wave, handles, strict=True):
                yield i, list(handle)
                bar.update(1)


def written_prompts(loaded: LoadedModel, starts: Sequence[tuple[str, str]], *, max_new_tokens: int = 48,
                    batch_size: int = 8, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                    deadline: float | None = None, enough: int | None = None,
                    desc: str = "prompts") -> list[Prompt | None]:
    """Per (system prompt, start of the request): the user's request the model wrote from it,
    as a Prompt of kind SELF_KIND, or None (no end of turn within `max_new_tokens`, a loop,
    `clean_request` refused it, or an earlier start's request was the same, case aside).
    Row i samples with seed (seed << 32) + i: the same prompts in any batch, and none of one seed's
    rows samples as another seed's row does. With `enough`, the first that many requests kept are
    returned (the rest stay None) and no further wave of starts is begun once they are."""
    from dlm.chat import ChatFormatter
    from dlm.engine import GenerationParams

    formatter = ChatFormatter(loaded.tokenizer, loaded.spec)
    heads = [[{"role": "system", "content": system}, {"role": "user", "content": start}] for system, start in starts]
    if heads:  # the model ends the request with an end-of-turn id only where the template does
        first, closed = formatter.encode_open(heads[0]), formatter.encode(heads[0], add_generation_prompt=False)
        if closed[len(first):len(first) + 1] not in ([t] for t in loaded.spec.eos_token_ids):
            raise ValueError("the chat template does not end a user's turn with an end-of-turn id: the model "
                             "cannot say where a request it writes ends")
    opened = formatter.encode_many_open(heads)  # the template rendered once per role sequence
    out: list[Prompt | None] = [None] * len(starts)
    seen: set[str] = set()
    bar = tqdm(total=len(starts), desc=desc, unit="prompt", mininterval=2.0)

    def params(i: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=(seed << 32) + i)

    def full() -> bool:
        return enough is not None and len(seen) >= enough

    for i, deltas in _engine_runs(loaded, opened, params, batch_size=batch_size, deadline=deadline, bar=bar,
                                  desc=desc, stop=full):
        ids = [t for d in deltas for t in d.token_ids]
        if full() or deltas[-1].finish_reason != "eos" or has_loop(ids):  # the rest of the last wave
            continue
        system, start = starts[i]
        # The start decoded with the continuation (its spacing); a special token written
        # inside the request stays as its markup text, which clean_request refuses.
        text = loaded.tokenizer.decode(formatter.content_ids(start) + ids, skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        request = clean_request(text)
        if request is not None and request.lower() not in seen:
            seen.add(request.lower())
            out[i] = Prompt((("system", system), ("user", request)), SELF_KIND)
            bar.set_postfix(kept=len(seen), refresh=False)
    bar.close()
    return out


@torch.inference_mode()
def reply_nll(model, prompts: Sequence[list[int]], replies: Sequence[list[int]], *,
              batch_size: int = 32) -> list[tuple[float, int]]:
    """Per example: (sum of the teacher's NLL over the reply's tokens, number of reply tokens)."""
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = []
    for b in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[b:b + batch_size], replies[b:b + batch_size], strict=True))
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (p, y) in enumerate(chunk):  # right padding: causal rows never see it
            ids[r, :len(p) + len(y)] = torch.tensor(p + y)
            attention[r, :len(p) + len(y)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): position t predicts t + 1
        tok_logp = logp.gather(-1, ids[:, 1:].to(device)[..., None])[..., 0].cpu()  # (B, T-1)
        for r, (p, y) in enumerate(chunk):
            nll = -tok_logp[r, len(p) - 1:len(p) - 1 + len(y)].sum().item()
            results.append((nll, len(y)))
    return results
