"""`voice-agent bench llm`: the speed bars computed from the per-reply token timelines, and the machine a run names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from voice_agent.commands.bench import speed_bars


def _level(engine: str, timelines: list[list[list[float]]], tokens_per_forward: float) -> dict:
    """A level's records: each reply's first text with its first final tokens (as `_measure` records)."""
    return {"engine": engine, "concurrency": 1, "tokens_per_forward": tokens_per_forward,
            "replies_detail": [{"token_times": t, "first_output_s": t[0][0], "first_output_tokens": t[0][1]}
                               for t in timelines]}


def test_bars_compare_the_same_number_of_tokens_prompt_by_prompt() -> None:
    # dLLM: 8 tokens per 0.1 s block after 0.05 s; AR: one token per 0.02 s after 0.05 s.
    dllm = [[[0.05 + 0.1 * b, 8 * b] for b in range(1, 7)],  # 48 tokens at 0.65 s
            [[0.15, 8], [0.25, 12]]]  # a 12-token reply
    ar = [[[0.05 + 0.02 * k, k] for k in range(1, 61)],  # 60 tokens: 48th at 1.01 s, 8th at 0.21 s
          [[0.05 + 0.02 * k, k] for k in range(1, 21)]]  # 20 tokens: 12th at 0.29 s, 8th at 0.21 s
    bars = speed_bars([_level("dllm", dllm, 3.5), _level("ar", ar, 1.0)])
    assert bars is not None and bars["pairs"] == 2
    # Prompt 1: 48 tokens, 1.01 / 0.65; prompt 2: 12 tokens (the shorter reply), 0.29 / 0.25.
    assert bars["wall_speedup"]["value"] == pytest.approx((1.01 / 0.65 + 0.29 / 0.25) / 2)
    assert not bars["wall_speedup"]["pass"]
    # First final text: 8 tokens at 0.15 s against the AR's 8th token at 0.21 s, on both prompts.
    assert bars["first_text_ratio"]["value"] == pytest.approx(0.15 / 0.21)
    assert not bars["first_text_ratio"]["pass"]
    assert bars["tokens_per_forward"]["pass"]
    # Final tokens whose text the stream still held (a stop string's start): the text came later.
    held = _level("dllm", dllm, 3.5)
    held["replies_detail"][0].update(first_output_s=0.25, first_output_tokens=16)  # AR's 16th token: 0.37 s
    assert speed_bars([held, _level("ar", ar, 1.0)])["first_text_ratio"]["value"] == pytest.approx(
        (0.25 / 0.37 + 0.15 / 0.21) / 2)


def test_bars_pass_when_the_dllm_is_fast_enough_and_need_both_engines() -> None:
    dllm = [[[0.1, 16], [0.2, 32], [0.3, 48]]]
    ar = [[[0.02 * k, k] for k in range(1, 49)]]  # 16th token at 0.32 s, 48th at 0.96 s
    bars = speed_bars([_level("dllm", dllm, 4.0), _level("ar", ar, 1.0)])
    assert bars["wall_speedup"]["value"] == pytest.approx(0.96 / 0.3) and bars["wall_speedup"]["pass"]
    assert bars["first_text_ratio"]["value"] == pytest.approx(0.1 / 0.32) and bars["first_text_ratio"]["pass"]
    assert speed_bars([_level("ar", ar, 1.0)]) is None
    assert speed_bars([_level("dllm", dllm, 4.0), {**_level("ar", ar, 1.0), "concurrency": 8}]) is None


def test_exact_bars_count_differing_replies_and_leave_out_the_prefill() -> None:
    from voice_agent.commands.bench import exact_bars

    def level(engine, replies, tpf, decode_tpf):
        return {"engine": engine, "concurrency": 1, "tokens_per_forward": tpf, "decode_tokens_per_forward": decode_tpf,
                "replies_detail": replies}

    ours = [{"token_times": [[0.1, 4], [0.2, 8], [0.3, 12]], "token_ids": [1, 2, 3]},
            {"token_times": [[0.1, 3], [0.2, 6]], "token_ids": [4, 5]}]
    ar = [{"token_times": [[0.05 * k, k] for k in range(1, 13)], "token_ids": [1, 2, 3]},
          {"token_times": [[0.05 * k, k] for k in range(1, 7)], "token_ids": [4, 6]}]
    bars = exact_bars([level("dllm", ours, 2.4, 3.0), level("ar", ar, 1.0, 1.0)])
    assert bars["differing_replies"]["value"] == 1 and not bars["differing_replies"]["pass"]
    assert bars["decode_tokens_per_forward"]["value"] == 3.0 and bars["decode_tokens_per_forward"]["pass"]
    # 8 tokens: 0.2 s against 0.4 s; 6 tokens (the shorter reply): 0.2 s against 0.3 s.
    assert bars["first8_ratio"]["value"] == pytest.approx((0.2 / 0.4 + 0.2 / 0.3) / 2)
    # 12 tokens: 0.6 / 0.3; 6 tokens: 0.3 / 0.2.
    assert bars["wall_speedup"]["value"] == pytest.approx((0.6 / 0.3 + 0.3 / 0.2) / 2) and not bars["wall_speedup"]["pass"]


def test_tokens_per_forward_without_the_prefill_leave_out_the_token_it_made() -> None:
    """An AR reply's first token comes from its prefill's logits: without the prefill's forwards,
    nor that token, an AR engine makes exactly one token a forward."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "dlm"))
    from dlm_tiny_models import random_loaded

    from dlm.ar import AREngine
    from dlm.engine import GenerationParams
    from voice_agent.commands.bench import _measure, _summary

    loaded = random_loaded("causal", seed=3, eos=[], block_size=1)
    with AREngine(loaded, max_batch_size=2) as engine:
        records, wall = _measure(engine, [[1, 2, 3], [4, 5]], GenerationParams(max_new_tokens=7))
    assert [(r["tokens"], r["prefill_tokens"]) for r in records] == [(7, 1), (7, 1)]
    summary = _summary("ar", 1, records, wall, None)
    assert summary["decode_tokens_per_forward"] == 1.0
    assert summary["tokens_per_forward"] == 14 / sum(r["steps"] for r in records)


