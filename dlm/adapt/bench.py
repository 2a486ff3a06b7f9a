"""Throughput of the recipe's two heavy steps on a randomly initialised SmolLM2-135M-shaped model,
so a device can be measured before the base model has arrived (call 1 of docs/gpu-run.md).

`bench(device, ...)` times training steps of the real objective (batch of `batch_size` examples
of `seq_len` tokens, x_t ⊕ x_0, both complementary views) and teacher decoding steps (HF
`generate` with a batch of prompts and a fixed number of new tokens, EOS disabled) and returns
seconds per step and tokens per second for each.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dlm.adapt.objective import diffusion_loss, diffusion_targets
from dlm.config import ModelConfig
from dlm.model import Transformer

__all__ = ["SMOLLM2_135M", "bench"]

SMOLLM2_135M = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                           rope_theta=100_000.0, max_seq_len=2048, tie_embeddings=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(device: str, *, batch_size: int = 64, seq_len: int = 128, block_size: int = 32, train_steps: int = 10,
          gen_batch_size: int = 768, prompt_len: int = 68, new_tokens: int = 64, config: ModelConfig = SMOLLM2_135M
          ) -> dict[str, Any]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = Transformer(config).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    x0 = torch.randint(config.vocab_size // 2, config.vocab_size, (batch_size, seq_len), device=dev)
    supervised = torch.zeros_like(x0, dtype=torch.bool)
    supervised[:, seq_len // 2:] = True
    generator = torch.Generator(device=dev).manual_seed(0)
    result: dict[str, Any] = {"device": device, "batch_size": batch_size, "seq_len": seq_len}
    times = []
    for step in range(train_steps + 2):  # two warm-up steps
        _sync(dev)
        t0 = time.perf_counter()
        targets = diffusion_targets(x0, supervised, block_size=block_size, mask_id=16, generator=generator)
        with autocast:
            loss = diffusion_loss(model, targets, block_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _sync(dev)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    s = sum(times) / len(times)
    result["train_s_per_step"] = round(s, 4)
    result["train_tokens_per_s"] = round(batch_size * seq_len / s, 1)  # examples' tokens, as train.py counts them
    del optimizer
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        rope_theta=config.rope_theta, tie_word_embeddings=True, max_position_embeddings=config.max_seq_len,
    )).to(device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    prompts = torch.randint(config.vocab_size // 2, config.vocab_size, (gen_batch_size, prompt_len), device=dev)
    with torch.inference_mode():
        hf.generate(input_ids=prompts[:, :8], max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync(dev)
        t0 = time.perf_counter()
        hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync(dev)
    g = time.perf_counter() - t0
    result.update(gen_batch_size=gen_batch_size, gen_new_tokens=new_tokens, gen_s_per_batch=round(g, 2),
                  gen_tokens_per_s=round(gen_batch_size * new_tokens / g, 1))
    return result
