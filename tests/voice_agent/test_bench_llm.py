"""`voice-agent bench llm`: the speed bars computed from the per-reply token timelines."""

from __future__ import annotations

import pytest

from voice_agent.commands.bench import speed_bars


def _level(engine: str, timelines: list[list[list[float]]], tokens_per_forward: float) -> dict:
    return {"engine": engine, "concurrency": 1, "tokens_per_forward": tokens_per_forward,
            "replies_detail": [{"token_times": t} for t in timelines]}


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