def test_reference_bars_compare_our_engines_with_llama_cpp() -> None:
    from voice_agent.commands.bench import REFERENCE, reference_bars

    def level(engine, tps, first, replies):
        return {"engine": engine, "concurrency": 1, "replies": len(replies), "median_tokens_per_s_per_request": tps,
                "median_first_output_s": first, "replies_detail": replies}

    ar = [{"token_times": [[0.02 * k, k] for k in range(1, 11)], "token_ids": [1, 2]},
          {"token_times": [[0.02 * k, k] for k in range(1, 11)], "token_ids": [3]}]
    ref = [{"token_times": [[0.01 * k, k] for k in range(1, 11)], "token_ids": [1, 2]},
           {"token_times": [[0.01 * k, k] for k in range(1, 11)], "token_ids": [4]}]
    dllm = [{"token_times": [[0.02, 5], [0.04, 10]], "token_ids": [1, 2]},
            {"token_times": [[0.02, 5], [0.04, 10]], "token_ids": [3]}]
    assert reference_bars([level("ar", 50.0, 0.02, ar)]) is None  # no reference, no bars
    bars = reference_bars([level("ar", 50.0, 0.02, ar), level(REFERENCE, 100.0, 0.04, ref),
                           level("dllm", 250.0, 0.02, dllm)])
    assert bars["ar_tokens_per_s_ratio"]["value"] == pytest.approx(0.5) and not bars["ar_tokens_per_s_ratio"]["pass"]
    assert bars["ar_first_output_ratio"]["value"] == pytest.approx(0.5) and bars["ar_first_output_ratio"]["pass"]
    assert bars["same_replies_as_ar"] == 1
    # llama.cpp takes 0.1 s to 10 tokens, the dLLM 0.04 s: 2.5x on both prompts.
    assert bars["dllm_wall_speedup"]["value"] == pytest.approx(2.5) and bars["dllm_wall_speedup"]["pass"]


