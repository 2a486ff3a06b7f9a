"""Random-weight models in the shapes of real checkpoints: for benchmarks that compare work, not quality.

Contract: `SYNTHETIC_MODELS` names presets (a `ModelConfig` and a `DiffusionSpec` each);
`synthetic_model(name, *, device, dtype=None, max_seq_len=None, seed=0) -> LoadedModel` builds
one with N(0, 0.02) weights (norms 1), allocated directly in `dtype` on `device` (never a float32
copy of the whole model first). It has no tokenizer (prompts are token ids, replies have no text)
and no EOS ids, so every reply runs to max_new_tokens and the work per reply is fixed: with a
fixed number of denoising steps per block, a benchmark on these weights measures the same work
on any machine. Nothing is downloaded.

| name              | shapes of                                   | block | mask id |
|-------------------|---------------------------------------------|-------|---------|
| fast-dllm-v2-1.5b | Efficient-Large-Model/Fast_dLLM_v2_1.5B (Qwen2.5-1.5B: 28 layers, hidden 1536, 12 heads, 2 KV heads, MLP 8960, vocab 151936, qkv bias, tied embeddings) | 32 | 151665 |
| small             | a 4-layer toy for CPU runs and tests         | 32    | 4095    |
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dlm.checkpoints import LoadedModel, resolve_dtype
from dlm.config import DiffusionSpec, ModelConfig
from dlm.model import Transformer

__all__ = ["SYNTHETIC_MODELS", "synthetic_model"]

SYNTHETIC_MODELS: dict[str, tuple[ModelConfig, DiffusionSpec]] = {
    "fast-dllm-v2-1.5b": (
        ModelConfig(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, intermediate_size=8960,
                    rope_theta=1_000_000.0, norm_eps=1e-6, max_seq_len=4096, qkv_bias=True, tie_embeddings=True),
        DiffusionSpec(family="synthetic", attention="block_causal", mask_token_id=151665, logit_shift=True,
                      block_size=32),
    ),
    "small": (
        ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=704,
                    max_seq_len=2048, qkv_bias=True, tie_embeddings=True),
        DiffusionSpec(family="synthetic", attention="block_causal", mask_token_id=4095, logit_shift=True,
                      block_size=32),
    ),
}


def synthetic_model(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    max_seq_len: int | None = None, seed: int = 0) -> LoadedModel:
    """dtype None / "auto": float32 on CPU, bfloat16 elsewhere (as `load_model`)."""
    if name not in SYNTHETIC_MODELS:
        raise ValueError(f"unknown synthetic model {name!r}; expected one of {', '.join(SYNTHETIC_MODELS)}")
    config, spec = SYNTHETIC_MODELS[name]
    config = replace(config, max_seq_len=max_seq_len or config.max_seq_len)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):  # shapes only: the weights are allocated once, in dtype, on device
        model = Transformer(config, init=False)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    model.build_rope(device)
    return LoadedModel(model=model.eval(), config=config, spec=replace(spec, eos_token_ids=[]), tokenizer=None,
                       family="synthetic", path=Path(f"synthetic:{name}"))
