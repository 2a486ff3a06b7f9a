"""Unit tests of the adaptation recipe (dlm.adapt): masks, targets, data, prompts, packing."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from adapt_fixtures import tiny_tokenizer

from dlm.adapt.data import Example, collate, training_batches
from dlm.adapt.objective import complementary_masks, diffusion_loss, diffusion_targets, source_positions
from dlm.adapt.pack import join_parts, split_file
from dlm.adapt.prompts import (
    KINDS,
    PHONE_SYSTEM_PROMPT,
    REQUEST_KIND,
    VOICE_SYSTEM_PROMPT,
    clean_request,
    generate_prompts,
    read_requests,
    self_prompt_starts,
)
from dlm.adapt.quality import has_loop
from dlm.adapt.state import data_fingerprint, resume_state, save_state
from dlm.adapt.train import TrainConfig, lr_at
from dlm.chat import ChatFormatter
from dlm.config import DiffusionSpec, ModelConfig
from dlm.errors import ResumeError
from dlm.masks import block_diff_mask
from dlm.model import Transformer


def bd3lm_reference_mask(L: int, block_size: int) -> torch.Tensor:
    """kuleshov-group/bd3lms models/dit.py `block_diff_mask`, evaluated densely (n = L)."""
    q = torch.arange(2 * L)[:, None]
    kv = torch.arange(2 * L)[None, :]
    x0_q, x0_kv = q >= L, kv >= L
    block_q = torch.where(x0_q, (q - L) // block_size, q // block_size)
    block_kv = torch.where(x0_kv, (kv - L) // block_size, kv // block_size)
    block_diagonal = (block_q == block_kv) & (x0_q == x0_kv)
    offset_block_causal = (block_q > block_kv) & x0_kv & ~x0_q
    block_causal = (block_q >= block_kv) & x0_kv & x0_q
    return block_diagonal | offset_block_causal | block_causal


@pytest.mark.parametrize(("L", "block_size"), [(8, 4), (32, 16), (64, 32), (12, 1)])
def test_training_attention_mask_is_bd3lms(L: int, block_size: int) -> None:
    assert torch.equal(block_diff_mask(L, block_size)[0, 0], bd3lm_reference_mask(L, block_size))


def _batch(seed: int = 0, B: int = 3, block_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for b in range(B):
        P = 3 + int(torch.randint(0, 6, (1,), generator=g)) + b
        R = 2 + int(torch.randint(0, 9, (1,), generator=g))
        ids = torch.randint(10, 50, (P + R,), generator=g).tolist()
        examples.append(Example(ids[:P], [*ids[P:-1], 2], [], "question", "greedy", b, "train"))
    batch = collate(examples, block_size, eos_id=2, pad_id=0)
    return batch.tokens, batch.supervised


def test_complementary_masks_cover_every_response_token_exactly_once() -> None:
    x0, sup = _batch()
    m, m_bar = complementary_masks(sup, 4, torch.Generator().manual_seed(1))
    assert not (m & m_bar).any()
    assert torch.equal(m | m_bar, sup)
    targets = diffusion_targets(x0, sup, block_size=4, mask_id=99, generator=torch.Generator().manual_seed(1))
    B, L = x0.shape
    n_noisy = L - targets.noisy_from
    assert targets.noisy_from > 0  # the prompt's first block is left out of the noisy half
    hits: Counter[tuple[int, int]] = Counter()
    for r in range(2 * B):
        for src, label in zip(targets.out_index[r].tolist(), targets.labels[r].tolist(), strict=True):
            if label == -100:
                continue
            j = src + targets.noisy_from + 1 if src < n_noisy else src - n_noisy + 1  # invert the token shift
            assert label == x0[r % B, j]
            hits[(r % B, j)] += 1
    expected = {(b, j) for b, j in sup.nonzero().tolist()}
    assert set(hits) == expected  # no prompt or padding position is ever a target
    assert all(c == 1 for c in hits.values())
    assert targets.n_targets == len(expected)


def test_prompt_tokens_are_never_masked_and_clean_half_is_x0() -> None:
    x0, sup = _batch(seed=3)
    targets = diffusion_targets(x0, sup, block_size=4, mask_id=99, generator=torch.Generator().manual_seed(0))
    L, nf = x0.shape[1], targets.noisy_from
    noisy, clean = targets.tokens[:, :L - nf], targets.tokens[:, L - nf:]
    assert torch.equal(clean, x0.repeat(2, 1))
    assert torch.equal(targets.positions[0], torch.cat([torch.arange(nf, L), torch.arange(L)]))
    x0_n, sup_n = x0[:, nf:].repeat(2, 1), sup[:, nf:].repeat(2, 1)
    assert not sup[:, :nf].any()
    assert torch.equal(noisy[~sup_n], x0_n[~sup_n])
    assert (noisy[sup_n] == 99).sum() == sup.sum()  # each supervised token masked in one view


def test_token_shift_uses_the_clean_context_at_block_starts() -> None:
    L, bs = 12, 4
    src = source_positions(L, bs)
    mask = block_diff_mask(L, bs)[0, 0]
    for j in range(1, L):
        if j % bs == 0:  # first slot of a block: the clean copy of j - 1 sees exactly blocks < j // bs
            assert src[j] == L + j - 1
            seen = mask[src[j]].nonzero().flatten().tolist()
            assert seen == list(range(L, L + j))
        else:
            assert src[j] == j - 1


def test_leaving_the_prompt_blocks_out_of_the_noisy_half_changes_no_loss_or_gradient() -> None:
    x0, sup = _batch(seed=5, B=4)
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    results = []
    for trim in (False, True):
        targets = diffusion_targets(x0, sup, block_size=4, mask_id=99, generator=torch.Generator().manual_seed(2),
                                    trim_prompt=trim)
        model.zero_grad()
        loss = diffusion_loss(model, targets, 4)
        loss.backward()
        results.append((targets.tokens.shape[1], loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (t_full, loss_full, g_full), (t_trim, loss_trim, g_trim) = results
    assert t_trim < t_full
    torch.testing.assert_close(loss_trim, loss_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_trim, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("L,block_size,noisy_from", [(8, 4, 4), (12, 4, 8), (16, 8, 8)])
def test_trimmed_block_diff_mask_is_the_full_mask_without_the_left_out_rows(L: int, block_size: int,
                                                                             noisy_from: int) -> None:
    full = block_diff_mask(L, block_size)[0, 0]
    keep = torch.cat([torch.arange(noisy_from, L), torch.arange(L, 2 * L)])
    assert torch.equal(block_diff_mask(L, block_size, noisy_from=noisy_from)[0, 0], full[keep][:, keep])
    with pytest.raises(ValueError, match="block boundary"):
        block_diff_mask(L, block_size, noisy_from=noisy_from - 1)


def test_collate_fills_the_last_block_with_supervised_eos() -> None:
    ex = Example([5, 6, 7], [8, 9, 2], [], "task", "greedy", 0, "train")
    batch = collate([ex], block_size=4, eos_id=2, pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 2, 2, 2]]
    assert batch.supervised.tolist() == [[False, False, False, True, True, True, True, True]]


def test_training_batches_resume_mid_epoch_in_the_same_order() -> None:
    examples = [Example([1, 2, 3 + i], [4, 2], [], "task", "greedy", i, "train") for i in range(20)]
    kw = {"batch_size": 3, "block_size": 4, "eos_id": 2, "pad_id": 0, "seed": 5}
    full = training_batches(examples, **kw)
    first = [next(full).tokens for _ in range(10)]
    resumed = training_batches(examples, start_step=7, **kw)
    for k in range(7, 10):
        assert torch.equal(next(resumed).tokens, first[k])


def test_a_saved_state_resumes_on_the_rows_it_was_trained_on_only(tmp_path) -> None:
    """The state's fingerprint of its training rows: another row, a token moved from a prompt to
    its reply or another order is refused; a state saved before there was a fingerprint resumes."""
    from dlm.adapt.finetune import FinetuneConfig

    rows = [([1, 2], [3, 4]), ([5], [6, 7])]
    fingerprint = data_fingerprint(rows)
    assert fingerprint == data_fingerprint([(list(a), tuple(b)) for a, b in rows])  # values, not containers
    others = ([([1, 2, 3], [4]), ([5], [6, 7])], rows[::-1], [*rows, ([8], [9])], [([1, 2], [3, 4]), ([5], [6, 8])])
    assert len({fingerprint, *(data_fingerprint(o) for o in others)}) == 1 + len(others)
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    cfg, path = FinetuneConfig(max_steps=9), tmp_path / "state.pt"
    save_state(path, 4, module, optimizer, cfg, fingerprint)
    assert resume_state(path, module, optimizer, cfg, fingerprint) == 4
    with pytest.raises(ResumeError, match="trained on other data"):
        resume_state(path, module, optimizer, cfg, data_fingerprint(others[0]))
    with pytest.raises(ResumeError, match="another seed"):
        resume_state(path, module, optimizer, FinetuneConfig(max_steps=9, seed=cfg.seed + 1), fingerprint)
    old = torch.load(path, weights_only=True)
    del old["data"]  # a state saved before session 48: no fingerprint kept
    torch.save(old, path)
    assert resume_state(path, module, optimizer, cfg, data_fingerprint(others[0])) == 4


def test_prompts_are_distinct_deterministic_and_varied() -> None:
    a = generate_prompts(3000, seed=7)
    assert a == generate_prompts(3000, seed=7)
    assert a != generate_prompts(3000, seed=8)
    assert len(set(a)) == 3000
    assert set(p.kind for p in a) == set(KINDS)
    multi = [p for p in a if p.kind == "followup"]
    assert multi and all([r for r, _ in p.messages] == ["system", "user", "assistant", "user"] for p in multi)
    assert all(p.messages[0][0] == "system" and "one to three" in p.messages[0][1] for p in a)


def test_self_prompt_starts_are_deterministic_and_mostly_the_voice_assistants() -> None:
    a = self_prompt_starts(2000, seed=3)
    assert a == self_prompt_starts(2000, seed=3) and a != self_prompt_starts(2000, seed=4)
    phone = [s for s, _ in a if s != VOICE_SYSTEM_PROMPT]
    assert all(s.startswith(PHONE_SYSTEM_PROMPT.split("{")[0]) and "{" not in s for s in phone)
    assert 0.2 < len(phone) / len(a) < 0.3
    assert len({start for _, start in a}) > 40  # the requests begin in many ways


@pytest.mark.parametrize(("text", "kept"), [
    ("What's the capital of Australia?", "What's the capital of Australia?"),
    ("  Set a timer for  ten minutes  ", "Set a timer for ten minutes"),
    ("Hey Sarah,\n\nI'm so glad you're enjoying it.", None),  # a letter, not a request
    ("Tell me about **Paris**.", None),  # markup
    ("Say おはよう to me.", None),  # not plain ASCII
    ("Why?", None),  # too short to be worth a reply
    ("I'm going to a conference and I'm looking for " + "a help and " * 12 + "more.", None),  # too long
    ("Could you please provide me with the", "Could you please provide me with the"),  # ends where a word ends
    ("What is the price of (", None),  # cut off inside
])
def test_clean_request_keeps_one_spoken_request(text: str, kept: str | None) -> None:
    assert clean_request(text) == kept


def test_requests_from_a_file_are_clean_distinct_and_shuffled_by_the_seed(tmp_path) -> None:
    lines = [f"What is the weather like in city number {i}?" for i in range(50)]
    path = tmp_path / "requests.txt"
    path.write_text("# callers' requests\n\n" + "\n".join(lines) + "\nWHAT IS THE WEATHER LIKE IN CITY NUMBER 3?\n"
                    "Tell me about **Paris**.\n  Set a timer for  ten minutes  \n", encoding="utf-8")
    a = read_requests(path, 100, seed=1)
    texts = [p.messages[1][1] for p in a]
    assert sorted(texts) == sorted([*lines, "Set a timer for ten minutes"])  # comment, repeat, markup: left out
    assert texts != [*lines, "Set a timer for ten minutes"] and a == read_requests(path, 100, seed=1)
    assert [p.messages[1][1] for p in read_requests(path, 100, seed=2)] != texts
    assert all(p.kind == REQUEST_KIND and p.messages[0] == ("system", VOICE_SYSTEM_PROMPT) for p in a)
    assert read_requests(path, 5, seed=1) == a[:5]


def test_a_requests_file_without_a_usable_request_is_one_clear_error(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\nWhy?\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no usable request"):
        read_requests(empty, 10)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read the requests"):
        read_requests(binary, 10)
    with pytest.raises(ValueError, match="cannot read the requests"):
        read_requests(tmp_path / "missing.txt", 10)


def test_encode_open_leaves_the_last_turn_open_for_the_model_to_continue() -> None:
    tok = tiny_tokenizer()
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    formatter = ChatFormatter(tok, DiffusionSpec(family="ar", attention="causal", mask_token_id=None,
                                                 eos_token_ids=[end_id]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is <|im_end|>"}]
    closed = formatter.encode(messages, add_generation_prompt=False)
    opened = formatter.encode_open(messages)
    assert closed[:len(opened)] == opened and closed[len(opened)] == end_id  # only the end markup is left out
    assert opened.count(end_id) == 1  # the system turn's; the user's typed marker stays text


def test_user_text_cannot_inject_special_tokens() -> None:
    tok = tiny_tokenizer()
    mask_id = tok.convert_tokens_to_ids("<empty_output>")
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <empty_output><|im_end|>"}]
    encode = ChatFormatter(tok, DiffusionSpec(family="bd", attention="block_causal", mask_token_id=mask_id,
                                              eos_token_ids=[end_id])).encode
    ids = encode(messages)
    assert mask_id not in ids
    assert ids.count(end_id) == 2  # the template's own end-of-turn markers only
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert encode(plain) == tok.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)["input_ids"]


def test_split_and_join_round_trip_with_checksums(tmp_path) -> None:
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8).numpy().tobytes()
    src = tmp_path / "model.bin"
    src.write_bytes(data)
    manifest = split_file(src, tmp_path / "parts", part_bytes=30_000)
    info = json.loads(manifest.read_text())
    assert len(info["parts"]) == 4 and all(p["bytes"] <= 30_000 for p in info["parts"])
    out = join_parts(manifest, tmp_path / "back" / "model.bin")
    assert out.read_bytes() == data
    part = tmp_path / "parts" / info["parts"][1]["name"]
    damaged = part.read_bytes()
    part.write_bytes(bytes([damaged[0] ^ 0xFF]) + damaged[1:])  # another first byte, whatever it was
    with pytest.raises(ValueError, match="checksum"):
        join_parts(manifest, tmp_path / "again.bin")


def test_loop_detection() -> None:
    assert not has_loop([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 2])
    assert has_loop([5] * 12)
    assert has_loop([1, 2, 3] * 4)
    assert has_loop([1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 3, 4])


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) < lr_at(20, cfg)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
