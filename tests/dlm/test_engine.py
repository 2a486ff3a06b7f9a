"""dlm.engine: concurrency, aborts, bad input, errors, stop strings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from dlm_tiny_models import CharTokenizer, counting_loaded, random_loaded

from dlm.ar import AREngine
from dlm.engine import BACKGROUND_PREFILL_STEP_S, MAX_PENDING_REQUESTS, Engine, GenerationParams
from dlm.errors import InvalidRequestError

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [3, 3], [21, 22, 23, 24, 25]]


def _ids(handle) -> list[int]:
    return [t for d in handle for t in d.token_ids]


def test_concurrent_requests_equal_each_alone():
    """Required (4): continuous batching does not change greedy outputs."""
    loaded = random_loaded("block_causal", seed=11, eos=[9], scale=3.0)
    params = GenerationParams(max_new_tokens=12, block_size=4, threshold=0.7)
    with Engine(loaded, max_batch_size=4) as engine:
        alone = [_ids(engine.submit(p, params)) for p in PROMPTS]
        handles = [engine.submit(p, params) for p in PROMPTS]  # 6 requests, 4 rows: later ones join
        together = [_ids(h) for h in handles]
    assert together == alone


def test_greedy_row_unaffected_by_a_sampled_neighbour():
    loaded = random_loaded("block_causal", seed=11, scale=3.0)
    greedy = GenerationParams(max_new_tokens=10, block_size=4, threshold=0.7)
    sampled = GenerationParams(max_new_tokens=10, block_size=4, threshold=0.7, temperature=1.0, top_p=0.9, seed=1)
    with Engine(loaded, max_batch_size=2) as engine:
        alone = _ids(engine.submit(PROMPTS[0], greedy))
        hs, hg = engine.submit(PROMPTS[1], sampled), engine.submit(PROMPTS[0], greedy)
        assert _ids(hg) == alone
        first = _ids(hs)
        assert _ids(engine.submit(PROMPTS[1], sampled)) == first  # same seed, same sample


def test_abort_mid_block_stops_within_one_step_and_frees_the_row():
    """Required (5)."""
    loaded = counting_loaded(block_size=8)
    engine = Engine(loaded, max_batch_size=1)
    try:
        seen: list = []

        def on_delta(d):
            seen.append(d)
            if len(seen) == 2:  # mid-block: 2 of 8 slots final
                engine.abort(handle.request_id)

        handle = engine.submit([1], GenerationParams(max_new_tokens=200, threshold=0.9), on_delta=on_delta)
        deltas = list(handle)
        assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
        assert deltas[-1].steps <= seen[1].steps + 1
        assert handle.finish_reason == "abort"
        # The only row is free again: the next request runs to the end.
        nxt = list(engine.submit([1], GenerationParams(max_new_tokens=5, threshold=0.9)))
        assert nxt[-1].finish_reason == "length" and [t for d in nxt for t in d.token_ids] == [2, 3, 4, 5, 6]
    finally:
        engine.close()
        engine.close()  # idempotent


def test_abort_of_a_waiting_request():
    loaded = counting_loaded(block_size=4)
    with Engine(loaded, max_batch_size=1) as engine:
        gate = threading.Event()
        first = engine.submit([1], GenerationParams(max_new_tokens=40), on_delta=lambda d: gate.wait(5))
        waiting = engine.submit([2], GenerationParams(max_new_tokens=40))
        engine.abort(waiting.request_id)
        gate.set()
        assert list(waiting)[-1].finish_reason == "abort"
        assert first.result() == "" and first.finish_reason == "length"


@pytest.mark.parametrize("prompt,params", [
    ([], GenerationParams()),
    ([1] * 300, GenerationParams()),
    ([1, 2], GenerationParams(max_new_tokens=255)),  # 2 + 255 > 256 positions
    ([1, 2], GenerationParams(max_new_tokens=-1)),
    ([1, 2], GenerationParams(policy="best")),
    ([1, 2], GenerationParams(threshold=0.0)),
    ([1, 2], GenerationParams(temperature=-1.0)),
    ([1, 2], GenerationParams(top_p=1.5)),
    ([1, 2], GenerationParams(block_size=4, sub_block_size=3)),
    ([1, 2], GenerationParams(steps_per_block=99)),
    ([1, 99999], GenerationParams()),
    ("hello", GenerationParams()),
    ([{"role": "user", "content": "hi"}], GenerationParams()),  # no tokenizer
])
def test_bad_input_is_refused_and_the_engine_keeps_serving(prompt, params):
    loaded = counting_loaded(block_size=4)
    with Engine(loaded, max_batch_size=2) as engine:
        with pytest.raises(InvalidRequestError):
            engine.submit(prompt, params)
        assert _ids(engine.submit([1], GenerationParams(max_new_tokens=3))) == [2, 3, 4]


def test_error_in_one_request_fails_only_that_request():
    loaded = counting_loaded(block_size=4)
    with Engine(loaded, max_batch_size=2) as engine:
        def boom(d):
            raise RuntimeError("callback broke")

        bad = engine.submit([1], GenerationParams(max_new_tokens=8), on_delta=boom)
        good = engine.submit([5], GenerationParams(max_new_tokens=8))
        last = list(bad)[-1]
        assert last.finish_reason == "error" and "callback broke" in last.error
        assert _ids(good) == list(range(6, 14))


def test_stop_string_and_text():
    loaded = counting_loaded(block_size=4, tokenizer=CharTokenizer())
    with Engine(loaded, max_batch_size=1) as engine:
        h = engine.submit([0], GenerationParams(max_new_tokens=20, stop=["efg"]))
        deltas = list(h)
    assert "".join(d.text for d in deltas) == "bcd"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].steps < 20  # stopped without decoding the rest


def test_engines_sharing_a_model_do_not_disturb_each_other():
    """The voice layer holds one Engine per model; the dLLM and its AR baseline may still share
    weights. Each engine owns its cache, so concurrent engines give what each gives alone."""
    loaded = random_loaded("block_causal", seed=11, eos=[9], scale=3.0)
    params = GenerationParams(max_new_tokens=12, block_size=4, threshold=0.7)
    ar_params = GenerationParams(max_new_tokens=12)
    with Engine(loaded, max_batch_size=2) as engine, AREngine(loaded, max_batch_size=2) as ar:
        alone = [_ids(engine.submit(p, params)) for p in PROMPTS]
        ar_alone = [_ids(ar.submit(p, ar_params)) for p in PROMPTS]
    with Engine(loaded, max_batch_size=2) as a, Engine(loaded, max_batch_size=3) as b, \
            AREngine(loaded, max_batch_size=2) as ar:
        ha = [a.submit(p, params) for p in PROMPTS]
        hb = [b.submit(p, params) for p in reversed(PROMPTS)]
        har = [ar.submit(p, ar_params) for p in PROMPTS]
        assert [_ids(h) for h in ha] == alone
        assert [_ids(h) for h in hb] == alone[::-1]
        assert [_ids(h) for h in har] == ar_alone


def test_stop_string_across_deltas_and_hold_back():
    """Text that may be the start of a stop string waits; when the stop string cannot complete,
    it is released."""
    loaded = counting_loaded(block_size=4, tokenizer=CharTokenizer())
    with Engine(loaded, max_batch_size=1) as engine:
        deltas = list(engine.submit([0], GenerationParams(max_new_tokens=8, stop=["dex", "fgh"])))
    # One token per step: "d" and "de" wait (they could start "dex"), "f" frees them and waits
    # itself (it could start "fgh"), "fgh" ends the reply before it.
    assert [d.text for d in deltas] == ["b", "c", "", "", "de", "", ""]
    assert deltas[-1].finish_reason == "stop"


def _until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.mark.parametrize("engine_cls", [Engine, AREngine])
def test_abort_owner_ends_every_request_of_the_owner_wherever_it_is(engine_cls):
    loaded = counting_loaded(block_size=4)
    with engine_cls(loaded, max_batch_size=2) as engine:
        gate = threading.Event()
        params = GenerationParams(max_new_tokens=200)
        slow = dict(on_delta=lambda d: gate.wait(5))
        # Two rows, both the hostile owner's (one decoding, one held by its callback), two more
        # of its requests waiting, and an honest request waiting behind them.
        mine = [engine.submit([1], params, owner="call-a", **slow) for _ in range(4)]
        honest = engine.submit([2], GenerationParams(max_new_tokens=6), owner="call-b")
        assert _until(lambda: engine.load().rows == 2)
        load = engine.load()
        assert load.queued == 3 and load.owners == {"call-a": 4, "call-b": 1} and not load.idle
        engine.abort_owner("call-a")
        gate.set()
        assert [list(h)[-1].finish_reason for h in mine] == ["abort"] * 4
        assert list(honest)[-1].finish_reason == "length"
        assert _until(lambda: engine.load().idle)
        assert engine.load().owners == {}


def test_a_free_row_goes_to_the_owner_holding_the_fewest():
    """Fair share: one owner's burst of requests does not keep another owner out of the row
    that frees up next."""
    loaded = counting_loaded(block_size=4)
    with Engine(loaded, max_batch_size=2) as engine:
        order: list[str] = []
        lock = threading.Lock()

        def started(name):
            def on_delta(d):
                with lock:
                    if name not in order:
                        order.append(name)
            return on_delta

        gate = threading.Event()
        hold = engine.submit([1], GenerationParams(max_new_tokens=40), on_delta=lambda d: gate.wait(5), owner="a")
        burst = [engine.submit([1], GenerationParams(max_new_tokens=4), owner="a", on_delta=started(f"a{i}")) for i in range(3)]
        other = engine.submit([2], GenerationParams(max_new_tokens=4), owner="b", on_delta=started("b"))
        gate.set()
        for h in [hold, *burst, other]:
            list(h)
        # "a" holds a row throughout; the second row went to a0, then to b (holding none), then a1.
        assert order.index("b") < order.index("a2")


def test_a_call_keeps_its_cached_prefix_when_another_call_shares_little_with_it():
    """A request that reuses next to nothing takes an empty row rather than another call's cached
    history; a long shared prefix (a client re-sending a conversation) is still reused."""
    loaded = random_loaded("causal", seed=5, eos=[1], block_size=1)
    history = [5 + i % 40 for i in range(100)]
    params = GenerationParams(max_new_tokens=3)

    def holding(engine, ids):
        assert _until(lambda: engine.load().idle)
        return [slot for slot, cached in engine._decoder.cached.items() if cached.ids[:len(ids)] == ids]

    with AREngine(loaded, max_batch_size=2) as engine:
        list(engine.submit(history, params, owner="call-a"))
        [slot] = holding(engine, history)
        # Another call whose prompt starts like call-a's (the chat template's first tokens) only.
        list(engine.submit([*history[:3], 50, 51, 52], params, owner="call-b"))
        assert holding(engine, history) == [slot]
        # A chat API request continuing call-a's conversation reuses its 100 tokens.
        list(engine.submit([*history, 53, 54], params, owner="api-1"))
        assert holding(engine, [*history, 53, 54]) == [slot]


def test_abort_never_blocks_with_many_requests_waiting():
    loaded = counting_loaded(block_size=4)
    with Engine(loaded, max_batch_size=1) as engine:
        gate = threading.Event()
        first = engine.submit([1], GenerationParams(max_new_tokens=8), on_delta=lambda d: gate.wait(5), owner="x")
        waiting = []
        with pytest.raises(InvalidRequestError):
            for _ in range(MAX_PENDING_REQUESTS + 2):
                waiting.append(engine.submit([1], GenerationParams(max_new_tokens=8), owner="x"))
        assert len(waiting) == MAX_PENDING_REQUESTS
        started = time.monotonic()
        for h in waiting:
            engine.abort(h.request_id)  # the command queue is unbounded: nothing waits here
        engine.abort_owner("x")
        assert time.monotonic() - started < 1.0
        gate.set()
        assert all(list(h)[-1].finish_reason == "abort" for h in waiting)
        list(first)
        assert _until(lambda: engine.load().idle)


def _heavy_alone(engine_cls):
    """(model, params, the tokens of PROMPTS[3] decoded alone): the background tests' reference."""
    loaded = random_loaded("causal" if engine_cls is AREngine else "block_causal", seed=7, eos=[],
                           block_size=1 if engine_cls is AREngine else 4)
    params = GenerationParams(max_new_tokens=24)
    with engine_cls(loaded, max_batch_size=2) as engine:
        return loaded, params, _ids(engine.submit(PROMPTS[3], params))


