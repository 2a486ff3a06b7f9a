"""dlm.adapter (a fine-tune as a low-rank file merged at load) and dlm.adapt.finetune (its
training): the hooked training forward equals the merged one, the file's checks, load_model's
merge, the drafter bound to its adapter, targets of a rendered conversation, and training that
learns and resumes where it stopped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tiny_checkpoints as tiny
import torch
from dlm_tiny_models import random_loaded
from safetensors.torch import save_file

from dlm.adapt import finetune as finetune_module
from dlm.adapt.data import Example
from dlm.adapt.draft import DraftTrainConfig, train_drafter
from dlm.adapt.finetune import (
    ADAPTER_FILE,
    FinetuneConfig,
    SupervisedSeq,
    conversation_seq,
    finetune,
    target_loss,
)
from dlm.adapter import Adapter, AdapterConfig, AdapterError, load_adapter, merge_adapter, save_adapter
from dlm.chat import ChatFormatter
from dlm.checkpoints import load_model
from dlm.config import DiffusionSpec
from dlm.drafter import Drafter, DrafterConfig, DrafterError, load_drafter, read_drafter_meta, save_drafter
from dlm.errors import ResumeError
from dlm.masks import causal_mask


def _random_adapter(config, seed=0, rank=4):
    torch.manual_seed(seed)
    adapter = Adapter(config, AdapterConfig(rank=rank, alpha=8.0))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.2)
    return adapter


def _logits(model, ids):
    T = ids.shape[1]
    return model(ids, torch.arange(T)[None].expand(ids.shape[0], T), causal_mask(T))


def test_attached_adapter_is_the_merged_model():
    loaded = random_loaded("causal", seed=1, block_size=1)
    adapter = _random_adapter(loaded.config)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = _logits(loaded.model, ids)
    handles = adapter.attach(loaded.model)
    trained = _logits(loaded.model, ids)  # gradients on: the hooks add the updates
    with torch.no_grad(), pytest.raises(RuntimeError, match="merge it to decode"):
        _logits(loaded.model, ids)
    Adapter.detach(handles)
    with torch.no_grad():
        assert torch.equal(_logits(loaded.model, ids), base)  # detached: the base again
        merge_adapter(loaded.model, adapter)
        merged = _logits(loaded.model, ids)
    assert not torch.allclose(merged, base, atol=1e-3)
    torch.testing.assert_close(merged, trained.detach(), atol=1e-4, rtol=1e-4)


def test_adapter_starts_as_the_base():
    loaded = random_loaded("causal", seed=2, block_size=1)
    ids = torch.randint(0, loaded.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = _logits(loaded.model, ids)
        merge_adapter(loaded.model, Adapter(loaded.config, AdapterConfig(rank=2)))  # B = 0
        assert torch.equal(_logits(loaded.model, ids), before)


def test_file_round_trip_and_checks(tmp_path):
    loaded = random_loaded("causal", seed=3, block_size=1)
    base = tmp_path / "base.gguf"
    base.write_bytes(b"tiny base weights")
    adapter = _random_adapter(loaded.config)
    path = save_adapter(tmp_path / "a.safetensors", adapter, base, {"note": "test"}, dtype=torch.float32)
    back = load_adapter(path, loaded.config, base)
    for (name, a), (_, b) in zip(adapter.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    with pytest.raises(AdapterError, match=r"a\.safetensors.*not made for the base .*other\.gguf"):
        load_adapter(path, loaded.config, other)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AdapterError, match=r"cut\.safetensors: cannot read it"):
        load_adapter(cut, loaded.config, base)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterError, match="not an adapter file"):
        load_adapter(plain, loaded.config, base)
    wide = random_loaded("causal", seed=3, block_size=1, dim=64)
    with pytest.raises(AdapterError, match="dim"):
        load_adapter(path, wide.config, base)


def test_load_model_merges_the_adapter_and_binds_the_drafter_to_it(tmp_path):
    gguf, _ = tiny.llama_gguf(tmp_path / "tiny.gguf")
    plain = load_model(gguf, cache_dir=tmp_path / "cache")
    adapter = _random_adapter(plain.config)
    a_path = save_adapter(tmp_path / "a.safetensors", adapter, gguf, dtype=torch.float32)
    tuned = load_model(gguf, cache_dir=tmp_path / "cache", adapter=a_path)
    assert tuned.adapter == a_path and plain.adapter is None
    ids = torch.randint(5, 250, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merge_adapter(plain.model, adapter)
        torch.testing.assert_close(_logits(tuned.model, ids), _logits(plain.model, ids))

    # A drafter trained on the adapted model loads only onto the adapted model, and vice versa.
    drafter = Drafter(tuned.config, DrafterConfig(rank=2, n_slots=2))
    with_adapter = save_drafter(tmp_path / "d1.safetensors", drafter, gguf, adapter=a_path)
    without = save_drafter(tmp_path / "d0.safetensors", drafter, gguf)
    load_drafter(with_adapter, tuned)
    load_drafter(without, load_model(gguf, cache_dir=tmp_path / "cache"))
    with pytest.raises(DrafterError, match=r"trained on the base with no adapter, but the model is loaded with the adapter"):
        load_drafter(without, tuned)
    with pytest.raises(DrafterError, match=r"trained on the base with the adapter 'a\.safetensors' \(sha256 [0-9a-f]{12}\.\.\.\), but .* no adapter"):
        load_drafter(with_adapter, load_model(gguf, cache_dir=tmp_path / "cache"))
    load_drafter(without, tuned, check_base=False)  # a starting point for training: shapes only

    # Training a drafter on the adapted model records the adapter in the file it writes.
    examples = [Example([5, 6], [7, 8, 9, 10, 2], [], "x", "greedy", 0, "train")] * 4
    cfg = DraftTrainConfig(max_steps=1, batch_size=4, cuts_per_seq=2, n_slots=2, rank=2, checkpoint_every=0)
    train_drafter(tuned, examples, cfg, tmp_path / "run", gguf)
    assert read_drafter_meta(tmp_path / "run" / "drafter.safetensors")["base"]["adapter"]["name"] == "a.safetensors"
    load_drafter(tmp_path / "run" / "drafter.safetensors", tuned)


def test_conversation_targets_are_the_replies_and_their_end_of_turn():
    tok = tiny.hf_tokenizer()
    formatter = ChatFormatter(tok, DiffusionSpec(family="ar", attention="causal", mask_token_id=None, eos_token_ids=[2]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye!"}]
    seq = conversation_seq(formatter, messages)
    targets = [t for t, m in zip(seq.ids, seq.loss_mask, strict=True) if m]
    expected = [*tok.encode("Hello there.", add_special_tokens=False), 2, *tok.encode("Goodbye!", add_special_tokens=False), 2]
    assert targets == expected
    assert seq.ids == formatter.encode(messages, add_generation_prompt=False)
    with pytest.raises(ValueError, match="ends with an assistant reply"):
        conversation_seq(formatter, messages[:-1])


def _pattern_seqs(vocab: int) -> list[SupervisedSeq]:
    """Prompts of random tokens; the target: the prompt's first three tokens again."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(16):
        prompt = torch.randint(3, vocab, (6,), generator=g).tolist()
        out.append(SupervisedSeq(prompt + prompt[:3], [False] * 6 + [True] * 3, "pattern"))
    return out


