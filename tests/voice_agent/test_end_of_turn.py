"""End-of-turn verdicts: the rule, the text score on the real embedded chat LM, the services' wiring."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "dlm"))

from voice_agent.config import Config
from voice_agent.end_of_turn import TextTurnScorer, TurnVerdict, decide
from voice_agent.services import ModelServices


@pytest.mark.parametrize(
    ("audio_p", "text_p", "over"),
    [
        (0.9, None, True),
        (0.4, None, False),
        (None, 0.05, True),
        (None, 0.01, False),
        (0.9, 0.05, True),
        (0.6, 0.01, False),  # a doubtful "over" from the sound, a clear "goes on" from the words
        (0.2, 0.05, False),  # a doubtful "over" from the words, a clear "goes on" from the sound
        (0.99, 0.01, True),  # garbled words (a low text score) from a voice that clearly finished
        (0.3, 0.5, True),  # a clearly finished request in a doubtful voice
        (0.5, 0.03, True),  # both at their thresholds: neutral evidence is enough
        (0.9, 0.0, False),  # nothing heard: the sound alone does not end it
        (0.9999, 0.0, False),  # ... however sure it is
        (0.999, 1e-7, True),  # words garbled into a sure fragment cannot outvote a voice sure it finished
        (0.95, 1e-7, False),  # ... nor one less sure: their say is bounded, not silenced
        (None, None, False),  # nothing judged: never over
    ],
)
def test_one_score_must_reach_its_threshold_and_two_multiply_their_odds(audio_p, text_p, over):
    assert decide(audio_p, text_p, 0.5, 0.03) is over


def test_the_rule_with_both_scores_is_monotone_in_each():
    grid = np.linspace(0.0, 1.0, 21)
    for text_p in (0.0, 0.001, 0.01, 0.03, 0.1, 0.9):
        verdicts = [decide(a, text_p, 0.5, 0.03) for a in grid]
        assert verdicts == sorted(verdicts)  # once over, a higher audio P stays over
    for audio_p in grid:
        verdicts = [decide(audio_p, t, 0.5, 0.03) for t in grid]
        assert verdicts == sorted(verdicts)


def test_transcripts_are_normalized_before_scoring():
    from voice_agent.transcription import normalize_transcript

    assert normalize_transcript("  What's the TIME, please?! ") == "what's the time please"
    assert normalize_transcript("...") == ""


@pytest.fixture(scope="module")
def scorer():
    from voice_agent.end_of_turn import load_text_scorer
    from voice_agent.errors import UserError

    try:
        return load_text_scorer("smollm2-135m-instruct")
    except UserError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_the_chat_lm_scores_finished_requests_above_fragments(scorer):
    pairs = [
        ("What time do you close tonight?", "What time do you"),
        ("I would like to book a table for two.", "I would like to book a table for"),
        ("Can you tell me the weather in Boston?", "Can you tell me the weather in"),
    ]
    for whole, fragment in pairs:
        p_whole, p_fragment = scorer.probability(whole), scorer.probability(fragment)
        assert p_whole >= 0.03 > p_fragment, (whole, p_whole, fragment, p_fragment)
    assert scorer.probability("") == 0.0
    assert scorer.probability("What time do you close tonight") == scorer.probability("what time do you close tonight?")


@pytest.mark.slow
def test_the_score_on_the_llms_weights_is_the_score_of_a_model_of_its_own(scorer):
    """The default LLM (the grounded adapter, unmerged on the GGUF's blocks) lends the scorer its
    weights without the adapter where they are what the scorer would load: the same scores, bit
    for bit; the adapted model's own would differ. Elsewhere (AMX: a bf16 scorer) it loads its own."""
    import torch

    from voice_agent.end_of_turn import load_text_scorer
    from voice_agent.llm import load_local_llm

    llm, _ = load_local_llm("default", device="cpu", dtype="auto", kv_cache="auto")
    shared = load_text_scorer("smollm2-135m-instruct", share=llm)
    texts = ["What time do you close tonight?", "I would like to book a table for", "hello", "ok so um"]
    if llm.weights != "blocks-int16" or scorer._model.model.embed_tokens.weight.dtype != torch.float32:
        assert shared._model.model is not llm.model.model  # not the blocks the scorer loads here: its own
        return
    assert shared._model.model is llm.model.model and shared._model is not llm.model
    assert [shared.probability(t) for t in texts] == [scorer.probability(t) for t in texts]
    adapted = TextTurnScorer(llm, cache_dtype=torch.float32)
    assert [adapted.probability(t) for t in texts] != [scorer.probability(t) for t in texts]
    grounded = load_text_scorer("smollm2-135m-grounded", share=llm)  # an adapter of its own: not the base
    assert grounded._model.model is not llm.model.model


def test_a_model_without_a_chat_template_is_refused():
    from dlm_tiny_models import CharTokenizer, counting_loaded

    with pytest.raises(ValueError, match="chat template"):
        TextTurnScorer(counting_loaded(block_size=4, tokenizer=CharTokenizer()))


class _Scores:
    def __init__(self, p: float) -> None:
        self.p = p
        self.seen: list = []

    def probability(self, x) -> float:
        self.seen.append(x)
        return self.p


def _services(detector: str, audio_p: float | None, text_p: float | None) -> tuple[ModelServices, _Scores | None, _Scores | None]:
    config = Config()
    config.turn.detector = detector
    smart = _Scores(audio_p) if audio_p is not None else None
    text = _Scores(text_p) if text_p is not None else None
    services = ModelServices(config, transcriber=None, synthesizer=None, llm=None, turn_model=smart, text_scorer=text)
    return services, smart, text


def test_services_judge_with_the_loaded_models_only():
    async def verdict(services):
        asked = []

        async def transcript():
            asked.append(1)
            return "what time do you close"

        v = await services.end_of_turn(np.zeros(1600, np.float32), transcript)
        return v, len(asked)

    services, smart, _ = _services("smart-turn", 0.8, None)
    assert asyncio.run(verdict(services)) == (TurnVerdict(True, 0.8, None), 0), "no transcript needed"
    assert len(smart.seen) == 1 and smart.seen[0].size == 1600
    services, _, text = _services("text", None, 0.01)
    assert asyncio.run(verdict(services)) == (TurnVerdict(False, None, 0.01), 1)
    assert text.seen == ["what time do you close"]
    services, _, _ = _services("smart-turn+text", 0.8, 0.2)
    assert asyncio.run(verdict(services)) == (TurnVerdict(True, 0.8, 0.2), 1)
    services, _, _ = _services("smart-turn+text", 0.1, 0.05)
    assert asyncio.run(verdict(services))[0].over is False
    assert services.judges_turns and services.end_silence_ms == Config().turn.max_silence_ms
    # The call's endpointer reports pauses of turn.check_silence_ms; the speculative start's does not.
    assert services.make_endpointer()._check_frames == Config().turn.check_silence_ms // 20
    assert services.make_endpointer(250)._check_frames == 0
    silent, _, _ = _services("silence", None, None)
    assert not silent.judges_turns and silent.end_silence_ms == Config().vad.end_silence_ms
    assert silent.make_endpointer()._check_frames == 0
    with pytest.raises(RuntimeError, match="no end-of-turn model"):
        asyncio.run(verdict(silent))


@pytest.mark.slow
def test_the_cached_prefix_gives_the_scores_of_a_whole_forward(scorer):
    import torch

    # On integer block products (a CPU without AMX) the cached forward's rounding of its inputs
    # may differ from the whole forward's by a unit here and there: within a few thousandths.
    rel = 1e-3 if scorer._model._block_layers is None else 5e-3
    for text in ("what time do you close tonight", "i would like to book a table for"):
        ids = scorer._tokenizer(scorer._prefix + text, add_special_tokens=False)["input_ids"]
        n = len(ids)
        with torch.inference_mode():
            logits = scorer._model(torch.tensor([ids]), torch.arange(n)[None], torch.ones(n, n, dtype=torch.bool).tril()[None, None])
        whole = float(torch.softmax(logits[0, -1].float(), -1)[scorer._end_ids].sum())
        assert scorer.probability(text) == pytest.approx(whole, rel=rel, abs=1e-7)
    # A transcript longer than the cache holds keeps its newest words.
    assert 0.0 <= scorer.probability("and then " * 200 + "that is all") <= 1.0


def test_an_unsure_transcript_gets_the_shorter_silence_and_the_settings_are_checked():
    from types import SimpleNamespace

    from audio.asr import Transcript
    from voice_agent.config import ConfigError, TurnConfig

    def unsure_ms(text, **turn):
        return ModelServices.unsure_silence_ms(SimpleNamespace(config=SimpleNamespace(turn=TurnConfig(**turn))), text)

    assert unsure_ms(Transcript("book a tab", -1.3)) == TurnConfig().unsure_silence_ms == 1000
    assert unsure_ms(Transcript("book a table for", -0.6)) == 0
    assert unsure_ms("no confidence attached") == 0 and unsure_ms(Transcript("", None)) == 0
    assert unsure_ms(Transcript("book a tab", -1.3), unsure_silence_ms=0) == 0  # off
    assert unsure_ms(Transcript("book a tab", -1.3), unsure_logprob=-1.5) == 0
    for bad in ({"unsure_silence_ms": 1500}, {"unsure_silence_ms": 50}, {"unsure_logprob": 0.5}):
        with pytest.raises(ConfigError, match="unsure"):
            TurnConfig(**bad)


@pytest.mark.slow
def test_the_scorer_runs_16_bit_integer_products_where_amx_is_missing(scorer):
    """Where AMX is missing and AVX512-VNNI runs, the score's short prefills run the GGUF's blocks
    with 16-bit inputs (2.3x faster than dense bf16 there, float32's scores within 0.001); on AMX
    (and anywhere else) dense bfloat16."""
    import torch

    import dlm.blocks

    int16 = dlm.blocks.amx_available() is not None and dlm.blocks.vnni_available() is None
    model = scorer._model
    assert (model._block_layers is not None) == int16
    assert model.model.embed_tokens.weight.dtype == (torch.float32 if int16 else torch.bfloat16)


def test_a_scorer_that_fails_to_load_leaves_no_llm_engine_running(monkeypatch):
    """ModelServices.load builds the LLM before the text scorer (which may share its weights): where
    the scorer then fails, the LLM is closed before the error goes on, not left decoding nothing."""
    from voice_agent import services as services_module
    from voice_agent.errors import UserError

    class _Llm:
        closed = False

        def close(self) -> None:
            self.closed = True

    llm = _Llm()
    monkeypatch.setattr(services_module, "build_llm", lambda *_a, **_k: llm)
    config = Config()
    config.turn.detector = "text"
    config.turn.text_model = "/nonexistent/turn-model.gguf"
    with pytest.raises(UserError, match="nonexistent"):
        ModelServices.load(config)
    assert llm.closed


def test_install_converts_what_serve_will_read(monkeypatch):
    """voice_agent.services.gguf_conversions (install.sh's list): the LLM and the text scorer on the
    block formats read the GGUF's small conversion; a dense reader (llm.weights = "dense", the
    scorer's bf16 where the integer products do not run) its float32 one; nothing where no local
    model reads it."""
    import dlm.blocks
    from voice_agent.models import resolve_llm_model
    from voice_agent.services import gguf_conversions

    gguf = resolve_llm_model("default").path
    assert resolve_llm_model(Config().turn.text_model).path == gguf
    llm_dense = dlm.blocks.available() is not None
    scorer_dense = not (dlm.blocks.amx_available() is not None and dlm.blocks.vnni_available() is None)
    config = Config()
    config.turn.detector = "smart-turn+text"
    assert gguf_conversions(config) == {gguf: {llm_dense, scorer_dense}}
    config.llm.weights = "dense"
    assert gguf_conversions(config) == {gguf: {True, scorer_dense}}
    config.turn.detector = "smart-turn"
    assert gguf_conversions(config) == {gguf: {True}}
    config.llm.backend = "openai"
    assert gguf_conversions(config) == {}
    monkeypatch.setenv("VOICE_AGENT_VNNI", "0")  # no integer products: the scorer loads dense bf16
    config = Config()
    config.turn.detector = "text"
    assert gguf_conversions(config) == {gguf: {llm_dense, True}}