def _waits_then_goes_on(engine_cls, hold: Callable[[Any], None], release: Callable[[Any], None],
                        waiting: str, other: str) -> None:
    """After `hold(engine)`, `waiting`'s request takes no step while `other`'s runs to its end,
    the worker waits without burning the CPU; after `release(engine)` the request ends with the
    same tokens as alone."""
    loaded, params, alone = _heavy_alone(engine_cls)
    with engine_cls(loaded, max_batch_size=2) as engine:
        hold(engine)
        tokens: list[int] = []
        held = engine.submit(PROMPTS[3], params, on_delta=lambda d: tokens.extend(d.token_ids), owner=waiting)
        assert len(_ids(engine.submit(PROMPTS[1], GenerationParams(max_new_tokens=6), owner=other))) == 6
        cpu = time.process_time()
        time.sleep(0.5)
        assert tokens == []
        assert time.process_time() - cpu < 0.25  # polling its commands, not stepping
        release(engine)
        assert _ids(held) == alone


@pytest.mark.parametrize("engine_cls", [Engine, AREngine])
def test_paused_background_rows_wait_without_spinning_and_go_on_unchanged(engine_cls):
    """pause_background(True): a background owner's row takes no step even alone (the others'
    work is elsewhere); once unpaused it goes on unchanged. Other owners are never paused."""
    def hold(engine):
        engine.set_background({"heavy"})
        engine.pause_background(True)

    _waits_then_goes_on(engine_cls, hold, lambda engine: engine.pause_background(False), "heavy", "light")


