"""LLM clients behind one interface: the in-process dlm engine, or an OpenAI-compatible server.

Contract:
- `client.stream(messages, trace_steps=False, owner=None, options=None)` is an async iterator of
  `LlmDelta`s for one chat request (`messages`: Chat Completions messages, system prompt first;
  assistant messages may carry `tool_calls` and `tool` messages a function's result). Text in a
  delta is final: it is never revised later. The last delta has `finished=True`. `owner` names
  who the request works for (a call id). `options` (`LlmOptions`): a lower limit on the reply's
  tokens (never above the configured one), and tools the model may call: the calls come whole,
  as `ToolCall`s in a delta's `tool_calls` (the OpenAI client passes tools through to the
  server; the local model's are made by `voice_agent.tools`). `LocalDLM.stream` also takes
  `params` (a dlm `GenerationParams` for this request instead of the configured ones) and token
  ids as `messages`; `LocalDLM.prepare(messages, params)` validates a request and returns its
  prompt's token ids (the chat API counts and checks prompts with it before it answers 200), and
  `LocalDLM.tool_prompt(messages, params, options)` makes the prompt of a request with tools
  (the chat API then streams its token ids with `call_opening`).
- `await client.health()`: whether the backend can serve now, `{"reachable": bool, ...}` with an
  `"error"` line where not (`OpenAICompatibleLLM` asks the server's `/models`, at most once per
  `HEALTH_CACHE_S`), for /healthz.
- `client.abort_owner(owner)` aborts every request of that owner still held by the backend
  (`LocalDLM`: the engine's `abort_owner`, effective within one denoising step; the OpenAI client
  holds nothing once its streams are closed). A session calls it when its call ends, so no work
  outlives the call even if a stream was never consumed.
- `LocalDLM.loaded`: the dlm LoadedModel its engine runs (the text end-of-turn scorer may share
  its weights: `voice_agent.end_of_turn.load_text_scorer`); `LocalDLM.close()` stops the engine
  (`aclose()` from the event loop).
- `LocalDLM.attach_share(share)`: the engine charges its steps to the calls of a
  `voice_agent.fair_share.CallShare` and holds back its background calls' rows (the services do
  it; a remote backend has no such method: its own server shares its engine).
- `client.load()`: what the backend holds now (`dlm.engine.EngineLoad` for `LocalDLM`; None where
  the backend cannot say), for /metrics and tests.
- Cancelling the consumer (or closing the iterator) aborts the request: `LocalDLM` calls
  `Engine.abort`, which takes effect within one denoising step; `OpenAICompatibleLLM` closes the
  HTTP response, which a streaming server treats as an abort.
- A stream that ends without its `[DONE]` (the server died mid-reply) or carries an `error`
  chunk raises LlmError: a cut reply is never passed off as a whole one. `parse_stream_line`
  reads one line of such a stream (also for `voice-agent bench llm --url`).
- `count_tokens(text)` counts with the model's tokenizer where there is one, otherwise estimates
  (4 characters per token), for the history budget.
- `build_llm(config)`: `llm.engine = "auto"` decodes a diffusion checkpoint by diffusion and a
  causal one with the AR engine; `"ar"` uses the AR baseline engine (`dlm.ar.AREngine`) on any
  checkpoint, named `local:<model>+ar`; `"speculative"`: exact draft-and-verify, also a
  block-diffusion checkpoint drafting for itself (`UserError` where the model cannot). Other
  values raise `UserError` naming the key.
- Failures surface as `LlmError` with a one-line message; secrets never appear in messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from voice_agent.config import LLM_ENGINES, LLM_KV_CACHES, LlmConfig
from voice_agent.errors import UserError

__all__ = ["BlockTrace", "LlmClient", "LlmDelta", "LlmError", "LlmOptions", "LocalDLM", "OpenAICompatibleLLM", "StreamChunk",
           "ToolCall", "build_llm", "parse_stream_line"]

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
MASK = "<mask>"  # a still-masked slot in a denoising trace
# voice-agent's own statistics in a chat completion (voice_agent.chat_api), which other clients ignore.
STATS_FIELD = "voice_agent"
HEALTH_CACHE_S = 2.0  # OpenAICompatibleLLM.health() asks the server at most this often
HEALTH_TIMEOUT_S = 2.0


class LlmError(Exception):
    """A request failed (server unreachable, HTTP error, engine error); one line, no secrets."""


class BlockTrace(NamedTuple):
    """One denoising step of the block being decoded (vendor extension, opt-in)."""

    step: int  # forward passes so far for this request
    block_start: int  # absolute position of the block's first slot (changes when a new block starts)
    slots: list[str]  # the block's slots as text; still-masked slots hold MASK


@dataclass
class ToolCall:
    """A function call the model made: `arguments` is a JSON object's text."""

    name: str
    arguments: str
    call_id: str | None = None  # the server's id, where it gave one


