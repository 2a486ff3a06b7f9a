"""dlm.chat.LoopGuard: a reply that repeats itself stops at the end of its last good sentence,
whatever the engine and however the text arrives."""

from __future__ import annotations

import re

import pytest
from dlm_tiny_models import counting_loaded
from hypothesis import given
from hypothesis import strategies as st

from dlm.ar import AREngine
from dlm.chat import LoopGuard
from dlm.engine import Engine, GenerationParams


def guard(pieces: list[str]) -> tuple[str, bool]:
    g = LoopGuard()
    out, looped = "", False
    for i, piece in enumerate(pieces):
        text, looped = g.push(piece, final=i == len(pieces) - 1)
        out += text
        if looped:
            break
    return out, looped


def words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


@pytest.mark.parametrize(
    ("reply", "kept"),
    [
        # The loops: the same words again and again, or the same sentence.
        ("No, I'm not. I'm not. I'm not. I'm not.", "No, I'm not."),
        ("Sure. The shop opens at nine. The shop opens at nine.", "Sure. The shop opens at nine."),
        ("We open at five. We close at eleven. We open at five. We close at eleven.", "We open at five. We close at eleven."),
    ],
)
def test_a_loop_stops_at_the_end_of_the_last_good_sentence(reply, kept):
    for pieces in (words(reply), [reply]):
        out, looped = guard(pieces)
        assert looped and out.strip() == kept, pieces


def test_a_loop_inside_the_first_sentence_keeps_only_what_was_already_released():
    reply = "Il bacalaco, il bacalaco, il bacalaco, il bacalaco,"
    assert guard([reply]) == ("", True), "no good sentence at all"
    # Streamed word by word, the first clause was out before the second copy began.
    assert guard(words(reply)) == ("Il bacalaco, ", True)


@pytest.mark.parametrize(
    "reply",
    [
        "The capital of Spain is Madrid. It is a big city.",
        "Yes. Yes, I do.",
        "It is very very good.",
        "I think that the answer is that the shop is open.",
        "We are open today. We are closed on Mondays.",
        "Version 1. Version 1.2 is out now.",  # "1." is a sentence end only once a space follows
        'I see. I see." he said.',
    ],
)
def test_ordinary_replies_pass_whole(reply):
    for pieces in (words(reply), [reply], list(reply)):
        assert guard(pieces) == (reply, False)


def test_a_first_sentence_streams_as_it_comes():
    g = LoopGuard()
    out = [g.push(w)[0] for w in words("The weather in Paris is mild in spring, ")]
    assert "".join(out) == "The weather in Paris is mild in spring, "[: len("".join(out))]
    assert len("".join(out)) >= len("The weather in Paris is mild "), "held back more than the recurring 'in'"


@given(st.lists(st.sampled_from(["the", "shop", "opens", "at", "nine.", "no,", "i'm", "not.", "we", "close"]), max_size=30),
       st.lists(st.integers(1, 9), min_size=1, max_size=30))
def test_released_text_is_a_prefix_and_a_loop_free_reply_comes_out_whole(vocab_words, cuts):
    text = " ".join(vocab_words)
    pieces, pos = [], 0
    for n in cuts:
        pieces.append(text[pos : pos + n])
        pos += n
    pieces.append(text[pos:])
    out, looped = guard(pieces)
    assert text.startswith(out)
    if not looped:
        assert out == text
    _, whole_looped = guard([text])
    assert whole_looped == looped or not text.strip()


@given(st.lists(st.sampled_from(["the ", "shop. ", "opens ", "at", " nine.", "1.", "2 ", "no, ", "i'm ", "not. "]), max_size=30),
       st.lists(st.booleans(), max_size=30))
def test_a_push_taken_back_leaves_the_guard_as_it_was(pieces, detours):
    """`rewind` to the `mark` taken before a push undoes it (what `TextStream` does where a
    multi-token push stopped): the pushes after it release what they would have without it."""
    plain, detoured = LoopGuard(), LoopGuard()
    for i, piece in enumerate(pieces):
        final = i == len(pieces) - 1
        if not final and i < len(detours) and detours[i]:
            mark = detoured.mark()
            detoured.push(piece + piece + piece)  # other text, which may complete words, sentences or a loop
            detoured.rewind(mark)
        assert detoured.push(piece, final) == plain.push(piece, final)


class WordTokenizer:
    """id t <-> "w{t % 3} ": the counting model's consecutive ids say "w0 w1 w2 w0 w1 w2 ..."."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **kwargs: object) -> str:
        return "".join(f"w{t % 3} " for t in ids)


@pytest.mark.parametrize("engine_cls", [Engine, AREngine])
def test_every_engine_stops_a_looping_reply_with_finish_reason_repetition(engine_cls):
    loaded = counting_loaded(block_size=4, tokenizer=WordTokenizer())
    with engine_cls(loaded, max_batch_size=2) as engine:
        guarded = list(engine.submit([0], GenerationParams(max_new_tokens=40, loop_guard=True)))
        raw = list(engine.submit([0], GenerationParams(max_new_tokens=40)))
    assert guarded[-1].finish_reason == "repetition"
    assert "".join(d.text for d in guarded).strip() == "w1 w2 w0", "the first copy only"
    assert sum(len(d.token_ids) for d in guarded) < 40
    assert raw[-1].finish_reason == "length" and "".join(d.text for d in raw).count("w1 w2 w0") > 5