@pytest.mark.parametrize("engine_cls", [Engine, AREngine])
def test_a_held_owner_sits_out_the_steps_and_goes_on_unchanged(engine_cls):
    """hold_owner(owner, True): that owner's rows take no step, others' do, background or not
    (a background owner still steps while the holder waits); released, it goes on unchanged."""
    def hold(engine):
        engine.hold_owner("caller", True)
        engine.set_background({"other"})

    _waits_then_goes_on(engine_cls, hold, lambda engine: engine.hold_owner("caller", False), "caller", "other")


def test_steps_of_background_rows_alone_prefill_briefly():
    """A step in which only background owners' rows take part aims its prefill forward at
    BACKGROUND_PREFILL_STEP_S: the others' next request waits at most about that long."""
    loaded = random_loaded("block_causal", seed=7, eos=[], block_size=4)
    with Engine(loaded, max_batch_size=2) as engine:
        asked: list[tuple[str, float | None]] = []
        step = engine._decoder.step

        def spy(hold=(), prefill_step_s=None):
            owners = {engine._slot_owner.get(slot) for slot in engine._decoder.rows if slot not in hold}
            asked.append(("+".join(sorted(o for o in owners if o)), prefill_step_s))
            return step(hold, prefill_step_s)

        engine._decoder.step = spy
        engine.set_background({"heavy"})
        list(engine.submit(PROMPTS[3], GenerationParams(max_new_tokens=8), owner="heavy"))
        list(engine.submit(PROMPTS[1], GenerationParams(max_new_tokens=8), owner="light"))
    assert {a for a in asked if a[0] == "heavy"} == {("heavy", BACKGROUND_PREFILL_STEP_S)}
    assert {a for a in asked if a[0] == "light"} == {("light", None)}