@dataclass
class LlmOptions:
    """One request's options (see the module docstring); None: the configured behaviour."""

    max_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None  # Chat Completions form: {"type": "function", "function": {...}}
    tool_choice: str | dict[str, Any] | None = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}


@dataclass
class LlmDelta:
    text: str  # new final text (may be empty, e.g. on a trace-only or final delta)
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "stop" | "repetition" | "length" | "abort" | "error"
    steps: int | None = None  # forward passes so far for this request (None: the backend does not say)
    tokens: int | None = None  # tokens committed so far
    trace: BlockTrace | None = None  # where trace_steps was asked
    prefill_steps: int | None = None  # of `steps`, the forwards that prefilled the prompt
    prefill_tokens: int | None = None  # of `tokens`, those the prefill's forwards made
    tool_calls: list[ToolCall] | None = None  # whole calls, on the last delta


@dataclass
class StreamChunk:
    """One `data:` line of a streamed chat completion (OpenAI's server-sent events), parsed."""

    done: bool = False  # the closing `data: [DONE]`
    text: str = ""  # choices[0].delta.content
    finish_reason: str | None = None
    stats: dict[str, Any] | None = None  # voice-agent's extension (STATS_FIELD), where the chunk has it
    usage_tokens: int | None = None  # usage.completion_tokens, in a usage chunk (stream_options.include_usage)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # choices[0].delta.tool_calls: fragments by index

    def stat(self, key: str) -> int | None:
        """An integer of the extension (forwards, completion_tokens, ...), else None."""
        value = (self.stats or {}).get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_stream_line(line: str) -> StreamChunk | None:
    """None for a line that is no `data:` (SSE comments, event names, blank separators). Raises
    LlmError for an `error` chunk (the server failed the reply) and ValueError for data that is
    not a chat completion chunk."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return StreamChunk(done=True)
    try:
        chunk = json.loads(data)
        if chunk.get("error") is not None:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise LlmError(f"the server failed the reply: {str(message)[:200]}")
        choice = chunk["choices"][0] if chunk.get("choices") else {}
        stats = chunk.get(STATS_FIELD)
        usage = chunk.get("usage")
        delta = choice.get("delta") or {}
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise ValueError("tool_calls")
        return StreamChunk(
            text=delta.get("content") or "",
            finish_reason=choice.get("finish_reason"),
            stats=stats if isinstance(stats, dict) else None,
            usage_tokens=usage.get("completion_tokens") if isinstance(usage, dict) else None,
            tool_calls=calls,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"malformed stream chunk {data[:80]!r}") from None


class LlmClient(Protocol):
    name: str

    def stream(self, messages: Messages, *, trace_steps: bool = False, owner: str | None = None,
               options: LlmOptions | None = None) -> AsyncIterator[LlmDelta]: ...

    def abort_owner(self, owner: str) -> None: ...

    def hold_owner(self, owner: str, held: bool) -> None: ...

    def load(self) -> Any: ...

    async def health(self) -> dict[str, Any]: ...

    def count_tokens(self, text: str) -> int: ...

    async def aclose(self) -> None: ...


def estimate_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0


# In-process dlm engine ------------------------------------------------------------------------


class LocalDLM:
    """The dlm `Engine` in this process; one engine batches the requests of every call.

    The engine's worker thread calls `on_delta`; deltas cross into the event loop with
    `loop.call_soon_threadsafe`. The per-request queue is unbounded on purpose: it holds at most
    `max_new_tokens + 1` deltas (plus trace snapshots), and reply text must never be dropped.
    """

    def __init__(
        self,
        engine: Any,
        make_params: Callable[[bool], Any],
        *,
        tokenizer: Any = None,
        name: str = "local",
        loaded: Any = None,
    ) -> None:
        """loaded: the dlm LoadedModel the engine runs, where another reader of its weights may share
        them (`voice_agent.end_of_turn.load_text_scorer`)."""
        self._engine = engine
        self.loaded = loaded
        self._make_params = make_params
        self._tokenizer = tokenizer
        self._router: Any = None  # voice_agent.tools.ToolRouter, made at the first request with tools
        self.name = name

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            return estimate_tokens(text)
        # As the chat template encodes contents: special-token text counts as the plain text it is.
        return len(self._tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def abort_owner(self, owner: str) -> None:
        self._engine.abort_owner(owner)

    def hold_owner(self, owner: str, held: bool) -> None:
        """Hold `owner`'s requests out of the engine's steps, or let them go on (the engine keeps
        their state): while a call's first words are being synthesized on the same cores."""
        self._engine.hold_owner(owner, held)

    def load(self) -> Any:
        return self._engine.load()

    def attach_share(self, share: Any) -> None:
        """Charge the engine's steps to the calls of `share` (a `voice_agent.fair_share.CallShare`)
        and hold back the rows of its background calls while others have work (in the engine, or
        jobs of their own: ASR, TTS, end-of-turn checks)."""
        self._engine.on_usage = share.charge_many
        share.on_background = self._engine.set_background
        share.on_foreground_jobs = self._engine.pause_background

    async def health(self) -> dict[str, Any]:
        return {"reachable": True}

    @property
    def max_seq_len(self) -> int:
        """The engine's context, in tokens."""
        return self._engine.max_seq_len

    def params(self, trace_steps: bool = False) -> Any:
        """The configured dlm `GenerationParams` (a fresh object: callers may change it)."""
        return self._make_params(trace_steps)

    def prepare(self, messages: Messages | list[int], params: Any) -> list[int]:
        """The prompt's token ids; `dlm.errors.InvalidRequestError` where the engine would refuse
        the request (empty, beyond the context, absurd parameters). Tokenizes: seconds for a
        huge prompt, so call it from a thread."""
        return self._engine.prepare(messages, params)[0]

    async def stream(self, messages: Messages | list[int], *, trace_steps: bool = False, owner: str | None = None,
                     params: Any = None, options: LlmOptions | None = None,
                     call_opening: str | None = None) -> AsyncIterator[LlmDelta]:
        """`call_opening`: with token ids from `tool_prompt` (and its params), the opening of the
        function call they end with: the reply is that call."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def on_delta(item: Any) -> None:  # the engine's worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: the call is over
                loop.call_soon_threadsafe(queue.put_nowait, item)

        params = params if params is not None else self._make_params(trace_steps)
        # Where the reply is one function call (decoded under its grammar): its prefilled opening.
        if messages and not isinstance(messages[0], int):
            options = options or LlmOptions()
            if options.tools and options.tool_choice != "none":
                # In a thread: routing runs the model, and a tokenizer's first grammar takes a second.
                messages, call_opening = await asyncio.to_thread(self.tool_prompt, messages, params, options)
            else:
                from voice_agent.tools import plain_messages

                messages = plain_messages(messages)
        if options is not None and options.max_tokens and call_opening is None:  # a call is finished whole
            params.max_new_tokens = min(params.max_new_tokens, options.max_tokens)
        handle = self._engine.submit(messages, params, on_delta=on_delta, owner=owner)
        finished = False
        held = call_opening or ""
        try:
            while True:
                item = await queue.get()
                delta = self._convert(item)
                if delta.finished:
                    finished = True
                    if delta.finish_reason == "error":
                        raise LlmError(f"dlm engine: {getattr(item, 'error', None) or 'request failed'}")
                if call_opening is not None:  # the call is held back and parsed whole at the end
                    held += delta.text
                    delta.text = ""
                    if finished:
                        from voice_agent.tools import parse_call

                        try:
                            delta.tool_calls = [parse_call(held)]
                        except ValueError as e:
                            raise LlmError(f"dlm engine: {e}") from None
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self._engine.abort(handle.request_id)

    def tool_prompt(self, messages: Messages, params: Any, options: LlmOptions) -> tuple[Messages | list[int], str | None]:
        """The request's prompt, and where its reply is a function call, the call's opening
        (prefilled with the prompt). Which function (if any) is routed
        (`voice_agent.tools.ToolRouter`) unless the client named one; a call is decoded under
        that function's grammar (its params change) and the prompt is then token ids. Runs the
        model (routing) and may build a grammar: call it from a thread."""
        from voice_agent import tools as t

        functions = t.functions_of(options.tools or [])
        if self._tokenizer is None:
            raise LlmError("tools need a model with a tokenizer")
        try:
            choice = t.parse_tool_choice(options.tool_choice, functions, "tool_choice") or "auto"
        except t.ToolSpecError as e:
            raise LlmError(f"tools: {e}") from None
        if isinstance(choice, dict):
            function = next(f for f in functions if f["name"] == choice["name"])
        elif choice == "none":
            raise LlmError("tools: tool_choice 'none' asks for no tools")  # callers decode such requests without tools
        elif not functions:
            raise LlmError("tools: no function tools")
        else:
            last = messages[-1] if messages else {}
            if choice == "auto" and last.get("role") != "user":
                function = None  # after a function's result: the answer, in words
            elif len(functions) == 1 and choice == "required":
                function = functions[0]
            else:
                if self._router is None:
                    self._router = t.ToolRouter(self._engine.model, self._tokenizer)
                name = self._router.choose(str(last.get("content") or ""), functions, allow_none=choice == "auto")
                function = next((f for f in functions if f["name"] == name), None)
        if function is None:
            return t.plain_messages(messages), None
        grammar = t.call_grammar(function, self._tokenizer)
        # What the grammar forces (the call's opening, up to the first free value) is prefilled
        # with the prompt in one forward instead of decoded a token per forward.
        forced = grammar.forced()
        params.constraint = functools.partial(grammar.constraint, after=forced)
        params.max_new_tokens = max(params.max_new_tokens, t.MIN_CALL_TOKENS)
        params.loop_guard = False  # JSON repeats its own shapes; the grammar ends the call
        params.stop = []
        params.temperature = 0.0  # the arguments are read off the request, not sampled
        prompt = self._engine.prepare(t.call_messages(messages, function), params)[0]
        return prompt + forced, self._tokenizer.decode(forced)

    def _convert(self, delta: Any) -> LlmDelta:
        """A dlm `Delta` -> LlmDelta (its StepTrace, if any, as the block's slots in text)."""
        trace = None
        if getattr(delta, "trace", None) is not None:
            st = delta.trace
            slots = [MASK if masked else self._token_text(tid) for tid, masked in zip(st.token_ids, st.masked, strict=True)]
            trace = BlockTrace(st.step, st.block_start, slots)
        return LlmDelta(
            text=delta.text,
            finished=bool(delta.finished),
            finish_reason=delta.finish_reason,
            steps=delta.steps,
            tokens=delta.tokens,
            trace=trace,
            prefill_steps=getattr(delta, "prefill_steps", None),
            prefill_tokens=getattr(delta, "prefill_tokens", None),
        )

    def _token_text(self, token_id: int) -> str:
        if self._tokenizer is None:
            return str(token_id)
        return self._tokenizer.decode([token_id])

    def close(self) -> None:
        """Stop the engine (blocks until its worker has stopped)."""
        self._engine.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


# OpenAI-compatible streaming server -----------------------------------------------------------


class OpenAICompatibleLLM:
    """Any server with a streaming `POST {base_url}/chat/completions` (SSE): Inception's Mercury
    API, SGLang or vLLM serving a dLLM, or another `voice-agent`.

    `api_key` comes from the environment variable named by `llm.api_key_env`; it is sent as a
    bearer token and never logged.
    """

    def __init__(self, config: LlmConfig, *, api_key: str = "", transport: Any = None) -> None:
        import httpx2

        if not config.base_url:
            raise UserError("llm.backend = 'openai' needs llm.base_url (e.g. https://api.inceptionlabs.ai/v1)")
        self._config = config
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0)),
            transport=transport,
        )
        self._httpx = httpx2
        self._health: dict[str, Any] | None = None
        self._health_at = 0.0
        self.name = f"openai:{config.api_model or '(default)'}@{config.base_url}"

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def abort_owner(self, owner: str) -> None:
        """Nothing to do: a request lives as long as its stream, which its consumer closes."""

    def hold_owner(self, owner: str, held: bool) -> None:
        """Nothing to do: the remote server's cores are not the ones synthesizing speech here."""

    def load(self) -> Any:
        return None  # the remote server's own metrics say what it holds

    async def health(self) -> dict[str, Any]:
        """Asks `{base_url}/models` (a cheap authenticated GET every OpenAI-compatible server
        has), at most once per HEALTH_CACHE_S whoever asks; never raises."""
        loop = asyncio.get_running_loop()
        if self._health is not None and loop.time() - self._health_at < HEALTH_CACHE_S:
            return self._health
        url = self._config.base_url.rstrip("/") + "/models"
        try:
            response = await self._client.get(url, timeout=HEALTH_TIMEOUT_S)
            if response.status_code == 200:
                health: dict[str, Any] = {"reachable": True}
            else:
                health = {"reachable": False, "error": f"{url}: HTTP {response.status_code}"}
        except self._httpx.HTTPError as e:
            health = {"reachable": False, "error": f"{url}: {type(e).__name__}: {e}"}
        self._health, self._health_at = health, loop.time()
        return health

    async def stream(self, messages: Messages, *, trace_steps: bool = False, owner: str | None = None,
                     options: LlmOptions | None = None) -> AsyncIterator[LlmDelta]:
        options = options or LlmOptions()
        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "max_tokens": min(self._config.max_new_tokens, options.max_tokens or self._config.max_new_tokens),
            "temperature": self._config.temperature,
            "top_p": self._config.top_p,
        }
        if self._config.api_model:
            body["model"] = self._config.api_model
        if options.tools:
            body["tools"] = options.tools
            if options.tool_choice is not None:
                body["tool_choice"] = options.tool_choice
        calls: dict[int, dict[str, str]] = {}  # tool call fragments by index, joined
        tokens = 0
        try:
            async with self._client.stream("POST", self._url, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:200].decode("utf-8", "replace")
                    raise LlmError(f"{self._url}: HTTP {response.status_code}: {detail}")
                finish_reason = None
                steps = None  # forwards, where the server reports them (voice-agent's extension)
                exact_tokens = None  # completion tokens, likewise
                done = False
                async for line in response.aiter_lines():
                    try:
                        chunk = parse_stream_line(line)
                    except (LlmError, ValueError) as e:
                        raise LlmError(f"{self._url}: {e}") from None
                    if chunk is None:
                        continue
                    if chunk.done:
                        done = True
                        break
                    finish_reason = chunk.finish_reason or finish_reason
                    for fragment in chunk.tool_calls:
                        _join_tool_call(calls, fragment)
                    # A voice-agent tier counts exactly: tokens, not chunks.
                    steps = chunk.stat("forwards") if chunk.stat("forwards") is not None else steps
                    exact_tokens = chunk.stat("completion_tokens") if chunk.stat("completion_tokens") is not None \
                        else exact_tokens
                    if chunk.text:
                        tokens += 1  # one chunk is about one token on the servers we target
                        yield LlmDelta(text=chunk.text, tokens=tokens)
                if not done:
                    # The connection ended inside the reply: the server (or its replica) died.
                    raise LlmError(f"{self._url}: the stream ended before the reply did")
                if any(not c["name"] for c in calls.values()):
                    raise LlmError(f"{self._url}: a tool call without a function name")
                tool_calls = [ToolCall(c["name"], c["arguments"] or "{}", c["id"] or None) for _, c in sorted(calls.items())]
                yield LlmDelta(text="", finished=True, finish_reason=finish_reason or "stop",
                               tokens=tokens if exact_tokens is None else exact_tokens, steps=steps,
                               tool_calls=tool_calls or None)
        except self._httpx.HTTPError as e:
            raise LlmError(f"{self._url}: {type(e).__name__}: {e}") from None

    async def aclose(self) -> None:
        await self._client.aclose()


