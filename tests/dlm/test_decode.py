"""Block decoding: AR equivalence, exact cache == no cache, the LLaDA reference, EOS, sub-blocks."""

from __future__ import annotations

import pytest
import torch
from dlm_tiny_models import MASK, counting_loaded, random_loaded

from dlm.ar import AREngine
from dlm.decode import BlockDecoder
from dlm.engine import Engine, GenerationParams
from dlm.masks import full_mask

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def _run(engine: Engine, prompts, params: GenerationParams) -> list[tuple[list[int], str | None]]:
    handles = [engine.submit(p, params) for p in prompts]
    out = []
    for h in handles:
        ids = [t for d in h for t in d.token_ids]
        out.append((ids, h.finish_reason))
    return out


def test_block_size_one_equals_ar_baseline():
    """Required (1): block-causal, block size 1, one token per step == AR greedy, same weights."""
    loaded = random_loaded("block_causal", seed=3, eos=[5], scale=2.0)
    params = GenerationParams(max_new_tokens=24, block_size=1, policy="fixed_steps", steps_per_block=1)
    with Engine(loaded, max_batch_size=4) as dlm, AREngine(loaded, max_batch_size=4) as ar:
        got = _run(dlm, PROMPTS, params)
        want = _run(ar, PROMPTS, GenerationParams(max_new_tokens=24))
    assert got == want
    assert any(len(ids) >= 10 for ids, _ in got)


def test_ar_is_one_forward_per_token():
    loaded = random_loaded("block_causal", seed=1)
    with AREngine(loaded, max_batch_size=1) as ar:
        deltas = list(ar.submit([1, 2, 3], GenerationParams(max_new_tokens=12)))
    assert deltas[-1].finish_reason == "length" and deltas[-1].tokens == 12
    assert deltas[-1].steps == 12  # one prefill + one cache write per token except the last


@pytest.mark.parametrize("logit_shift", [True, False])
@pytest.mark.parametrize("policy", ["threshold", "fixed_steps", "factor"])
def test_exact_cache_equals_no_cache(logit_shift, policy):
    """Required (2): the per-block cache of a block-causal model is exact."""
    loaded = random_loaded("block_causal", seed=5, logit_shift=logit_shift, scale=3.0)
    params = GenerationParams(max_new_tokens=14, block_size=4, policy=policy, threshold=0.6,
                              steps_per_block=2, factor=1.5)
    with Engine(loaded, max_batch_size=4, cache="exact") as cached, Engine(loaded, max_batch_size=4, cache="none") as plain:
        got = _run(cached, PROMPTS, params)
        want = _run(plain, PROMPTS, params)
    assert got == want
    assert all(len(ids) == 14 for ids, _ in got)


