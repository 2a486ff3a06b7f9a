"""Function calling with the local model: which function a request needs, and a grammar that
makes the call the model writes valid JSON for that function's schema.

Contract:
- `parse_tools(tools, param)` / `parse_tool_choice(choice, functions, param)`: a client's function
  tools (the Realtime form `{"type": "function", "name", "description", "parameters"}` or the Chat
  Completions form with a nested `function`) as function specs `{"name", "description",
  "parameters"}`, and its tool choice as "auto" | "none" | "required" | `{"name": ...}`; a bad
  declaration raises `ToolSpecError` naming the parameter (at most `MAX_TOOLS` functions of
  `MAX_TOOLS_JSON_CHARS` characters; names of 1-64 letters, digits, "_" and "-", none twice).
  `chat_tool(spec)` / `chat_tool_choice(choice)` write them as Chat Completions has them.
- `plain_messages(messages)`: Chat Completions messages (assistant `tool_calls`, `tool`
  results) as the plain role/content messages a local chat template takes: a call is written
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's text, a result
  is a user message `<tool_response>{"name": ..., "content": ...}</tool_response>`.
- `ToolRouter(model, tokenizer).choose(request, functions, allow_none)`: the function the
  caller's request needs, or None (answer in words). A generative classifier: the model's
  log-likelihood of the request's words after "A phone caller whose request is: <the function's
  description>", for every function and for `NO_FUNCTION` (small chat models rarely decide to
  call a function by themselves: SmolLM2-135M never did on our eval, docs/models.md), in one
  batched forward in the caller's thread (the weights are shared with the engine and never
  written). Scores the newest `MAX_REQUEST_TOKENS` tokens of the request.
- `call_messages(messages, function)`: `plain_messages`, with the function to call and how to
  write the call in the system prompt.
- `call_grammar(function, tokenizer)`: the llguidance grammar (`dlm.constraints.Grammar`, cached
  per function and tokenizer) of exactly one call of `function`: `<tool_call>`, a compact JSON
  object `{"name": <its name>, "arguments": <its parameters schema>}` (an object schema silent on
  `additionalProperties` takes no other properties, as OpenAI's strict mode has it), then
  `</tool_call>` and the end of the reply. A schema llguidance cannot compile constrains the
  arguments to any JSON object, with a warning in the log.
- `parse_call(text)`: the call of a reply decoded under `call_grammar`; the grammar decided the
  form, so only a reply cut short (its token limit) fails to parse: ValueError.
- This is a grammar mask on an AR model (the default model; draft-and-verify masks its
  verifier); a block-diffusion engine refuses constrained requests.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

from voice_agent.llm import ToolCall

__all__ = ["CALL_CLOSE", "CALL_OPEN", "NO_FUNCTION", "ToolRouter", "ToolSpecError", "call_grammar", "call_messages",
           "chat_tool", "chat_tool_choice", "parse_call", "parse_tool_choice", "parse_tools", "plain_messages"]

log = logging.getLogger(__name__)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MIN_CALL_TOKENS = 192  # the tokens a call may take at least (its JSON), whatever the reply's own limit
ROUTE_PREFIX = 'A phone caller whose request is: {description}\nThe caller says: "'
NO_FUNCTION = "Chat, ask a general question, or say goodbye."
MAX_REQUEST_TOKENS = 64
MAX_CACHED_GRAMMARS = 32
# Compact JSON: fewer tokens to decode than a model's pretty-printing.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_GRAMMARS: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
_GRAMMARS_LOCK = threading.Lock()
MAX_TOOLS = 64  # functions one session or request may declare
MAX_TOOLS_JSON_CHARS = 32_000  # their declarations, as JSON


class ToolSpecError(ValueError):
    """A bad tool declaration; `param` names where it is."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_tools(tools: Any, param: str) -> list[dict[str, Any]]:
    """Function specs of a client's tools (see the module docstring)."""
    if not isinstance(tools, list):
        raise ToolSpecError(f"{param} must be a list", param)
    if len(tools) > MAX_TOOLS or len(json.dumps(tools)) > MAX_TOOLS_JSON_CHARS:
        raise ToolSpecError(f"at most {MAX_TOOLS} tools of {MAX_TOOLS_JSON_CHARS} characters in all", param)
    specs: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise ToolSpecError(f"{where} must be an object", where)
        if tool.get("type", "function") != "function":
            raise ToolSpecError(f"tools of type {tool.get('type')!r} are not supported (only 'function')", f"{where}.type")
        spec = tool["function"] if isinstance(tool.get("function"), dict) else tool
        name = spec.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise ToolSpecError("a function name is 1-64 letters, digits, '_' or '-'", f"{where}.name")
        if any(s["name"] == name for s in specs):
            raise ToolSpecError(f"two tools are named {name!r}", f"{where}.name")
        description = spec.get("description") or ""
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(description, str):
            raise ToolSpecError("description must be a string", f"{where}.description")
        if not isinstance(parameters, dict):
            raise ToolSpecError("parameters must be a JSON schema object", f"{where}.parameters")
        specs.append({"name": name, "description": description, "parameters": parameters})
    return specs


