"""Cut streamed LLM text into sentences for speech synthesis.

Contract:
- `SentenceChunker(max_chars=160)`: `.push(text) -> list[str]` returns the sentences completed by
  this piece of text; `.flush() -> list[str]` returns what is left at the end of the reply and
  empties the chunker. Sentences are stripped and never empty; joined with spaces they hold every
  word of the input, in order (only whitespace between sentences is dropped).
- A sentence ends at `.`, `!`, `?` or `…` (optionally followed by closing quotes or brackets) when
  whitespace follows, and at a line break. Not an end: a known abbreviation ("Dr.", "Mr.", "e.g.",
  "etc." before a lower-case word), a single-letter initial ("J. K."), a number that begins a
  line or follows a list ("1. "), a decimal or an amount ("$3.50": no whitespace follows).
  Because the character after a full stop decides, a piece of text that ends right after one is
  held until the next push (or flush).
- A sentence longer than `max_chars` is cut at the last clause boundary (`,` `;` `:` or a dash)
  before the limit, else at the last space, else at the limit; so text with no punctuation at all
  still comes out in pieces of at most `max_chars` characters.
- `SentenceChunker(max_chars, first_chunk_min_words=N)` with N > 0 lets the FIRST chunk out early,
  for time to first audio: at the first clause boundary that has at least N words before it, if
  that comes before the first sentence end. Later chunks are whole sentences (better prosody).
  A clause mark counts only when whitespace follows it ("3,500", "10:30" and "well-known" are
  never cut), not right after an abbreviation ("e.g.,"), and a dash between numbers ("3 - 5") is
  not one. 0 (the default) disables it. `flush()` re-arms it for the next reply.
- `first_chunk_max_words=M` (> first_chunk_min_words, 0 = off): a first sentence that runs past
  M words with no clause mark after N words is cut anyway, as soon as its word M+1 starts: after
  its last clause mark, however few words stand before it ("Of course," | "I'd be happy to help
  you today."), else before the first function word ("and", "to", "of", "is", ...
  `PHRASE_STARTS`) among words N+1..M+1 (a phrase boundary), else after word M. Shorter first sentences stay whole. Decided from the first M+1
  words only, so the cut does not depend on how the stream was split either.
- `first_chunk_max_syllables=S` (0 = off) bounds the first chunk by how long it takes to say,
  not how many words it has written: piper's time to the first audio grows with the chunk's
  spoken length, and "2,150,000" is one written word but ten spoken syllables
  (`spoken_syllables` estimates 11). Once the first k+1 words hold more than S syllables
  (decided as soon as word k+1 is whole: whitespace follows it, or the reply ends), the first
  sentence is cut within its first k words, also where word k+1 ends the sentence or a clause
  ("What's the capital" | "of Australia?"), at the last natural boundary there: after the last
  clause mark, however few words stand before it ("Absolutely," | "I can help with that."),
  else before the last phrase start ("The capital" | "of Australia is Canberra."), else after
  word k. Whichever of the two bounds comes first decides.
- Either bound's cut never leaves a word that leans on the next one at the chunk's end (an
  article or possessive, `DETERMINERS`, or a phrase start: "A healthy breakfast" | "is a
  combination of ...", not "A healthy breakfast is a"), and keeps at least one word with
  something to say (not a lone dash).
- `first_chunk_min_words = 0` turns the early first chunk off altogether, both bounds with it.
- The chunks do not depend on how the stream is split into pushes (for sentences shorter than
  `max_chars`; over-long runs are cut as soon as they exceed the limit).
Pure text processing: no audio, no I/O.
"""

from __future__ import annotations

import re

__all__ = ["ABBREVIATIONS", "DETERMINERS", "PHRASE_STARTS", "SentenceChunker", "spoken_syllables"]

