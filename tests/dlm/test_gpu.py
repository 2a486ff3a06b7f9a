"""The engine on CUDA: same answers as on CPU, bf16 within tolerance, the compiled step, no host
sync inside a step beyond the documented one, the Fast-dLLM v2 1.5B shapes. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from dlm_tiny_models import counting_loaded, random_loaded

from dlm.ar import AREngine
from dlm.decode import BlockDecoder
from dlm.engine import Engine, GenerationParams
from dlm.masks import limit_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
PARAMS = GenerationParams(max_new_tokens=16, block_size=4, policy="threshold", threshold=0.6)


def _on(loaded, device: str, dtype: torch.dtype = torch.float32):
    """A copy of a tiny test model on another device / dtype (the CPU original stays usable)."""
    import copy

    moved = copy.deepcopy(loaded)
    moved.model = moved.model.to(device=device, dtype=dtype)
    return moved


def _run(engine, params=PARAMS, prompts=PROMPTS) -> list[list[int]]:
    handles = [engine.submit(p, params) for p in prompts]
    return [[t for d in h for t in d.token_ids] for h in handles]


def test_cuda_float32_decodes_exactly_as_cpu():
    loaded = random_loaded("block_causal", seed=5, scale=3.0)
    with Engine(loaded, max_batch_size=4) as cpu, Engine(_on(loaded, "cuda"), max_batch_size=4) as gpu:
        assert _run(gpu) == _run(cpu)


def test_cuda_bfloat16_forward_within_tolerance_and_known_output():
    loaded = random_loaded("block_causal", seed=5, scale=3.0)
    bf16 = _on(loaded, "cuda", torch.bfloat16)
    T = 12
    tokens, pos = torch.randint(0, 60, (2, T)), torch.arange(T).expand(2, T)
    lim = (pos // 4 + 1) * 4
    with torch.no_grad():
        want = loaded.model(tokens, pos, limit_mask(lim, T)).softmax(-1)
        got = bf16.model(tokens.cuda(), pos.cuda(), limit_mask(lim.cuda(), T)).softmax(-1).cpu()
    assert (got - want).abs().max() < 3e-2
    # A model with decisive logits decodes identically in bf16.
    counting = counting_loaded(block_size=4)
    params = GenerationParams(max_new_tokens=12, threshold=0.9)
    with Engine(_on(counting, "cuda", torch.bfloat16), max_batch_size=2) as gpu:
        assert _run(gpu, params, [[1], [20, 21]]) == [list(range(2, 14)), list(range(22, 34))]


def test_cuda_equivalences_hold():
    """Block size 1 == AR greedy; the exact cache == no cache; on the device, bf16."""
    loaded = _on(random_loaded("block_causal", seed=3, scale=2.0), "cuda", torch.bfloat16)
    one = GenerationParams(max_new_tokens=16, block_size=1, policy="fixed_steps", steps_per_block=1)
    with Engine(loaded, max_batch_size=4) as dlm, AREngine(loaded, max_batch_size=4) as ar:
        assert _run(dlm, one) == _run(ar, GenerationParams(max_new_tokens=16))
    with Engine(loaded, max_batch_size=4, cache="exact") as a, Engine(loaded, max_batch_size=4, cache="none") as b:
        assert _run(a) == _run(b)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_equals_eager(mode):
    loaded = _on(random_loaded("block_causal", seed=5, scale=3.0), "cuda", torch.bfloat16)
    with Engine(loaded, max_batch_size=4) as eager:
        want = _run(eager)
    with Engine(loaded, max_batch_size=4, compile_mode=mode) as compiled:
        assert _run(compiled) == want
        assert _run(compiled) == want  # replayed (CUDA graphs) without recompiling


def test_no_host_sync_inside_a_step_but_the_documented_one():
    loaded = _on(random_loaded("block_causal", seed=5, scale=3.0), "cuda", torch.bfloat16)
    engine = Engine(loaded, max_batch_size=4)  # for its request validation only
    engine.close()
    decoder = BlockDecoder(loaded.model, engine.spec, max_batch_size=4, max_seq_len=128)
    sampled = GenerationParams(max_new_tokens=16, block_size=4, threshold=0.6, temperature=0.8, seed=1)
    for slot, (prompt, params) in enumerate(zip(PROMPTS, [PARAMS, sampled, PARAMS], strict=True)):
        decoder.add(slot, *engine.prepare(prompt, params))
    download = decoder._download

    def allowed_sync(t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return download(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    decoder._download = allowed_sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            for _ in range(12):
                for update in decoder.step():
                    if update.finish_reason is not None:
                        decoder.remove(update.slot)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fast_dllm_v2_shapes_decode_with_fixed_steps():
    from dlm.synthetic import synthetic_model

    loaded = synthetic_model("fast-dllm-v2-1.5b", device="cuda", max_seq_len=256)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    params = GenerationParams(max_new_tokens=64, policy="fixed_steps", steps_per_block=8)
    with Engine(loaded, max_batch_size=2) as engine:
        deltas = list(engine.submit(list(range(100, 164)), params))  # 64 prompt tokens: two whole blocks
    assert deltas[-1].finish_reason == "length" and deltas[-1].tokens == 64
    assert deltas[-1].steps == 1 + 2 * 8  # the prefill, then 4 tokens per forward
