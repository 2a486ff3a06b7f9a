"""dlm.drafter and the model's drafting hooks: the file (round trip, wrong base, damage), the
adapter touching mask slots only, training mechanics (mask slots and the draft head), and
oneDNN-packed weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dlm_tiny_models import random_loaded
from safetensors.torch import save_file

import dlm.blocks
from dlm.adapt.data import Example
from dlm.adapt.draft import DraftTrainConfig, evaluate_drafter, train_drafter
from dlm.adapt.head import HeadTrainConfig, evaluate_head, train_head
from dlm.draft_head import DraftHead, DraftHeadConfig
from dlm.drafter import Drafter, DrafterConfig, DrafterError, load_drafter, read_drafter_meta, save_drafter
from dlm.errors import ResumeError
from dlm.masks import causal_mask
from dlm.model import DraftInputs, can_pack_linears


@pytest.fixture
def base(tmp_path):
    """A tiny random AR model whose "base file" is a file of bytes (the fingerprint's input)."""
    loaded = random_loaded("causal", seed=3, block_size=1, scale=2.0)
    path = tmp_path / "base.gguf"
    path.write_bytes(b"tiny base weights")
    loaded.path = path
    return loaded


def _drafter(loaded, seed=0):
    torch.manual_seed(seed)
    d = Drafter(loaded.config, DrafterConfig(rank=4, n_slots=3))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0.0, 0.3)
    return d