# Lower-case, without the final dot. Titles and Latin abbreviations never end a sentence;
# "etc", "inc" and similar end one only when a capitalized word follows; "U.S." never does
# here (merging two sentences costs nothing audible, a pause inside a name does).
ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "no", "nos", "vol",
        "fig", "figs", "approx", "dept", "gen", "gov", "lt", "col", "sgt", "capt", "rev",
        "e.g", "i.e", "cf", "al", "a.m", "p.m", "u.s", "u.k", "jan", "feb", "mar", "apr", "jun",
        "jul", "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "wed", "thu", "fri", "sat",
        "sun", "ave", "blvd", "rd", "hwy", "tel",
    }
)  # fmt: skip
# Words that start a phrase: a first chunk cut before one of them still sounds like a phrase.
PHRASE_STARTS = frozenset(
    {
        "and", "but", "or", "so", "because", "since", "to", "for", "in", "on", "at", "with", "of",
        "from", "about", "into", "that", "which", "who", "where", "when", "while", "if", "than",
        "is", "are", "was", "were", "will", "can", "by", "as", "like",
    }
)  # fmt: skip
# Articles and possessives: with the phrase starts, words that lean on the next one, which an
# early first chunk never ends on.
DETERMINERS = frozenset(
    {
        "a", "an", "the", "my", "your", "his", "her", "its", "our", "their", "this", "these", "those",
        "some", "any", "every", "each", "no",
    }
)  # fmt: skip
_LEANING = DETERMINERS | PHRASE_STARTS
_MAYBE_FINAL_ABBREVIATIONS = frozenset({"etc", "inc", "ltd", "co", "corp", "min", "max", "est"})

# Terminal punctuation, closing quotes/brackets, then whitespace (or the end of the buffer).
_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
_CLAUSE = re.compile(r"[,;:](?=\s)|\s[–—-]\s")
_WORD_BEFORE = re.compile(r"(?:^|\s)[(\"'“‘]*([\w.$]+)$")
# A list number: alone at the start of a line (or of what is left after the last sentence), or
# right after a colon ("Steps: 1. Mix").
_LIST_NUMBER = re.compile(r"(?:^|:)\s*\d{1,3}$")
_VOWELS = re.compile(r"[aeiouy]+")
_SILENT_E = re.compile(r"[^aeiouyl]e$")
_TRAILING = ".,;:!?\"')]”’…"  # what may follow a word ("GPS's," is "GPS's")
# Symbols a voice reads as words ("50%": "fifty percent").
_SPOKEN_SYMBOLS = {"%": 2, "$": 2, "€": 2, "£": 2, "&": 1, "+": 1, "=": 2, "@": 1, "°": 2}


def spoken_syllables(word: str) -> int:
    """About how many syllables a voice says for one written word: vowel groups (a final silent
    "e" not counted), each letter of an all-capital abbreviation ("GPS"), one and a half per
    digit ("2,150,000": 11, said "two million one hundred fifty thousand": 10), and symbols
    read as words; at least 1 for a word with anything to say, 0 for bare punctuation."""
    digits = sum(ch.isdigit() for ch in word)
    letters = "".join(ch for ch in word if ch.isalpha())
    count = (3 * digits + 1) // 2 + sum(_SPOKEN_SYMBOLS.get(ch, 0) for ch in word)
    if letters:
        initials = letters[:-1] if re.search(r"[A-Z]'?s$", word.rstrip(_TRAILING)) else letters
        if 2 <= len(initials) <= 5 and initials.isupper():
            count += len(initials)  # "GPS", "APIs", "URL's"
        else:
            lower = letters.lower()
            groups = len(_VOWELS.findall(lower))
            if groups > 1 and _SILENT_E.search(lower):
                groups -= 1
            count += max(groups, 1)
    return count


