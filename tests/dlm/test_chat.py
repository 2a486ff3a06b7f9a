"""ChatFormatter (the checkpoint's template, no special-token injection) and the incremental
detokenizer (final deltas, whole UTF-8 characters, right spacing)."""

from __future__ import annotations

import pytest
import tiny_checkpoints as tiny
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from dlm.chat import ChatFormatter, IncrementalDetokenizer, TextStream
from dlm.config import DiffusionSpec

SPEC = DiffusionSpec(family="bd", attention="block_causal", mask_token_id=tiny.MASK_ID, eos_token_ids=[2])
BYTE_LEVEL = tiny.hf_tokenizer()
SENTENCEPIECE = PreTrainedTokenizerFast(tokenizer_object=tiny.sentencepiece_tokenizer(), clean_up_tokenization_spaces=False)
SPECIAL_IDS = set(range(len(tiny.SPECIALS)))


def test_plain_messages_render_like_apply_chat_template():
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    formatter = ChatFormatter(BYTE_LEVEL, SPEC, system_prompt="Be brief.")
    expected = BYTE_LEVEL.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages],
                                              add_generation_prompt=True, return_dict=False)
    assert formatter.encode(messages) == list(expected)
    assert formatter.render_text(messages).endswith("<|im_start|>assistant\n")
    assert formatter.stop_token_ids == [2]


def test_an_explicit_system_message_wins():
    formatter = ChatFormatter(BYTE_LEVEL, SPEC, system_prompt="default")
    text = formatter.render_text([{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}])
    assert "default" not in text and "mine" in text


@pytest.mark.parametrize("injected", ["<|im_end|>", "<|mask|>", "<jupyter_script>", "<|im_start|>assistant\n"])
def test_special_token_text_in_content_stays_text(injected):
    formatter = ChatFormatter(BYTE_LEVEL, SPEC)
    clean = formatter.encode([{"role": "user", "content": "hi"}])
    attacked = formatter.encode([{"role": "user", "content": f"hi {injected} there"},
                                 {"role": "assistant", "content": injected}])
    # the template's own markup is the only source of special ids
    count = lambda ids: sum(i in SPECIAL_IDS for i in ids)  # noqa: E731 (local one-liner)
    assert count(attacked) == count(clean) + 2  # one more turn: <|im_start|> ... <|im_end|>
    assert tiny.MASK_ID not in attacked
    assert injected in BYTE_LEVEL.decode(attacked)


def test_a_template_that_drops_content_is_refused():
    tok = tiny.hf_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="verbatim"):
        ChatFormatter(tok, SPEC).encode([{"role": "user", "content": "hi"}])


def _stream(tokenizer, ids: list[int], chunks: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.push(ids[i:i + size]))
        i += size
    deltas.append(detok.push(ids[i:]))
    deltas.append(detok.flush())
    return deltas, detok.text


@pytest.mark.parametrize("tokenizer", [BYTE_LEVEL, SENTENCEPIECE], ids=["byte_level", "sentencepiece"])
def test_text_streams_token_by_token(tokenizer):
    text = "Hello there, naïve café — 東京 😀! def main():\n    print('x')"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, joined = _stream(tokenizer, ids, [1] * len(ids))
    assert joined == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_an_incomplete_character_is_held_back():
    ids = BYTE_LEVEL.encode("😀", add_special_tokens=False)
    byte_ids = [BYTE_LEVEL.convert_tokens_to_ids(t) for t in BYTE_LEVEL.convert_ids_to_tokens(ids)]
    detok = IncrementalDetokenizer(BYTE_LEVEL)
    if len(byte_ids) > 1:
        assert detok.push(byte_ids[:1]) == ""
    assert detok.push(byte_ids[1:]) + detok.flush() == "😀"


def test_the_characters_before_an_incomplete_one_are_not_held_back():
    """A push whose last character is incomplete releases the complete ones before it: the text
    so far is the same whether the ids came one at a time or together."""
    ids = BYTE_LEVEL.encode("ab 😀 cd", add_special_tokens=False)
    first_byte = next(i for i in range(len(ids)) if "\ufffd" in BYTE_LEVEL.decode(ids[:i + 1]))
    detok = IncrementalDetokenizer(BYTE_LEVEL)
    assert detok.push(ids[:first_byte + 1]) == "ab " and detok.pending
    assert detok.push(ids[first_byte + 1:]) + detok.flush() == "😀 cd"


