"""Chat messages in, prompt token ids out; committed token ids in, final text deltas out.

Contract:
- `ChatFormatter(tokenizer, spec, system_prompt=None).encode(messages) -> list[int]` renders
  `[{"role", "content"}]` with the checkpoint's own chat template (`add_generation_prompt`), with
  `system_prompt` prepended where the messages carry no system message. Message *content* is
  tokenized with special-token parsing off: text such as "<|im_end|>" typed by a user stays
  plain text and can never become the end-of-turn, mask or any other special id. Only the
  template's own markup is parsed for special tokens. `stop_token_ids` are `spec.eos_token_ids`.
- `IncrementalDetokenizer(tokenizer).push(ids) -> str` returns the new text that is final:
  emitted text never changes later, never ends inside a UTF-8 sequence (an incomplete byte
  sequence is held back until it completes), and keeps SentencePiece / byte-level BPE spacing
  right by decoding each new token together with the tokens before it. `flush()` returns what
  is still held back (at the end of a reply). Concatenated deltas equal
  `tokenizer.decode(all_ids)` whenever that decodes to valid UTF-8.
"""

from __future__ import annotations

import secrets
from typing import Any

from dlm.config import DiffusionSpec

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatFormatter", "IncrementalDetokenizer"]

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
        """Template markup with special tokens parsed, contents with special tokens escaped.

        The template is rendered with a random placeholder per message content; the rendered text
        is split at the placeholders and each piece is tokenized with the right parsing mode.
        """
        messages = self._with_system(messages)
        nonce = secrets.token_hex(8)
        holders = [f"\x00{nonce}:{i}\x00" for i in range(len(messages))]
        placeholder_messages = [{**m, "content": h} for m, h in zip(messages, holders, strict=True)]
        text = self.tokenizer.apply_chat_template(placeholder_messages, chat_template=self.template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)
        ids: list[int] = []
        for message, holder in zip(messages, holders, strict=True):
            markup, found, text = text.partition(holder)
            if not found:  # the template dropped or rewrote a message: refuse rather than guess
                raise ValueError(f"chat template does not render the content of a {message['role']!r} message verbatim")
            ids += self._markup_ids(markup) + self._content_ids(message["content"])
        return ids + self._markup_ids(text)

    def _markup_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _content_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


class IncrementalDetokenizer:
    """Committed ids -> text deltas that are final (see the module docstring).

    Each push decodes only a window: the tokens since the last emitted boundary plus the ones
    before it (`_prefix`), so the cost per token stays constant and a SentencePiece "▁word" keeps
    its leading space (a token decoded alone would lose it).
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index are fully emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, ids: list[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new, or the last character's bytes are not all here yet
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The held-back tail (an incomplete byte sequence decodes to U+FFFD here)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        delta = after[len(before):] if len(after) > len(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