def test_finetune_learns_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    loaded = random_loaded("causal", seed=4, block_size=1, eos=[2])
    seqs = _pattern_seqs(loaded.config.vocab_size)
    before = target_loss(loaded, seqs)
    base = tmp_path / "base.gguf"
    base.write_bytes(b"tiny base")
    cfg = dict(max_steps=12, batch_size=4, rank=4, alpha=8.0, lr=2e-2, warmup_steps=2, checkpoint_every=0)
    whole = finetune(loaded, seqs, FinetuneConfig(**cfg), tmp_path / "whole", base)
    # A clock that ticks once per look: a time budget of 6.5 ticks stops the run after step 6.
    ticks = iter(range(10**6))
    monkeypatch.setattr(finetune_module, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    cut = finetune(loaded, seqs, FinetuneConfig(**cfg, time_budget_s=6.5), tmp_path / "split", base)
    assert torch.load(tmp_path / "split" / "adapter-state.pt", weights_only=True)["step"] == 6
    assert not torch.equal(cut.state_dict()["b.0_q"], whole.state_dict()["b.0_q"])
    moved = [SupervisedSeq(s.ids, [s.loss_mask[0], *s.loss_mask[2:], s.loss_mask[1]], s.kind) for s in seqs]
    with pytest.raises(ResumeError, match="trained on other data"):  # the same ids, other targets: not its run
        finetune(loaded, moved, FinetuneConfig(**cfg), tmp_path / "split", base)
    with pytest.raises(ResumeError, match="trained on other data"):  # the same sequences in another order neither
        finetune(loaded, seqs[::-1], FinetuneConfig(**cfg), tmp_path / "split", base)
    resumed = finetune(loaded, seqs, FinetuneConfig(**cfg), tmp_path / "split", base)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert target_loss(loaded, seqs) == before  # training never touched the base
    shipped = load_adapter(tmp_path / "whole" / ADAPTER_FILE, loaded.config, base)
    with torch.no_grad():
        merge_adapter(loaded.model, shipped)
    assert target_loss(loaded, seqs) < 0.9 * before
    with pytest.raises(ValueError, match="no training sequence has a target"):
        finetune(loaded, [SupervisedSeq([1, 2], [False, False])], FinetuneConfig(max_steps=1), tmp_path / "x", base)


@pytest.mark.parametrize("make", [lambda t: AdapterConfig(targets=t), lambda t: DrafterConfig(targets=t)])
def test_adapter_and_drafter_configs_take_a_non_empty_subset_of_the_projections(make):
    assert make(["q", "down"]).targets == ("q", "down")
    for bad in ([], ["q", "lm_head"]):
        with pytest.raises(ValueError, match="targets must be a non-empty subset"):
            make(bad)


def test_a_file_is_hashed_once_while_it_stays_as_it_was(tmp_path, monkeypatch):
    """dlm.tuned_file's sha256 memo: a settled file (modified and changed over two seconds ago) is
    read once a process; a rewrite (new times) or another path is read again; a file written in
    the last seconds is read every time."""
    import hashlib
    import os
    import time
    from types import SimpleNamespace

    from dlm import tuned_file

    monkeypatch.setattr(tuned_file, "_DIGESTS", {})
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(tuned_file.hashlib, "sha256", lambda: reads.append(1) or real())
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    assert tuned_file.file_sha256(path) == tuned_file.file_sha256(path) == real(b"a" * 1000).hexdigest()
    assert len(reads) == 2  # fresh: not kept
    monkeypatch.setattr(tuned_file, "time", SimpleNamespace(time=lambda: time.time() + 60))  # a minute on
    for _ in range(3):
        assert tuned_file.file_sha256(path) == real(b"a" * 1000).hexdigest()
    assert tuned_file.base_fingerprint(path) == real(b"a" * 1000).hexdigest()
    assert len(reads) == 3  # settled: once
    path.write_bytes(b"b" * 1000)  # the same size and inode, new times (a second on: coarse clocks)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert tuned_file.file_sha256(path) == real(b"b" * 1000).hexdigest() and len(reads) == 4
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"b" * 1000)
    assert tuned_file.file_sha256(copy) == real(b"b" * 1000).hexdigest() and len(reads) == 5
