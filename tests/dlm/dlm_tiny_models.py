"""Tiny models for the dlm engine tests, built from ModelConfig directly (no checkpoint code).

- `random_loaded(attention, ...)`: a random transformer (seeded) with a DiffusionSpec.
- `counting_loaded(...)`: "a model that prefers fixed tokens": whatever the context, the logits
  at a position holding token t put almost all mass on t + 1 (mod COUNT_V); at a masked position
  they are flat. With a logit shift it therefore writes prompt[-1] + 1, + 2, ... one confident
  slot at a time, which makes outputs, EOS and step counts known in advance.
- `CharTokenizer`: id t <-> the letter chr(97 + t % 26), for text and stop-string tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dlm.config import DiffusionSpec, ModelConfig
from dlm.model import Transformer

V = 64  # vocabulary of the random models; the last id is the mask token
MASK = V - 1


@dataclass
class Loaded:
    model: Transformer
    config: ModelConfig
    spec: DiffusionSpec
    tokenizer: Any = None
    family: str = "test"
    path: str = "<memory>"
    weights: str = "dense"  # as dlm.checkpoints.LoadedModel


def tiny_config(**overrides: Any) -> ModelConfig:
    fields = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                  max_seq_len=256, rope_theta=10_000.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_loaded(attention: str = "block_causal", *, seed: int = 0, logit_shift: bool = True,
                  block_size: int = 4, eos: list[int] | None = None, scale: float = 1.0,
                  tokenizer: Any = None, **cfg: Any) -> Loaded:
    config = tiny_config(**cfg)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():  # sharper logits than the default init, so confidences spread out
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)
    spec = DiffusionSpec(family="test", attention=attention, mask_token_id=MASK,
                         eos_token_ids=list(eos or []), logit_shift=logit_shift, block_size=block_size)
    return Loaded(model.eval(), config, spec, tokenizer)


COUNT_V = 48  # the counting model's vocabulary; MASK is its last id
COUNT_MASK = COUNT_V - 1


def counting_loaded(*, attention: str = "block_causal", block_size: int = 4, eos: list[int] | None = None,
                    tokenizer: Any = None, max_seq_len: int = 256) -> Loaded:
    config = ModelConfig(vocab_size=COUNT_V, dim=COUNT_V, n_layers=1, n_heads=4, n_kv_heads=2,
                         intermediate_size=16, max_seq_len=max_seq_len)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        emb = torch.eye(COUNT_V)
        emb[COUNT_MASK] = 0.0  # the mask token's embedding is zero -> flat logits
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(COUNT_V, COUNT_V)
        for t in range(COUNT_V - 1):
            head[(t + 1) % (COUNT_V - 1), t] = 2.0  # RMSNorm scales a one-hot by sqrt(dim): logit ~14
        model.lm_head.weight.copy_(head)
    spec = DiffusionSpec(family="test", attention=attention, mask_token_id=COUNT_MASK,
                         eos_token_ids=list(eos or []), logit_shift=True, block_size=block_size)
    return Loaded(model.eval(), config, spec, tokenizer)


class CharTokenizer:
    """id t <-> chr(97 + t % 26)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **kwargs: object) -> str:
        return "".join(chr(97 + t % 26) for t in ids)