def test_file_round_trip_and_checks(base, tmp_path):
    d = _drafter(base)
    path = save_drafter(tmp_path / "d.safetensors", d, base.path, {"note": "test"}, dtype=torch.float32)
    back = load_drafter(path, base)
    for (name, a), (_, b) in zip(d.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert back.n_slots == 3 and not any(p.requires_grad for p in back.parameters())

    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    base.path = other
    with pytest.raises(DrafterError, match=r"d\.safetensors.*not made for the base .*other\.gguf"):
        load_drafter(path, base)


def test_damaged_or_foreign_files_fail_clearly(base, tmp_path):
    good = save_drafter(tmp_path / "d.safetensors", _drafter(base), base.path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DrafterError, match=r"cut\.safetensors: cannot read it"):
        load_drafter(cut, base)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(DrafterError, match="not a drafter file"):
        load_drafter(plain, base)
    # Right metadata, wrong tensors (a layer missing).
    meta = json.loads(__import__("safetensors").safe_open(str(good), "pt").metadata()["voice_agent_drafter"])
    broken = tmp_path / "broken.safetensors"
    tensors = {k: v for k, v in _drafter(base).state_dict().items() if not k.startswith("layers.1.")}
    save_file(tensors, str(broken), metadata={"voice_agent_drafter": json.dumps(meta)})
    with pytest.raises(DrafterError, match="damaged"):
        load_drafter(broken, base)
    # Another model's shape.
    wide = random_loaded("causal", seed=3, block_size=1, dim=48, n_heads=4, n_kv_heads=2)
    wide.path = base.path
    with pytest.raises(DrafterError, match="does not fit the base"):
        load_drafter(good, wide)


def _rewritten(path, tmp_path, name, *, meta=None, flip_at=None):
    """A copy of a drafter file with its record replaced (`meta`: a function of it) or one byte of
    its tensor data flipped (`flip_at`: bytes from the data's end)."""
    raw = bytearray(path.read_bytes())
    if flip_at is not None:
        raw[-flip_at] ^= 0x40
    out = tmp_path / name
    out.write_bytes(bytes(raw))
    if meta is not None:
        with __import__("safetensors").safe_open(str(out), "pt") as f:
            record = json.loads(f.metadata()["voice_agent_drafter"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(out), metadata={"voice_agent_drafter": json.dumps(meta(record))})
    return out


def test_a_file_whose_tensors_or_record_were_changed_is_refused_naming_it(base, tmp_path):
    """Bytes flipped in a weight (which loaded and drafted nothing: the verifier decides every
    token, so a user saw only an AR-speed engine), a config a damaged file made absurd, a base that
    is not a record, weights that are not numbers: each a DrafterError naming the file, at load."""
    good = save_drafter(tmp_path / "h.safetensors", _head(base, [3, 7, 40, 61]), base.path, dtype=torch.float32)
    with pytest.raises(DrafterError, match=r"flipped\.safetensors.*do not hash"):
        load_drafter(_rewritten(good, tmp_path, "flipped.safetensors", flip_at=3), base)
    for name, change in [("window", 10**6), ("window", 4.5), ("window", True), ("causal", "no"), ("n_slots", -1)]:
        def meta(record, name=name, change=change):
            return {**record, "config": {**record["config"], name: change}}
        with pytest.raises(DrafterError, match=rf"edited\.safetensors .*: damaged .*{name}"):
            load_drafter(_rewritten(good, tmp_path, "edited.safetensors", meta=meta), base)
    from dlm.adapt.head import HeadTrainConfig

    with pytest.raises(ValueError, match="window must be an integer in"):  # before a training run's features
        HeadTrainConfig(max_steps=1, window=80)
    with pytest.raises(DrafterError, match=r"nobase\.safetensors: damaged metadata"):
        load_drafter(_rewritten(good, tmp_path, "nobase.safetensors", meta=lambda r: {**r, "base": None}), base)
    nan = _head(base, [3, 7, 40, 61])
    with torch.no_grad():
        nan.fuse.weight.fill_(float("nan"))
    with pytest.raises(DrafterError, match=r"nan\.safetensors .*: damaged \(weights that are not finite"):
        load_drafter(save_drafter(tmp_path / "nan.safetensors", nan, base.path), base)


def test_adapter_touches_mask_slots_only(base):
    """Positions before `start` compute exactly what the plain base computes; slots differ."""
    model, d = base.model, _drafter(base)
    tokens = torch.tensor([[5, 6, 7, 8, 0, 0]])
    positions = torch.arange(6)[None]
    mask = causal_mask(6)
    with torch.no_grad():
        plain = model(tokens, positions, mask)
        drafted = model(tokens, positions, mask, draft=DraftInputs(d, 4, torch.tensor([[0, 1]])))
    assert torch.equal(plain[:, :4], drafted[:, :4])
    assert not torch.allclose(plain[:, 4:], drafted[:, 4:])


def test_training_learns_and_resumes(base, tmp_path):
    """A drafter for a model that always continues last + 1 learns it; a rerun resumes."""
    examples = []
    for i in range(24):
        start = (3 * i) % 40
        examples.append(Example([start, start + 1], [start + 2 + k for k in range(8)], [], "x", "greedy", i, "train"))
    # The targets need not be the tiny model's own replies: what is checked is that the adapter
    # fits them through the frozen base.
    cfg = DraftTrainConfig(max_steps=60, batch_size=8, cuts_per_seq=4, n_slots=3, rank=8, alpha=8.0, lr=2e-2,
                           warmup_steps=2, checkpoint_every=30)
    torch.manual_seed(0)
    with torch.no_grad():
        before = evaluate_drafter(base, _drafter(base), examples[:8], 3)
    drafter = train_drafter(base, examples, cfg, tmp_path / "run", base.path)
    with torch.no_grad():
        report = evaluate_drafter(base, drafter.eval(), examples[:8], 3)
    assert before["slot_agreement"][0] < 0.2 < 0.6 < report["slot_agreement"][0], (before, report)
    assert report["tokens_per_forward_by_draft_len"][3] > 1.8
    assert (tmp_path / "run" / "drafter.safetensors").exists()
    state = torch.load(tmp_path / "run" / "drafter-state.pt", weights_only=True)
    assert state["step"] == 60
    cfg.max_steps = 62  # continue the same run for two more steps
    train_drafter(base, examples, cfg, tmp_path / "run", base.path)
    assert torch.load(tmp_path / "run" / "drafter-state.pt", weights_only=True)["step"] == 62


@pytest.mark.skipif(not can_pack_linears(torch.bfloat16, "cpu"), reason="no oneDNN bf16 on this CPU")
def test_packed_bf16_weights_match_and_do_not_depend_on_the_batch():
    loaded = random_loaded("causal", seed=4, block_size=1, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128)
    model = loaded.model.to(torch.bfloat16)
    tokens = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7)[None].expand(3, 7)
    with torch.no_grad():
        plain = model(tokens, positions, causal_mask(7))
        assert model.pack_linears() and model.packed
        packed = model(tokens, positions, causal_mask(7))
        alone = model(tokens[1:2, :3], positions[:1, :3], causal_mask(3))
    model.unpack_linears()
    assert torch.allclose(plain, packed, atol=0.15, rtol=0.05)  # bf16 rounding, another kernel
    assert torch.equal(packed[1:2, :3], alone)  # a row's result does not depend on the batch


def _head(loaded, vocab: list[int], seed=0):
    torch.manual_seed(seed)
    head = DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=3, vocab_size=len(vocab)))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)
        head.vocab.copy_(torch.tensor(vocab))
    return head


