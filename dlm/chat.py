r"""Chat messages in, prompt token ids out; committed token ids in, final text deltas out.

Contract:
- `ChatFormatter(tokenizer, spec, system_prompt=None).encode(messages) -> list[int]` renders
  `[{"role", "content"}]` with the checkpoint's own chat template (`add_generation_prompt`), with
  `system_prompt` prepended where the messages carry no system message. Message *content* is
  tokenized with special-token parsing off: text such as "<|im_end|>" typed by a user stays
  plain text and can never become the end-of-turn, mask or any other special id. Only the
  template's own markup is parsed for special tokens. `stop_token_ids` are `spec.eos_token_ids`.
  `encode_many(conversations)` is the same over many conversations at once (data sets).
  `encode_open(messages)` renders the last message left open: its content so far without the
  markup that ends it, for a model to go on writing that turn (a user's request, for data);
  `content_ids(text)` is a content's own ids within them; `encode_many_open` is the same over
  many conversations (the markup rendered once per role sequence).
- `IncrementalDetokenizer(tokenizer).push(ids) -> str` returns the new text that is final:
  emitted text never changes later, never ends inside a UTF-8 sequence (an incomplete byte
  sequence is held back until it completes; the complete characters before it are not), and
  keeps SentencePiece / byte-level BPE spacing right by decoding each new token together with the
  tokens before it. The text so far is the ids so far decoded less an incomplete tail, however
  the ids came in pushes. `flush()` returns what is still held back (at the end of a reply).
  Concatenated deltas equal `tokenizer.decode(all_ids)` whenever that decodes to valid UTF-8.
- `TextStream(tokenizer, stop=()).push(ids, final=False) -> (text, stopped)`: the engine's one
  path from committed ids to reply text. An `IncrementalDetokenizer` plus stop strings: the text
  ends just before the first occurrence of any stop string, and a tail that could still grow
  into one is held back until it cannot (or the reply ends). Same guarantees: emitted text never
  changes and never contains a broken character. With no tokenizer it emits no text.
  `TextStream(..., loop_guard=True)` also runs the text through a `LoopGuard`; `.finish_reason`
  says why a stopped stream stopped ("stop" or "repetition"). Where it stops, and its text, do
  not depend on how the ids were split into pushes: they are those of pushing them one at a time
  (a forward that makes several tokens final ends the reply where a one-token-a-step engine does,
  whatever came after in the same forward; with stops "b" and "aba", "aba" ends at "a").
  `.taken`: how many of the last push's ids the text took (all, or up to the one that stopped it).
- `LoopGuard().push(text, final=False) -> (text to release, looped)`: a reply that starts
  repeating itself stops at the end of its last good sentence. A loop is a run of words said
  again right after itself (a unit of 1-3 words three times in a row, "il bacalaco, il bacalaco,
  il bacalaco", or of 4-12 words twice) or a sentence of two words or more that says an earlier
  sentence again (case and punctuation aside). The text is cut at the last sentence end before
  the loop's second copy, never before text already released. To make that possible the guard
  holds back text while it could still become a loop: the longest run of last words that says
  again words said before (up to 24), and the sentence in progress while its words so far are the
  start of an earlier sentence. A word at the very end of the text so far is judged only once
  something follows it (a token may be half a word), and so is a sentence end there ("1." may
  go on as "1.2"). A reply that does not repeat itself streams
  as it comes, a word or two later at most where a word recurs. Words are `[\w']+` runs,
  lower-cased.
"""

from __future__ import annotations

import bisect
import re
import secrets
from typing import Any

from dlm.config import DiffusionSpec

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatFormatter", "IncrementalDetokenizer", "LoopGuard", "TextStream"]

