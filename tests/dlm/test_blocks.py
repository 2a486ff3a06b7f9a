"""Float32 block weights (dlm.blocks, dlm.model.Transformer.use_blocks, load_model(weights="blocks")):
the kernel rebuilds each weight exactly as the float32 dequantisation does, a row's bits do not
depend on the other rows or on the thread count, and a model on blocks decodes what the dense
float32 model decodes, on float32 FMAs and on float32-accurate AMX products alike (BlockWeight.split);
where the kernel cannot run, the registry's choice falls back (to dense, or from AMX to float32 blocks)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch
from dlm_tiny_models import V, random_loaded, tiny_config
from test_int4 import random_adapter
from test_speculative import PROMPTS, _random_drafter, _random_head, _run, _tree_oracle, ar_alone_together

import dlm.blocks
from dlm.adapter import merge_adapter, unmerged_update
from dlm.ar import AREngine
from dlm.blocks import BlockWeight
from dlm.checkpoints import load_model, runnable_weights
from dlm.engine import GenerationParams
from dlm.errors import UnsupportedCheckpointError
from dlm.masks import causal_mask, limit_mask
from dlm.model import BlockEmbedding, DraftInputs, Transformer
from dlm.speculative import SpeculativeEngine, tree_writes

needs_kernel = pytest.mark.skipif(dlm.blocks.available() is not None,
                                  reason=f"float32 block kernel unavailable: {dlm.blocks.available()}")
needs_amx = pytest.mark.skipif(dlm.blocks.amx_available() is not None,
                               reason=f"bf16 block products unavailable: {dlm.blocks.amx_available()}")
needs_vnni = pytest.mark.skipif(dlm.blocks.vnni_available() is not None,
                                reason=f"integer block products unavailable: {dlm.blocks.vnni_available()}")


def _q4(n: int, k: int, seed: int, q4_0: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // 32, generator=g) * 0.02 + 0.002).half().float()  # GGUF stores float16
    minimum = -8 * scale if q4_0 else (-torch.rand(n, k // 32, generator=g) * 0.16).half().float()
    return q, scale, minimum


def _q8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return q, (torch.rand(n, k // 32, generator=g) * 0.01 + 0.001).half().float()


def _dequantized(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """As dlm.gguf_file.convert_gguf writes them: q * scale, then + minimum, in float32."""
    n, k = q.shape
    w = q.float().view(n, -1, 32) * scale[..., None]
    return (w if minimum is None else w + minimum[..., None]).view(n, k)


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
def test_each_weight_is_the_float32_dequantisation_bit_for_bit(kind):
    n, k = 70, 192  # 70 outputs: tiles of 4 and 2 with a tail
    if kind == "q8_0":
        q, scale = _q8(n, k, seed=1)
        weight, dense = BlockWeight.q8(q, scale), _dequantized(q, scale)
    else:
        q, scale, minimum = _q4(n, k, seed=1, q4_0=kind == "q4_0")
        weight, dense = BlockWeight.q4(q, scale, minimum), _dequantized(q, scale, minimum)
    # one-hot rows read one weight each: exact whatever the order of the sums
    assert torch.equal(weight(torch.eye(k)), dense.T)
    x = torch.randn(9, k)
    # against the float64 product: torch's float32 x @ dense.T is itself off by up to ~1e-5 for Q8's
    # larger terms (the kernel's sums by a quarter of that)
    assert torch.allclose(weight(x).double(), x.double() @ dense.double().T, atol=1e-5, rtol=1e-5)


def _random_blocks(kind: str, n: int, k: int, seed: int) -> tuple[BlockWeight, torch.Tensor]:
    """Random Q4 (Q4_1; "q4_0": Q4_0) or Q8 block weights (n, k) and their float32 dequantisation."""
    if kind in ("q4", "q4_0"):
        q, scale, minimum = _q4(n, k, seed=seed, q4_0=kind == "q4_0")
        return BlockWeight.q4(q, scale, minimum), _dequantized(q, scale, minimum)
    q, scale = _q8(n, k, seed=seed)
    return BlockWeight.q8(q, scale), _dequantized(q, scale)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_a_rows_bits_depend_neither_on_the_other_rows_nor_on_the_threads():
    q, scale, minimum = _q4(300, 576, seed=2)
    weight = BlockWeight.q4(q, scale, minimum)
    x = torch.randn(21, 576)
    y = weight(x)
    for rows in (1, 2, 3, 4, 5, 8, 9, 17):  # every row-tile width of the kernel, and more than one tile
        assert torch.equal(weight(x[:rows]), y[:rows]), rows
    assert torch.equal(weight(x[13:14]), y[13:14])
    with _one_thread():
        assert torch.equal(weight(x), y)


@needs_amx
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_bf16_products_round_weights_and_inputs_and_a_rows_bits_are_its_own(kind):
    """BlockWeight.bf16 (AMX): each weight the float32 dequantisation rounded to bf16, each input
    rounded to bf16, sums in float32; a row's bits whatever the other rows (one tile of 16 rows or
    several, tails of 16 outputs) or the thread count; a low-rank update beside it, also across
    the boundary of fused parts inside a tile of 16 outputs."""
    n, k = 176, 192  # 11 tiles of 16 outputs: groups of 4 and a tail
    weight, dense = _random_blocks(kind, n, k, seed=7)
    x = torch.randn(37, k)
    bf16 = weight.bf16()
    y = bf16(x)
    want = x.bfloat16().double() @ dense.bfloat16().double().T
    assert (y.double() - want).abs().max() < 1e-5 * want.abs().max()
    for rows in (1, 5, 16, 17):
        assert torch.equal(bf16(x[:rows]), y[:rows]), rows
    assert torch.equal(bf16(x[20:21]), y[20:21])
    with _one_thread():
        assert torch.equal(bf16(x), y)
    g = torch.Generator().manual_seed(8)
    # an update that bf16 holds (bf16 products add their updates in bf16)
    down = torch.randn(4, k, generator=g).bfloat16().float()
    up = (torch.randn(40, 4, generator=g) * 0.05).bfloat16().float()
    # outputs 160..175: a tile of 16 outputs across both parts
    parts, dense_parts = zip(*[_random_blocks(kind, size, k, seed) for size, seed in ((168, 9), (40, 10))], strict=True)
    fused = BlockWeight.cat([parts[0], parts[1].with_low_rank(down, up)]).bf16()
    got = fused(x)
    reference = x.bfloat16().double() @ torch.cat(dense_parts).bfloat16().double().T
    reference[:, 168:] += (x @ down.T @ up.T).double()
    assert (got.double() - reference).abs().max() < 1e-5 * reference.abs().max()
    assert torch.equal(fused(x[3:4]), got[3:4])
    with pytest.raises(ValueError, match="multiples of 16"):
        BlockWeight.q4(*_q4(40, k, seed=1)).bf16()


def _fused_with_update(x: torch.Tensor) -> tuple[BlockWeight, torch.Tensor]:
    """Q4 blocks of two fused parts (168 + 40 outputs: the tile of outputs 160..175 spans both),
    the second with a float32 low-rank update; and their exact product with x (float64)."""
    k = x.shape[1]
    g = torch.Generator().manual_seed(8)
    down, up = torch.randn(4, k, generator=g), torch.randn(40, 4, generator=g) * 0.05
    parts, dense_parts = zip(*[_random_blocks("q4", size, k, seed) for size, seed in ((168, 9), (40, 10))], strict=True)
    reference = x.double() @ torch.cat(dense_parts).double().T
    reference[:, 168:] += x.double() @ down.double().T @ up.double().T
    return BlockWeight.cat([parts[0], parts[1].with_low_rank(down, up)]), reference


@needs_amx
@pytest.mark.parametrize("kind", ["q4", "q4_0", "q8"])
def test_split_products_are_float32_accurate_and_a_rows_bits_are_its_own(kind):
    """BlockWeight.split (AMX): inputs split into three bf16 parts, the blocks' integers exact, so
    the result is as close to the exact product as the float32 path's (not bf16's); a row's bits
    whatever the other rows (groups of 16 rows, several groups) or the thread count; a float32
    low-rank update, also across fused parts inside a tile of 16 outputs."""
    n, k = 176, 192
    weight, dense = _random_blocks(kind, n, k, seed=7)
    x = torch.randn(37, k)
    split = weight.split()
    assert split.out_features == n and split.split() is split
    y = split(x)
    exact = x.double() @ dense.double().T
    float32_error = (weight(x).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() < 4 * float32_error + 1e-7 * exact.abs().max()
    bf16_error = (weight.bf16()(x).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() < 0.01 * bf16_error
    for rows in (1, 2, 4, 5, 6, 16, 17):
        assert torch.equal(split(x[:rows]), y[:rows]), rows
    assert torch.equal(split(x[20:21]), y[20:21])
    with _one_thread():
        assert torch.equal(split(x), y)
    fused, reference = _fused_with_update(x)
    got = fused.split()(x)
    assert (got - fused(x)).abs().max() < 1e-5 * reference.abs().max()
    assert (got.double() - reference).abs().max() < 1e-6 * reference.abs().max()
    assert torch.equal(fused.split()(x[3:4]), got[3:4])
    with pytest.raises(ValueError, match="multiples of 16"):
        BlockWeight.q4(*_q4(40, k, seed=1)).split()
    with pytest.raises(ValueError, match="another way"):
        split.bf16()


def _integer_reference(x: torch.Tensor, weight: BlockWeight, bits: int) -> torch.Tensor:
    """dlm/blocks.c's integer products, in float64: each row's inputs rounded per block of 32 to
    integers of at most 127 (8 bits) or 32512 (16 bits) over the block's largest magnitude, times
    the blocks' integers, scaled by d and the inputs' unit; plus m times the block's exact sum."""
    n, k = weight.out_features, weight.in_features
    q, d, m = weight._integers()
    blocks = x.view(-1, k // 32, 32)
    top = blocks.abs().amax(-1, keepdim=True)
    largest = 127.0 if bits == 8 else 32512.0
    # inf for a block of zeros or of tiny numbers: those round to 0. A true float32 division, as
    # the kernel's (a number over a tensor is torch's reciprocal times the number, a rounding
    # apart in about a quarter of cases: an input on the edge then rounds to another integer)
    inverse = torch.full_like(top, largest) / top
    scale = torch.where(inverse.isfinite(), inverse, torch.zeros_like(top))
    ints = torch.round(blocks * scale).double()  # x * scale in float32, rounded to nearest even, as the kernel
    sums = torch.einsum("rbi,nbi->rnb", ints, q.view(n, k // 32, 32).double())
    return (sums * d.double() * (top / largest).double().transpose(1, 2)).sum(-1) + blocks.sum(-1).double() @ m.double().T


@needs_vnni
@pytest.mark.parametrize("kind", ["q4", "q4_0", "q8"])
def test_integer_products_round_each_rows_inputs_per_block_and_a_rows_bits_are_its_own(kind):
    """BlockWeight.int8 / int16 (AVX512-VNNI): each row's inputs rounded per block of 32 to 8 or
    16 bits of its largest magnitude, the blocks' integers multiplied exactly, float32 scales;
    16 bits far closer to the exact product than 8 (and than bf16 inputs); a row's bits whatever
    the other rows (groups of 8 rows, several groups, tiles of 4 and 2 with tails) or the thread
    count; a float32 low-rank update, also across fused parts inside a tile of 16 outputs."""
    n, k = 176, 192
    weight, dense = _random_blocks(kind, n, k, seed=7)
    x = torch.randn(37, k)
    x[5, 32:64] = 0.0  # a block of zeros: unit 0
    x[6, 64:96] = 1e-38  # a block too small for 127 / its largest to be finite: unit 0 too
    exact = x.double() @ dense.double().T
    errors = {}
    for bits, products in ((8, weight.int8()), (16, weight.int16())):
        assert products.out_features == n
        y = products(x)
        assert (y.double() - _integer_reference(x, weight, bits)).abs().max() < 1e-5 * exact.abs().max()
        errors[bits] = float((y.double() - exact).abs().max() / exact.abs().max())
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17):
            assert torch.equal(products(x[:rows]), y[:rows]), (bits, rows)
        assert torch.equal(products(x[20:21]), y[20:21])
        with _one_thread():
            assert torch.equal(products(x), y)
    assert errors[8] < 2e-2 and errors[16] < 2e-4 and errors[16] < errors[8] / 50
    for bad in (float("nan"), float("inf")):  # not finite: not finite out, as a float32 product gives
        broken = x[:3].clone()
        broken[1, 70] = bad
        out = weight.int8()(broken)
        assert not out[1].isfinite().any() and torch.equal(out[[0, 2]], weight.int8()(x[[0, 2]]))
    fused, reference = _fused_with_update(x)
    got = fused.int16()(x)
    assert (got.double() - reference).abs().max() < 2e-4 * reference.abs().max()
    assert torch.equal(fused.int16()(x[3:4]), got[3:4])
    assert torch.equal(fused.int8().int16()(x), got)  # one layout, two input widths
    with pytest.raises(ValueError, match="multiples of 16"):
        BlockWeight.q4(*_q4(40, k, seed=1)).int8()
    if dlm.blocks.amx_available() is None:
        with pytest.raises(ValueError, match="another way"):
            weight.split().int8()


@needs_kernel
@pytest.mark.parametrize("products", ["float32", pytest.param("split", marks=needs_amx)])
def test_an_update_of_bf16_numbers_is_kept_in_bf16_and_gives_the_same_bits(products):
    """A fine-tune saved in bf16 is read at half the bytes: LowRank keeps down and up in bf16 where
    every value is a bf16 number, and the kernel gives, bit for bit, what the same numbers held in
    float32 give (its t shared between the threads: a row's bits whatever the threads or rows);
    an update with any other value stays float32."""
    from dlm.blocks import LowRank

    k = 192
    parts = [_random_blocks("q4", size, k, seed)[0] for size, seed in ((160, 21), (48, 22))]
    g = torch.Generator().manual_seed(23)
    down = torch.randn(12, k, generator=g).to(torch.bfloat16).float()
    up = (torch.randn(48, 12, generator=g) * 0.05).to(torch.bfloat16).float()
    fused = BlockWeight.cat([parts[0], parts[1].with_low_rank(down, up)])
    u = fused.low_rank
    assert u.down.dtype == u.up.dtype == torch.bfloat16
    held_in_float32 = BlockWeight(fused.kind, fused.data, fused.scales, fused.in_features,
                                  LowRank(u.down.float(), u.up.float(), u.offset))
    if products == "split":
        fused, held_in_float32 = fused.split(), held_in_float32.split()
    x = torch.randn(13, k)
    y = fused(x)
    assert torch.equal(y, held_in_float32(x))
    for rows in (1, 4, 5, 8, 9):
        assert torch.equal(fused(x[:rows]), y[:rows]), rows
    with _one_thread():
        assert torch.equal(fused(x), y)
    assert parts[1].with_low_rank(down + 1e-4, up).low_rank.down.dtype == torch.float32


def test_a_float_weight_rounds_to_q8_blocks_as_a_gguf_writer_rounds_it():
    """BlockWeight.quantize_q8 (the draft head's weights): per 32 inputs a float16 scale max|w| / 127
    and q = round(w / d): within half a step of each weight, and Q8 blocks come back as they were."""
    q, scale = _q8(24, 128, seed=31)
    q = q.clamp(-127, 127)
    q[:, ::32] = 127  # each block's largest magnitude is 127 steps, as a writer makes it
    dense = _dequantized(q, scale)
    again = BlockWeight.quantize_q8(dense)
    assert torch.equal(again.data, q) and torch.equal(again.scales, scale)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(32))
    w[3, :32] = 0.0  # an all-zero block: scale 0, weights 0
    rounded = BlockWeight.quantize_q8(w)
    step = rounded.scales.repeat_interleave(32, dim=1)
    assert ((rounded.data.float() * step - w).abs() <= step * 0.5 + 1e-6 * w.abs()).all()
    assert (rounded.data[3, :32] == 0).all()
    with pytest.raises(ValueError, match="multiple of 64"):
        BlockWeight.quantize_q8(torch.randn(4, 96))


@needs_kernel
def test_fused_parts_and_a_low_rank_update():
    parts = [BlockWeight.q4(*_q4(n, 128, seed=10 + n)) for n in (64, 40, 40)]
    x = torch.randn(6, 128)
    fused = BlockWeight.cat(parts)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))  # same order of sums per output
    assert BlockWeight.cat([parts[0], BlockWeight.q8(*_q8(8, 128, seed=3))]) is None  # kinds differ
    assert BlockWeight.cat([parts[0], None]) is None
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g) * 0.05
    adapted = parts[0].with_low_rank(down, up)
    dense = _dequantized(*_q4(64, 128, seed=74)) + up @ down
    assert torch.allclose(adapted(x), x @ dense.T, atol=1e-5, rtol=1e-5)
    both = BlockWeight.cat([adapted, parts[1]])
    assert torch.allclose(both(x), torch.cat([adapted(x), parts[1](x)], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="already carry"):
        adapted.with_low_rank(down, up)
    with pytest.raises(ValueError, match="down"):
        parts[0].with_low_rank(down[:, :64], up)
    with pytest.raises(ValueError, match="multiple of 64"):
        BlockWeight.q4(*_q4(8, 96, seed=5))
    with pytest.raises(ValueError, match="float32"):
        parts[0](x.to(torch.bfloat16))


def _blocks_loaded(seed: int = 3, adapted: bool = False, products: str | None = None, dim: int = 128,
                   heads: tuple[int, int] = (4, 2)):
    """A random causal model (widths multiples of 64; `heads`: query and KV heads) whose dense
    float32 weights are the dequantisation of random blocks; returns (dense model, the same on
    blocks; `products` "bf16", "split" (on AMX), "int8" or "int16" (on VNNI): its products so,
    BlockWeight's method of that name)."""
    def make():
        return random_loaded("causal", seed=seed, eos=[1], block_size=1, dim=dim, n_heads=heads[0],
                             n_kv_heads=heads[1], intermediate_size=256)

    dense, on_blocks = make(), make()
    blocks = {}
    params = dict(dense.model.named_parameters())
    for i, name in enumerate(n for n, p in params.items() if p.ndim == 2):
        if name.endswith("embed_tokens.weight"):  # the tied head: Q8_0, as SmolLM2's GGUF has it
            q, scale = _q8(*params[name].shape, seed=100 + i)
            blocks[name], w = BlockWeight.q8(q, scale * 16), _dequantized(q, scale * 16)
            embedding = (q, scale * 16, torch.zeros_like(scale))
        else:
            q, scale, minimum = _q4(*params[name].shape, seed=100 + i)
            blocks[name], w = BlockWeight.q4(q, scale * 16, minimum * 16), _dequantized(q, scale * 16, minimum * 16)
        for model in (dense.model, on_blocks.model):
            with torch.no_grad():
                dict(model.named_parameters())[name].copy_(w)
    if adapted:
        adapter = random_adapter(dense.config, seed)
        merge_adapter(dense.model, adapter)
        blocks = unmerged_update(blocks, adapter)
    if products is not None:
        blocks = {name: getattr(w, products)() for name, w in blocks.items()}
    on_blocks.model.use_blocks(blocks)
    on_blocks.model.use_block_embedding(*embedding)  # the lookups too, as a GGUF load does
    on_blocks.model.release_dense_weights()
    assert not on_blocks.model.step_kernels  # one kernel everywhere: step positions are reusable
    assert on_blocks.model.model.embed_tokens.weight.is_meta  # the float32 table is gone
    return dense, on_blocks


PARAMS = GenerationParams(max_new_tokens=16)
BLOCK_PROMPTS = [p * 5 for p in PROMPTS]


def _alone_together_and_reused(loaded) -> tuple[list[list[int]], list[list[int]]]:
    """The AR engine's replies to BLOCK_PROMPTS one at a time and all at once; checks on the way
    that a second turn reusing the first turn's prompt and reply gets what a fresh engine gives."""
    with AREngine(loaded, max_batch_size=4) as engine:
        alone = [_run(engine.submit(p, PARAMS))[0] for p in BLOCK_PROMPTS]
        together = [_run(h)[0] for h in [engine.submit(p, PARAMS) for p in BLOCK_PROMPTS]]
        turn2 = BLOCK_PROMPTS[0] + alone[0] + [5, 6, 7]
        reused = _run(engine.submit(turn2, PARAMS))[0]
    with AREngine(loaded, max_batch_size=1) as fresh:
        assert _run(fresh.submit(turn2, PARAMS))[0] == reused
    return alone, together


def _logit_gap(dense, on_blocks) -> float:
    """The largest logit difference of the two models on a short prompt, relative to the largest logit."""
    tokens = torch.tensor([[3, 9, 4, 1, 7, 7, 2]])
    with torch.no_grad():
        want = dense.model(tokens, torch.arange(7)[None], causal_mask(7))
        got = on_blocks.model(tokens, torch.arange(7)[None], causal_mask(7))
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("products,gap", [pytest.param("bf16", 3e-2, marks=needs_amx),
                                          pytest.param("int8", 0.15, marks=needs_vnni),
                                          pytest.param("int16", 1e-3, marks=needs_vnni)])
def test_a_model_with_rounded_products_decodes_alike_alone_batched_reused_and_drafted(products, gap):
    """load_model(weights="blocks-bf16" / "blocks-int8" / "blocks-int16")'s arithmetic: close to
    float32's (16-bit inputs far closer than bf16's or 8-bit ones), and, as on float32 blocks, a
    reply does not depend on the batch, a reused prefix gives what a fresh prefill gives, and
    draft-and-verify on it writes its AR replies."""
    dense, on_blocks = _blocks_loaded(adapted=True, products=products)
    assert _logit_gap(dense, on_blocks) < gap
    alone, together = _alone_together_and_reused(on_blocks)
    drafter = _random_drafter(on_blocks, n_slots=4, scale=0.2)
    with SpeculativeEngine(on_blocks, drafter, draft_len=3, max_batch_size=4) as spec:
        drafted = [_run(h)[0] for h in [spec.submit(p, PARAMS) for p in BLOCK_PROMPTS]]
    assert together == alone == drafted
    assert any(len(ids) > 3 for ids in alone)


@needs_kernel
@pytest.mark.parametrize("adapted,amx", [(False, None), (True, None),
                                         pytest.param(True, "split", marks=needs_amx)])
def test_a_model_on_blocks_decodes_what_the_dense_float32_model_decodes(adapted, amx):
    """Float32 blocks, and their float32-accurate products on AMX ("blocks-amx")."""
    dense, on_blocks = _blocks_loaded(adapted=adapted, products=amx)
    assert _logit_gap(dense, on_blocks) < 1e-3
    with AREngine(dense, max_batch_size=4) as reference:
        expected = [_run(reference.submit(p, PARAMS))[0] for p in BLOCK_PROMPTS]
    alone, together = _alone_together_and_reused(on_blocks)
    assert together == alone == expected
    assert any(len(ids) > 3 for ids in expected)


@needs_kernel
@pytest.mark.parametrize("products", [None, pytest.param("int16", marks=needs_vnni), pytest.param("int8", marks=needs_vnni)])
@pytest.mark.parametrize("dim,heads", [(128, (4, 2)), (384, (6, 2))])
def test_the_one_call_forward_computes_what_the_layers_compute_and_each_row_alone(products, dim, heads):
    """dlm.blocks.BlockLayers (every layer in one C call, for forwards with a cache) against the
    layers' own torch forward on the same blocks: the same logits and cache up to the order of
    sums (with integer products also up to the inputs' rounding, which another order of sums in a
    norm can move by a unit: 16 bits stay close, 8 bits not, so only their bits are checked); and
    a row's bits are those it gets alone (another batch, another cache row). Heads of 32
    dimensions, two a KV head, take the kernel's one-head attention; of 64, three a KV head
    (SmolLM2's), its attention of a KV head's query heads together."""
    tolerance = {None: 1e-4, "int16": 3e-3, "int8": None}[products]
    _, on_blocks = _blocks_loaded(seed=5, adapted=True, products=products, dim=dim, heads=heads)
    model = on_blocks.model
    assert model._block_layers is not None
    tokens = torch.tensor([[3, 9, 4, 1, 7, 2], [5, 5, 8, 2, 6, 1]])
    positions = torch.arange(6).expand(2, 6)
    mask = causal_mask(6).expand(2, 1, 6, 6)

    def run(rows, *, fused=True, batch=slice(None)):
        cache = model.new_cache(3, 16)
        saved = model._block_layers
        model._block_layers = saved if fused else None
        try:
            with torch.no_grad():
                logits = model(tokens[batch], positions[batch], mask[batch], cache=cache, cache_rows=torch.tensor(rows))
        finally:
            model._block_layers = saved
        return logits, cache

    fused, cache = run([0, 2])
    if tolerance is not None:
        layers, reference = run([0, 2], fused=False)
        assert (fused - layers).abs().max() < tolerance * layers.abs().max()
        written = cache.k[:, [0, 2], :6]
        assert (written - reference.k[:, [0, 2], :6]).abs().max() < tolerance * written.abs().max()
        assert (cache.v[:, [0, 2], :6] - reference.v[:, [0, 2], :6]).abs().max() < tolerance * cache.v.abs().max()
    alone, alone_cache = run([1], batch=slice(1, 2))
    assert torch.equal(alone[0], fused[1])
    assert torch.equal(alone_cache.k[:, 1, :6], cache.k[:, 2, :6])
    with pytest.raises(IndexError, match="out of the cache"):
        run([0, 4])  # the cache has rows 0..2 and the scratch row 3


@needs_kernel
@pytest.mark.parametrize("dim,heads", [(128, (4, 2)), (384, (6, 2))])
def test_a_float16_kv_cache_holds_each_k_and_v_rounded_and_decodes_alike_alone_batched_and_drafted(dim, heads):
    """`Transformer.use_half_cache` (llm.kv_cache = "float16"): the fused forward writes each K and
    V rounded to the nearest float16 (the first layer's, computed before any attention read the
    cache, are exactly the float32 cache's rounded), the logits stay close to the float32 cache's,
    a row's bits are those it gets alone, and the engines' replies do not depend on the batch, a
    reused prefix or drafts. Both attention paths: one head at a time (32 dimensions) and a KV
    head's three query heads together (64)."""
    _, on_blocks = _blocks_loaded(seed=7, adapted=True, products="int16" if dlm.blocks.vnni_available() is None else None,
                                  dim=dim, heads=heads)
    model = on_blocks.model
    tokens = torch.tensor([[3, 9, 4, 1, 7, 2], [5, 5, 8, 2, 6, 1]])
    positions = torch.arange(6).expand(2, 6)
    mask = causal_mask(6).expand(2, 1, 6, 6)

    def run(rows, batch=slice(None)):
        cache = model.new_cache(3, 16)
        with torch.no_grad():
            logits = model(tokens[batch], positions[batch], mask[batch], cache=cache, cache_rows=torch.tensor(rows))
        return logits, cache

    full, full_cache = run([0, 2])
    model.use_half_cache()
    try:
        half, half_cache = run([0, 2])
        assert half_cache.k.dtype == half_cache.v.dtype == torch.float16
        assert torch.equal(half_cache.k[0, [0, 2], :6], full_cache.k[0, [0, 2], :6].half())
        assert torch.equal(half_cache.v[0, [0, 2], :6], full_cache.v[0, [0, 2], :6].half())
        assert not torch.equal(half, full)  # the rounding reaches the logits ...
        assert (half - full).abs().max() < 1e-2 * full.abs().max()  # ... by about its size
        alone, _ = run([1], batch=slice(1, 2))
        assert torch.equal(alone[0], half[1])
        alone_ids, together = _alone_together_and_reused(on_blocks)
        drafter = _random_drafter(on_blocks, n_slots=4, scale=0.2)
        with SpeculativeEngine(on_blocks, drafter, draft_len=3, max_batch_size=4) as spec:
            drafted = [_run(h)[0] for h in [spec.submit(p, PARAMS) for p in BLOCK_PROMPTS]]
        assert together == alone_ids == drafted
    finally:
        model.kv_dtype = None


@needs_kernel
@pytest.mark.parametrize("half", [False, True])
def test_long_contexts_attend_alike_alone_batched_and_with_masked_keys(half):
    """The fused forward's attention past many cached positions (its K and V fetched ahead of the
    key being scored), in a float32 or float16 cache: one row alone (three KV heads on two
    threads: the query heads shared out) gets, bit for bit, what it gets beside another row (the
    KV heads shared out) and what it gets with the batch's keys past its own masked; close to the
    layers' own torch forward; keys masked in the middle of the context are left out. On two
    threads, whatever the machine has (the kernel takes torch's count), so that both ways of
    sharing the attention run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _long_contexts_alike(half)
    finally:
        torch.set_num_threads(threads)


def _long_contexts_alike(half: bool) -> None:
    _, on_blocks = _blocks_loaded(seed=11, adapted=False, dim=384, heads=(6, 3),
                                  products="int16" if half and dlm.blocks.vnni_available() is None else None)
    model = on_blocks.model
    if half:
        model.use_half_cache()
    generator = torch.Generator().manual_seed(0)
    n = 150  # cached positions: several times the keys fetched ahead, not a multiple of 16
    prompts = torch.randint(2, V, (2, n), generator=generator)
    cache = model.new_cache(3, 256)

    def forward(tokens, start, rows, mask):
        positions = torch.arange(start, start + tokens.shape[1]).expand(tokens.shape[0], -1)
        with torch.no_grad():
            return model(tokens, positions, mask, cache=cache, cache_rows=torch.tensor(rows))

    forward(prompts, 0, [0, 1], causal_mask(n).expand(2, 1, n, n))
    step = torch.tensor([[7], [9]])
    mask = limit_mask(torch.full((2, 1), n + 1), n + 1)
    alone = forward(step[:1], n, [0], mask[:1])
    together = forward(step, n, [0, 1], mask)
    assert torch.equal(alone[0], together[0])
    wider = limit_mask(torch.full((1, 1), n + 1), n + 40)  # a batch's longer keys, masked for this row
    assert torch.equal(forward(step[:1], n, [0], wider), alone)
    saved = model._block_layers
    model._block_layers = None  # the layers' torch forward on the same cache
    try:
        layers = forward(step[:1], n, [0], mask[:1])
    finally:
        model._block_layers = saved
    assert (alone - layers).abs().max() < (3e-3 if half else 1e-4) * layers.abs().max()
    holed = mask[:1].clone()
    holed[..., 20:90] = False  # keys left out in the middle: another result, and the torch layers' one
    without = forward(step[:1], n, [0], holed)
    assert not torch.equal(without, alone)
    model._block_layers = None
    try:
        layers = forward(step[:1], n, [0], holed)
    finally:
        model._block_layers = saved
    assert (without - layers).abs().max() < (3e-3 if half else 1e-4) * layers.abs().max()


def test_a_float16_kv_cache_needs_the_fused_block_forward():
    model = random_loaded("causal", seed=1, eos=[1], block_size=1).model
    with pytest.raises(ValueError, match="fused block forward"):
        model.use_half_cache()
    assert model.new_cache(1, 8).k.dtype == torch.float32


@needs_kernel
def test_draft_slots_in_the_one_call_forward_add_the_drafters_update_there_only():
    """A draft-and-verify forward on blocks: the mask slots (the drafter's slot embeddings and
    low-rank updates, K/V at spare positions, each slot seeing the text and its block's earlier
    slots) come out as the layers' torch forward computes them (for updates that bf16 holds); the text positions' bits are
    those of the same forward without slots; padding (written at the scratch position) is skipped."""
    _, on_blocks = _blocks_loaded(seed=6, adapted=True)
    model = on_blocks.model
    drafter = _random_drafter(on_blocks, n_slots=3, scale=0.2)
    with torch.no_grad():  # values bf16 holds (the kernel keeps a drafter's updates in bf16)
        for p in drafter.parameters():
            p.copy_(p.bfloat16().float())
    tokens = torch.tensor([[3, 9, 4, 0, 0, 0], [5, 5, 8, 0, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5]] * 2)
    writes = torch.tensor([[0, 1, 2, 8, 9, 10]] * 2)
    keys = torch.arange(16)
    limit = torch.tensor([1, 2, 3, 3, 3, 3])
    block_end = torch.tensor([0, 0, 0, 9, 10, 11])
    mask = ((keys[None] < limit[:, None]) | ((keys[None] >= 8) & (keys[None] < block_end[:, None])))[None, None]
    mask = mask.expand(2, 1, 6, 16)

    def run(fused: bool, draft: bool = True, pad: bool = False):
        cache = model.new_cache(3, 16)
        saved = model._block_layers
        model._block_layers = saved if fused else None
        t, p, w, m = (tokens, positions, writes, mask) if draft else (tokens[:, :3], positions[:, :3], writes[:, :3],
                                                                     mask[:, :, :3])
        if pad:  # a third batch row of padding, as the engines add it
            t, p, m = torch.cat([t, t[:1]]), torch.cat([p, p[:1]]), torch.cat([m, m[:1]])
            w = torch.cat([w, torch.full_like(w[:1], cache.scratch_pos)])
        rows = torch.tensor([0, 2, 3][:t.shape[0]])
        inputs = DraftInputs(drafter, 3, torch.tensor([[0, 1, 2]] * t.shape[0])) if draft else None
        try:
            with torch.no_grad():
                h = model(t, p, m, cache=cache, cache_rows=rows, write_positions=w, draft=inputs, hidden=True)
        finally:
            model._block_layers = saved
        return h[:2], cache

    fused, cache = run(True)
    layers, reference = run(False)
    assert (fused - layers).abs().max() < 1e-4 * layers.abs().max()
    assert (cache.k[:, [0, 2], 8:11] - reference.k[:, [0, 2], 8:11]).abs().max() < 1e-4 * cache.k.abs().max()
    text, _ = run(True, draft=False)
    assert torch.equal(fused[:, :3], text)
    padded, _ = run(True, pad=True)
    assert torch.equal(padded, fused)
    with torch.no_grad():  # the same slots without the low-rank updates: other outputs there
        for layer in drafter.layers:
            for b in layer.b.values():
                b.zero_()
    drafter.refresh()
    bare, _ = run(True)
    assert torch.equal(bare[:, :3], fused[:, :3])
    assert (bare[:, 3:] - fused[:, 3:]).abs().max() > 1e-2 * fused.abs().max()


@needs_kernel
@pytest.mark.parametrize("draft_len,tree,amx", [(2, True, None), (3, False, None),
                                                pytest.param(3, True, "split", marks=needs_amx)])
def test_draft_and_verify_on_blocks_is_exact_and_batches_equal_each_alone(draft_len, tree, amx):
    _, on_blocks = _blocks_loaded(seed=3, adapted=True, products=amx)
    drafter = _random_drafter(on_blocks, n_slots=4, scale=0.2)
    expected, alone, together = ar_alone_together(on_blocks, drafter, BLOCK_PROMPTS, PARAMS, draft_len=draft_len,
                                                  tree=tree)
    assert alone == expected
    assert together == expected
    assert any(len(ids) > 3 for ids in expected)


@needs_kernel
def test_a_tree_node_verifies_with_the_bits_of_its_place_in_the_text():
    """A tree's node sees the row's text and its ancestors, whose K/V lie away from their places
    (`tree_writes`): the hidden states of a path (a, then b) through a tree whose first node is a
    decoy sibling of a are, bit for bit, those of the chain x, a, b, after prompts of several
    lengths. (The kernel's softmax sums keys in 16 lanes by cache position, and the nodes are
    written in the lanes of their places, which keeps every sum's order; written at the next free
    positions instead, the bits differed in one of 24 such cases of a sweep, not kept.)"""
    _, on_blocks = _blocks_loaded(seed=3, products="int16" if dlm.blocks.vnni_available() is None else None)
    model = on_blocks.model
    V, K, rows = model.config.vocab_size, 160, torch.tensor([0])
    for seed in range(3):
        for c in (20, 77, 140):  # the row's last final token x at c - 1
            torch.manual_seed(seed)
            cache = model.new_cache(1, 192)
            x, z, a, b = (int(t) for t in torch.randint(2, V, (4,)))
            mask = limit_mask(torch.tensor([[c] * 4]), K)
            writes = [c - 1, *tree_writes(c, [-1, -1, 1], [1, 1, 2])]  # nodes z, a (depth 1), b (a's child)
            for t, seen in ((1, [1]), (2, [2]), (3, [2, 3])):
                mask[0, 0, t, [writes[k] for k in seen]] = True
            with torch.inference_mode():
                model(torch.randint(2, V, (1, c - 1)), torch.arange(c - 1)[None], causal_mask(c - 1), cache=cache,
                      cache_rows=rows)
                chain = model(torch.tensor([[x, a, b]]), torch.tensor([[c - 1, c, c + 1]]),
                              limit_mask(torch.tensor([[c, c + 1, c + 2]]), K), cache=cache, cache_rows=rows,
                              hidden=True, step=True)[0, 1:]
                tree = model(torch.tensor([[x, z, a, b]]), torch.tensor([[c - 1, c, c, c + 1]]), mask, cache=cache,
                             cache_rows=rows, hidden=True, step=True, write_positions=torch.tensor([writes]))[0, 2:]
            assert torch.equal(tree, chain), (seed, c)


@needs_kernel
def test_draft_trees_on_blocks_write_the_ar_replies_alone_and_batched():
    """`_TreeOracle` (right only in second choices, K/V moved at every forward) on the block kernel."""
    _, on_blocks = _blocks_loaded(seed=3, products="int16" if dlm.blocks.vnni_available() is None else None)
    expected, Engine = _tree_oracle(on_blocks, BLOCK_PROMPTS, PARAMS)
    with Engine(on_blocks, _random_head(on_blocks, n_slots=4), max_batch_size=4) as spec:
        alone = [_run(spec.submit(p, PARAMS)) for p in BLOCK_PROMPTS]
        together = [_run(h) for h in [spec.submit(p, PARAMS) for p in BLOCK_PROMPTS]]
    assert [r[0] for r in alone] == [r[0] for r in together] == [r[0] for r in expected]
    assert sum(r[1] for r in alone) < sum(r[1] for r in expected) / 2


@needs_kernel
def test_use_blocks_wants_every_projection_and_a_float32_model():
    dense, _ = _blocks_loaded(seed=4)
    with pytest.raises(ValueError, match=r"no block weights for model\.layers\.0\.self_attn\.q_proj\.weight"):
        dense.model.use_blocks({})
    with pytest.raises(ValueError, match="float32"):
        dense.model.to(torch.bfloat16).use_blocks({})


@needs_amx
def test_split_products_keep_the_scales_as_the_float16_a_gguf_stores():
    q, scale = _q8(16, 64, seed=2)
    assert BlockWeight.q8(q, scale).split().scales.dtype == torch.float16
    with pytest.raises(ValueError, match="float16"):
        BlockWeight.q8(q, scale + 1e-6).split()


def test_blocks_need_a_gguf_and_float32(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises((UnsupportedCheckpointError, ValueError)):
        load_model(bad, weights="blocks")


@needs_amx
def test_the_default_model_runs_float32_accurate_products_on_amx_where_it_can():
    from voice_agent.llm import _registry_weights
    from voice_agent.models import resolve_llm_model

    for name in ("default", "smollm2-135m-drafter"):
        assert resolve_llm_model(name).weights == "blocks-amx"
    assert _registry_weights("blocks-amx", "cpu", "auto") == "blocks-amx"
    assert _registry_weights("blocks-amx", "cpu", "bfloat16") == "dense"  # the format computes in float32


def test_products_on_amx_where_it_cannot_run_are_refused_with_the_reason(monkeypatch, caplog):
    from voice_agent.llm import _registry_weights
    from voice_agent.models import resolve_llm_model

    monkeypatch.setattr(dlm.blocks, "_amx_tried", True)
    monkeypatch.setattr(dlm.blocks, "_amx_reason", "switched off (VOICE_AGENT_AMX=0)")
    gguf = resolve_llm_model("smollm2-135m-instruct").path
    for method, weights in (("bf16", "blocks-bf16"), ("split", "blocks-amx")):
        with pytest.raises(RuntimeError, match="VOICE_AGENT_AMX=0"):
            getattr(BlockWeight.q4(*_q4(16, 64, seed=1)), method)()
        with pytest.raises(ValueError, match=rf"{weights}.*VOICE_AGENT_AMX=0"):
            load_model(gguf, weights=weights)
        with pytest.raises(ValueError, match="float32"):
            load_model(gguf, weights=weights, dtype="bfloat16")
    # The registry's float32-accurate AMX products become 16-bit integer products on VNNI here
    # (nearly the same accuracy), or, without VNNI, float32 blocks (the same accuracy).
    with caplog.at_level(logging.INFO, logger="voice_agent.llm"):
        expected = "blocks-int16" if dlm.blocks.vnni_available() is None else "blocks"
        assert _registry_weights("blocks-amx", "cpu", "auto") == (expected if dlm.blocks.available() is None else "dense")
    assert "VOICE_AGENT_AMX=0" in caplog.text
    caplog.clear()
    monkeypatch.setenv("VOICE_AGENT_VNNI", "0")
    with caplog.at_level(logging.INFO, logger="voice_agent.llm"):
        assert _registry_weights("blocks-amx", "cpu", "auto") == ("blocks" if dlm.blocks.available() is None else "dense")
    assert "VOICE_AGENT_VNNI=0" in caplog.text and "voice-agent calibrate" in caplog.text  # where to look next
    if dlm.blocks.available() is None:  # training features keep float32's accuracy, VNNI or not
        assert runnable_weights("blocks-amx") == ("blocks", [("blocks-amx", "switched off (VOICE_AGENT_AMX=0)")])
    with pytest.raises(RuntimeError, match="VOICE_AGENT_VNNI=0"):
        BlockWeight.q4(*_q4(16, 64, seed=1)).int16()
    with pytest.raises(ValueError, match=r"blocks-int8.*VOICE_AGENT_VNNI=0"):
        load_model(gguf, weights="blocks-int8")


def test_a_failed_build_is_reported_and_the_registry_falls_back_to_dense(tmp_path, monkeypatch, caplog):
    from voice_agent.llm import _registry_weights

    broken = tmp_path / "blocks.c"
    broken.write_text("this is not C\n")
    monkeypatch.setenv("VOICE_AGENT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dlm.blocks, "SOURCE", broken)
    monkeypatch.setattr(dlm.blocks, "_tried", False)
    monkeypatch.setattr(dlm.blocks, "_lib", None)
    monkeypatch.setattr(dlm.blocks, "_reason", None)
    reason = dlm.blocks.available()
    assert reason is not None and "could not be built" in reason and "blocks.c" in reason
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # no half-written library left
    with pytest.raises(RuntimeError, match="could not be built"):
        BlockWeight.q8(*_q8(8, 64, seed=0))(torch.randn(1, 64))
    with caplog.at_level(logging.WARNING):
        assert _registry_weights("blocks", "cpu", "auto") == "dense"
    assert "unavailable" in caplog.text
    assert _registry_weights("blocks", "cpu", "bfloat16") == "dense"  # the format computes in float32
    assert _registry_weights("int4", "cuda", "auto") == "dense"
    assert _registry_weights("int4", "cpu", "auto") == "int4"


@needs_kernel
def test_the_peak_rate_counts_each_instruction_at_its_products_precision():
    """`blocks_peak` runs 12 instructions a round on each thread and counts the multiply-adds at the
    precision of the products it stands for: an FMA 16 (float32), a vpdpbusd 64 (8-bit inputs) or
    32 (16-bit inputs take two); -1 for the AMX tiles' products, an unknown kind, no rounds or a
    count past 64 bits.
    `product_peak` times it: a rate, or None where it does not measure the products."""
    from dlm.blocks import AMX_BF16, AMX_SPLIT, VNNI_INT8, VNNI_INT16, product_peak

    lib = dlm.blocks._kernel()
    assert lib.blocks_peak(0, 5, 1) == 5 * 12 * 16 and lib.blocks_peak(0, 5, 2) == 2 * 5 * 12 * 16
    vnni = bool(lib.blocks_vnni_supported())
    assert lib.blocks_peak(VNNI_INT8, 7, 2) == (2 * 7 * 12 * 64 if vnni else -1)
    assert lib.blocks_peak(VNNI_INT16, 7, 2) == (2 * 7 * 12 * 32 if vnni else -1)
    for products, rounds, threads in ((AMX_BF16, 5, 1), (AMX_SPLIT, 5, 1), (5, 5, 1), (0, 0, 1), (0, 5, 0),
                                      (0, 2**62, 1)):  # that many rounds' count would not fit in 64 bits
        assert lib.blocks_peak(products, rounds, threads) == -1
    # Any CPU with AVX-512 does more than 1 GMAC/s in float32, and none more than two 512-bit FMAs a
    # cycle at 7 GHz: a loop the compiler emptied, or counted twice, would read above that.
    assert 1e9 < product_peak(0, 1, seconds=0.005) < 16 * 2 * 7e9
    assert (product_peak(VNNI_INT16, 1, seconds=0.005) is None) == (not vnni)
    assert product_peak(AMX_BF16, 1) is None and product_peak(AMX_SPLIT, 2) is None
    for bad in ((9, 1), (0, 0), (VNNI_INT8, -1)):
        with pytest.raises(ValueError):
            product_peak(*bad)
    with pytest.raises(ValueError):
        product_peak(0, 1, seconds=0)


@needs_kernel
def test_the_kernel_is_built_once_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("VOICE_AGENT_CACHE_DIR", str(tmp_path))
    first = dlm.blocks._build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert dlm.blocks._build() == first and first.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_the_embedding_looked_up_in_blocks_is_the_tables_bit_for_bit(kind):
    """Every row of each GGUF block kind dequantised on demand equals convert_gguf's table; the
    model then frees the table and still reports where and in what it runs."""
    n, k = 96, 128
    if kind == "q8_0":
        q, scale = _q8(n, k, seed=7)
        minimum = torch.zeros_like(scale)
    else:
        q, scale, minimum = _q4(n, k, seed=7, q4_0=kind == "q4_0")
    table = _dequantized(q, scale, minimum)
    embedding = BlockEmbedding(q, scale, minimum)
    assert torch.equal(embedding(torch.arange(n)), table)
    ids = torch.tensor([[5, 0, 95], [5, 5, 1]])
    assert torch.equal(embedding(ids), table[ids]) and embedding.nbytes < table.nbytes / 2

    model = Transformer(tiny_config(dim=k, vocab_size=n, tie_embeddings=True)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(table)
    model.use_block_embedding(q, scale, minimum)
    assert torch.equal(model.embed(ids), table[ids])
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_embedding_blocks_that_differ_from_the_table_are_refused():
    q, scale = _q8(64, 128, seed=8)
    model = Transformer(tiny_config(dim=128, vocab_size=64, tie_embeddings=True)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(_dequantized(q, scale))
    other = scale.clone()
    other[40, 2] *= 2  # one block of one row
    with pytest.raises(ValueError, match=r"differ from the table in rows 0\.\.63"):
        model.use_block_embedding(q, other, torch.zeros_like(scale))
    with pytest.raises(ValueError, match="do not describe blocks of 32"):
        BlockEmbedding(q, scale[:, :3], torch.zeros_like(scale[:, :3]))
    assert model._embed_blocks is None and not model.model.embed_tokens.weight.is_meta  # the table stays


@needs_kernel
def test_the_default_teacher_on_blocks_answers_as_the_dense_float32_one():
    """The shipped fine-tune on the embedded GGUF's blocks: the same greedy reply as dense float32,
    logits within float32 rounding, at under half the weight bytes."""
    from dlm.chat import ChatFormatter
    from voice_agent.models import resolve_llm_model

    resolved = resolve_llm_model("smollm2-135m-grounded")
    assert resolved.weights == "blocks" and resolved.adapter is not None
    reference = load_model(resolved.path, adapter=resolved.adapter, dtype="float32")
    loaded = load_model(resolved.path, adapter=resolved.adapter, weights="blocks", inference_only=True)
    assert loaded.model.weight_bytes() < 0.3 * reference.model.weight_bytes()  # the embedding's table too
    assert loaded.model.model.embed_tokens.weight.is_meta and loaded.model.device == torch.device("cpu")
    messages = [{"role": "system", "content": "You answer the phone for Rosa's Bakery. Hours: 7am to 3pm."},
                {"role": "user", "content": "What time do you open?"}]
    ids = torch.tensor([ChatFormatter(loaded.tokenizer, loaded.spec).encode(messages)])
    n = ids.shape[1]
    with torch.no_grad():
        want = reference.model(ids, torch.arange(n)[None], causal_mask(n))
        got = loaded.model(ids, torch.arange(n)[None], causal_mask(n))
    assert (got - want).abs().max() < 1e-3
    params = GenerationParams(max_new_tokens=24)
    with AREngine(reference, max_batch_size=1) as dense_engine, AREngine(loaded, max_batch_size=1) as engine:
        expected = dense_engine.submit(messages, params).result()
        assert engine.submit(messages, params).result() == expected
    assert "7" in expected


@needs_kernel
@pytest.mark.parametrize("products", [None, "int16", "int8"])
def test_head_features_after_a_shared_prefix_are_each_sequences_whole_forwards_bit_for_bit(products):
    """On the block kernel the head's features run each sequence after the prefix it shares with
    the one before it in token order (a system prompt): the same bits as its whole forward, for
    fewer positions; a sequence that is all of another's prefix, and a repeat, included. The
    float32 states too: a position after a cached prefix is the whole forward's, bit for bit."""
    from dlm.adapt.data import Example
    from dlm.adapt.head import head_features

    if products in ("int8", "int16") and dlm.blocks.vnni_available() is not None:
        pytest.skip(dlm.blocks.vnni_available())
    _, on_blocks = _blocks_loaded(seed=7, products=products)
    model = on_blocks.model
    system = [5, 6, 7, 8, 9, 10]
    whole, after = [*system, 20, 22, 23, 41, 42], [*system, 20, 21]
    cache = model.new_cache(1, 16)
    row = torch.zeros(1, dtype=torch.long)

    def states(seq: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, len(seq))
        mask = (torch.arange(len(seq))[None] <= positions[:, None])[None, None]
        with torch.no_grad():
            return model(torch.tensor(seq[start:])[None], positions[None], mask, cache=cache, cache_rows=row,
                         hidden=True)[0]

    alone = states(whole, 0)
    states(after, 0)  # the cache row holds another sequence's system prompt and more
    assert torch.equal(states(whole, len(system)), alone[len(system):])

    prompts = [[*system, 20, 21], [*system, 20, 22, 23], [*system, 30], [*system, 20, 21], [11, 12], system]
    examples = [Example(p, [40 + i + k for k in range(3 + i % 3)], [], "x", "greedy", i, "train")
                for i, p in enumerate(prompts)]
    examples.append(Example(prompts[0], examples[0].reply_ids[:2], [], "x", "greedy", 9, "train"))  # a prefix of one
    examples.append(dataclasses.replace(examples[1], prompt_index=10))  # a repeat
    computed = []
    real = model.forward

    def counting(tokens, *args, **kwargs):
        computed.append(tokens.shape[1])
        return real(tokens, *args, **kwargs)

    model.forward = counting
    try:
        together = head_features(on_blocks, examples)
        alone = [head_features(on_blocks, [e])[0] for e in examples]
    finally:
        del model.forward
    for e, a, b in zip(examples, together, alone, strict=True):
        assert a.shape == (len(e.prompt_ids) + len(e.reply_ids), on_blocks.config.dim)
        assert torch.equal(a, b)
    every = sum(len(e.prompt_ids) + len(e.reply_ids) for e in examples)
    assert sum(computed[: len(examples)]) < every - 6 * len(system)  # six sequences ran after their system prompt
    assert sum(computed[len(examples):]) == every
    assert 1 in computed[: len(examples)]  # the repeat: its last position only


@needs_kernel
def test_a_draft_head_trains_on_a_base_whose_embedding_table_is_freed(tmp_path):
    """`adapt drafter --kind head` loads the base on blocks, where the float32 embedding table is
    freed: the features, a fresh head's start and a continued head read embeddings through the
    lookup; a continued head keeps its weights and its vocabulary grows by the data's tokens."""
    from dlm.adapt.data import Example
    from dlm.adapt.head import HeadTrainConfig, head_features, train_head

    dense, on_blocks = _blocks_loaded(seed=5)
    on_blocks.path = dense.path = tmp_path / "base.gguf"
    dense.path.write_bytes(b"tiny base weights")
    examples = [Example([3, 4 + i], [10 + i + k for k in range(8)], [], "x", "greedy", i, "train") for i in range(12)]
    for a, b in zip(head_features(on_blocks, examples), head_features(dense, examples), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=2e-3, rtol=2e-3)  # the blocks' order of sums, float16
    cfg = HeadTrainConfig(max_steps=0, batch_size=16, window=2, n_slots=2, n_layers=1, warmup_steps=1)
    first = train_head(on_blocks, examples, cfg, tmp_path / "first", on_blocks.path)  # its start only
    assert torch.equal(first.slots, dense.model.model.embed_tokens.weight.mean(0, keepdim=True).expand_as(first.slots))
    more = [Example([5, 6], [40 + k for k in range(6)], [], "x", "greedy", 99, "train")]
    cfg = HeadTrainConfig(max_steps=0, batch_size=16)
    continued = train_head(on_blocks, more, cfg, tmp_path / "more", on_blocks.path, init=first)
    assert continued.vocab.tolist() == sorted(set(first.vocab.tolist()) | set(range(40, 46)))
    assert (continued.config.window, continued.config.n_slots) == (2, 2)  # the head given decides its shape
    given = {k: v for k, v in first.state_dict().items() if k != "vocab"}
    assert all(torch.equal(v.float(), continued.state_dict()[k].float()) for k, v in given.items())  # its start


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 16, 33, 8427, 49152])
def test_row_argmax_picks_what_torch_picks_and_row_top_its_probability(n, monkeypatch):
    """dlm.blocks.row_argmax / row_top (the kernel's argmax of a step's logits): torch.argmax's
    index on every row, ties (the first), NaN (the first NaN), all -inf and a tail of fewer than
    16 values included, for any leading shape and a non-contiguous view; row_top's probability is
    softmax's largest within float32 rounding (NaN where softmax gives NaN); without the kernel
    loaded, torch answers the same."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4, n, generator=g) * 5
    x[0, 1] = x[0, 1].round()  # ties
    x[0, 2] = float("-inf")
    x[1, 0] = 0.0
    if n > 3:
        x[1, 1, n // 2] = x[1, 1, n - 1] = float("nan")
    x[1, 2, -1] = 1e4  # the largest last, in the tail
    dlm.blocks.available()  # loaded: row_argmax never builds it
    assert dlm.blocks._lib is not None
    best, top = dlm.blocks.row_top(x)
    assert best.dtype == torch.long and best.shape == (2, 4)
    assert torch.equal(best, x.argmax(dim=-1))
    assert torch.allclose(top, torch.softmax(x, dim=-1).amax(dim=-1), rtol=1e-5, atol=0, equal_nan=True)
    view = x[:, 1:3]
    assert not view.is_contiguous()
    assert torch.equal(dlm.blocks.row_argmax(view), view.argmax(dim=-1))
    monkeypatch.setattr(dlm.blocks, "_lib", None)  # the torch path
    again, again_top = dlm.blocks.row_top(x)
    assert torch.equal(again, best) and torch.allclose(again_top, top, rtol=1e-5, equal_nan=True)


@needs_kernel
def test_block_layers_refuse_weights_that_do_not_fit_their_dimensions():
    """The C reads and writes each weight by the dimensions given: a layer whose weights are
    another shape (the wrong head count, a wider MLP) is refused when the layers are built."""
    from dlm.blocks import BlockLayers

    _, on_blocks = _blocks_loaded(seed=5, dim=128, heads=(4, 2))
    layers, model = on_blocks.model._block_layers, on_blocks.model
    weights, cfg = layers._weights, model.config
    BlockLayers(weights, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, eps=1e-5)
    with pytest.raises(ValueError, match="layer 0 qkv"):
        BlockLayers(weights, n_heads=2 * cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, eps=1e-5)
    assert "at least 1" in BlockLayers.supported(cfg.dim, cfg.n_heads, cfg.n_kv_heads, 0, 256)
    swapped = [*weights[:-1], dataclasses.replace(weights[-1], ln_post=weights[-1].ln_post[:16])]
    with pytest.raises(ValueError, match=f"layer {len(weights) - 1} ln_post: 16 values"):
        BlockLayers(swapped, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, eps=1e-5)


@needs_kernel
@pytest.mark.parametrize("products", [None, pytest.param("int16", marks=needs_vnni)])
def test_a_model_without_its_low_rank_updates_is_its_base_on_the_same_weights(products):
    """`Transformer.without_low_rank()`: an adapted model on blocks (the update unmerged) read as its
    base, on the same memory: the base's logits and replies bit for bit, the adapted model's
    unchanged beside it, and no forward that would still add the updates."""
    _, adapted = _blocks_loaded(adapted=True, products=products)
    _, base = _blocks_loaded(adapted=False, products=products)
    view = adapted.model.without_low_rank()
    mine, theirs = view._block_layers._weights[0], adapted.model._block_layers._weights[0]
    assert mine.qkv.data.data_ptr() == theirs.qkv.data.data_ptr() and theirs.qkv.low_rank is not None
    assert mine.qkv.low_rank is None and view.model is adapted.model.model and view._head is adapted.model._head

    def logits(model) -> torch.Tensor:
        tokens = torch.tensor([[3, 9, 4, 1, 7, 7, 2]])
        cache = model.new_cache(1, max_seq_len=16)
        with torch.inference_mode():
            return model(tokens, torch.arange(7)[None], causal_mask(7), cache=cache,
                         cache_rows=torch.zeros(1, dtype=torch.long))

    want, tuned = logits(base.model), logits(adapted.model)
    assert torch.equal(logits(view), want) and not torch.equal(tuned, want)
    assert torch.equal(logits(adapted.model), tuned)  # the adapted model keeps its updates
    with AREngine(base, max_batch_size=2) as engine:
        expected = [_run(engine.submit(p, PARAMS))[0] for p in BLOCK_PROMPTS[:2]]
    with AREngine(dataclasses.replace(adapted, model=view), max_batch_size=2) as engine:
        assert [_run(h)[0] for h in [engine.submit(p, PARAMS) for p in BLOCK_PROMPTS[:2]]] == expected
    with pytest.raises(ValueError, match="fused block forward only"), torch.no_grad():
        view(torch.tensor([[3, 9]]), torch.arange(2)[None], causal_mask(2))  # no cache: the projections' path
    for change in (lambda: view.to(torch.float64), view.train, view.build_rope, view.use_half_cache,
                   view.release_dense_weights, view.pack_linears, view.unpack_linears, lambda: view.use_blocks({}),
                   lambda: view.use_block_embedding(None, None, None)):
        with pytest.raises(ValueError, match="would change the model it shares its weights with"):
            change()
    assert view.eval() is view and adapted.model.model.norm.weight.dtype == torch.float32
    seen = []
    view.register_forward_hook(lambda *_: seen.append(1))
    logits(adapted.model)
    assert not seen  # a hook on it is its own
    view.register_buffer("extra", torch.zeros(1), persistent=False)
    assert not hasattr(adapted.model, "extra")  # so is a buffer set on it
    assert view.weight_bytes() == base.model.weight_bytes() < adapted.model.weight_bytes()
    dense, _ = _blocks_loaded(adapted=True)
    with pytest.raises(ValueError, match="only a model on the fused block forward"):
        dense.model.without_low_rank()


@needs_vnni
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_integer_layouts_straight_from_a_ggufs_bytes_are_the_codes_own(kind):
    """`BlockWeight.from_gguf_blocks` (what a load on the integer products uses): the bytes and
    scales `int16()` / `int8()` make of the unpacked codes, from the stored blocks in one copy."""
    import gguf
    import numpy as np

    from dlm.blocks import VNNI_INT8, VNNI_INT16
    from dlm.gguf_file import block_codes

    gtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    w = np.random.default_rng(4).normal(size=(48, 192)).astype(np.float32)
    w[3, :32] = 0  # a block of zeros: scale 0
    raw = torch.from_numpy(gguf.quants.quantize(w, gtype).reshape(48, 6, -1).copy())
    code, q, scale, minimum = block_codes(kind, raw)
    assert torch.equal(_dequantized(q, scale, minimum), torch.from_numpy(gguf.quants.dequantize(raw.reshape(48, -1).numpy(), gtype)))
    codes = BlockWeight.q4(q, scale, minimum) if code == "q4" else BlockWeight.q8(q, scale)
    for products, method in ((VNNI_INT16, "int16"), (VNNI_INT8, "int8")):
        want, got = getattr(codes, method)(), BlockWeight.from_gguf_blocks(kind, raw, products)
        assert (got.kind, got.in_features, got.out_features, got.products) == (want.kind, 192, 48, products)
        assert got.data.dtype == want.data.dtype and torch.equal(got.data, want.data)
        assert torch.equal(got.scales, want.scales)
    x = torch.randn(3, 192)
    assert torch.equal(BlockWeight.from_gguf_blocks(kind, raw)(x), codes.int16()(x))
    with pytest.raises(ValueError, match="multiples of 16"):
        BlockWeight.from_gguf_blocks(kind, raw[:40])
    with pytest.raises(ValueError, match="not Q4_0, Q4_1 or Q8_0"):
        BlockWeight.from_gguf_blocks("q4_0" if kind == "q8_0" else "q8_0", raw)