def test_a_draft_head_file_round_trips_and_is_checked_like_a_drafter(base, tmp_path):
    vocab = [3, 7, 40, 61]
    head = _head(base, vocab)
    path = save_drafter(tmp_path / "h.safetensors", head, base.path, dtype=torch.float32)
    back = load_drafter(path, base)
    assert isinstance(back, DraftHead) and back.vocab.tolist() == vocab  # ids stay integers in the file
    for (name, a), (_, b) in zip(head.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a.to(b.dtype), b), name  # in bf16 where it was packed for oneDNN
    assert (back.fuse.weight.dtype == torch.bfloat16) == can_pack_linears(torch.bfloat16, "cpu")
    # Attached on load: it drafts from the model's own embeddings, only tokens of its vocabulary.
    feats = torch.randn(2, 3, base.config.dim)
    scores = back(feats, torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([3, 1]), 2)
    assert scores.shape == (2, 2, len(vocab)) and set(back.draft_ids(scores.argmax(-1)).flatten().tolist()) <= set(vocab)
    # A short window: the padding pairs are nobody's keys, so what they hold changes nothing.
    changed = feats.clone()
    changed[1, :2] = 9.0
    again = back(changed, torch.tensor([[1, 2, 3], [0, 0, 6]]), torch.tensor([3, 1]), 2)
    assert torch.allclose(scores[1], again[1], atol=1e-5)

    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    elsewhere = random_loaded("causal", seed=3, block_size=1, scale=2.0)
    elsewhere.path = other
    with pytest.raises(DrafterError, match=r"h\.safetensors.*not made for the base .*other\.gguf"):
        load_drafter(path, elsewhere)
    bad = _head(base, [3, 7, 40, base.config.vocab_size + 5])
    with pytest.raises(DrafterError, match="outside the vocabulary"):
        load_drafter(save_drafter(tmp_path / "bad.safetensors", bad, base.path), base)