def test_a_missing_llama_cpp_is_one_note_and_the_run_goes_on(monkeypatch, capsys) -> None:
    import argparse
    from types import SimpleNamespace

    from voice_agent.bench import reference
    from voice_agent.commands.bench import _reference

    monkeypatch.setattr(reference, "llama_cpp_missing", lambda: "llama-cpp-python is not installed (test)")
    notes: list[str] = []
    args = argparse.Namespace(reference="llama.cpp", synthetic=None)
    assert _reference(args, SimpleNamespace(path="model.gguf"), notes) is None
    assert notes == ["llama.cpp skipped: llama-cpp-python is not installed (test)"]
    assert "llama.cpp skipped" in capsys.readouterr().err
    monkeypatch.setattr(reference, "llama_cpp_missing", lambda: None)
    notes.clear()
    assert _reference(args, SimpleNamespace(path="model.safetensors"), notes) is None  # llama.cpp runs GGUF only
    assert "not a GGUF file" in notes[0]
    assert _reference(argparse.Namespace(reference=None, synthetic=None), SimpleNamespace(path="m.gguf"), notes) is None


def _bench_with_fake_llama_cpp(tmp_path, monkeypatch, walls: list) -> tuple[dict, list[tuple[str, int]], type]:
    """`bench llm --engines ar --repeats 3 --reference llama.cpp` on a tiny GGUF with a stand-in for
    llama.cpp whose rounds take `walls` in turn (an exception: that round raises it): (the JSON
    report, the sequence of measured levels (engine, requests), the stand-in's class)."""
    import json

    from voice_agent import cli
    from voice_agent.bench import reference
    from voice_agent.commands import bench

    sys.path.insert(0, str(Path(__file__).parents[1] / "dlm"))
    import tiny_checkpoints

    monkeypatch.setenv("VOICE_AGENT_CACHE_DIR", str(tmp_path / "cache"))
    gguf, _ = tiny_checkpoints.llama_gguf(tmp_path / "tiny.gguf", context=1024)
    events: list[tuple[str, int]] = []
    rounds = iter(walls)

    class FakeLlamaCpp:
        alive = 0

        def __init__(self, path, *, threads: int, n_ctx: int) -> None:
            assert Path(path) == gguf and threads >= 1 and n_ctx > 0
            FakeLlamaCpp.alive += 1
            assert FakeLlamaCpp.alive == 1, "a reference made while another is loaded"
            self.path, self.version, self.measured = Path(path), "fake", 0

        def measure(self, prompt_ids, max_new_tokens, eos_ids):
            self.measured += 1
            if self.measured == 1:  # the warm-up
                return [], 0.0
            events.append(("llama.cpp", len(prompt_ids)))
            wall = next(rounds)
            if isinstance(wall, Exception):
                raise wall
            records = [{"first_output_s": wall / 4, "token_times": [[wall / 4, 1], [wall / 2, 2]], "token_ids": [5, 6],
                        "wall_s": wall / 2, "tokens": 2, "steps": 2, "prefill_steps": 1, "prefill_tokens": 1,
                        "finish": "length", "error": None, "tokens_per_forward": 1.0, "tokens_per_s": 4 / wall,
                        "text": "ab"} for _ in prompt_ids]
            return records, wall

        def close(self) -> None:
            FakeLlamaCpp.alive -= 1

    measure = bench._measure

    def ours(engine, prompts, params):
        records, wall = measure(engine, prompts, params)
        events.append(("ours", len(prompts)))
        return records, wall

    monkeypatch.setattr(reference, "llama_cpp_missing", lambda: None)
    monkeypatch.setattr(reference, "LlamaCppReference", FakeLlamaCpp)
    monkeypatch.setattr(bench, "_measure", ours)
    out = tmp_path / "llm.json"
    assert cli.main(["bench", "--set", f"llm.model={gguf}", "llm", "--engines", "ar", "--concurrency", "1",
                     "--max-new-tokens", "2", "--repeats", "3", "--reference", "llama.cpp", "--json", str(out)]) == 0
    return json.loads(out.read_text()), events, FakeLlamaCpp


