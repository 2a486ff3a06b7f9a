"""Boolean attention masks (True = may attend) for `dlm.model.Transformer`.

Shapes follow torch SDPA: (1, 1, T, T) for a cache-free forward, (B, 1, T, K) for a cached one.
- `causal_mask(T)`: the AR baseline.
- `block_causal_mask(T, block_size)`: bidirectional inside a block, causal across blocks.
- `full_mask(T)`: LLaDA / Dream.
- `block_diff_mask(L, block_size)`: the BD3-LM training layout x_t ⊕ x_0 (length 2L, positions
  0..L-1 repeated): noisy block b sees itself and clean blocks < b; clean block b sees clean
  blocks <= b; clean tokens never see noisy ones.
- `limit_mask(limits, K)`: query t of row b sees cache keys 0..limits[b, t]-1; the engine
  expresses every cached attention shape this way.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_causal_mask", "block_diff_mask", "causal_mask", "full_mask", "limit_mask"]


def causal_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)


def full_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    return torch.ones(1, 1, T, T, dtype=torch.bool, device=device)


def block_causal_mask(T: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    block = torch.arange(T, device=device) // block_size  # (T,)
    return (block[None, :] <= block[:, None])[None, None]  # (1, 1, T, T)


def block_diff_mask(L: int, block_size: int, device: torch.device | str | None = None, noisy_from: int = 0) -> Tensor:
    """(1, 1, T, T) mask for the sequence x_t ⊕ x_0 (BD3-LM, Arriola et al. 2025), T = 2L - noisy_from.

    The noisy half may start at a block boundary `noisy_from` > 0 (positions noisy_from..L-1):
    blocks before it are never masked, and no clean token attends to a noisy one, so leaving
    their noisy copies out changes no output (the training step skips the prompt's blocks).
    """
    if noisy_from % block_size or not 0 <= noisy_from < L:
        raise ValueError(f"noisy_from={noisy_from} must be a block boundary inside [0, {L})")
    n_noisy = L - noisy_from
    idx = torch.arange(n_noisy + L, device=device)
    is_clean = idx >= n_noisy  # second part: x_0
    block = torch.where(is_clean, idx - n_noisy, idx + noisy_from) // block_size
    q_clean, k_clean = is_clean[:, None], is_clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    noisy_self = ~q_clean & ~k_clean & (q_block == k_block)  # block-diagonal on x_t
    noisy_to_clean = ~q_clean & k_clean & (k_block < q_block)  # offset block-causal
    clean_to_clean = q_clean & k_clean & (k_block <= q_block)  # block-causal on x_0
    return (noisy_self | noisy_to_clean | clean_to_clean)[None, None]


def limit_mask(limits: Tensor, K: int) -> Tensor:
    """limits (B, T) int -> (B, 1, T, K): key s is visible to query t where s < limits[b, t]."""
    keys = torch.arange(K, device=limits.device)
    return (keys[None, None, :] < limits[..., None])[:, None]