@pytest.mark.skipif(dlm.blocks.available() is not None, reason=f"block kernel unavailable: {dlm.blocks.available()}")
@pytest.mark.parametrize("amx", [True, False], ids=["amx-or-vnni-where-they-run", "float32-products"])
def test_a_draft_head_on_q8_blocks_drafts_what_its_float32_layers_draft(tmp_path, monkeypatch, amx):
    """DraftHead.use_blocks: the head's weights rounded to Q8 blocks, its layers in one C call
    (products on AMX where it runs, else on VNNI, else float32): scores within that rounding of the float32
    head's, padding pairs still nobody's keys, each pass of a batch computed as alone;
    load_drafter runs a head on blocks where the kernel runs."""
    if not amx:
        monkeypatch.setattr(dlm.blocks, "_amx_tried", True)
        monkeypatch.setattr(dlm.blocks, "_amx_reason", "switched off (VOICE_AGENT_AMX=0)")
        monkeypatch.setenv("VOICE_AGENT_VNNI", "0")
    loaded = random_loaded("causal", seed=4, block_size=1, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128)
    loaded.path = tmp_path / "base.gguf"
    loaded.path.write_bytes(b"tiny base weights")
    vocab = list(range(0, 60, 3))
    head = _head(loaded, vocab)
    head.attach(loaded.model)
    g = torch.Generator().manual_seed(5)
    feats, tokens = torch.randn(3, 3, 64, generator=g), torch.randint(0, 60, (3, 3), generator=g)
    valid = torch.tensor([3, 1, 2])
    changed = feats.clone()
    changed[1, :2] = 9.0
    with torch.no_grad():
        plain = head(feats, tokens, valid, 3)
        assert head.use_blocks()
        split, vnni = amx and dlm.blocks.amx_available() is None, amx and dlm.blocks.vnni_available() is None
        assert head._packed_head.weight.products == (dlm.blocks.AMX_SPLIT if split else dlm.blocks.VNNI_INT8 if vnni
                                                     else 0)
        on_blocks = head(feats, tokens, valid, 3)
        alone = head(feats[1:2], tokens[1:2], valid[1:2], 3)
        again = head(changed, tokens, valid, 3)
        # The pass is one C call (`BlockDraftPass`): the bits of its three steps called one by one.
        B, T, c = 3, 6, loaded.config
        rows = torch.cat([head.fuse.proj(torch.cat([feats, head._embed(tokens)], dim=-1), 0),
                          head.slots[:3][None].expand(B, -1, -1)], dim=1).reshape(B * T, 64).contiguous()
        k_cache = torch.empty(len(head.layers), B, T, c.n_kv_heads, c.head_dim)
        head._block_layers(rows, *head._block_rope(B, T), k_cache, torch.empty_like(k_cache),
                           torch.arange(B).repeat_interleave(T), torch.arange(T).repeat(B), head._block_mask(3, 3, valid),
                           final_norm=head.norm.weight.detach())
        by_steps = head._packed_head(rows.view(B, T, 64)[:, 3:], 0)[..., : len(vocab)]
    assert torch.equal(by_steps, on_blocks)
    full = head._block_mask(3, 3, torch.tensor([3]))
    with pytest.raises(ValueError, match="float32 contiguous inputs"):  # never garbage read past the inputs
        head._draft_pass(torch.zeros(1, 3, 5), 3, *head._block_rope(1, 6), full)
    with pytest.raises(ValueError, match=r"needs a \(6, 6\) uint8 contiguous mask"):
        head._draft_pass(torch.zeros(1, 3, 128), 3, *head._block_rope(1, 6), full.bool())
    error = (on_blocks - plain).abs().max()
    assert 0 < error < 0.03 * plain.abs().max()  # other weights (Q8), within their rounding
    assert torch.equal(alone[0], on_blocks[1])
    assert torch.equal(again[1], on_blocks[1])
    back = load_drafter(save_drafter(tmp_path / "h.safetensors", _head(loaded, vocab), loaded.path, dtype=torch.float32),
                        loaded)
    assert back._block_layers is not None and back.fuse.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(back(feats, tokens, valid, 3), on_blocks)
    # For serving: the float32 weights go, the drafts stay; training or saving it is refused.
    served = load_drafter(tmp_path / "h.safetensors", loaded, inference_only=True)
    assert served.fuse.weight.is_meta and served._head is None
    assert all(m.weight.is_meta for m in served.layers.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        assert torch.equal(served(feats, tokens, valid, 3), on_blocks)
    with pytest.raises(RuntimeError, match="inference only"):
        served(feats, tokens, valid, 3)  # with gradients: the float32 path
    with pytest.raises(ValueError, match="inference only"):
        save_drafter(tmp_path / "again.safetensors", served, loaded.path)
    assert served.release_dense_weights() == 0  # nothing left to free
    with pytest.raises(RuntimeError, match="use_blocks"):
        _head(loaded, vocab).release_dense_weights()


def _causal_head(loaded, vocab, n_slots=4):
    head = DraftHead(loaded.config, DraftHeadConfig(window=3, n_slots=n_slots, vocab_size=len(vocab), causal=True))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)
        head.vocab.copy_(torch.tensor(vocab))
    head.attach(loaded.model)
    return head


def _places_drafted(scores):
    return [int(n) for n in (scores != 0).any(-1).sum(1)]