@pytest.mark.parametrize("engine_cls", [Engine, AREngine])
def test_a_background_owner_waits_while_others_decode_and_its_output_is_unchanged(engine_cls):
    """set_background: the owner's row takes no part in the steps while another owner's request
    holds a row, then goes on from where it was (same tokens as alone); on_usage charges both."""
    loaded, params, alone = _heavy_alone(engine_cls)
    with engine_cls(loaded, max_batch_size=2) as engine:
        events: list[tuple[str, int, bool]] = []  # (owner, new tokens, finished), in the worker's order
        usage: dict[str, float] = {}
        engine.on_usage = lambda step: [usage.__setitem__(o, usage.get(o, 0.0) + s) for o, s in step.items()]
        engine.set_background({"heavy"})
        started = threading.Event()

        def record(owner):
            def on_delta(d):
                events.append((owner, len(d.token_ids), d.finished))
                if owner == "heavy" and d.token_ids:
                    started.set()
            return on_delta

        heavy = engine.submit(PROMPTS[3], params, on_delta=record("heavy"), owner="heavy")
        assert started.wait(5)  # alone, a background request runs
        light = engine.submit(PROMPTS[1], GenerationParams(max_new_tokens=6), on_delta=record("light"), owner="light")
        assert len(_ids(light)) == 6
        assert _ids(heavy) == alone
    first = next(i for i, e in enumerate(events) if e[0] == "light")
    last = next(i for i, e in enumerate(events) if e[0] == "light" and e[2])
    assert not any(owner == "heavy" and n for owner, n, _ in events[first:last]), events
    assert any(owner == "heavy" and n for owner, n, _ in events[last:])  # and it went on afterwards
    assert usage.keys() == {"heavy", "light"} and min(usage.values()) > 0