def test_llama_cpp_runs_in_our_engines_rounds_one_model_in_memory_at_a_time(tmp_path, monkeypatch, capsys) -> None:
    """`--reference` with `--repeats`: llama.cpp measured in every round beside our engine, in
    rotating order, loaded for its round and closed after it, on as many prompts as our level 1,
    its fastest round kept as ours are."""
    report, events, fake = _bench_with_fake_llama_cpp(tmp_path, monkeypatch, [0.3, 0.1, 0.2])
    ar, ref = report["results"]
    assert ar["engine"] == "ar" and ref["engine"] == "llama.cpp" and fake.alive == 0
    assert ref["repeat_walls_s"] == [0.3, 0.1, 0.2] and ref["level_wall_s"] == 0.1  # the fastest round kept
    assert len(ar["repeat_walls_s"]) == 3 and ref["replies"] == ar["replies"] == 8  # the voice prompts, one at a time
    assert report["reference"] == {"engine": "llama.cpp", "version": "fake", "model": report["model"]}  # our GGUF
    # Rounds in rotating order: [ar, llama.cpp], [ar, llama.cpp], [llama.cpp, ar]; each of our
    # levels a warm-up and one request a round, llama.cpp as many requests as our level measured.
    runs = [name for name, _ in events]
    rounds = [runs[:10], runs[10:20], runs[20:]]
    assert rounds[0] == rounds[1] == ["ours"] * 9 + ["llama.cpp"] and rounds[2] == ["llama.cpp"] + ["ours"] * 9
    assert all(n == 8 for name, n in events if name == "llama.cpp")
    printed = capsys.readouterr()
    assert "llama.cpp concurrency 1" in printed.err
    header = next(line for line in printed.out.splitlines() if line.startswith("engine"))
    rows = [line for line in printed.out.splitlines() if line.startswith(("ar ", "llama.cpp "))]
    end = header.index("conc") + len("conc")  # the table's columns line up whatever the engines' names
    assert len(rows) == 2 and all(row[end - 1] == "1" and row[end] == " " for row in rows)


@pytest.mark.parametrize("failing", ["first round", "second round"])
def test_a_failing_llama_cpp_leaves_a_note_and_our_engines_results(tmp_path, monkeypatch, capsys, failing) -> None:
    """llama.cpp raising in a round (a GGUF it cannot load, ...): closed, a note, no more of its
    rounds; the run's report keeps our engine's rounds and llama.cpp's finished ones."""
    walls = [RuntimeError("llama_decode returned -3")] if failing == "first round" else [
        0.3, RuntimeError("llama_decode returned -3")]
    report, events, fake = _bench_with_fake_llama_cpp(tmp_path, monkeypatch, walls)
    assert fake.alive == 0 and [name for name, _ in events].count("llama.cpp") == len(walls)
    assert any(n.startswith("llama.cpp failed (RuntimeError: llama_decode returned -3)") for n in report["notes"])
    ar = report["results"][0]
    assert ar["engine"] == "ar" and len(ar["repeat_walls_s"]) == 3  # every round of ours
    if failing == "first round":
        assert len(report["results"]) == 1 and report["reference"] is None and report["reference_bars"] is None
    else:
        ref = report["results"][1]
        assert ref["engine"] == "llama.cpp" and ref["repeat_walls_s"] == [0.3] and report["reference_bars"] is not None
    assert "note: llama.cpp failed" in capsys.readouterr().err


def test_forward_costs_time_a_step_a_block_a_prefill_positions_and_a_heads_pass() -> None:
    import torch

    from dlm.config import ModelConfig
    from dlm.draft_head import DraftHead, DraftHeadConfig
    from dlm.model import Transformer
    from voice_agent.commands.bench import forward_costs

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                                    max_seq_len=64)).eval()
    head = DraftHead(model.config, DraftHeadConfig(window=3, n_slots=3, vocab_size=10))
    head.vocab.copy_(torch.arange(10, 20))
    head.attach(model)
    costs = forward_costs(model, context=20, block=4, prompt=12, head=head.eval())
    assert costs["block"] == 4 and costs["prompt"] == 12
    assert all(costs[k] > 0 for k in ("step_ms", "block_step_ms", "block_bulk_ms", "prefill_ms"))
    ratio = costs["bars"]["block_step_ratio"]
    assert ratio["value"] == pytest.approx(costs["block_step_ms"] / costs["step_ms"])
    assert ratio["pass"] == (ratio["value"] <= 1.3)
    assert len(costs["verify_ms_by_positions"]) == 8 and all(t > 0 for t in costs["verify_ms_by_positions"])
    assert 1 <= costs["verify_cost"]["free"] <= 8
    assert len(costs["verify_ms_by_rows"]) == 8 and 1 <= costs["verify_row_cost"]["free"] <= 8
    # one position of one row is the step, timed once for both series
    assert costs["verify_ms_by_rows"][0] == costs["verify_ms_by_positions"][0] == pytest.approx(costs["step_ms"], abs=1e-3)
    passes = costs["head_pass"]
    assert passes["rows"] == [1, 2, 4, 8] and all(t > 0 for t in passes["ms"]) and passes["engine_share"] == 0.37
    assert forward_costs(model, context=20, block=4, prompt=12)["head_pass"] is None
    assert costs["floors"] == {"measured": False, "why": "the model does not run block products"}  # dense torch layers