@pytest.mark.parametrize("blocks", [False, True], ids=["torch-layers", "q8-blocks"])
def test_a_causal_head_drafts_place_by_place_after_its_own_drafts(tmp_path, blocks):
    """A causal head's place i reads the draft of place i - 1: on its own it scores as it does
    when given those drafts (teacher forcing, as in training), a place never depends on later
    ones, each row is drafted as alone (on blocks bit for bit), and `bar` stops after the first place where every row's
    chain is less sure than it (the later places' scores 0). On Q8 blocks (one C call, places one
    at a time over a scratch cache) the scores are within that rounding of the float32 layers'
    and the drafts the same."""
    if blocks and dlm.blocks.available() is not None:
        pytest.skip(f"block kernel unavailable: {dlm.blocks.available()}")
    loaded = random_loaded("causal", seed=4, block_size=1, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128)
    vocab = list(range(0, 60, 3))
    head = _causal_head(loaded, vocab)
    g = torch.Generator().manual_seed(5)
    feats, tokens = torch.randn(3, 3, 64, generator=g), torch.randint(0, 60, (3, 3), generator=g)
    valid = torch.tensor([3, 1, 2])
    with torch.no_grad():
        plain = head(feats, tokens, valid, 4)
        forced = head(feats, tokens, valid, 4, head.draft_ids(plain.argmax(-1))[:, :3])
        assert torch.allclose(forced, plain, atol=1e-5)
        other = head(feats, tokens, valid, 4, torch.full((3, 3), 7))  # other tokens before: other scores after them
        assert torch.equal(other[:, 0], forced[:, 0]) and not torch.allclose(other[:, 1:], forced[:, 1:], atol=1e-3)
        if blocks:
            assert head.use_blocks() and head._draft_pass.embed is not None
            on_blocks = head(feats, tokens, valid, 4)
            assert torch.equal(on_blocks.argmax(-1), plain.argmax(-1))
            assert 0 < (on_blocks - plain).abs().max() < 0.03 * plain.abs().max()
            plain = on_blocks
        if blocks:  # one pass of 2 places (a scratch cache of its own size) as the first 2 of 4
            assert torch.equal(head(feats, tokens, valid, 2), plain[:, :2])
        alone = head(feats[1:2], tokens[1:2], valid[1:2], 4)[0]
        assert torch.equal(alone, plain[1]) if blocks else torch.allclose(alone, plain[1], atol=1e-6)
        sure = plain.softmax(-1).max(-1).values.cumprod(-1)  # each row's chain confidence by place
        # A place k where some rows fall below the bar and others not (the pass goes on), and every
        # row is below it at k + 1 (the pass stops there: k + 2 places drafted).
        k, bar = next((k, float(sure[:, k].min() + sure[:, k].max()) / 2) for k in range(3)
                      if float(sure[:, k + 1].max()) < float(sure[:, k].min() + sure[:, k].max()) / 2)
        cut = head(feats, tokens, valid, 4, bar=bar)
    assert _places_drafted(cut) == [k + 2] * 3 and torch.equal(cut[:, : k + 2], plain[:, : k + 2])
    parallel = _head(loaded, vocab)
    parallel.attach(loaded.model)
    with pytest.raises(ValueError, match="causal head"):
        parallel(feats, tokens, valid, 3, torch.zeros(3, 2, dtype=torch.long))