def _llada_reference(model, prompt: list[int], gen_length: int, block_length: int, steps: int) -> list[int]:
    """LLaDA's semi-autoregressive sampler with low-confidence remasking (Nie et al. 2025, Alg. 4
    / generate.py), greedy, written out plainly: the whole canvas is fed at every step."""
    P = len(prompt)
    x = torch.full((1, P + gen_length), MASK, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[0, P:] = True
    steps_per_block = steps // (gen_length // block_length)
    T = x.shape[1]
    for b in range(gen_length // block_length):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        n = int(masked[0, lo:hi].sum())
        schedule = [n // steps_per_block + (1 if i < n % steps_per_block else 0) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            logits = model(x, torch.arange(T)[None], full_mask(T))  # (1, T, V)
            p = logits.softmax(-1)
            x0 = logits.argmax(-1)
            conf = p.gather(-1, x0[..., None]).squeeze(-1)
            conf[:, hi:] = float("-inf")
            conf = torch.where(masked, conf, torch.tensor(float("-inf")))
            idx = conf[0].topk(schedule[i]).indices
            x[0, idx] = x0[0, idx]
            masked[0, idx] = False
    return x[0, P:].tolist()


def test_fixed_steps_reproduces_llada_reference():
    """Required (3): FixedSteps on a full-attention model == LLaDA's low-confidence remasking."""
    loaded = random_loaded("full", seed=7, logit_shift=False, block_size=8, scale=3.0)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    params = GenerationParams(max_new_tokens=16, block_size=8, policy="fixed_steps", steps_per_block=4)
    with torch.no_grad():
        want = [_llada_reference(loaded.model, p, 16, 8, 8) for p in prompts]
    with Engine(loaded, max_batch_size=2, cache="none") as engine:
        got = [ids for ids, _ in _run(engine, prompts, params)]
    assert got == want


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_full_attention_caches_run(cache):
    loaded = random_loaded("full", seed=7, logit_shift=True, block_size=4, scale=3.0)
    params = GenerationParams(max_new_tokens=10, block_size=4, policy="threshold", threshold=0.5)
    with Engine(loaded, max_batch_size=2, cache=cache) as engine:
        out = _run(engine, PROMPTS[:2], params)
    assert all(len(ids) == 10 and reason == "length" for ids, reason in out)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_step_equals_no_cache(cache):
    """The approximate caches are refreshed once per block: that step sees the same context as
    the uncached decoder, so the first step of the first block commits the same slots."""
    loaded = random_loaded("full", seed=2, logit_shift=True, block_size=8, scale=3.0)
    params = GenerationParams(max_new_tokens=8, block_size=8, policy="fixed_steps", steps_per_block=4,
                              trace_steps=True)

    def first_trace(engine):
        return next(d.trace for d in engine.submit(PROMPTS[0], params) if d.trace is not None)

    with Engine(loaded, max_batch_size=1, cache=cache) as a, Engine(loaded, max_batch_size=1, cache="none") as b:
        assert first_trace(a) == first_trace(b)


def test_counting_model_known_output_and_eos_stops_early():
    loaded = counting_loaded(eos=[12], block_size=4)
    with Engine(loaded, max_batch_size=2) as engine:
        deltas = list(engine.submit([1, 2, 3], GenerationParams(max_new_tokens=100, threshold=0.9)))
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == list(range(4, 12))
    assert deltas[-1].finish_reason == "eos" and deltas[-1].tokens == 8
    # One forward per committed slot (EOS included), nothing past it: no prefill (the prompt
    # lies in the first block), and block writes ride along with the next block's first step.
    assert deltas[-1].steps == 9


def test_streaming_releases_left_part_of_a_block_early():
    loaded = counting_loaded(block_size=8)
    with Engine(loaded, max_batch_size=1) as engine:
        deltas = list(engine.submit([1], GenerationParams(max_new_tokens=8, threshold=0.9)))
    # The counting model commits one slot per step left to right: each becomes final at once.
    assert [d.token_ids for d in deltas if d.token_ids] == [[t] for t in range(2, 10)]


def test_sub_blocks_commit_in_order_and_trace():
    loaded = random_loaded("block_causal", seed=4, block_size=8, scale=3.0)
    params = GenerationParams(max_new_tokens=8, block_size=8, sub_block_size=4, policy="fixed_steps",
                              steps_per_block=2, trace_steps=True)
    with Engine(loaded, max_batch_size=1) as engine:
        deltas = list(engine.submit(list(range(1, 9)), params))
    traces = [d.trace for d in deltas if d.trace is not None]
    masked = [t.masked for t in traces]
    assert sum(masked[0][:4]) == 2 and all(masked[0][4:])  # 2 of the first sub-block only
    assert masked[1] == [False] * 4 + [True] * 4
    assert not any(masked[2][:4]) and sum(masked[2][4:]) == 2
    assert masked[3] == [False] * 8
    assert all(t.block_start == 8 for t in traces)
    with Engine(loaded, max_batch_size=1) as engine:
        assert all(d.trace is None for d in engine.submit([1, 2], GenerationParams(max_new_tokens=4)))


@pytest.mark.parametrize("prompt", [[1], [1, 2, 3, 4, 5, 6]], ids=["no_prefill", "prefill"])
def test_exact_cache_costs_no_forward_beyond_the_denoising_steps(prompt):
    """The clean write of a finished block is fused with the next block's first step: the
    counting model commits exactly one slot per step, so the exact cache takes one forward per
    token (plus the prefill), as many as the uncached decoder, with the same output."""
    loaded = counting_loaded(block_size=4)
    params = GenerationParams(max_new_tokens=10, threshold=0.9)
    with Engine(loaded, max_batch_size=2, cache="exact") as exact, Engine(loaded, max_batch_size=2, cache="none") as plain:
        cached, uncached = list(exact.submit(prompt, params)), list(plain.submit(prompt, params))
    ids = [t for d in cached for t in d.token_ids]
    assert ids == [t for d in uncached for t in d.token_ids] == list(range(prompt[-1] + 1, prompt[-1] + 11))
    prefill = 1 if len(prompt) >= 4 else 0
    assert cached[-1].steps == prefill + 10
    assert uncached[-1].steps == 10
    assert [d.steps for d in cached if d.token_ids] == list(range(prefill + 1, prefill + 11))  # a token per forward


def test_exact_cache_equals_no_cache_with_sub_blocks_and_a_batch():
    loaded = random_loaded("block_causal", seed=8, scale=3.0, block_size=8)
    params = GenerationParams(max_new_tokens=21, block_size=8, sub_block_size=4, policy="threshold", threshold=0.5)
    with Engine(loaded, max_batch_size=3, cache="exact") as cached, Engine(loaded, max_batch_size=3, cache="none") as plain:
        assert _run(cached, PROMPTS, params) == _run(plain, PROMPTS, params)


def test_synthetic_model_fixed_steps_do_fixed_work():
    """`voice-agent bench llm --synthetic`: no EOS, a fixed number of steps per block, so the
    work per reply is known: the prefill, then block / steps tokens per forward."""
    from dlm.synthetic import synthetic_model

    loaded = synthetic_model("small", max_seq_len=256)
    assert loaded.tokenizer is None and loaded.spec.eos_token_ids == []
    params = GenerationParams(max_new_tokens=64, policy="fixed_steps", steps_per_block=8)
    with Engine(loaded, max_batch_size=2) as engine:
        handles = [engine.submit(list(range(100, 164)), params) for _ in range(2)]
        finals = [list(h)[-1] for h in handles]
    assert all(d.finish_reason == "length" and d.tokens == 64 and d.steps == 1 + 2 * 8 for d in finals)


def _drive(decoder: BlockDecoder, requests: list[tuple[list[int], object]]) -> tuple[list[list[int]], list[list[int]]]:
    """Add every request at once, step to the end -> (ids per request, slots updated per step)."""
    for slot, (ids, settings) in enumerate(requests):
        decoder.add(slot, ids, settings)
    out: list[list[int]] = [[] for _ in requests]
    updated: list[list[int]] = []
    with torch.inference_mode():
        while decoder.rows:
            updates = decoder.step()
            updated.append([u.slot for u in updates])
            for u in updates:
                out[u.slot] += u.new_ids
                if u.finish_reason is not None:
                    decoder.remove(u.slot)
    return out, updated


def _prepared(loaded, prompts, params) -> list[tuple[list[int], object]]:
    engine = Engine(loaded, max_batch_size=1)  # for its request validation only
    engine.close()
    return [engine.prepare(p, params) for p in prompts]


def _forward_shapes(model) -> tuple[list[tuple[int, int]], object]:
    shapes: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes, hook


@pytest.mark.parametrize("block_size", [1, 4])
def test_prompts_admitted_together_are_prefilled_in_one_forward(block_size):
    """Batched prefill: the first step runs one padded prefill forward for every new row, then the
    denoising forward; the outputs equal one prefill per step."""
    loaded = random_loaded("block_causal", seed=5, scale=3.0)
    prompts = [[1, 2, 3, 4, 5], [9, 10, 11, 12, 13, 14, 15, 16, 17], [6, 7, 8, 9, 10, 11, 12, 13]]
    params = GenerationParams(max_new_tokens=10, block_size=block_size, threshold=0.6)
    requests = _prepared(loaded, prompts, params)
    one_at_a_time = BlockDecoder(loaded.model, loaded.spec, max_batch_size=3, max_seq_len=64,
                                 prefill_budget_tokens=1)
    want, updated_alone = _drive(one_at_a_time, requests)
    assert [len(slots) for slots in updated_alone[:3]] == [1, 2, 3]  # one more row ready per step
    batched = BlockDecoder(loaded.model, loaded.spec, max_batch_size=3, max_seq_len=64)
    shapes, hook = _forward_shapes(loaded.model)
    try:
        got, updated = _drive(batched, requests)
    finally:
        hook.remove()
    assert got == want and all(len(ids) == 10 for ids in got)
    assert updated[0] == [0, 1, 2]  # every row decodes in the step that prefilled it
    origin = 16 if block_size == 1 else 8  # the longest prompt's prefill: 16 (bs 1) or 2 blocks of 4
    assert shapes[0] == (3, origin)  # exact batch, window to a multiple of 8
    if block_size == 4:
        assert shapes[1][0] == 4  # the denoising forward of the same step: 3 rows, batch bucket 4
    else:
        assert shapes[1] == (4, 1)  # AR: the next step's cache writes; the first tokens came from the carry


def test_long_prompt_is_prefilled_in_chunks_without_starving_running_rows():
    loaded = random_loaded("block_causal", seed=8, scale=3.0)
    long_prompt = list(range(1, 30))  # 28 positions to prefill at block size 4
    params = GenerationParams(max_new_tokens=12, block_size=4, threshold=0.6)
    requests = _prepared(loaded, [[3, 4], long_prompt], params)
    whole = BlockDecoder(loaded.model, loaded.spec, max_batch_size=2, max_seq_len=64)
    want, _ = _drive(whole, requests)
    chunked = BlockDecoder(loaded.model, loaded.spec, max_batch_size=2, max_seq_len=64, prefill_chunk_tokens=10,
                           long_prefill_share=1.0)  # no pause between a long prompt's chunks
    shapes, hook = _forward_shapes(loaded.model)
    try:
        got, updated = _drive(chunked, requests)
    finally:
        hook.remove()
    assert got == want
    # Steps 1-4 each run a prefill chunk (10 tokens rounded down to 2 blocks: 8 + 8 + 8 + 4
    # positions), then the denoising forward (the short row's block of 4, its block write fused
    # in where one finished; from step 4, both rows').
    assert [shapes[i] for i in (0, 2, 4, 6)] == [(1, 8), (1, 8), (1, 8), (1, 4)]
    assert all(shapes[i][1] == 4 for i in (1, 3, 5, 7))
    assert [0 in slots for slots in updated[:4]] == [True] * 4  # the running row decodes at every step
    assert [1 in slots for slots in updated[:4]] == [False, False, False, True]


def test_a_long_prompt_yields_to_decoding_rows_and_a_short_one_does_not_wait():
    """long_prefill_share: after a chunk of a long prompt, the next long chunk waits while other
    rows decode (here: for good, at a tiny share); a prompt of one chunk is prefilled at once."""
    loaded = random_loaded("block_causal", seed=8, scale=3.0)
    params = GenerationParams(max_new_tokens=8, block_size=4, threshold=0.6)
    short, long_prompt, late = _prepared(loaded, [[3, 4], list(range(1, 30)), [5, 6, 7]], params)
    decoder = BlockDecoder(loaded.model, loaded.spec, max_batch_size=3, max_seq_len=64, prefill_chunk_tokens=8,
                           long_prefill_share=1e-9)
    decoder.add(0, *short)
    decoder.step()  # the short row prefills and decodes
    decoder.add(1, *long_prompt)
    decoder.step()  # one chunk of the long prompt: 8 of 28 positions
    assert decoder.rows[1].prefill_upto == 8
    decoder.add(2, *late)
    decoder.step()
    assert decoder.rows[2].prefill_upto == decoder.rows[2].prefill_end  # not held behind the long one
    for _ in range(3):
        decoder.step()
    assert decoder.rows[1].prefill_upto == 8  # paused while the others decode
    while 0 in decoder.rows or 2 in decoder.rows:
        for update in decoder.step():
            if update.finish_reason is not None:
                decoder.remove(update.slot)
    while decoder.rows[1].prefill_upto < decoder.rows[1].prefill_end:  # alone now: no pause
        decoder.step()


def test_a_short_prompt_is_not_held_back_when_the_measured_prefill_speed_is_low():
    """On a CPU shared with other work the chunks shrink to the measured prefill speed; a prompt
    that fits one configured chunk still never waits for a long prompt's share of the time."""
    loaded = random_loaded("block_causal", seed=8, scale=3.0)
    params = GenerationParams(max_new_tokens=8, block_size=4, threshold=0.6)
    short, long_prompt, late = _prepared(loaded, [[3, 4], list(range(1, 40)), list(range(5, 17))], params)
    decoder = BlockDecoder(loaded.model, loaded.spec, max_batch_size=3, max_seq_len=96, prefill_chunk_tokens=16,
                           long_prefill_share=1e-9, prefill_step_s=0.3)
    decoder.add(0, *short)
    decoder.step()
    decoder.add(1, *long_prompt)
    decoder.step()  # a chunk of the long prompt: the long prompts' gate closes for good (tiny share)
    decoder._prefill_tokens_per_s = 10.0  # a slow, shared CPU: chunks of 3 tokens, whole blocks: 4
    decoder.add(2, *late)
    steps = 0
    while decoder.rows[2].prefill_upto < decoder.rows[2].prefill_end:
        decoder.step()
        decoder._prefill_tokens_per_s = 10.0  # as measured on that CPU, whatever this one does
        steps += 1
        assert steps <= 4, "a one-chunk prompt waited behind the long one"
    assert decoder.rows[2].prefill_steps == steps >= 2  # in shrunk chunks, one a step


def test_a_step_may_aim_its_prefill_at_a_shorter_time():
    """step(prefill_step_s=...) sizes that step's chunks for it (the engine's steps of background
    rows alone) and leaves the measured prefill speed alone; the next step is back to the
    decoder's own."""
    loaded = random_loaded("block_causal", seed=8, scale=3.0)
    params = GenerationParams(max_new_tokens=8, block_size=4, threshold=0.6)
    [prompt] = _prepared(loaded, [[5 + i % 40 for i in range(80)]], params)
    decoder = BlockDecoder(loaded.model, loaded.spec, max_batch_size=1, max_seq_len=128, prefill_chunk_tokens=32,
                           prefill_step_s=0.3)
    decoder.add(0, *prompt)
    decoder.step()  # the first chunk is the configured one: nothing measured yet
    first = decoder.rows[0].prefill_upto
    decoder._prefill_tokens_per_s = 40.0  # 0.3 s: 12 tokens; 0.1 s: 4 (whole blocks)
    decoder.step(prefill_step_s=0.1)
    assert decoder.rows[0].prefill_upto - first == 4
    assert decoder._prefill_tokens_per_s == 40.0  # a brief step's speed is not measured
    decoder.step()
    assert decoder.rows[0].prefill_upto - first == 4 + 12


def test_the_prefill_speed_is_measured_on_chunks_not_on_short_tails(monkeypatch):
    """A forward's fixed cost dominates a short prompt's: measured there, the speed under-reads
    what a chunk takes and later prompts go in needlessly many forwards. Only a forward with a
    full chunk, or one slower than the target, updates it."""
    from types import SimpleNamespace

    import dlm.decode

    loaded = random_loaded("block_causal", seed=8, scale=3.0)
    params = GenerationParams(max_new_tokens=4, block_size=4, threshold=0.6)
    long_prompt, tail, other = _prepared(loaded, [[5 + i % 40 for i in range(60)], [3, 4, 5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4, 3, 2]], params)
    decoder = BlockDecoder(loaded.model, loaded.spec, max_batch_size=3, max_seq_len=96, prefill_chunk_tokens=64, prefill_step_s=0.3)
    clock = [0.0]
    fixed_s = [0.1]  # a prefill forward: this plus 200 tokens a second
    monkeypatch.setattr(dlm.decode, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # this module's clock only
    forward = decoder._forward

    def timed(entries, fn, *, eager_prefill=False):
        if eager_prefill:
            clock[0] += fixed_s[0] + sum(e.length for e in entries) / 200.0
        return forward(entries, fn, eager_prefill=eager_prefill)

    decoder._forward = timed
    decoder.add(0, *long_prompt)
    decoder.step()  # 60 tokens in 0.4 s: the first measure
    assert decoder._prefill_tokens_per_s == pytest.approx(150.0)
    decoder.add(1, *tail)
    decoder.step()  # 8 tokens in 0.14 s (57/s): mostly fixed cost, not measured
    assert decoder.rows[1].prefill_upto == decoder.rows[1].prefill_end
    assert decoder._prefill_tokens_per_s == pytest.approx(150.0)
    fixed_s[0] = 0.5  # a crowded CPU: even a short forward overruns the target
    decoder.add(2, *other)
    decoder.step()
    assert decoder._prefill_tokens_per_s < 150.0


def test_a_failing_prefill_fails_only_the_requests_being_prefilled():
    loaded = counting_loaded(block_size=4)

    def fail_long_prefill(module, args):
        if args[0].shape[1] == 16:  # only the long prompt's prefill has a 16-token window
            raise RuntimeError("prefill broke")

    hook = loaded.model.register_forward_pre_hook(fail_long_prefill)
    try:
        with Engine(loaded, max_batch_size=2) as engine:
            short = engine.submit([1], GenerationParams(max_new_tokens=8))
            long = engine.submit(list(range(1, 18)), GenerationParams(max_new_tokens=8))
            short_deltas, long_deltas = list(short), list(long)
            assert long_deltas[-1].finish_reason == "error" and "prefill broke" in long_deltas[-1].error
            assert [t for d in short_deltas for t in d.token_ids] == list(range(2, 10))
            assert short_deltas[-1].finish_reason == "length"
            ok = engine.submit([1, 2, 3, 4, 5], GenerationParams(max_new_tokens=3))
            assert [t for d in ok for t in d.token_ids] == [6, 7, 8]  # the engine keeps serving
    finally:
        hook.remove()


@pytest.mark.parametrize("attention,engine_cls,block_size", [("block_causal", Engine, 4), ("causal", AREngine, 1)],
                         ids=["bd", "ar"])
def test_next_turn_reuses_the_cached_prefix_of_its_row(attention, engine_cls, block_size):
    """Prefix reuse: turn 2 re-sends turn 1's prompt and reply; it lands in the row that served
    turn 1 (not the neighbour's), prefills only the tail and decodes as a fresh engine does."""
    loaded = random_loaded(attention, seed=5, scale=3.0, block_size=block_size)
    params = GenerationParams(max_new_tokens=9, threshold=0.6)
    first = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]
    with engine_cls(loaded, max_batch_size=3) as engine:
        handles = [engine.submit(p, params) for p in first]
        replies = [[t for d in h for t in d.token_ids] for h in handles]
        second = first[1] + replies[1] + [40, 41, 42]
        shapes, hook = _forward_shapes(loaded.model)
        try:
            got = [t for d in engine.submit(second, params) for t in d.token_ids]
        finally:
            hook.remove()
    with engine_cls(loaded, max_batch_size=3) as fresh:
        fresh_shapes, hook = _forward_shapes(loaded.model)
        try:
            want = [t for d in fresh.submit(second, params) for t in d.token_ids]
        finally:
            hook.remove()
    assert len(replies[1]) == 9 and got == want and len(got) == 9
    # 23 prompt tokens. A fresh row prefills 23 (AR) or 20 (5 blocks) positions, window padded to
    # 24. Turn 1's row holds clean K/V up to its last token (AR: 11 + 9 - 1 = 19) or its last
    # block (bd: 16), so turn 2 prefills positions 19..22 or 16..19: 4 positions.
    assert fresh_shapes[0] == (1, 24)
    assert shapes[0] == (1, 4)


def test_prefix_match_needs_the_same_tokens_and_block_size():
    loaded = random_loaded("block_causal", seed=5, scale=3.0)
    params4 = GenerationParams(max_new_tokens=4, block_size=4, threshold=0.6)
    prompt = list(range(1, 14))  # 13 tokens: 12 prefilled in 3 blocks
    (ids, settings), = _prepared(loaded, [prompt], params4)
    decoder = BlockDecoder(loaded.model, loaded.spec, max_batch_size=2, max_seq_len=64)
    _drive(decoder, [(ids, settings)])
    assert decoder.prefix_match(0, ids, settings) == 8  # whole blocks, the carry's block recomputed
    assert decoder.prefix_match(0, ids[:6] + [50] * 7, settings) == 4  # diverges inside block 2
    assert decoder.prefix_match(1, ids, settings) == 0  # another row holds nothing
    (_, settings2), = _prepared(loaded, [prompt], GenerationParams(max_new_tokens=4, block_size=2, threshold=0.6))
    assert decoder.prefix_match(0, ids, settings2) == 0  # other block size: other block-causal keys