def test_multiply_adds_are_the_projections_weights_of_a_position() -> None:
    """`multiply_adds`: each projection weight once a position (the layers'; the output layer's
    vocabulary x width): SmolLM2-135M's counts, and a tiny model's own weights counted."""
    from dlm.config import ModelConfig
    from dlm.model import PROJECTIONS, Transformer
    from voice_agent.commands.bench import multiply_adds

    smollm2 = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536)
    assert multiply_adds(smollm2) == (106_168_320, 28_311_552)  # 30 x (576 x 960 + 576 x 576 + 576 x 3072 + 1536 x 576)
    config = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=48, head_dim=16)
    model = Transformer(config)
    weights = dict(model.named_parameters())
    layers = sum(weights[f"model.layers.{i}.{p}.weight"].numel() for i in range(3) for p in PROJECTIONS.values())
    assert multiply_adds(config) == (layers, 64 * 32)


def test_product_floors_price_the_bars_work_at_the_measured_peak(monkeypatch) -> None:
    """The forward bars' work at this CPU's peak product rate: `block` positions with logits at
    the last (as `forward_costs` times them) and a prefill with logits at its last, from the
    model's multiply-adds and the larger of the threads' rate and one thread's times the threads;
    not measured where the model runs no block products the peak stands for."""
    from types import SimpleNamespace

    import dlm.blocks
    from dlm.blocks import AMX_SPLIT, VNNI_INT16
    from dlm.config import ModelConfig
    from voice_agent.commands.bench import multiply_adds, product_floors

    config = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536)

    def model(products):
        return SimpleNamespace(config=config, block_products=lambda: products)

    assert product_floors(model(None), block=16, prompt=150, step_ms=4.0) == {
        "measured": False, "why": "the model does not run block products"}
    assert product_floors(SimpleNamespace(config=config), block=16, prompt=150, step_ms=4.0)["measured"] is False
    assert product_floors(model(AMX_SPLIT), block=16, prompt=150, step_ms=4.0) == {
        "measured": False, "why": "the AMX tiles' products are not measured"}
    layers, output = multiply_adds(config)
    rates = {1: 3e10, 2: 5e10}  # a busy moment: two threads' run below twice one thread's
    monkeypatch.setattr(dlm.blocks, "product_peak", lambda products, threads: rates[threads])
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    floors = product_floors(model(VNNI_INT16), block=16, prompt=150, step_ms=4.0)
    assert floors["measured"] and floors["products"] == "16-bit VNNI products" and floors["threads"] == 2
    assert (floors["threads_gmac_per_s"], floors["one_thread_gmac_per_s"], floors["peak_gmac_per_s"]) == (50, 30, 60)
    assert (floors["layer_macs"], floors["output_macs"]) == (layers, output)
    assert floors["block_ms"] == pytest.approx(1e3 * (16 * layers + output) / 6e10)
    assert floors["block_steps"] == pytest.approx(floors["block_ms"] / 4.0)
    assert floors["prefill_ms"] == pytest.approx(1e3 * (150 * layers + output) / 6e10)
    rates[2] = 7e10  # a quiet one: the threads' own rate
    assert product_floors(model(0), block=4, prompt=10, step_ms=1.0)["prefill_ms"] == pytest.approx(
        1e3 * (10 * layers + output) / 7e10)
    rates[1] = rates[2] = None  # no VNNI here
    assert product_floors(model(VNNI_INT16), block=16, prompt=150, step_ms=4.0) == {
        "measured": False, "why": "this CPU cannot run the model's products"}
    monkeypatch.undo()
    if dlm.blocks.available() is not None:
        pytest.skip(f"float32 block kernel unavailable: {dlm.blocks.available()}")
    floors = product_floors(model(0), block=16, prompt=150, step_ms=4.0)  # the real peak of float32 FMAs
    assert floors["measured"] and floors["products"] == "float32 FMAs"
    assert floors["peak_gmac_per_s"] >= max(floors["threads_gmac_per_s"], floors["one_thread_gmac_per_s"]) > 0