def _join_tool_call(calls: dict[int, dict[str, str]], fragment: dict[str, Any]) -> None:
    """Add one streamed `tool_calls` fragment (OpenAI streams a call's id and name first, then
    its arguments in pieces, all under the call's `index`)."""
    index = fragment.get("index", 0)
    function = fragment.get("function") or {}
    if not isinstance(index, int) or not isinstance(function, dict):
        raise LlmError("malformed tool call in the stream")
    call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
    for key, value in (("id", fragment.get("id")), ("name", function.get("name"))):
        if isinstance(value, str) and value:
            call[key] = value
    if isinstance(function.get("arguments"), str):
        call["arguments"] += function["arguments"]


# Construction ---------------------------------------------------------------------------------


def generation_params(config: LlmConfig, *, trace_steps: bool = False, max_new_tokens: int | None = None,
                      loop_guard: bool | None = None) -> Any:
    """The dlm `GenerationParams` of the [llm] settings (`loop_guard` None: `config.loop_guard`)."""
    from dlm.engine import GenerationParams

    return GenerationParams(
        max_new_tokens=max_new_tokens or config.max_new_tokens,
        policy=config.policy,
        threshold=config.threshold,
        factor=config.factor,
        steps_per_block=config.steps_per_block,
        block_size=config.block_size,
        sub_block_size=config.sub_block_size,
        temperature=config.temperature,
        top_p=config.top_p,
        trace_steps=trace_steps,
        loop_guard=config.loop_guard if loop_guard is None else loop_guard,
        accept=config.accept,
    )