def parse_tool_choice(choice: Any, functions: list[dict[str, Any]], param: str) -> str | dict[str, str] | None:
    """"auto" | "none" | "required" | {"name": ...} (None where the client gave none)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        nested = choice.get("function")
        name = choice.get("name") or (nested.get("name") if isinstance(nested, dict) else None)
        if not isinstance(name, str) or not any(f["name"] == name for f in functions):
            raise ToolSpecError(f"tool_choice names no declared function: {str(name)[:64]!r}", param)
        return {"name": name}
    raise ToolSpecError("tool_choice must be 'auto', 'none', 'required' or a function", param)


def chat_tool(spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": dict(spec)}


def chat_tool_choice(choice: str | dict[str, str]) -> str | dict[str, Any]:
    return {"type": "function", "function": {"name": choice["name"]}} if isinstance(choice, dict) else choice


def _call_text(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError:
        args = arguments  # as the client wrote it
    return CALL_OPEN + json.dumps({"name": name, "arguments": args}) + CALL_CLOSE


def plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with function calls and results written as text (see the module docstring)."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                names[call.get("id", "")] = function.get("name", "")
                calls.append(_call_text(function.get("name", ""), function.get("arguments") or "{}"))
            out.append({"role": "assistant", "content": ((m.get("content") or "") + " " + "".join(calls)).strip()})
        elif m.get("role") == "tool":
            name = names.get(m.get("tool_call_id", ""), "")
            result = json.dumps({"name": name, "content": m.get("content") or ""})
            out.append({"role": "user", "content": f"<tool_response>{result}</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def functions_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The function specs (name, description, parameters) of Chat Completions tools."""
    return [t["function"] for t in tools if t.get("type", "function") == "function" and isinstance(t.get("function"), dict)]


def _description(function: dict[str, Any]) -> str:
    return (function.get("description") or "").strip() or function["name"].replace("_", " ")


