"""Weights in int4 for the decoding steps (dlm.model.Int4Weight, Int8AsInt4Weight, Projection;
dlm.checkpoints.load_model(weights="int4"), with or without a fine-tune's low-rank update): the
kernels compute what the blocks (and the update) say, a row's bits do not depend on the other
rows, and the engines built on them stay exact: the AR engine's replies do not depend on its
batch or on prefix reuse, and draft-and-verify writes them token for token."""

from __future__ import annotations

import pytest
import torch
from dlm_tiny_models import random_loaded
from test_speculative import PROMPTS, _random_drafter, _run

from dlm.adapter import Adapter, AdapterConfig, merge_adapter, unmerged_update
from dlm.ar import AREngine
from dlm.chat import ChatFormatter
from dlm.checkpoints import load_model
from dlm.engine import GenerationParams
from dlm.errors import UnsupportedCheckpointError
from dlm.masks import causal_mask
from dlm.model import Int4Weight, Int8AsInt4Weight, can_pack_linears
from dlm.speculative import SpeculativeEngine

needs_bf16 = pytest.mark.skipif(not can_pack_linears(torch.bfloat16, "cpu"), reason="no oneDNN bf16 on this CPU")


def _blocks(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.002).to(torch.bfloat16).float()
    minimum = (-8 * scale + (torch.rand(n, k // 32, generator=g) - 0.5) * 0.004).to(torch.bfloat16).float()
    return q, scale, minimum


def _dequantized(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.float().view(n, -1, 32) * scale[..., None] + minimum[..., None]).view(n, k)


def test_int4_weight_computes_its_blocks_and_each_row_alone():
    q, scale, minimum = _blocks(96, 128, seed=0)
    weight = Int4Weight.from_blocks(q, scale, minimum)
    x = torch.randn(40, 128).to(torch.bfloat16)
    y = weight(x)
    reference = x.float() @ _dequantized(q, scale, minimum).T  # scale and minimum are bf16 values here
    assert y.dtype == torch.bfloat16 and y.shape == (40, 96)
    assert torch.allclose(y.float(), reference, atol=2e-2, rtol=2e-2)
    for rows in (1, 2, 5, 17, 33):  # a row's bits do not depend on how many rows came with it
        assert torch.equal(weight(x[:rows]), y[:rows])
    assert torch.equal(weight(x[7:8]), y[7:8])


def test_a_low_rank_update_adds_to_the_blocks_and_keeps_each_row_alone():
    q, scale, minimum = _blocks(96, 128, seed=5)
    g = torch.Generator().manual_seed(6)
    down = torch.randn(4, 128, generator=g).to(torch.bfloat16)
    up = (torch.randn(96, 4, generator=g) * 0.05).to(torch.bfloat16)
    base = Int4Weight.from_blocks(q, scale, minimum)
    weight = base.with_low_rank(down, up)
    x = torch.randn(40, 128).to(torch.bfloat16)
    y = weight(x)
    update = x.double() @ (up.double() @ down.double()).T
    reference = x.double() @ _dequantized(q, scale, minimum).double().T + update
    assert update.abs().max() > 0.5  # large enough that dropping it would fail the next line
    assert torch.allclose(y.double(), reference, atol=3e-2, rtol=2e-2)
    assert not torch.allclose(base(x).double(), reference, atol=3e-2, rtol=2e-2)
    for rows in (1, 2, 5, 17, 33):
        assert torch.equal(weight(x[:rows]), y[:rows])
    with pytest.raises(ValueError, match="already carry"):
        weight.with_low_rank(down, up)
    with pytest.raises(ValueError, match=r"needs down \(R, 128\)"):
        base.with_low_rank(down[:, :64], up)

    # Fused side by side with weights with and without an update: each part's output, bit for bit.
    first = Int4Weight.from_blocks(*_blocks(128, 128, seed=7)).with_low_rank(down, torch.cat([up, up[:32]]))
    other = Int4Weight.from_blocks(*_blocks(64, 128, seed=8))
    third = Int4Weight.from_blocks(*_blocks(96, 128, seed=9)).with_low_rank(down[:2], up[:, :2])
    fused = Int4Weight.cat([first, other, third])
    assert fused.low_rank[0].shape == (6, 128) and fused.low_rank[1].shape == (288, 6)
    assert torch.equal(fused(x), torch.cat([first(x), other(x), third(x)], dim=1))
    assert Int4Weight.cat([other, other]).low_rank is None
    # The kernel's packed layout goes by blocks of 64 outputs: a part of 96 cannot lead a fusion.
    assert Int4Weight.cat([third, other]) is None and Int4Weight.cat([other, None]) is None


def test_int8_as_two_int4_weights_is_the_q8_weight():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (64, 96), generator=g, dtype=torch.int8)
    scale = (torch.rand(64, 3, generator=g) * 0.01 + 0.001).to(torch.bfloat16).float()
    weight = Int8AsInt4Weight(q, scale)
    x = torch.randn(3, 96).to(torch.bfloat16)
    reference = x.float() @ (q.float().view(64, 3, 32) * scale[..., None]).view(64, 96).T
    assert torch.allclose(weight(x).float(), reference, atol=3e-2, rtol=1e-2)
    # 16 d (hi - 8) + d lo covers every q: a one-hot input reads the weights back, to the bf16
    # rounding of each part's output (the kernel returns x's dtype).
    eye = torch.eye(96).to(torch.bfloat16)
    read_back = weight(eye).float().T  # (64, 96)
    expected = (q.float().view(64, 3, 32) * scale[..., None]).view(64, 96)
    assert (read_back - expected).abs().max() <= 2 * 2**-8 * expected.abs().max()


def random_adapter(config, seed: int) -> Adapter:
    """A rank-4 adapter with random weights (large enough to change replies)."""
    torch.manual_seed(seed)
    adapter = Adapter(config, AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.2)
    return adapter


def _int4_loaded(seed: int = 3, adapted: bool = False):
    """A random causal model at SmolLM2's widths whose projections run int4 weights in the steps
    and the same weights, dequantized to bf16, in the prefill; `adapted`: plus a random adapter,
    merged into the prefill's weights and unmerged in the steps' (as load_model does)."""
    loaded = random_loaded("causal", seed=seed, eos=[1], block_size=1, dim=576, n_heads=9, n_kv_heads=3,
                           intermediate_size=1536)
    model = loaded.model.to(torch.bfloat16)
    int4 = {}
    for i, name in enumerate(n for n, p in model.named_parameters() if n.startswith("model.layers.") and p.ndim == 2):
        param = dict(model.named_parameters())[name]
        q, scale, minimum = _blocks(*param.shape, seed=100 + i)
        with torch.no_grad():
            param.copy_(_dequantized(q, scale, minimum) * 20)  # SmolLM2-like magnitudes for this init
        int4[name] = Int4Weight.from_blocks(q, scale * 20, minimum * 20)
    if adapted:
        adapter = random_adapter(loaded.config, seed)
        merge_adapter(model, adapter)
        int4 = unmerged_update(int4, adapter)
    assert model.pack_linears(int4) and model.step_kernels
    model.release_dense_weights()
    return loaded


@needs_bf16
@pytest.mark.parametrize("adapted", [False, True])
def test_int4_engines_are_exact_whatever_the_batch_and_the_prefix_reuse(adapted):
    loaded = _int4_loaded(adapted=adapted)
    drafter = _random_drafter(loaded)
    params = GenerationParams(max_new_tokens=16)
    prompts = [p * 9 for p in PROMPTS]  # prefills of more than one packed call
    with AREngine(loaded, max_batch_size=4) as ar, SpeculativeEngine(loaded, drafter, draft_len=3,
                                                                      max_batch_size=4) as spec:
        expected = [_run(ar.submit(p, params))[0] for p in prompts]
        ar_together = [_run(h)[0] for h in [ar.submit(p, params) for p in prompts]]
        drafted = [_run(h)[0] for h in [spec.submit(p, params) for p in prompts]]
        # A second turn: the first turn's prompt and reply, then more. The engine reuses the
        # prefilled prompt only (the reply's K/V came from int4 steps) and gives the reply a
        # fresh engine gives.
        turn2 = prompts[0] + expected[0] + [5, 6, 7]
        reused = _run(ar.submit(turn2, params))[0]
    with AREngine(loaded, max_batch_size=1) as fresh:
        assert _run(fresh.submit(turn2, params))[0] == reused
    assert ar_together == expected
    assert drafted == expected
    assert any(len(ids) > 3 for ids in expected)


@needs_bf16
def test_a_model_with_released_weights_refuses_gradients_and_unpacking():
    loaded = _int4_loaded(seed=4)
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        logits = loaded.model(tokens, torch.arange(3)[None], causal_mask(3))
    assert torch.isfinite(logits).all()
    with pytest.raises(RuntimeError, match="inference only"):
        loaded.model(tokens, torch.arange(3)[None], causal_mask(3))  # gradients on
    with pytest.raises(RuntimeError, match="inference only"):
        loaded.model.unpack_linears()


def test_int4_weights_need_a_gguf_and_bfloat16(tmp_path):
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(tmp_path, weights="int3")
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(UnsupportedCheckpointError):
        load_model(bad, weights="int4")


@pytest.mark.slow
def test_the_embedded_gguf_in_int4_reads_its_own_blocks_and_answers():
    from dlm.gguf_file import read_quant_blocks
    from voice_agent.models import resolve_llm_model

    path = resolve_llm_model("smollm2-135m-instruct").path
    dense = load_model(path, dtype="float32")
    blocks = read_quant_blocks(path)
    state = dense.model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):  # q un-permuted like the dense one; the head is Q8_0
        kind, q, scale, minimum = blocks[name]
        assert kind == ("q8" if "embed" in name else "q4")
        n, k = q.shape
        rebuilt = (q.float().view(n, -1, 32) * scale[..., None] + minimum[..., None]).view(n, k)
        assert torch.equal(rebuilt, state[name]), name
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(path, dtype="float32", weights="int4")
    loaded = load_model(path, weights="int4")
    assert loaded.model.step_kernels and loaded.model.weight_bytes() < 450e6
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with AREngine(loaded, max_batch_size=1) as engine:
        reply = engine.submit(messages, GenerationParams(max_new_tokens=12)).result()
    assert "paris" in reply.lower()


@pytest.mark.slow
def test_the_grounded_fine_tune_runs_on_the_int4_steps():
    """The shipped adapter on the GGUF's int4 blocks: a decoding step's logits are the fine-tuned
    model's (float32, merged), not the base's, to within the int4 path's bf16 arithmetic."""
    from voice_agent.models import resolve_llm_model

    resolved = resolve_llm_model("smollm2-135m-grounded-int4")
    assert resolved.weights == "int4" and resolved.adapter is not None
    tuned = load_model(resolved.path, adapter=resolved.adapter, weights="int4")
    base = load_model(resolved.path, weights="int4")
    reference = load_model(resolved.path, adapter=resolved.adapter, dtype="float32")
    messages = [{"role": "system", "content": "You answer the phone for Rosa's Bakery. Hours: 7am to 3pm."},
                {"role": "user", "content": "What time do you open?"}]
    ids = torch.tensor([ChatFormatter(tuned.tokenizer, tuned.spec).encode(messages)])

    def step_logits(loaded):
        # the prefill's K/V, then one step at the last position (the steps' kernels)
        cache = loaded.model.new_cache(1, 64)
        with torch.no_grad():
            n = ids.shape[1] - 1
            loaded.model(ids[:, :n], torch.arange(n)[None], causal_mask(n), cache=cache,
                         cache_rows=torch.tensor([0]))
            mask = torch.ones(1, 1, 1, n + 1, dtype=torch.bool)
            return loaded.model(ids[:, n:], torch.tensor([[n]]), mask, cache=cache, cache_rows=torch.tensor([0]),
                                step=True)[0, -1].float()

    want = step_logits(reference)
    tuned_gap = (step_logits(tuned) - want).abs().max()
    base_gap = (step_logits(base) - want).abs().max()
    assert tuned_gap < 1.5 and base_gap > 2 * tuned_gap, (tuned_gap, base_gap)
    with AREngine(tuned, max_batch_size=1) as engine:
        reply = engine.submit(messages, GenerationParams(max_new_tokens=24)).result()
    assert "7" in reply
