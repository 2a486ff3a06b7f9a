"""LocalDLM over the REAL dlm engine with a tiny block-diffusion model: text deltas, the
denoising trace (`voice_agent.denoise_step`), aborts. No fakes between LocalDLM and the engine."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

# The dlm tests' tiny models (tests/ is not a package; each folder is its own import root).
sys.path.insert(0, str(Path(__file__).parents[1] / "dlm"))

from dlm_tiny_models import CharTokenizer, counting_loaded

from dlm.engine import Engine, GenerationParams
from voice_agent.llm import MASK, LocalDLM


def stream(prompt: list[int], *, trace_steps: bool, max_new_tokens: int = 6, block_size: int = 4) -> list:
    """The deltas of one request. The counting model writes prompt[-1] + 1, + 2, ... one
    confident slot per denoising step; CharTokenizer spells id t as chr(97 + t)."""
    loaded = counting_loaded(block_size=block_size, tokenizer=CharTokenizer())

    async def main():
        with Engine(loaded, max_batch_size=1) as engine:
            llm = LocalDLM(engine, lambda trace: GenerationParams(max_new_tokens=max_new_tokens, trace_steps=trace), tokenizer=CharTokenizer())
            return [d async for d in llm.stream(prompt, trace_steps=trace_steps)]  # token ids are a prompt too

    return asyncio.run(main())


def test_trace_is_the_block_after_each_step_with_masked_slots_marked():
    deltas = stream([0], trace_steps=True)
    assert "".join(d.text for d in deltas) == "bcdefg"
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert [tuple(d.trace) for d in deltas] == [
        # Blocks are aligned to absolute positions: the first one starts with the prompt's "a".
        (1, 0, ["a", "b", MASK, MASK]),
        (2, 0, ["a", "b", "c", MASK]),
        (3, 0, ["a", "b", "c", "d"]),
        (4, 4, ["e", MASK, MASK, MASK]),
        (5, 4, ["e", "f", MASK, MASK]),
        (6, 4, ["e", "f", "g", MASK]),  # max_new_tokens reached: that slot is never decoded
    ]
    assert [(d.steps, d.tokens) for d in deltas] == [(i, i) for i in range(1, 7)]
    # Every committed slot of a trace is text already streamed (or the prompt): traces never
    # show a token that the reply later contradicts.
    text = "a" + "".join(d.text for d in deltas)
    for _step, _block_start, slots in (d.trace for d in deltas):
        committed = [s for s in slots if s != MASK]
        assert "".join(committed) in text


def test_no_trace_unless_asked():
    deltas = stream([3], trace_steps=False)
    assert "".join(d.text for d in deltas) == "efghij"
    assert all(d.trace is None for d in deltas)


def test_closing_the_stream_aborts_the_request_in_the_engine():
    loaded = counting_loaded(block_size=4, tokenizer=CharTokenizer())

    async def main():
        with Engine(loaded, max_batch_size=1) as engine:
            long = LocalDLM(engine, lambda trace: GenerationParams(max_new_tokens=200), tokenizer=CharTokenizer())
            received = ""
            agen = long.stream([0])
            async for delta in agen:
                received += delta.text
                if len(received) >= 3:
                    break
            await agen.aclose()  # aborts: the engine stops within one step
            # The engine's only row is free again at once: a short request runs to its end.
            short = LocalDLM(engine, lambda trace: GenerationParams(max_new_tokens=3), tokenizer=CharTokenizer())
            second = await asyncio.wait_for(_collect(short, [1]), 10)
            return received, second

    received, second = asyncio.run(main())
    assert received == "bcd"
    assert "".join(d.text for d in second) == "cde" and second[-1].finish_reason == "length"


async def _collect(llm: LocalDLM, prompt: list[int]) -> list:
    return [d async for d in llm.stream(prompt)]


# --- llm.engine: "auto" or "ar" on the same weights --------------------------------------------


def build_on_tiny_model(monkeypatch, engine: str, *, attention: str = "block_causal"):
    """build_llm over a tiny counting model in place of a checkpoint on disk."""
    import dlm.checkpoints
    import voice_agent.models
    from voice_agent.config import LlmConfig
    from voice_agent.llm import build_llm
    from voice_agent.models import ResolvedLlm

    loaded = counting_loaded(attention=attention, block_size=4, tokenizer=CharTokenizer())
    monkeypatch.setattr(voice_agent.models, "resolve_llm_model", lambda name: ResolvedLlm(Path("<memory>"), name))
    monkeypatch.setattr(dlm.checkpoints, "load_model", lambda path, **kw: loaded)
    return build_llm(LlmConfig(model="tiny", engine=engine, max_new_tokens=6, max_batch_size=1, steps_per_block=4))


def reply(llm, prompt: list[int]) -> list:
    async def main():
        try:
            return [d async for d in llm.stream(prompt)]
        finally:
            await llm.aclose()

    return asyncio.run(main())


def test_engine_auto_decodes_a_diffusion_checkpoint_by_diffusion(monkeypatch):
    llm = build_on_tiny_model(monkeypatch, "auto")
    assert type(llm._engine) is Engine and llm.name == "local:tiny"
    deltas = reply(llm, [0])
    assert "".join(d.text for d in deltas) == "bcdefg"
    assert deltas[-1].steps == 6  # one confident slot per denoising step, no carry


def test_engine_ar_forces_the_ar_baseline_on_the_same_weights(monkeypatch):
    from dlm.ar import AREngine

    llm = build_on_tiny_model(monkeypatch, "ar")
    assert type(llm._engine) is AREngine and llm.name == "local:tiny+ar"
    deltas = reply(llm, [0])
    assert "".join(d.text for d in deltas) == "bcdefg"  # the counting model counts causally too


def test_engine_auto_uses_ar_for_a_causal_checkpoint(monkeypatch):
    from dlm.ar import AREngine

    llm = build_on_tiny_model(monkeypatch, "auto", attention="causal")
    assert type(llm._engine) is AREngine and llm.name == "local:tiny"
    asyncio.run(llm.aclose())


def test_a_draft_length_past_the_drafters_places_is_one_clear_error(monkeypatch):
    import pytest

    import dlm.checkpoints
    import voice_agent.models
    from dlm.draft_head import DraftHead, DraftHeadConfig
    from voice_agent.config import LlmConfig
    from voice_agent.errors import UserError
    from voice_agent.llm import build_llm
    from voice_agent.models import ResolvedLlm

    loaded = counting_loaded(attention="causal", block_size=1, tokenizer=CharTokenizer())
    loaded.drafter = DraftHead(loaded.config, DraftHeadConfig(window=2, n_slots=3, vocab_size=4))
    loaded.drafter.attach(loaded.model)
    monkeypatch.setattr(voice_agent.models, "resolve_llm_model", lambda name: ResolvedLlm(Path("<memory>"), name))
    monkeypatch.setattr(dlm.checkpoints, "load_model", lambda path, **kw: loaded)
    with pytest.raises(UserError, match=r"draft settings for 'tiny'.*draft_len 5 must lie in \[1, 3\]"):
        build_llm(LlmConfig(model="tiny", draft_len=5, max_batch_size=1))


def test_unknown_engine_names_the_key():
    import pytest

    from voice_agent.config import ConfigError, LlmConfig, load_config
    from voice_agent.errors import UserError
    from voice_agent.llm import build_llm

    with pytest.raises(ConfigError, match=r"llm\.engine must be one of 'auto', 'ar', 'speculative', not 'dllm'"):
        load_config(overrides=["llm.engine=dllm"])
    config = LlmConfig()
    config.engine = "fast"  # set after construction: build_llm checks it before loading anything
    with pytest.raises(UserError, match=r"llm\.engine"):
        build_llm(config)


def test_int4_weights_on_a_model_that_cannot_have_them_is_one_clear_error(tmp_path):
    import pytest

    from voice_agent.errors import UserError
    from voice_agent.llm import load_local_llm

    with pytest.raises(UserError, match=r"llm\.weights = 'int4'.*bfloat16"):
        load_local_llm("smollm2-135m-instruct", device="cpu", dtype="float32", weights="int4")
    with pytest.raises(UserError, match=r"llm\.weights must be"):
        load_local_llm("smollm2-135m-instruct", device="cpu", dtype="auto", weights="int3")


def test_a_float16_kv_cache_where_asked_or_where_the_products_round_and_one_clear_error_elsewhere():
    import pytest
    import torch

    import dlm.blocks
    from voice_agent.errors import UserError
    from voice_agent.llm import load_local_llm

    with pytest.raises(UserError, match=r"llm\.weights = 'dense' and llm\.kv_cache = 'float16'.*fused block forward"):
        load_local_llm("smollm2-135m-instruct", device="cpu", dtype="float32", weights="dense", kv_cache="float16")
    with pytest.raises(UserError, match=r"llm\.kv_cache must be"):
        load_local_llm("smollm2-135m-instruct", device="cpu", dtype="auto", kv_cache="bf16")
    if dlm.blocks.available() is None:  # the blocks formats run here: their caches are float16 where asked
        loaded, _ = load_local_llm("smollm2-135m-instruct", device="cpu", dtype="float32", weights="blocks",
                                   kv_cache="float16")
        assert loaded.model.new_cache(1, 8).k.dtype == torch.float16
        # "auto": float32 products keep a float32 cache, rounded ones (16-bit inputs) a float16 one
        loaded, _ = load_local_llm("smollm2-135m-instruct", device="cpu", dtype="float32", weights="blocks",
                                   kv_cache="auto")
        assert loaded.model.new_cache(1, 8).k.dtype == torch.float32
    if dlm.blocks.vnni_available() is None:
        loaded, _ = load_local_llm("smollm2-135m-instruct", device="cpu", dtype="float32", weights="blocks-int16",
                                   kv_cache="auto")
        assert loaded.model.new_cache(1, 8).k.dtype == torch.float16