def test_a_causal_head_learns_the_token_after_a_guess(base, tmp_path):
    """Replies of pairs (a random a in 10..13, then a + 20): after a pair, no head can know the
    next a, but a causal head, reading it (the teacher's in training, its own draft in decoding),
    knows the b after it; a parallel head cannot. Saved and loaded, it stays causal."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(50):
        a = torch.randint(10, 14, (6,), generator=g).tolist()
        examples.append(Example([2, 3], [t for x in a for t in (x, x + 20)], [], "x", "greedy", i, "train"))
    examples, heldout = examples[:40], examples[40:]
    agreement = {}
    for causal in (False, True):
        cfg = HeadTrainConfig(max_steps=150, batch_size=64, window=2, n_slots=2, n_layers=1, lr=3e-3, warmup_steps=2,
                              causal=causal)
        head = train_head(base, examples, cfg, tmp_path / str(causal), base.path)
        agreement[causal] = evaluate_head(base, head, heldout)["slot_agreement"]
    # Place 1 after an a is the next a (a guess: 1 in 4 for both); after a b, the b of the next
    # a: the causal head knows it from its input (the teacher's a), the parallel one guesses.
    assert agreement[True][1] > 0.5 > 0.4 > agreement[False][1], agreement
    back = load_drafter(tmp_path / "True" / "drafter.safetensors", base)
    assert back.config.causal and read_drafter_meta(tmp_path / "True" / "drafter.safetensors")["config"]["causal"]
    # A parallel head continued as a causal one (`--causal --init`): its weights are the start.
    parallel = load_drafter(tmp_path / "False" / "drafter.safetensors", base)
    start = train_head(base, examples, HeadTrainConfig(max_steps=0, batch_size=64, causal=True), tmp_path / "start",
                       base.path, init=parallel)
    assert start.config.causal and torch.equal(start.fuse.weight, parallel.fuse.weight.float())
    with pytest.raises(ResumeError, match="another causal"):  # a parallel run is not resumed as a causal one
        train_head(base, examples, HeadTrainConfig(max_steps=200, batch_size=64, window=2, n_slots=2, n_layers=1,
                                                   causal=True), tmp_path / "False", base.path)


def test_a_draft_head_learns_from_the_bases_hidden_states_and_resumes(base, tmp_path, monkeypatch):
    """Replies that count up (next = last + 1): the head learns them from (hidden state, token)
    pairs of the frozen base; a rerun with more steps continues the same run, one on other replies
    is refused before it computes a feature."""
    examples = []
    for i in range(24):
        start = (3 * i) % 40
        examples.append(Example([start, start + 1], [start + 2 + k for k in range(10)], [], "x", "greedy", i, "train"))
    cfg = HeadTrainConfig(max_steps=80, batch_size=64, window=3, n_slots=3, n_layers=1, lr=3e-3, warmup_steps=2,
                          checkpoint_every=40)
    head = train_head(base, examples, cfg, tmp_path / "run", base.path)
    report = evaluate_head(base, head, examples[:8])
    assert report["slot_agreement"][0] > 0.6 and report["tokens_per_forward_by_draft_len"][3] > 2.0, report
    assert report["vocab"] == len({t for e in examples for t in e.reply_ids})
    assert (tmp_path / "run" / "features.pt").exists()  # computed once, read back by a resumed run
    cfg.max_steps = 82
    train_head(base, examples, cfg, tmp_path / "run", base.path)
    assert torch.load(tmp_path / "run" / "drafter-state.pt", weights_only=True)["step"] == 82
    assert isinstance(load_drafter(tmp_path / "run" / "drafter.safetensors", base), DraftHead)
    # Other replies (one token more in one of them) are refused before a feature is computed.
    other = [*examples[:-1], Example(examples[-1].prompt_ids, [*examples[-1].reply_ids, 50], [], "x", "greedy", 23,
                                     "train")]

    def no_features(*args, **kwargs):
        raise AssertionError("computed features")

    monkeypatch.setattr("dlm.adapt.head.head_features", no_features)
    with pytest.raises(ResumeError, match="trained on other data"):
        train_head(base, other, cfg, tmp_path / "run", base.path)
    assert torch.load(tmp_path / "run" / "drafter-state.pt", weights_only=True)["step"] == 82


def test_a_continued_head_keeps_its_vocabulary_and_grows_it_up_to_max_vocab(base, tmp_path):
    """`init` continues a head: its vocabulary and the new replies' tokens, unless `max_vocab`
    caps it, then the tokens the replies use most (ties: the lower id), and the head still drafts."""
    first = [Example([i, i + 1], [i + 2 + k for k in range(8)], [], "x", "greedy", i, "train") for i in range(0, 30, 2)]
    cfg = HeadTrainConfig(max_steps=40, batch_size=64, window=3, n_slots=3, n_layers=1, lr=3e-3, warmup_steps=2)
    init = train_head(base, first, cfg, tmp_path / "first", base.path)
    assert init.vocab.tolist() == list(range(2, 38))
    # New replies count up from 20: tokens 22..51, the low ones used most (every reply starts low).
    more = [Example([20, 21 + i % 3], [22 + i % 3 + k for k in range(20 - i)], [], "x", "greedy", i, "train")
            for i in range(10)]
    counts = torch.bincount(torch.tensor([t for e in more for t in e.reply_ids]), minlength=64)
    grown = train_head(base, more, HeadTrainConfig(max_steps=2, batch_size=64, lr=3e-3, warmup_steps=1),
                       tmp_path / "grown", base.path, init=init)
    assert grown.vocab.tolist() == sorted(set(range(2, 38)) | set(counts.nonzero().squeeze(1).tolist()))
    capped = train_head(base, more, HeadTrainConfig(max_steps=60, batch_size=64, lr=3e-3, warmup_steps=2,
                                                    max_vocab=12), tmp_path / "capped", base.path, init=init)
    by_use = sorted(range(64), key=lambda t: (-int(counts[t]), t))[:12]
    assert capped.vocab.tolist() == sorted(by_use) and len(by_use) == 12 and int(counts[by_use[-1]]) > 0
    assert read_drafter_meta(tmp_path / "capped" / "drafter.safetensors")["info"]["train"]["max_vocab"] == 12
    report = evaluate_head(base, capped, more[:4])
    assert report["vocab"] == 12 and report["slot_agreement"][0] > 0.5, report
    with pytest.raises(ValueError, match="max_vocab"):
        HeadTrainConfig(max_steps=1, max_vocab=-1)


def test_head_features_in_batches_equal_one_sequence_at_a_time(base):
    """Batched features (padded at the end, as on a GPU) are each sequence's own, to float16."""
    from dlm.adapt.head import head_features

    examples = [Example(list(range(3, 3 + n)), [40 + k for k in range(n % 5 + 2)], [], "x", "greedy", n, "train")
                for n in (2, 9, 4, 7, 5)]
    alone = head_features(base, examples, batch_size=1)
    batched = head_features(base, examples, batch_size=3)
    assert [h.shape for h in alone] == [(len(e.prompt_ids) + len(e.reply_ids), base.config.dim) for e in examples]
    for a, b in zip(alone, batched, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=2e-3, rtol=2e-3)