_WORD = re.compile(r"[\w']+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
# (unit length in words, copies in a row that make a loop)
_LOOP_UNITS = tuple((k, 3 if k <= 3 else 2) for k in range(1, 13))
_MAX_HOLD_WORDS = 24

# ChatML, for a tokenizer that ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatFormatter:
    def __init__(self, tokenizer: Any, spec: DiffusionSpec, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.system_prompt = system_prompt
        self.template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.spec.eos_token_ids)

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is None or any(m["role"] == "system" for m in messages):
            return list(messages)
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt as text (for logs); `encode` is what the model sees."""
        return self.tokenizer.apply_chat_template(self._with_system(messages), chat_template=self.template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Template markup with special tokens parsed, contents with special tokens escaped."""
        return self.encode_many([messages], add_generation_prompt)[0]

    def encode_many(self, conversations: list[list[dict[str, str]]], add_generation_prompt: bool = True, *,
                    open_last: bool = False) -> list[list[int]]:
        """`encode` over many conversations, for data sets of tens of thousands of prompts.

        The template is rendered with a random placeholder per message content; the rendered text
        is split at the placeholders and each piece is tokenized with the right parsing mode. The
        markup pieces depend only on the sequence of roles, so they are rendered and tokenized once
        per sequence; all contents are tokenized in one batched call.
        """
        conversations = [self._with_system(messages) for messages in conversations]
        shells: dict[tuple[str, ...], list[list[int]]] = {}
        for messages in conversations:
            roles = tuple(m["role"] for m in messages)
            if roles not in shells:
                shells[roles] = self._markup_pieces(roles, add_generation_prompt)
        contents = iter(self._contents_ids([m["content"] for messages in conversations for m in messages]))
        out = []
        for messages in conversations:
            pieces = shells[tuple(m["role"] for m in messages)]
            ids: list[int] = []
            for markup in pieces[:-1]:
                ids += markup + next(contents)
            out.append(ids if open_last else ids + pieces[-1])  # open_last: the markup ending it left out
        return out

    def encode_open(self, messages: list[dict[str, str]]) -> list[int]:
        """`encode` without the markup after the last message's content (and no generation
        prompt): the model's next token continues that message."""
        return self.encode_many_open([messages])[0]

    def encode_many_open(self, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        """`encode_open` over many conversations (`encode_many`'s markup cache and batched contents)."""
        return self.encode_many(conversations, add_generation_prompt=False, open_last=True)

    def content_ids(self, text: str) -> list[int]:
        """A message content's ids as `encode` writes them (special-token parsing off)."""
        return self._contents_ids([text])[0]

    def _markup_pieces(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[list[int]]:
        """The template's markup around the contents of messages with these roles: one more piece
        than messages (the last one follows the last content)."""
        nonce = secrets.token_hex(8)
        holders = [f"\x00{nonce}:{i}\x00" for i in range(len(roles))]
        placeholder_messages = [{"role": r, "content": h} for r, h in zip(roles, holders, strict=True)]
        text = self.tokenizer.apply_chat_template(placeholder_messages, chat_template=self.template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)
        pieces: list[list[int]] = []
        for role, holder in zip(roles, holders, strict=True):
            markup, found, text = text.partition(holder)
            if not found:  # the template dropped or rewrote a message: refuse rather than guess
                raise ValueError(f"chat template does not render the content of a {role!r} message verbatim")
            pieces.append(self._markup_ids(markup))
        return [*pieces, self._markup_ids(text)]

    def _markup_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _contents_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids with special-token parsing off, in one batched tokenizer call."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [list(ids) for ids in encoded]


class IncrementalDetokenizer:
    """Committed ids -> text deltas that are final (see the module docstring).

    Each push decodes only a window: the tokens since the last emitted boundary plus the ones
    before it (`_prefix`), so the cost per token stays constant and a SentencePiece "▁word" keeps
    its leading space (a token decoded alone would lose it). While the window's last character is
    incomplete, the complete characters before it are released (`_shown` of them past the
    emitted ids' text), so the text so far is the ids so far decoded, less an incomplete tail,
    however the ids were split into pushes.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index are fully emitted
        self._shown = 0  # characters emitted of the ids from _read on (complete ones before an incomplete one)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, ids: list[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        start = len(before) + self._shown
        if after.endswith("\ufffd"):  # the last character's bytes are not all here yet: what precedes it
            delta = after[start:len(after.rstrip("\ufffd"))]
            self._shown += len(delta)
        elif len(after) <= start:
            return ""  # nothing new (ids that decode to nothing)
        else:
            delta = after[start:]
            self._prefix, self._read, self._shown = self._read, len(self.ids), 0
        self.text += delta
        return delta

    @property
    def pending(self) -> bool:
        """Whether ids pushed are not all in the text yet: a character's bytes still incomplete,
        or ids that decode to nothing (special ids)."""
        return self._read < len(self.ids)

    def mark(self) -> tuple[int, int, int, int, int]:
        """The state to `rewind` to (what a push changes)."""
        return len(self.ids), len(self.text), self._prefix, self._read, self._shown

    def rewind(self, mark: tuple[int, int, int, int, int]) -> None:
        n, t, self._prefix, self._read, self._shown = mark
        del self.ids[n:]
        self.text = self.text[:t]

    def flush(self) -> str:
        """The held-back tail (an incomplete byte sequence decodes to U+FFFD here)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        delta = after[len(before) + self._shown:]
        self._prefix = self._read = len(self.ids)
        self._shown = 0
        self.text += delta
        return delta


class LoopGuard:
    """Text in as it is decoded, text out until the reply starts repeating itself (see the module
    docstring). Incremental: each push reads only the text that is new since the words and
    sentence ends already judged, and its checks look back through indexes (each word's places, a
    trie of the sentences said), so a push late in a long reply costs about what an early one does
    (what grows is the list of the last word's earlier places). Pushes end at the `final` one."""

    def __init__(self) -> None:
        self.text = ""  # everything pushed
        self.released = 0  # characters of `text` handed out
        self.looped = False
        self._clear()

    def _clear(self) -> None:
        """No word or sentence end judged yet (the indexes of `_scan`)."""
        self._words: list[str] = []  # the words judged so far, lower-cased
        self._starts: list[int] = []  # where each starts in `text`
        self._places: dict[str, list[int]] = {}  # word -> its indexes in `_words`
        self._ends: list[int] = []  # sentence ends judged so far (character index after each)
        self._words_read = 0  # `text` before this is read for words (the end of the last one judged)
        self._ends_read = 0  # ... for sentence ends (the last one judged)
        self._sentence_from = 0  # index in `_words` of the sentence in progress's first word
        self._said: set[tuple[str, ...]] = set()  # the complete sentences so far
        self._trie: dict[str, dict] = {}  # the same, a word a level (sentences in progress that start one)
        self._node: dict[str, dict] | None = self._trie  # where the sentence in progress's words lead in it
        self._walked = 0  # ... its words walked so far (from `_sentence_from`)
        self._examined = 0  # words whose runs ending there were checked for a loop

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        if self.looped:
            return "", True
        self.text += text
        partial, repeats = self._scan(final)
        loop = self._loop_start(repeats)
        if loop is not None:
            self.looped = True
            cut = max(self.released, max((e for e in self._ends if e <= loop), default=0))
            return self._release(cut), True
        return self._release(len(self.text) if final else min(partial, self._hold_from())), False

    def _scan(self, final: bool) -> tuple[int, list[int]]:
        """Judge the words and sentence ends the new text completes -> (where the text still open
        to change starts: a word at the very end, which may still grow ("I" before "'m"), else
        len(text); the starts of the sentences completed now that say an earlier one again). A
        sentence end at the very end may be none ("1." before "2"): each is judged once something
        follows, or at the `final` push."""
        partial = len(self.text)
        for m in _WORD.finditer(self.text, self._words_read):
            if m.end() == len(self.text) and not final:
                partial = m.start()
                break
            word = m.group().lower()
            self._places.setdefault(word, []).append(len(self._words))
            self._words.append(word)
            self._starts.append(m.start())
            self._words_read = m.end()
        repeats = []
        for m in _SENTENCE_END.finditer(self.text, self._ends_read):
            if m.end() > partial or (m.end() == len(self.text) and not final):
                break
            self._ends.append(m.end())
            self._ends_read = m.end()
            stop = bisect.bisect_left(self._starts, m.end(), lo=self._sentence_from)  # its words: those before it
            if stop > self._sentence_from:  # a sentence of no words (".. !") is none
                sentence = tuple(self._words[self._sentence_from:stop])
                if len(sentence) >= 2 and sentence in self._said:
                    repeats.append(self._starts[self._sentence_from])
                self._said.add(sentence)
                node = self._trie
                for word in sentence:
                    node = node.setdefault(word, {})
                self._sentence_from = stop
                self._node, self._walked = self._trie, 0
        return partial, repeats

    def mark(self) -> tuple[int, int, bool, int]:
        """The state to `rewind` to (what a push changes)."""
        return len(self.text), self.released, self.looped, self._examined

    def rewind(self, mark: tuple[int, int, bool, int]) -> None:
        """Back to `mark` (the indexes made again from its text: once, where a stream stops)."""
        n, released, looped, examined = mark
        self.text = self.text[:n]
        self._clear()
        self._scan(final=False)  # marks are taken between pushes, and only the last push is final
        self.released, self.looped, self._examined = released, looped, examined

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out, self.released = self.text[self.released : upto], upto
        return out

    def _loop_start(self, repeats: list[int]) -> int | None:
        """Character index of the second copy of a loop that the new words complete (`repeats`:
        the sentences just completed that say an earlier one again), or None."""
        words, starts = self._words, self._starts
        first: int | None = None
        for e in range(self._examined, len(words)):  # a run of copies ending at word e
            for k, copies in _LOOP_UNITS:
                span = k * copies
                if span <= e + 1 and all(words[e - t] == words[e - t - k] for t in range(span - k)):
                    at = starts[e - span + 1 + k]
                    first = at if first is None else min(first, at)
            if first is not None:
                break
        self._examined = len(words)
        if repeats:
            first = repeats[0] if first is None else min(first, repeats[0])
        return first

    def _hold_from(self) -> int:
        """Where the text that could still become a loop starts (len(text): nothing to hold): the
        longest run of last words that says again words said before, or the sentence in progress
        while its words so far are the start of an earlier sentence."""
        words, starts, n = self._words, self._starts, len(self._words)
        hold = len(self.text)
        if n >= 2:
            # Earlier positions e whose words up to e equal the last m words, for m = 1, 2, ...
            matches = self._places[words[-1]][:-1]
            m = 0
            while matches and m < _MAX_HOLD_WORDS:
                m += 1
                hold = starts[n - m]
                matches = [e for e in matches if e - m >= 0 and words[e - m] == words[n - 1 - m]]
        if self._sentence_from < n:  # a sentence in progress: walk its new words down the trie
            while self._node is not None and self._sentence_from + self._walked < n:
                self._node = self._node.get(words[self._sentence_from + self._walked])
                self._walked += 1
            if self._node is not None:
                hold = min(hold, starts[self._sentence_from])
        return hold


class TextStream:
    """Committed ids -> final reply text, cut at the first stop string (see the module docstring).

    Invariant: `_held` is the longest tail of the text so far that is a proper prefix of some stop
    string. Text already released therefore never contains the start of a stop occurrence, so a
    stop string, once complete, lies entirely in `_held` + the new delta: only that is searched.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = (), loop_guard: bool = False) -> None:
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = [s for s in stop if s]
        self._held = ""  # decoded, not yet released: it may be the start of a stop string
        self._guard = LoopGuard() if loop_guard else None
        self.stopped = False
        self.finish_reason: str | None = None  # "stop" or "repetition" once stopped
        self.taken = 0  # of the last push's ids, those the text took (all unless it stopped)

    def push(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """New committed ids -> (text to emit now, the text has ended: a stop string or a loop).
        `final`: the reply ends here, release everything (up to a stop string or a loop)."""
        if self._detok is None or self.stopped:
            self.taken = 0 if self.stopped else len(ids)
            return "", self.stopped
        if len(ids) < 2:
            self.taken = len(ids)
            return self._push(ids, final)
        mark = (self._detok.mark(), self._held, None if self._guard is None else self._guard.mark())
        text, stopped = self._push(ids, final)
        self.taken = len(ids)
        if not stopped:  # the text so far is what one id at a time would have made (`IncrementalDetokenizer`)
            return text, False
        # Which id stopped it: the same ids again, one at a time (see the docstring).
        self._detok.rewind(mark[0])
        self._held, self.stopped, self.finish_reason = mark[1], False, None
        if self._guard is not None:
            self._guard.rewind(mark[2])
        pieces = []
        for i, tid in enumerate(ids):
            piece, stopped = self._push([tid], final and i == len(ids) - 1)
            pieces.append(piece)
            if stopped:
                self.taken = i + 1
                break
        return "".join(pieces), stopped

    def _push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        text, stopped = self._stop_strings(self._held + self._detok.push(ids) + (self._detok.flush() if final else ""), final)
        if stopped:
            self.stopped, self.finish_reason = True, "stop"
        if self._guard is not None:
            text, looped = self._guard.push(text, final=final or stopped)
            if looped:
                self.stopped, self.finish_reason = True, "repetition"
        return text, self.stopped

    def _stop_strings(self, text: str, final: bool) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = 0 if final else max((self._prefix_tail(text, s) for s in self.stop), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    @staticmethod
    def _prefix_tail(text: str, stop: str) -> int:
        """Length of the longest tail of text that is a proper prefix of stop."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
