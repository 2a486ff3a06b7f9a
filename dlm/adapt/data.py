"""The distillation set: one JSON Lines file, a header line then one example per line.

Contract:
- `write_dataset(path, examples, meta)` / `read_dataset(path) -> (meta, examples)`; the header is
  `{"format": DATA_FORMAT, **meta}` (tokenizer, mask id, seed, counts, teacher settings).
- An `Example` holds token ids (the rendered prompt, the teacher's reply ending with EOS) and the
  chat messages it came from, so evaluation can print text side by side.
- The held-out split is by prompt: every reply to a held-out prompt is held out, so evaluation
  never sees a prompt the student was trained on.
- `training_batches(examples, ...)` yields padded `Batch`es in a deterministic order that depends
  only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
- `replies_fingerprint(examples)`: dlm.adapt.state's fingerprint of the examples' (prompt, reply)
  ids in their order, what a drafter's run state keeps of the data it trained on.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlm.adapt.state import data_fingerprint

__all__ = ["DATA_FORMAT", "Batch", "Example", "collate", "draftable", "read_dataset", "replies_fingerprint",
           "steps_per_epoch", "training_batches", "write_dataset"]

DATA_FORMAT = "voice-agent-adapt-data/1"


@dataclass
class Example:
    prompt_ids: list[int]  # the chat-template rendering of `messages`, generation prompt included
    reply_ids: list[int]  # the teacher's reply; its last id is an EOS id
    messages: list[dict[str, str]]  # the prompt as chat messages (system first)
    kind: str  # prompt category (dlm.adapt.prompts.KINDS; SELF_KIND: a request the teacher wrote; REQUEST_KIND: from a file)
    source: str  # "greedy" or "sampled"
    prompt_index: int  # index in the generated prompt set; replies to one prompt share it
    split: str  # "train" or "heldout"


@dataclass
class Batch:
    tokens: Tensor  # (B, L) long: prompt, reply, EOS fill to the block boundary, then pad
    supervised: Tensor  # (B, L) bool: the positions that carry a loss (reply and EOS fill)
    n_real_tokens: int  # prompt + reply tokens, padding excluded (for tokens/s)


def draftable(examples: Iterable[Example]) -> list[Example]:
    """The examples whose reply has a token to draft after its first (two tokens or more): what a
    drafter trains and is evaluated on."""
    return [e for e in examples if len(e.reply_ids) >= 2]


def replies_fingerprint(examples: Iterable[Example]) -> str:
    """The fingerprint of the examples' (prompt, reply) token ids in their order (dlm.adapt.state)."""
    return data_fingerprint((e.prompt_ids, e.reply_ids) for e in examples)


def write_dataset(path: str | Path, examples: Iterable[Example], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"format": DATA_FORMAT, **meta}) + "\n")
        for ex in examples:
            f.write(json.dumps(asdict(ex), separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def read_dataset(path: str | Path) -> tuple[dict[str, Any], list[Example]]:
    """The header and the examples of a data file (gzip-compressed where it ends in .gz)."""
    path = Path(path)
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
        meta = json.loads(f.readline())
        if meta.get("format") != DATA_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {DATA_FORMAT!r}")
        examples = [Example(**json.loads(line)) for line in f if line.strip()]
    return meta, examples


def collate(examples: list[Example], block_size: int, eos_id: int, pad_id: int) -> Batch:
    """Pad to a common length that is a multiple of `block_size`.

    The reply is followed by EOS up to the end of its block, and those EOS are supervised: the
    engine decodes whole blocks, so the student must learn to fill the rest of the final block
    with EOS. Padding beyond that lies in later blocks, which no real token attends to under
    block-causal attention, so it needs no attention mask of its own.
    """
    ends = [-(-(len(e.prompt_ids) + len(e.reply_ids)) // block_size) * block_size for e in examples]
    L = max(ends)
    tokens = torch.full((len(examples), L), pad_id, dtype=torch.long)
    supervised = torch.zeros((len(examples), L), dtype=torch.bool)
    for i, (e, end) in enumerate(zip(examples, ends, strict=True)):
        P, R = len(e.prompt_ids), len(e.reply_ids)
        tokens[i, :P] = torch.tensor(e.prompt_ids)
        tokens[i, P:P + R] = torch.tensor(e.reply_ids)
        tokens[i, P + R:end] = eos_id
        supervised[i, P:end] = True
    n_real = sum(len(e.prompt_ids) + len(e.reply_ids) for e in examples)
    return Batch(tokens, supervised, n_real)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return n_examples // batch_size  # the ragged tail is dropped; the next epoch reshuffles


def training_batches(examples: list[Example], *, batch_size: int, block_size: int, eos_id: int, pad_id: int,
                     seed: int, start_step: int = 0) -> Iterator[Batch]:
    """Endless batches from step `start_step` on; the order depends only on (seed, epoch).

    Within an epoch, batches are drawn from length-sorted windows of 32 batches so that padding
    stays small, and the windows and batches are shuffled.
    """
    per_epoch = steps_per_epoch(len(examples), batch_size)
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} training examples do not fill one batch of {batch_size}")
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(examples)))
        rng.shuffle(order)
        order = order[:per_epoch * batch_size]
        window = 32 * batch_size
        batches: list[list[int]] = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: len(examples[i].prompt_ids) + len(examples[i].reply_ids))
            batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        for idx in batches[offset:]:
            yield collate([examples[i] for i in idx], block_size, eos_id, pad_id)
        epoch, offset = epoch + 1, 0
