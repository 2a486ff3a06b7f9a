"""SentenceChunker: abbreviations, amounts, lists, no punctuation, any split of the stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audio.text import SentenceChunker, spoken_syllables


def chunk(pieces: list[str], max_chars: int = 160) -> list[str]:
    c = SentenceChunker(max_chars)
    out = [s for p in pieces for s in c.push(p)]
    return out + c.flush()


def char_by_char(text: str, max_chars: int = 160) -> list[str]:
    return chunk(list(text), max_chars)


@pytest.mark.parametrize("split", [chunk, char_by_char])
def test_title_abbreviation_and_amount(split):
    text = "Dr. Smith paid $3.50. He left."
    pieces = [text] if split is chunk else text
    assert chunk(list(pieces)) == ["Dr. Smith paid $3.50.", "He left."]


def test_decimal_split_across_pushes_waits_for_the_next_character():
    c = SentenceChunker()
    assert c.push("It costs $3.") == []
    assert c.push("50 today. And") == ["It costs $3.50 today."]
    assert c.flush() == ["And"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Use a solvent, e.g. water. Then stir.", ["Use a solvent, e.g. water.", "Then stir."]),
        ("That is, i.e. never. Ok!", ["That is, i.e. never.", "Ok!"]),
        ("Ask Mr. and Mrs. Jones. They know.", ["Ask Mr. and Mrs. Jones.", "They know."]),
        ("Apples, pears, etc. are fruit. Bananas too.", ["Apples, pears, etc. are fruit.", "Bananas too."]),
        ("Bring pens, paper, etc. Then we start.", ["Bring pens, paper, etc.", "Then we start."]),
        ("J. K. Rowling wrote it. Really?! Yes…", ["J. K. Rowling wrote it.", "Really?!", "Yes…"]),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("Pi is about 3.14159 here. Fine.", ["Pi is about 3.14159 here.", "Fine."]),
        ("Wait... what? No.", ["Wait...", "what?", "No."]),
    ],
)
def test_sentence_boundaries(text, expected):
    assert chunk([text]) == expected
    assert char_by_char(text) == expected


def test_numbered_lists():
    text = "Here are the steps:\n1. Preheat the oven.\n2. Mix the flour.\n3. Bake it."
    expected = ["Here are the steps:", "1. Preheat the oven.", "2. Mix the flour.", "3. Bake it."]
    assert chunk([text]) == expected
    assert char_by_char(text) == expected
    assert chunk(["Steps: 1. Mix. 2. Bake. Enjoy"]) == ["Steps: 1. Mix.", "2. Bake.", "Enjoy"]


def test_no_punctuation_is_cut_at_max_chars_and_flushed():
    words = "this text has no punctuation at all and it keeps going without any end in sight"
    c = SentenceChunker(max_chars=30)
    out = c.push(words)
    assert out, "an over-long run must not wait for flush()"
    out += c.flush()
    assert all(len(s) <= 30 for s in out)
    assert " ".join(out).split() == words.split()


def test_long_sentence_is_cut_at_a_clause_boundary():
    text = "When the train arrives at the station, please take your bags and walk to the exit on the left."
    out = chunk([text], max_chars=60)
    assert out == [
        "When the train arrives at the station,",
        "please take your bags and walk to the exit on the left.",
    ]


def test_short_text_without_punctuation_comes_out_at_flush():
    c = SentenceChunker()
    assert c.push("hello there") == []
    assert c.flush() == ["hello there"]
    assert c.flush() == []


def test_max_chars_must_be_sensible():
    with pytest.raises(ValueError):
        SentenceChunker(max_chars=3)


_WORDS = st.sampled_from(
    [
        "Dr.",
        "Smith",
        "paid",
        "$3.50.",
        "e.g.",
        "1.",
        "etc.",
        "Hello,",
        "world!",
        "why?",
        "ok",
        "U.S.",
        "x",
        "\n",
        "—",
        "2)",
        "a;",
        "long" * 12,
    ]
)


@given(
    st.lists(_WORDS, max_size=60), st.lists(st.integers(1, 25), min_size=1, max_size=30), st.integers(20, 120)
)
def test_any_split_keeps_every_word_in_order_within_max_chars(words, cuts, max_chars):
    text = " ".join(words)
    pieces, pos = [], 0
    for n in cuts:
        pieces.append(text[pos : pos + n])
        pos += n
    pieces.append(text[pos:])
    out = chunk(pieces, max_chars)
    assert all(s and s == s.strip() for s in out)
    # Every character but whitespace, in order (a word longer than max_chars is cut inside).
    assert "".join("".join(out).split()) == "".join(text.split())
    assert all(len(s) <= max_chars for s in out)


# --- the early first chunk (tts.first_chunk_min_words) ------------------------------------------


def early(pieces: list[str], min_words: int = 4, max_chars: int = 1000) -> list[str]:
    c = SentenceChunker(max_chars, first_chunk_min_words=min_words)
    out = [s for p in pieces for s in c.push(p)]
    return out + c.flush()


def test_first_chunk_goes_out_at_the_first_clause_with_enough_words():
    c = SentenceChunker(first_chunk_min_words=4)
    assert c.push("Sure, the weather ") == []  # "Sure," has one word: too short
    assert c.push("looks great today, so") == ["Sure, the weather looks great today,"]
    # Later chunks are whole sentences, commas and all.
    assert c.push(" take a hat. Have fun, and bring water, ok? Bye") == ["so take a hat.", "Have fun, and bring water, ok?"]
    assert c.flush() == ["Bye"]
    # flush() ends the reply: the next one gets an early first chunk again.
    assert c.push("One two three four; five. ") == ["One two three four;", "five."]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Not clause boundaries: a thousands separator, a time, a hyphen, a range, "e.g.,".
        ("It costs 3,500 dollars, more or less. Ok.", ["It costs 3,500 dollars,", "more or less.", "Ok."]),
        ("We meet at 10:30 tomorrow: see you. Ok.", ["We meet at 10:30 tomorrow:", "see you.", "Ok."]),
        ("A well-known and loved song - really. Ok.", ["A well-known and loved song -", "really.", "Ok."]),
        ("Read pages 3 - 5 first — then rest. Ok.", ["Read pages 3 - 5 first —", "then rest.", "Ok."]),
        ("Use a solvent, e.g., water, then stir. Ok.", ["Use a solvent, e.g., water,", "then stir.", "Ok."]),
        # A short first sentence is the first chunk; the next sentence stays whole.
        ("Yes. The weather looks great, so go out. Ok.", ["Yes.", "The weather looks great, so go out.", "Ok."]),
        # The rest of a cut sentence keeps its context: "5." there is not a list number.
        ("I counted them all again, 5. Then we left.", ["I counted them all again,", "5.", "Then we left."]),
    ],
)
def test_first_chunk_boundaries(text, expected):
    assert early([text]) == expected
    assert early(list(text)) == expected


def test_zero_disables_the_early_first_chunk():
    text = "The weather looks great today, so take a hat."
    assert early([text], min_words=0) == [text]
    with pytest.raises(ValueError):
        SentenceChunker(first_chunk_min_words=-1)


_EARLY_WORDS = st.sampled_from(
    ["Dr.", "Smith", "paid", "3,500", "$3.50.", "e.g.,", "1.", "5", "etc.", "Hello,", "world!", "why?", "ok",
     "a;", "to:", "—", "-", "x", "\n", "Then", "10:30"]
)  # fmt: skip


def _split(text: str, cuts: list[int]) -> list[str]:
    pieces, pos = [], 0
    for n in cuts:
        pieces.append(text[pos : pos + n])
        pos += n
    return [*pieces, text[pos:]]


@given(st.lists(_EARLY_WORDS, max_size=50), st.lists(st.integers(1, 12), min_size=1, max_size=40), st.integers(0, 5))
def test_early_first_chunk_does_not_depend_on_the_split(words, cuts, min_words):
    text = " ".join(words)
    out = early(_split(text, cuts), min_words)
    # Any split of the stream gives the same chunks, in order.
    assert out == early([text], min_words) == early(list(text), min_words)
    assert "".join("".join(out).split()) == "".join(text.split())
    # Never a boundary inside "3,500" (joined with spaces, a cut there would read "3, 500").
    assert " ".join(out).count("3,500") == text.count("3,500")
    # Only the first chunk may end early: the rest are the whole-sentence chunks of the text,
    # the first sentence's remainder aside.
    sentences = early([text], 0)
    if out != sentences:
        assert min_words > 0
        assert out[0] + " " + out[1] == sentences[0]
        assert out[2:] == sentences[1:]
        assert len(out[0].split()) >= min_words


def early_phrase(pieces: list[str], min_words: int, max_words: int) -> list[str]:
    chunker = SentenceChunker(160, first_chunk_min_words=min_words, first_chunk_max_words=max_words)
    out = [c for piece in pieces for c in chunker.push(piece)]
    return out + chunker.flush()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The capital of Australia is Canberra.", ["The capital of Australia is Canberra."]),  # short: whole
        ("The sky is blue because of a process called Rayleigh scattering.",
         ["The sky is blue", "because of a process called Rayleigh scattering."]),
        ("A healthy breakfast is a combination of whole grains, fruits and proteins.",
         ["A healthy breakfast is a combination", "of whole grains, fruits and proteins."]),
        ("Bonjour le monde est toujours par le monde encore une fois.",
         ["Bonjour le monde est toujours par le", "monde encore une fois."]),  # no phrase start: after M words
        # A clause mark before the cut wins, even with fewer than N words before it.
        ("Of course, I'd be happy to help you today. Then more.",
         ["Of course,", "I'd be happy to help you today.", "Then more."]),
        ("Well, the weather in Paris is mild, and sunny.", ["Well, the weather in Paris is mild,", "and sunny."]),
    ],
)
def test_a_long_first_sentence_is_cut_at_a_phrase_start(text, expected):
    assert early_phrase([text], 4, 7) == expected
    assert early_phrase(list(text), 4, 7) == expected


def test_phrase_cuts_need_a_sensible_maximum():
    with pytest.raises(ValueError, match="first_chunk_max_words"):
        SentenceChunker(first_chunk_min_words=4, first_chunk_max_words=4)
    text = "The sky is blue because of a process called Rayleigh scattering."
    assert early_phrase([text], 4, 0) == [text], "0 turns it off"


@given(st.lists(_EARLY_WORDS | st.sampled_from(["of", "and", "sky", "blue", "is"]), max_size=50),
       st.lists(st.integers(1, 12), min_size=1, max_size=40), st.integers(0, 4), st.integers(1, 6))
def test_phrase_cut_first_chunk_does_not_depend_on_the_split(words, cuts, min_words, extra):
    text = " ".join(words)
    max_words = min_words + extra
    out = early_phrase(_split(text, cuts), min_words, max_words)
    assert out == early_phrase([text], min_words, max_words) == early_phrase(list(text), min_words, max_words)
    assert "".join("".join(out).split()) == "".join(text.split())
    if out:
        assert len(out[0].split()) <= max(max_words, len(early([text], min_words)[0].split()))


@pytest.mark.parametrize(
    ("word", "syllables"),
    [("moon", 1), ("healthy", 2), ("make", 1), ("little", 2), ("combination", 4), ("GPS", 3), ("I'd", 1),
     ("10", 3), ("2,150,000", 11), ("50%", 5), ("—", 0), ("...", 0), ("ok,", 1)],
)
def test_spoken_syllables(word, syllables):
    assert spoken_syllables(word) == syllables


def early_spoken(pieces: list[str], max_syllables: int, min_words: int = 4, max_words: int = 5) -> list[str]:
    chunker = SentenceChunker(160, first_chunk_min_words=min_words, first_chunk_max_words=max_words,
                              first_chunk_max_syllables=max_syllables)
    out = [c for piece in pieces for c in chunker.push(piece)]
    return out + chunker.flush()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Four written words, but the number takes ten syllables to say: cut within the bound, at
        # its last phrase start.
        ("The moon is approximately 2,150,000 miles away.", ["The moon", "is approximately 2,150,000 miles away."]),
        ("It is 2,150,000 miles away.", ["It", "is 2,150,000 miles away."]),
        ("The capital of Australia is Canberra.", ["The capital of Australia", "is Canberra."]),
        # At a clause mark, however few words stand before it.
        ("Absolutely, I can help with that.", ["Absolutely,", "I can help with that."]),
        # A heavy first word goes out alone; a dash before it is not a chunk of its own.
        ("2,150,000 people live there.", ["2,150,000", "people live there."]),
        ("- 2,150,000 people live there.", ["- 2,150,000", "people live there."]),
        # No chunk ends on a word that leans on the next one ("a", "of", "is", ...): here the word
        # bound (5 words) cut, before the syllable bound.
        ("It's a bit of a long story.", ["It's a bit", "of a long story."]),
        ("A healthy breakfast is a combination of whole grains.", ["A healthy breakfast", "is a combination of whole grains."]),
        # Light words: the word bound decides, as without the syllable bound.
        ("The sky is blue because of a process called Rayleigh scattering.",
         ["The sky is blue", "because of a process called Rayleigh scattering."]),
        # A short sentence that takes too long to say is split too, at the end of the reply as well.
        ("It is approximately 2,150,000.", ["It", "is approximately 2,150,000."]),
        ("What's the capital of Australia? Canberra.", ["What's the capital", "of Australia?", "Canberra."]),
        # ... and one that does not stays whole.
        ("I'm here to help.", ["I'm here to help."]),
    ],
)
def test_a_first_sentence_that_takes_long_to_say_is_cut_early(text, expected):
    assert early_spoken([text], 8) == expected
    assert early_spoken(list(text), 8) == expected


def test_the_syllable_bound_alone_and_off():
    text = "The moon is approximately 2,150,000 miles away."
    assert early_spoken([text], 0) == ["The moon is approximately 2,150,000", "miles away."], "0: the word bound only"
    assert early_spoken([text], 8, max_words=0) == ["The moon", "is approximately 2,150,000 miles away."], "alone"
    with pytest.raises(ValueError, match="first_chunk_max_syllables"):
        SentenceChunker(first_chunk_max_syllables=-1)


@given(st.lists(_EARLY_WORDS | st.sampled_from(["of", "and", "sky", "approximately", "2,150,000", "is"]), max_size=50),
       st.lists(st.integers(1, 12), min_size=1, max_size=40), st.integers(0, 4), st.integers(0, 6), st.integers(1, 12))
def test_syllable_bound_first_chunk_does_not_depend_on_the_split(words, cuts, min_words, extra, max_syllables):
    text = " ".join(words)
    max_words = min_words + extra if extra else 0
    out = early_spoken(_split(text, cuts), max_syllables, min_words, max_words)
    assert out == early_spoken([text], max_syllables, min_words, max_words)
    assert out == early_spoken(list(text), max_syllables, min_words, max_words)
    assert "".join("".join(out).split()) == "".join(text.split())
    # Where the bound cut, the first chunk is within it, or one word said that alone is not.
    if out != early_spoken([text], 0, min_words, max_words):
        said = [w for w in out[0].split() if spoken_syllables(w)]
        assert len(said) == 1 or sum(map(spoken_syllables, said)) <= max_syllables