def _registry_weights(registry: str | None, device: str, dtype: str) -> str:
    """llm.weights "auto": the registry's format where it fits the device and the dtype asked
    for (a caller asking bfloat16 of a float32-blocks model gets dense bfloat16), and where its
    kernel runs on this machine (float32 blocks need AVX-512: else dense float32, with a warning;
    float32-accurate products on AMX need AMX: else 16-bit integer products on AVX512-VNNI, else
    float32 blocks, with a note)."""
    import torch

    from dlm.checkpoints import FORMAT_DTYPES, resolve_dtype, runnable_weights

    if not registry or not str(device).startswith("cpu"):
        return "dense"
    wanted = FORMAT_DTYPES.get(registry)
    if wanted is not None and dtype != "auto" and resolve_dtype(dtype, torch.device("cpu")) != wanted:
        return "dense"
    weights, passed = runnable_weights(registry, near=True)
    why = dict(passed)
    if weights == "blocks-int16" and "blocks-amx" in why:
        log.info("float32-accurate products on AMX unavailable (%s): integer products with 16-bit inputs on VNNI "
                 "instead (logits within about 0.01 of float32's)", why["blocks-amx"])
    elif weights == "blocks" and "blocks-int16" in why:
        what = "products on AMX and integer products on VNNI" if "blocks-amx" in why else "integer products on VNNI"
        log.info("%s unavailable (%s): float32 blocks instead, where a drafted row costs nearly a step, so "
                 "draft-and-verify gains little over the AR engine; `voice-agent calibrate` measures which is faster "
                 "here", what, "; ".join(why[k] for k in ("blocks-amx", "blocks-int16") if k in why))
    if "blocks" in why:
        log.warning("float32 block weights unavailable (%s): the model runs dense float32, slower", why["blocks"])
    return weights