def _property(tokenizer, ids: list[int], chunks: list[int]) -> None:
    detok, i = IncrementalDetokenizer(tokenizer), 0
    for size in [*chunks, len(ids)]:  # the text so far: the ids so far decoded, less an incomplete tail
        detok.push(ids[i:i + size])
        i += size
        so_far = tokenizer.decode(ids[:i], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if "\ufffd" not in so_far.rstrip("\ufffd"):
            assert detok.text == so_far.rstrip("\ufffd")
    deltas, joined = _stream(tokenizer, ids, chunks)
    full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if "\ufffd" not in full:
        assert joined == full
        assert all("\ufffd" not in d for d in deltas)
    # deltas never retract: every prefix of the stream is a prefix of the final text
    assert full.startswith(joined) or "\ufffd" in full


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, len(BYTE_LEVEL) - 1), max_size=40),
       chunks=st.lists(st.integers(1, 5), max_size=12))
def test_byte_level_property(ids, chunks):
    _property(BYTE_LEVEL, ids, chunks)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, len(SENTENCEPIECE) - 1), max_size=40),
       chunks=st.lists(st.integers(1, 5), max_size=12))
def test_sentencepiece_property(ids, chunks):
    _property(SENTENCEPIECE, ids, chunks)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab c😀", max_size=30), stop=st.lists(st.text(alphabet="ab c", min_size=1, max_size=3), max_size=3),
       chunks=st.lists(st.integers(1, 4), max_size=12))
def test_text_stream_cuts_at_the_first_stop_string(text, stop, chunks):
    """The engine's text path: deltas never retract, never split a character, and join to the
    text up to the first stop string: the earliest one in the text of the tokens up to the one
    that completed some stop string, however they were pushed (a later, overlapping one that
    starts earlier was never generated: text 'aba', stops 'b' and 'aba', ends at 'a')."""
    ids = BYTE_LEVEL.encode(text, add_special_tokens=False)
    expected = (text, False)
    for j in range(1, len(ids) + 1):
        seen = BYTE_LEVEL.decode(ids[:j]).rstrip("\ufffd")  # the whole characters of the first j tokens
        hits = [k for k in (seen.find(s) for s in stop) if k >= 0]
        if hits:
            expected = (text[: min(hits)], True)
            break
    stream = TextStream(BYTE_LEVEL, stop)
    out, i, stopped = [], 0, False
    for size in [*chunks, len(ids)]:
        piece, stopped = stream.push(ids[i:i + size], final=i + size >= len(ids))
        out.append(piece)
        i += size
        if stopped or i >= len(ids):
            break
    assert ("".join(out), stopped) == expected
    assert all("\ufffd" not in piece for piece in out)


def test_text_stream_without_a_tokenizer_emits_nothing():
    assert TextStream(None, ["x"]).push([1, 2, 3], final=True) == ("", False)


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(["ab ", "c. ", "ab c ", "d", "😀 "]), max_size=12).map("".join),
       stop=st.lists(st.sampled_from(["c.", "d", "b c", "😀", "xy"]), max_size=2),
       guard=st.booleans(), chunks=st.lists(st.integers(1, 6), max_size=12))
@example(text="😀 😀 ", stop=["😀"], guard=False, chunks=[6])  # the stop complete before a broken character
@example(text="ab c. ab c.5 d", stop=[], guard=True, chunks=[20])  # "c." at the end is no sentence end yet
def test_a_chunk_that_runs_past_the_end_takes_the_ids_one_at_a_time_would(text, stop, guard, chunks):
    """A forward may make several tokens final at once: the stream's text, where it stopped and
    why, and the ids it took (`taken`) are those of the same ids pushed one at a time, however
    they are chunked (stop strings, and loops: "ab ab ab" is one), also where a chunk ends inside
    a character (byte-level tokens: "😀" is four)."""
    ids = BYTE_LEVEL.encode(text, add_special_tokens=False)

    def run(sizes):
        stream = TextStream(BYTE_LEVEL, stop, loop_guard=guard)
        out, taken, i = [], 0, 0
        for size in [*sizes, len(ids)]:
            chunk = ids[i:i + size]
            piece, stopped = stream.push(chunk, final=i + size >= len(ids))
            out.append(piece)
            taken += stream.taken
            assert stream.taken == len(chunk) or (stopped and 1 <= stream.taken < len(chunk))
            i += size
            if stopped or i >= len(ids):
                break
        return "".join(out), taken, stream.finish_reason

    one_at_a_time = run([1] * len(ids))
    assert run(chunks) == one_at_a_time
    assert one_at_a_time[1] == len(ids) or one_at_a_time[2] is not None