def test_the_engines_budget_is_the_price_llm_row_cost_gives() -> None:
    from dlm.config import ModelConfig
    from dlm.model import Transformer
    from voice_agent.commands.bench import _engine_row_cost

    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                                    max_seq_len=64)).eval()
    assert _engine_row_cost(model, "auto") == {"free": 1, "each": 0.06}  # dense float32 weights (`row_cost_of`)
    assert _engine_row_cost(model, 0.5) == {"free": 1, "each": 0.5}  # what `voice-agent calibrate` wrote
    assert _engine_row_cost(model, 0) is None  # no budget


def test_verify_cost_finds_the_free_positions_and_the_price_of_each_one_more() -> None:
    from voice_agent.commands import bench
    from voice_agent.commands.bench import verify_cost

    # Session 33's EPYC on 16-bit integer products (ms): two at one's price, then about 1.15 ms each.
    fit = verify_cost([4.7e-3, 4.4e-3, 5.1e-3, 6.4e-3, 7.5e-3, 8.7e-3, 10.1e-3, 11.0e-3])
    assert fit["free"] == 2 and fit["each_ms"] == pytest.approx(1.15, abs=0.01)
    assert fit["each"] == pytest.approx(fit["each_ms"] / 4.7, abs=1e-3)
    assert verify_cost([2e-3] * 8) == {"free": 8, "each_ms": 0.0, "each": 0.0}  # memory-bound throughout
    linear = verify_cost([1e-3 * P for P in range(1, 9)])  # every position a whole forward
    assert linear["free"] == 1 and linear["each"] == pytest.approx(1.0)
    # a last reading as fast as one position (noise) frees none of the positions before it
    assert verify_cost([4.3e-3, 4.7e-3, 5.2e-3, 7.8e-3, 8.7e-3, 7.9e-3, 8.9e-3, 4.5e-3])["free"] == 1
    # The head's pass by rows (session 34: 0.60 / 0.99 / 1.88 / 3.66 ms), priced per verified position.
    passes = bench._head_pass([0.60e-3, 0.99e-3, 1.88e-3, 3.66e-3], {"each_ms": 1.17})
    assert passes["each_row_ms"] == pytest.approx(0.44, abs=0.005)
    assert passes["share_of_position"] == pytest.approx(passes["each_row_ms"] / 1.17, abs=1e-3)
    assert bench._head_pass([1e-3] * 4, {"each_ms": 0.0})["share_of_position"] is None


def test_the_environment_names_the_cpu_and_whether_its_amx_products_run(tmp_path, monkeypatch) -> None:
    from dlm.blocks import amx_available
    from voice_agent.commands import bench

    env = bench._environment("cpu")
    assert env["device_name"] == bench._cpu_model() and env["device_name"]
    assert env["amx"] == (amx_available() or "yes")  # "yes", or why not: the default's arithmetic differs
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example CPU 9000 @ 3.0GHz\nflags\t\t: fpu\n")
    real = Path

    def fake_path(p: str, *a):
        return cpuinfo if p == "/proc/cpuinfo" else real(p, *a)

    monkeypatch.setattr(bench, "Path", fake_path)
    assert bench._cpu_model() == "Example CPU 9000 @ 3.0GHz"
    cpuinfo.write_text("processor\t: 0\n")  # no model name (some ARM kernels): what platform says
    assert bench._cpu_model() == (bench.platform.processor() or bench.platform.machine())


def test_repeats_measure_each_engine_and_level_in_turn_and_keep_the_fastest(tmp_path) -> None:
    """`bench llm --repeats 2` on a small synthetic model (whose 192 positions also shorten the
    single forwards' context): every (engine, level) measured twice, its fastest kept."""
    import json

    from voice_agent.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "llm", "--synthetic", "small", "--concurrency", "1,2", "--max-new-tokens", "4",
                 "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["engine"], r["concurrency"]) for r in report["results"]] == [("dllm", 1), ("dllm", 2), ("ar", 1), ("ar", 2)]
    for r in report["results"]:
        assert len(r["repeat_walls_s"]) == 2 and r["level_wall_s"] == pytest.approx(min(r["repeat_walls_s"]), abs=1e-4)
    assert report["forward_costs"]["context"] < 160  # 192 positions: 150 for the prefill, the rest context
    with pytest.raises(SystemExit):
        main(["bench", "llm", "--synthetic", "small", "--repeats", "0"])