def load_format(resolved: Any, *, device: str, dtype: str, weights: str = "auto") -> tuple[str, str]:
    """(dtype, weights) that `load_local_llm` loads a registry entry (voice_agent.models.ResolvedLlm)
    with, "auto" resolved as it says."""
    if dtype == "auto" and resolved.dtype:
        dtype = resolved.dtype
    if weights == "auto":
        weights = _registry_weights(resolved.weights, device, dtype)
    return dtype, weights


def load_local_llm(name: str, *, device: str, dtype: str, weights: str = "auto", kv_cache: str = "float32"
                   ) -> tuple[Any, Any]:
    """A model by registry name or path, with its adapter and drafter where the registry names them ->
    (dlm LoadedModel, voice_agent.models.ResolvedLlm). dtype "auto": the registry's dtype for
    the model where it names one (the default model: bfloat16), else dlm's default; weights
    "auto": the registry's weight format where it names one, the device is a CPU and the dtype
    fits (`_registry_weights`), else "dense" (dlm.checkpoints.load_model); kv_cache "float32" (here
    the default; the configuration's is llm.kv_cache's "auto"), "float16": its KV caches in float16
    (`Transformer.use_half_cache`; UserError where the weights do not run the fused block forward),
    "auto": float16 where its products round their inputs anyway (`_rounds_inputs`). For inference only:
    where the weights were packed, their dense copies are released (training loads through
    dlm.checkpoints.load_model)."""
    from dlm.adapter import AdapterError
    from dlm.checkpoints import WEIGHT_FORMATS, load_model
    from dlm.drafter import DrafterError
    from dlm.errors import UnsupportedCheckpointError
    from voice_agent.models import resolve_llm_model

    resolved = resolve_llm_model(name)
    resolved.check_files()
    dtype, weights = load_format(resolved, device=device, dtype=dtype, weights=weights)
    if weights not in WEIGHT_FORMATS:
        raise UserError(f"llm.weights must be 'auto' or one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    if kv_cache not in LLM_KV_CACHES:
        raise UserError(f"llm.kv_cache must be one of {', '.join(map(repr, LLM_KV_CACHES))}, not {kv_cache!r}")
    try:
        loaded = load_model(resolved.path, device=device, dtype=dtype, drafter=resolved.drafter,
                            adapter=resolved.adapter, weights=weights, inference_only=True)
    except (DrafterError, AdapterError) as e:
        raise UserError(str(e)) from e
    except (UnsupportedCheckpointError, ValueError) as e:
        if weights == "dense":
            raise
        raise UserError(f"model {resolved.name!r} with llm.weights = {weights!r}: {e}") from e
    if kv_cache == "float16":
        try:
            loaded.model.use_half_cache()
        except ValueError as e:
            raise UserError(f"model {resolved.name!r} with llm.weights = {weights!r} and llm.kv_cache = 'float16': {e}"
                            ) from e
    elif kv_cache == "auto" and _rounds_inputs(loaded.model):
        with contextlib.suppress(ValueError):  # no fused forward for this model: its cache stays float32
            loaded.model.use_half_cache()
    return loaded, resolved


def _rounds_inputs(model: Any) -> bool:
    """Whether the model's block products round their inputs (llm.kv_cache "auto" gives it a
    float16 KV cache then): 16-bit or 8-bit integers on VNNI, bf16 on AMX. On the default model's
    16-bit products a float16 cache changed no greedy reply against a float32 one (56 held-out
    prompts, 24 calls of about 1000 tokens), and long calls decode 14-19 % faster a token
    (docs/models.md, "A float16 KV cache"). Weights that keep float32's accuracy (blocks,
    blocks-amx) keep a float32 cache."""
    from dlm.blocks import AMX_BF16, VNNI_INT8, VNNI_INT16

    return model.block_products() in (AMX_BF16, VNNI_INT8, VNNI_INT16)


def build_llm(config: LlmConfig, *, api_key: str = "") -> LlmClient:
    """The configured client. Loading the local model takes seconds: call it from a thread."""
    if config.backend == "openai":
        return OpenAICompatibleLLM(config, api_key=api_key)
    if config.backend != "local":
        raise UserError(f"llm.backend must be 'local' or 'openai', not {config.backend!r}")
    if config.engine not in LLM_ENGINES:  # LlmConfig checks this too; the field may be set later
        raise UserError(f"llm.engine must be one of {', '.join(map(repr, LLM_ENGINES))}, not {config.engine!r}")
    from dlm.engines import decoding, make_engine, parallel

    loaded, resolved = load_local_llm(config.model, device=config.device, dtype=config.dtype, weights=config.weights,
                                      kv_cache=config.kv_cache)
    if resolved.fallback_from:
        log.warning(
            "!!! llm.model %r is not shipped yet: FALLING BACK to the autoregressive model %r "
            "(no diffusion decoding; tokens per forward pass will be 1) !!!",
            resolved.fallback_from,
            resolved.name,
        )
    diffusion = parallel(loaded)
    if config.engine == "ar" and diffusion and getattr(loaded, "drafter", None) is None and not loaded.spec.logit_shift:
        log.warning(
            "llm.engine = 'ar' on %s (%s): trained without a token shift, so its logits do not "
            "predict the next token; expect meaningless replies",
            resolved.name,
            loaded.family,
        )
    try:
        decoding_name = decoding(loaded, config.engine)
    except ValueError as e:  # llm.engine = "speculative" on a model that has no way to draft
        raise UserError(f"llm.engine: {e}") from e
    try:
        engine = make_engine(loaded, config.engine, max_batch_size=config.max_batch_size, **config.draft_settings())
    except ValueError as e:  # a draft setting this model's drafter cannot take (llm.draft_len past its places)
        raise UserError(f"the [llm] draft settings for {resolved.name!r}: {e}") from e
    if decoding_name == "AR" and not diffusion:
        decoding_name = "AR (causal checkpoint)"
    log.info("LLM: %s (%s, %s) on %s, %s, %s weights, %s decoding", resolved.name, loaded.family, resolved.path,
             config.device, str(loaded.model.dtype).removeprefix("torch."), loaded.weights,
             decoding_name)
    # "+ar" marks a diffusion checkpoint forced onto the AR engine, in logs and the call store.
    suffix = "+ar" if diffusion and config.engine == "ar" else ""
    return LocalDLM(
        engine,
        lambda trace: generation_params(config, trace_steps=trace),
        tokenizer=loaded.tokenizer,
        name=f"local:{resolved.name}{suffix}",
        loaded=loaded,
    )
