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