class ToolRouter:
    """Which function a request needs (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self._model = model
        self._tokenizer = tokenizer

    def scores(self, request: str, descriptions: list[str]) -> list[float]:
        """The request's log-likelihood after each description's prefix."""
        import torch

        encode = self._tokenizer
        words = encode(request.strip(), add_special_tokens=False)["input_ids"][-MAX_REQUEST_TOKENS:]
        if not words:
            return [0.0] * len(descriptions)
        prefixes = [encode(ROUTE_PREFIX.format(description=d), add_special_tokens=False)["input_ids"] for d in descriptions]
        B, T, n = len(prefixes), max(len(p) for p in prefixes) + len(words), len(words)
        device = self._model.device
        tokens = torch.zeros(B, T, dtype=torch.long)
        out_index = torch.zeros(B, n, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for b, prefix in enumerate(prefixes):
            ids = prefix + words
            tokens[b, : len(ids)] = torch.tensor(ids)
            valid[b, : len(ids)] = True
            out_index[b] = torch.arange(len(prefix) - 1, len(ids) - 1)  # the positions that predict the words
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, T, T); padding is never attended
        cache = self._model.new_cache(B, max_seq_len=T)
        with torch.inference_mode():
            logits = self._model(tokens.to(device), torch.arange(T, device=device)[None].expand(B, T), mask.to(device),
                                 cache=cache, cache_rows=torch.arange(B, device=device), out_index=out_index.to(device))
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, n, V)
            target = torch.tensor(words, device=device)[None, :, None].expand(B, n, 1)
            return logp.gather(-1, target)[..., 0].sum(dim=-1).tolist()

    def choose(self, request: str, functions: list[dict[str, Any]], allow_none: bool = True) -> str | None:
        if not request.strip() and allow_none:
            return None  # no words to read: nothing asks for a function
        descriptions = [_description(f) for f in functions] + ([NO_FUNCTION] if allow_none else [])
        scores = self.scores(request, descriptions)
        best = max(range(len(scores)), key=scores.__getitem__)
        return functions[best]["name"] if best < len(functions) else None


def call_messages(messages: list[dict[str, Any]], function: dict[str, Any]) -> list[dict[str, Any]]:
    """`plain_messages`, with the function to call now in the system prompt."""
    spec = json.dumps({k: function.get(k) for k in ("name", "description", "parameters") if function.get(k) is not None})
    offer = (f"\n\nCall this function now, with the arguments the user's words give:\n{spec}\nReply with only "
             f'{CALL_OPEN}{{"name": "{function["name"]}", "arguments": <arguments object>}}{CALL_CLOSE}')
    plain = plain_messages(messages)
    if plain and plain[0]["role"] == "system":
        return [{"role": "system", "content": plain[0]["content"] + offer}, *plain[1:]]
    return [{"role": "system", "content": offer.strip()}, *plain]


def _arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        return {"type": "object"}
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
        schema = {**schema, "additionalProperties": False}
    return schema


def _lark(name: str, arguments: dict[str, Any]) -> str:
    schema = {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
              "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": _COMPACT}
    return f'start: "{CALL_OPEN}" obj "{CALL_CLOSE}"\nobj: %json {json.dumps(schema)}\n'


def call_grammar(function: dict[str, Any], tokenizer: Any) -> Any:
    """The compiled grammar of one call of `function` (see the module docstring)."""
    from dlm.constraints import Grammar

    key = (_lark(function["name"], _arguments_schema(function)), id(tokenizer))
    with _GRAMMARS_LOCK:
        if key in _GRAMMARS:
            _GRAMMARS.move_to_end(key)
            return _GRAMMARS[key]
    try:
        grammar = Grammar(key[0], tokenizer)
    except ValueError as e:
        log.warning("the parameters schema of %r cannot be enforced (%s): its arguments are constrained to a JSON object",
                    function["name"], e)
        grammar = Grammar(_lark(function["name"], {"type": "object"}), tokenizer)
    with _GRAMMARS_LOCK:
        _GRAMMARS[key] = grammar
        while len(_GRAMMARS) > MAX_CACHED_GRAMMARS:
            _GRAMMARS.popitem(last=False)
    return grammar


def parse_call(text: str) -> ToolCall:
    text = text.strip()
    if not (text.startswith(CALL_OPEN) and text.endswith(CALL_CLOSE)):
        raise ValueError(f"the function call was cut short: {text[:80]!r}")
    call = json.loads(text[len(CALL_OPEN) : -len(CALL_CLOSE)])
    return ToolCall(call["name"], json.dumps(call["arguments"]))