def test_head_features_are_kept_by_sequence_and_computed_only_where_missing(base, tmp_path, monkeypatch):
    """features.pt keeps each sequence's features by its token ids, saved every few sequences as a
    part file of the new ones, merged at the end: a run on more data computes only the new ones,
    and an interrupted run goes on where it stopped."""
    from dlm.adapt import head as head_module

    examples = [Example([(3 * i) % 40, (3 * i) % 40 + 1], [(3 * i) % 40 + 2 + k for k in range(6)], [], "x",
                        "greedy", i, "train") for i in range(24)]
    examples.insert(3, examples[1])  # a repeated sequence is computed once
    source = {"base": "fingerprint", "adapter": None}
    monkeypatch.setattr(head_module, "FEATURES_SAVE_EVERY", 5)
    computed: list[int] = []
    real = head_module.head_features

    def counting(loaded, batch, **kw):
        if len(computed) == 2 and fail:
            raise KeyboardInterrupt
        computed.append(len(batch))
        return real(loaded, batch, **kw)

    monkeypatch.setattr(head_module, "head_features", counting)
    fail = True
    with pytest.raises(KeyboardInterrupt):
        head_module._features(base, examples[:13], tmp_path, (), source)
    assert computed == [5, 5]
    parts = sorted(f.name for f in tmp_path.glob("features*"))
    assert parts == ["features.pt.part-0000", "features.pt.part-0001"]  # each save holds only its new five
    assert [len(torch.load(tmp_path / f, weights_only=True)["h"]) for f in parts] == [5, 5]
    (tmp_path / "features.pt.part-0002.tmp").write_bytes(b"a part cut off while it was saved")
    fail, computed[:] = False, []
    first = head_module._features(base, examples[:13], tmp_path, (), source)
    assert computed == [2]  # the ten saved before the interruption are read back; 12 distinct of 13
    assert sorted(f.name for f in tmp_path.glob("features*")) == ["features.pt"]  # the parts merged into one file
    assert first[3] is first[1]
    computed.clear()
    other_run = tmp_path / "other-run"  # features.pt a link to another run's: that file is left as it was
    other_run.mkdir()
    (tmp_path / "features.pt").rename(other_run / "features.pt")
    os.link(other_run / "features.pt", tmp_path / "features.pt")
    theirs = (other_run / "features.pt").read_bytes()
    both = head_module._features(base, examples[::-1], tmp_path, (), source)
    assert computed == [5, 5, 2]  # the other twelve only
    assert (other_run / "features.pt").read_bytes() == theirs
    assert not (tmp_path / "features.pt").samefile(other_run / "features.pt")
    assert all(torch.equal(a, b) for a, b in zip(first, both[::-1][:13], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(both, real(base, examples[::-1]), strict=True))
    computed.clear()
    other = {"base": "another base's fingerprint", "adapter": None}
    assert head_module._features(base, examples[:3], tmp_path, (), other) and computed == [3]  # not read: computed
    computed.clear()
    assert head_module._features(base, examples[:3], tmp_path, (0,), other)[0].shape[1] == 2 * base.config.dim
    assert computed == [3]  # other layers' features: computed


def test_a_head_trained_with_soft_targets_learns_and_records_the_share(base, tmp_path):
    """Distillation to the teacher's distribution (`soft`) trains a head that drafts the counting
    replies; the share is in the file's training info."""
    examples = [Example([(3 * i) % 40, (3 * i) % 40 + 1], [(3 * i) % 40 + 2 + k for k in range(10)], [], "x",
                        "greedy", i, "train") for i in range(24)]
    cfg = HeadTrainConfig(max_steps=80, batch_size=64, window=3, n_slots=3, n_layers=1, lr=3e-3, warmup_steps=2,
                          soft=0.5)
    head = train_head(base, examples, cfg, tmp_path / "run", base.path)
    report = evaluate_head(base, head, examples[:8])
    assert report["slot_agreement"][0] > 0.6, report
    assert read_drafter_meta(tmp_path / "run" / "drafter.safetensors")["info"]["train"]["soft"] == 0.5


def test_a_head_on_more_layers_features_trains_and_the_engine_refuses_it(base, tmp_path):
    """feature_layers: the head reads a base layer's output beside the final state (training and
    evaluation compute it); the engine, which feeds the final state only, says so at once."""
    from dlm.speculative import SpeculativeEngine

    examples = [Example([(3 * i) % 40, (3 * i) % 40 + 1], [(3 * i) % 40 + 2 + k for k in range(10)], [], "x",
                        "greedy", i, "train") for i in range(24)]
    cfg = HeadTrainConfig(max_steps=60, batch_size=64, window=3, n_slots=3, n_layers=1, lr=3e-3, warmup_steps=2,
                          feature_layers=(0,))
    head = train_head(base, examples, cfg, tmp_path / "run", base.path)
    assert head.fuse.weight.shape[1] == 3 * base.config.dim
    assert evaluate_head(base, head, examples[:8])["slot_agreement"][0] > 0.5
    saved = torch.load(tmp_path / "run" / "features.pt", weights_only=True)
    assert saved["layers"] == [0] and all(h.shape[1] == 2 * base.config.dim for h in saved["h"].values())
    loaded = load_drafter(tmp_path / "run" / "drafter.safetensors", base)
    assert loaded.config.feature_layers == (0,)
    with pytest.raises(ValueError, match=r"layers \[0\]"):
        SpeculativeEngine(base, loaded, max_batch_size=2)


def test_feature_layers_past_the_base_are_refused_with_its_range(base):
    from dlm.adapt.head import head_features

    examples = [Example([3, 4], [5, 6], [], "x", "greedy", 0, "train")]
    with pytest.raises(ValueError, match=r"layers 0\.\."):
        head_features(base, examples, layers=(len(base.model.model.layers),))
    assert not any(layer._forward_hooks for layer in base.model.model.layers)