class SentenceChunker:
    """Streamed text in, whole sentences out (see the module docstring)."""

    def __init__(
        self,
        max_chars: int = 160,
        *,
        first_chunk_min_words: int = 0,
        first_chunk_max_words: int = 0,
        first_chunk_max_syllables: int = 0,
    ) -> None:
        if max_chars < 8:
            raise ValueError(f"max_chars must be >= 8, got {max_chars}")
        if first_chunk_min_words < 0:
            raise ValueError(f"first_chunk_min_words must be >= 0, got {first_chunk_min_words}")
        if first_chunk_max_words and first_chunk_max_words <= first_chunk_min_words:
            raise ValueError(f"first_chunk_max_words ({first_chunk_max_words}) must be 0 or above first_chunk_min_words "
                             f"({first_chunk_min_words})")
        if first_chunk_max_syllables < 0:
            raise ValueError(f"first_chunk_max_syllables must be >= 0, got {first_chunk_max_syllables}")
        self.max_chars = int(max_chars)
        self.first_chunk_max_syllables = int(first_chunk_max_syllables)
        self.first_chunk_min_words = int(first_chunk_min_words)
        self.first_chunk_max_words = int(first_chunk_max_words)
        self._buffer = ""
        self._first_pending = self.first_chunk_min_words > 0  # no chunk out yet, early cut allowed
        self._context = ""  # the early first chunk, while the rest of its sentence is in the buffer

    def push(self, text: str) -> list[str]:
        """Add text; return the sentences it completes."""
        self._buffer += text
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """Return everything still held (the end of the reply) and empty the chunker."""
        out = self._drain(final=True)
        rest = self._buffer.strip()
        self._buffer = ""
        if rest:
            out.extend(self._split_long(rest))
        self._first_pending = self.first_chunk_min_words > 0
        self._context = ""
        return out

    # --- internals -----------------------------------------------------------------------------

    def _drain(self, *, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            cut = self._find_end(final=final)
            early = False
            if self._first_pending:
                clause = self._first_clause_end(final=final)
                phrase = self._first_phrase_cut(final=final)
                # The phrase cut wins over a clause mark or sentence end found no earlier than it
                # was decided (as a word-by-word stream would have seen it): a short first
                # sentence that takes too long to say is split too.
                if phrase is not None and all(x is None or x >= phrase[1] for x in (clause, cut)):
                    clause = phrase[0]
                if clause is not None and (cut is None or clause < cut):
                    cut, early = clause, True
            if cut is None:
                break
            head, self._buffer = self._buffer[:cut], self._buffer[cut:]
            # The rest of a sentence cut early is judged with its start in view ("I had 5. Then").
            self._context = head if early else ""
            sentence = head.strip()
            if sentence:
                out.extend(self._split_long(sentence))
                self._first_pending = False
        # No end in sight: cut an over-long run at a clause boundary now rather than wait.
        while len(self._buffer.strip()) > self.max_chars:
            stripped = self._buffer.lstrip()
            cut = self._clause_cut(stripped)
            out.append(stripped[:cut].strip())
            self._buffer = stripped[cut:]
            self._first_pending = False
            self._context = ""
        return out

    def _first_clause_end(self, *, final: bool) -> int | None:
        """Index just past the first clause boundary with enough words before it, or None
        (also when a dash at the end of the buffer waits for the next character)."""
        buf = self._buffer
        for m in _CLAUSE.finditer(buf):
            head = buf[: m.start()]
            words = sum(1 for w in head.split() if any(ch.isalnum() for ch in w))
            if words < self.first_chunk_min_words:
                continue
            counts = self._is_clause(buf, m, final=final)
            if counts is None:
                return None  # the next character decides
            if counts:
                return m.end()
        return None

    @staticmethod
    def _is_clause(buf: str, m: re.Match[str], *, final: bool) -> bool | None:
        """Whether the clause mark `m` ends a clause; None when the next character decides."""
        head = buf[: m.start()]
        if buf[m.start()] in ",;:":
            w = _WORD_BEFORE.search(head)
            # "e.g., water": the phrase goes on
            return not (w is not None and w.group(1).lower().rstrip(".") in ABBREVIATIONS and w.group(1).endswith("."))
        if head[-1:].isdigit():  # a dash after a number: a range ("3 - 5") is not a clause
            if m.end() == len(buf):
                return True if final else None
            return not buf[m.end()].isdigit()
        return True

    def _first_phrase_cut(self, *, final: bool) -> tuple[int, int] | None:
        """(where a long first sentence is cut, the index at which that was decided: the start
        of word M+1, or the end of the whole word that went over the syllable bound), or None
        before then (see the module docstring)."""
        m, budget = self.first_chunk_max_words, self.first_chunk_max_syllables
        if not m and not budget:
            return None
        buf = self._buffer
        words: list[re.Match[str]] = []
        spoken = None  # the first word with something to say
        latest = decided = None  # the cut comes before word `latest` (0-based) at the latest
        by_syllables = False
        syllables = 0
        for word in re.finditer(r"\S+", buf):
            words.append(word)
            j = len(words) - 1
            if m and j == m:  # word M+1 has started
                latest, decided = m, word.start()
                break
            if word.end() == len(buf) and not final:
                break  # not whole yet: the next character may go on with it
            said = spoken_syllables(word.group())
            if spoken is None and said > 0:
                spoken = j
            syllables += said
            if budget and syllables > budget:  # word j said something, so spoken <= j
                latest, decided, by_syllables = max(j, spoken + 1), word.end(), True
                break
        if latest is None or spoken is None or spoken + 1 > latest:
            return None  # nothing said yet that a cut could keep
        lowest = spoken + 1  # a cut before this word would leave nothing said

        def at(k: int) -> int:  # the buffer index of a cut before word k
            return words[k].start() if k < len(words) else words[k - 1].end()

        def bare(k: int) -> str:
            return words[k].group().lower().strip("\"'“‘(")

        cut = None
        for mark in _CLAUSE.finditer(buf, words[spoken].start(), at(latest)):
            if self._is_clause(buf, mark, final=False):  # the last clause mark with a word said before it
                cut = mark.end()
        if cut is not None:
            return cut, decided
        known = range(lowest, min(latest, len(words) - 1) + 1)
        if by_syllables:  # the last run of function words within the bound
            phrase = [k for k in known if bare(k) in PHRASE_STARTS and bare(k - 1) not in PHRASE_STARTS]
            c = phrase[-1] if phrase else latest
        else:  # the first phrase start after N words
            phrase = [k for k in known if k >= self.first_chunk_min_words and bare(k) in PHRASE_STARTS]
            c = phrase[0] if phrase else latest
        # Never end on a word that leans on the next one ("is a" | "combination"), or on a dash.
        while c - 1 >= lowest and (bare(c - 1) in _LEANING or not spoken_syllables(words[c - 1].group())):
            c -= 1
        return at(c), decided

    def _find_end(self, *, final: bool) -> int | None:
        """Index just past the first sentence end in the buffer, or None."""
        buf = self._buffer
        newline = buf.find("\n")
        for m in _END.finditer(buf):
            if newline != -1 and newline < m.start():
                break
            if m.end() == len(buf) and not final:
                return None  # the next character decides (e.g. "$3." then "50")
            decision = self._is_end(buf, m)
            if decision is None:  # "etc. ": the next word decides; at the end of the text it ends
                return m.end() if final else None
            if decision:
                return m.end()
        if newline != -1:
            return newline + 1
        return None

    def _is_end(self, buf: str, m: re.Match[str]) -> bool | None:
        """Whether the match ends a sentence; None when it depends on text not here yet."""
        if buf[m.start()] != ".":
            return True  # ! ? … always end a sentence
        if m.end() - m.start() > 1:
            return True  # "..." or ".)" or '."'
        before = self._context + buf[: m.start()]
        if _LIST_NUMBER.search(before[before.rfind("\n") + 1 :]):
            return False  # "1. Preheat the oven"
        w = _WORD_BEFORE.search(before)
        if w is None:
            return True
        word = w.group(1).lower()
        if len(word) == 1 and word.isalpha():
            return False  # an initial: "J. K. Rowling"
        if word in ABBREVIATIONS or word in _MAYBE_FINAL_ABBREVIATIONS:
            following = buf[m.end() :].lstrip()
            if not following:
                return None if word in _MAYBE_FINAL_ABBREVIATIONS else False
            # "etc. Then" ends a sentence; "Dr. Smith" and "etc. and" do not.
            return word in _MAYBE_FINAL_ABBREVIATIONS and following[0].isupper()
        return True

    def _split_long(self, sentence: str) -> list[str]:
        out = []
        while len(sentence) > self.max_chars:
            cut = self._clause_cut(sentence)
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            out.append(sentence)
        return out

    def _clause_cut(self, text: str) -> int:
        """Where to cut `text` (longer than max_chars): after a clause mark, a space, or at the limit."""
        window = text[: self.max_chars + 1]
        clauses = [m.end() for m in _CLAUSE.finditer(window) if m.end() <= self.max_chars]
        if clauses and clauses[-1] > self.max_chars // 4:
            return clauses[-1]
        space = window.rfind(" ")
        if space > 0:
            return space + 1
        return self.max_chars
