"""The block-diffusion training objective: complementary masks, token shift, x_t ⊕ x_0.

Contract (what the engine's decoding relies on):
- Blocks are aligned to absolute positions: block k covers positions [k·B, (k+1)·B), prompt
  included, exactly as `dlm.masks.block_causal_mask` draws them.
- Token shift (Fast-dLLM v2): the token at position j is predicted from the hidden state at j - 1.
  For j inside a block that is the noisy block's own position j - 1 (it sees its block's noisy
  tokens and the clean blocks before it). For j at the start of a block, j - 1 lies in the
  previous block; its prediction is taken from the *clean* copy of position j - 1, which sees
  exactly the committed context, as the first slot of a new block does at decoding time.
- Complementary masks: each row is used twice, with a mask m and with its complement over the
  supervised positions, so every supervised token is predicted exactly once per row. The mask
  rate is drawn per (row, block) uniformly in [eps, 1 - eps].
- Only supervised positions (the reply and the EOS fill of its last block) are masked or carry a
  loss; prompt tokens are always visible and never predicted. The noisy half therefore starts at
  the first block of the batch that holds a supervised token (`noisy_from`): the prompt's blocks
  before it would be noisy copies equal to the clean ones that nothing reads, and voice prompts
  (system prompt included) are about two thirds of a training sequence.
- The loss is the mean cross-entropy over the supervised tokens (each counted once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlm.masks import block_diff_mask
from dlm.model import Transformer

__all__ = ["DiffusionTargets", "complementary_masks", "diffusion_loss", "diffusion_targets", "source_positions"]

MASK_RATE_EPS = 1e-3


def complementary_masks(supervised: Tensor, block_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """supervised (B, L) bool -> (m, m̄), both (B, L) bool, disjoint, union == supervised."""
    B, L = supervised.shape
    n_blocks = L // block_size
    rate = torch.rand(B, n_blocks, generator=generator, device=supervised.device)  # (B, nb)
    rate = MASK_RATE_EPS + (1 - 2 * MASK_RATE_EPS) * rate
    rate = rate.repeat_interleave(block_size, dim=1)  # (B, L)
    draw = torch.rand(B, L, generator=generator, device=supervised.device)
    masked = (draw < rate) & supervised
    return masked, supervised & ~masked


def source_positions(L: int, block_size: int, device: torch.device | str | None = None, noisy_from: int = 0) -> Tensor:
    """(L,) long: the index in the x_t ⊕ x_0 sequence (noisy positions noisy_from..L-1, then clean
    0..L-1) whose hidden state predicts the token at position j. Entries for j <= noisy_from that
    are not block starts are unused (such positions are never targets)."""
    j = torch.arange(L, device=device)
    n_noisy = L - noisy_from
    src = j - 1 - noisy_from  # noisy copy of the previous position
    block_start = (j % block_size) == 0
    return torch.where(block_start, n_noisy + j - 1, src).clamp(min=0)  # clean copy at block starts


@dataclass
class DiffusionTargets:
    tokens: Tensor  # (R, T) x_t[noisy_from:] ⊕ x_0 for R = 2B rows (view m, then view m̄), T = 2L - noisy_from
    positions: Tensor  # (R, T) noisy_from..L-1, then 0..L-1
    out_index: Tensor  # (R, N) which of the T hidden states predict a target (0 where padding)
    labels: Tensor  # (R, N) target token ids, -100 where padding
    n_targets: int  # supervised tokens in the batch (each once across the two views)
    length: int  # L
    noisy_from: int  # first position of the noisy half (a block boundary)


def diffusion_targets(x0: Tensor, supervised: Tensor, *, block_size: int, mask_id: int,
                      generator: torch.Generator, trim_prompt: bool = True) -> DiffusionTargets:
    """Build both complementary views of a batch in the x_t ⊕ x_0 layout. With `trim_prompt` the
    noisy half starts at the batch's first block holding a supervised token (same loss, less work)."""
    B, L = x0.shape
    if L % block_size:
        raise ValueError(f"sequence length {L} is not a multiple of the block size {block_size}")
    if supervised[:, 0].any():
        raise ValueError("position 0 cannot be supervised: nothing precedes it")
    m, m_bar = complementary_masks(supervised, block_size, generator)
    masked = torch.cat([m, m_bar])  # (2B, L)
    clean = x0.repeat(2, 1)  # (2B, L)
    noisy = torch.where(masked, torch.full_like(clean, mask_id), clean)
    any_sup = supervised.any(0).nonzero()
    first = int(any_sup[0]) if trim_prompt and len(any_sup) else 0
    noisy_from = first // block_size * block_size
    tokens = torch.cat([noisy[:, noisy_from:], clean], dim=1)  # (2B, 2L - noisy_from)
    pos = torch.arange(L, device=x0.device)
    positions = torch.cat([pos[noisy_from:], pos])[None].expand(2 * B, -1)

    src = source_positions(L, block_size, x0.device, noisy_from)  # (L,)
    counts = masked.sum(1)  # (2B,)
    N = max(int(counts.max()), 1)
    # Stable sort puts each row's masked positions first, in position order.
    order = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :N]  # (2B, N)
    valid = torch.arange(N, device=x0.device)[None] < counts[:, None]  # (2B, N)
    out_index = torch.where(valid, src[order], 0)
    labels = torch.where(valid, clean.gather(1, order), -100)
    return DiffusionTargets(tokens, positions, out_index, labels, int(supervised.sum()), L, noisy_from)


def diffusion_loss(model: Transformer, targets: DiffusionTargets, block_size: int) -> Tensor:
    """Mean cross-entropy per supervised token (a scalar tensor)."""
    mask = block_diff_mask(targets.length, block_size, targets.tokens.device, targets.noisy_from)  # (1, 1, T, T)
    logits = model(targets.tokens, targets.positions, mask, out_index=targets.out_index)  # (R, N, V)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum / max(targets.n_targets, 1)
