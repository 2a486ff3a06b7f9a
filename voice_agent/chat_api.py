"""The local LLM behind an OpenAI-compatible HTTP API: `POST /v1/chat/completions` (streamed as
server-sent events, or not) and `GET /v1/models`, as one ASGI app.

Contract:
- `ChatService.of(llm, config, replica=None)`: one in-process engine (`LocalDLM`) behind the
  API, with the config's `[api]` limits and `server.token`, the model named by the registry name
  (or path) it was loaded from, the replica by Ray's id or else host:pid; the engine batches the requests of every client (continuous batching). `chat_app(service,
  fallback=None)` is the Starlette app. The same app runs in `voice-agent serve` (the
  `VoiceServer` hands it the HTTP requests that websockets cannot take, `fallback` answering the
  server's own GET routes on a kept-alive connection), standalone in `serve-llm` (uvicorn) and in
  every Ray Serve replica (`voice_agent.llm_tier`).
- Requests as OpenAI documents them: `messages` with system (or developer), user and assistant
  roles, content a string or text parts; `model` (optional: the one served), `temperature`,
  `top_p`, `max_tokens` / `max_completion_tokens` (default and ceiling `api.max_tokens`), `stop`
  (a string or a list), `seed`, `stream`, `stream_options.include_usage`, `n` = 1; function
  calling: `tools`, `tool_choice` ("auto", "none", "required", a named function), assistant
  messages with `tool_calls` and `tool` messages with their `tool_call_id` (the local model's
  calls: `voice_agent.tools`; a call comes whole, in one chunk when streamed, with
  `finish_reason` "tool_calls"). Parameters
  that change nothing the engine does (presence and frequency penalties, `user`, `metadata`, ...:
  `IGNORED_PARAMETERS`) are accepted and ignored; an argument OpenAI does not know is refused, as
  OpenAI refuses it (400 `unknown_parameter`).
- Answers carry `usage`, `finish_reason` ("stop" or "length") and our statistics in the extension
  field `voice_agent` (`STATS_FIELD`), which OpenAI clients ignore: completion_tokens, forwards, prefill_forwards,
  prefill_tokens (of them, those its prefill's forwards made: an AR reply's first token),
  tokens_per_forward (completion tokens per forward, as `voice-agent bench llm` counts them),
  decode_tokens_per_forward (the prefill not counted: its forwards and tokens), the engine's own finish reason
  ("eos", "stop", "repetition", "length"), the replica, and first_text_ms: the server's own time
  from the request's arrival to its first text (sent, when streamed), so that a client can tell
  the time its request spent in the network and HTTP from the time it spent here. Every response, errors included,
  names the replica that served it in the `x-voice-agent-replica` header.
- Refusals have OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) and a
  4xx status, and touch nobody else's request: a wrong or missing token (401, checked before
  anything of the request is read; the token is never logged), a body over `api.max_body_bytes`
  (413), malformed JSON or parameters (400), an unknown model (404), a prompt (plus max_tokens)
  beyond the context (400 `context_length_exceeded`), more than `api.max_requests` requests in
  flight (429 with `Retry-After`), what this server cannot do (images, audio, n > 1, logprobs,
  the legacy `functions`: 400 `unsupported_parameter` or `unsupported_value`).
- Alone (no `fallback`), the app also answers `GET /healthz` without a token: the model, the
  replica and its process id, the requests in flight and what the engine holds (rows, queue),
  for load balancers and operators.
- A client that goes away (its connection closes; under Ray Serve its request is cancelled)
  aborts its engine request within one denoising step, streamed or not. A streamed reply whose
  engine request fails ends with an SSE chunk `{"error": {...}}` and no `[DONE]`; a non-streamed
  one gets 500 `server_error`.
- CORS: with `api.cors_origins` set, a page from a listed origin may call the API from a browser
  (preflight answered without the token; the request itself still needs it); unset, no CORS
  headers are sent and browsers refuse cross-origin calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dlm.engine import MAX_STOP_STRINGS
from dlm.errors import InvalidRequestError
from voice_agent.access import token_ok
from voice_agent.config import ApiConfig, Config
from voice_agent.llm import STATS_FIELD, LlmError, LlmOptions, LocalDLM
from voice_agent.tools import (
    ToolSpecError,
    chat_tool,
    chat_tool_choice,
    parse_tool_choice,
    parse_tools,
    plain_messages,
)

__all__ = ["REPLICA_HEADER", "ApiError", "ChatRequest", "ChatService", "chat_app", "parse_chat_request"]

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-voice-agent-replica"
# OpenAI's roles -> the chat template's ("developer" is the newer name of "system").
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The engine's finish reasons -> OpenAI's. "repetition" (the loop guard ended a reply at its last
# good sentence) is a natural stop; the engine's own reason is in the statistics.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "repetition": "stop", "length": "length"}
MAX_TOOL_CALL_ID = 64
# Accepted and ignored: they change nothing the engine does, and clients send them by default.
IGNORED_PARAMETERS = frozenset({
    "frequency_penalty", "presence_penalty", "user", "metadata", "store", "service_tier",
    "parallel_tool_calls", "prompt_cache_key", "safety_identifier", "reasoning_effort", "verbosity",
})
# Refused: accepting them would silently give the client something else than it asked for.
UNSUPPORTED_PARAMETERS = {
    "functions": "the legacy functions (use tools)", "function_call": "the legacy function_call (use tool_choice)",
    "audio": "audio output", "modalities": "audio output",
    "prediction": "predicted outputs", "logit_bias": "logit_bias", "top_logprobs": "logprobs",
    "web_search_options": "web search",
}
KNOWN_PARAMETERS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
    "stream", "stream_options", "n", "logprobs", "response_format", "tools", "tool_choice",
})


class ApiError(Exception):
    """A refused request: OpenAI's error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A validated `/v1/chat/completions` request."""

    messages: list[dict[str, Any]]  # {"role": system|user|assistant|tool, "content"} (+ tool_calls, tool_call_id)
    model: str  # the served model's id (a request without one gets it)
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    tools: list[dict[str, Any]] = field(default_factory=list)  # Chat Completions function tools
    tool_choice: str | dict[str, Any] | None = None


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"{key} must be a number in [{low:g}, {high:g}], not {json.dumps(value)[:40]}", key,
                   "invalid_value" if isinstance(value, int | float) and not isinstance(value, bool) else "invalid_type")
    return float(value)


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_audio", "file"):
                raise _bad(f"messages[{index}]: content of type {kind!r} is not supported: this model reads text only",
                           f"messages[{index}].content", "unsupported_value")
            else:
                raise _bad(f"messages[{index}]: each content part needs a 'type' of 'text' and a string 'text'",
                           f"messages[{index}].content", "invalid_type")
        return "".join(texts)
    raise _bad(f"messages[{index}]: 'content' must be a string or a list of text parts", f"messages[{index}].content",
               "invalid_type")


def parse_chat_request(raw: bytes, *, model_id: str, max_tokens: int) -> ChatRequest:
    """The request in `raw` (a JSON body), or ApiError (400; 404 for an unknown model).
    `max_tokens`: the most a request may ask for, and what it gets where it asks for nothing."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _bad("We could not parse the JSON body of your request: it is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object")
    for key in body:
        if key not in KNOWN_PARAMETERS and key not in IGNORED_PARAMETERS and key not in UNSUPPORTED_PARAMETERS:
            raise _bad(f"Unrecognized request argument supplied: {key[:60]}", key[:60], "unknown_parameter")
        if key in UNSUPPORTED_PARAMETERS and body[key] not in (None, [], {}):
            raise _bad(f"{key}: {UNSUPPORTED_PARAMETERS[key]} is not supported by this server", key, "unsupported_parameter")
    model = body.get("model") or model_id
    if not isinstance(model, str):
        raise _bad("model must be a string", "model", "invalid_type")
    if model != model_id:
        raise ApiError(404, f"The model {model[:100]!r} does not exist; this server serves {model_id!r}", param="model",
                       code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of messages", "messages",
                   "empty_array" if isinstance(messages, list) else "invalid_type")
    chat = [_message(message, i) for i, message in enumerate(messages)]
    if not any((m["content"] or "").strip() or m.get("tool_calls") for m in chat):
        raise _bad("messages are all empty: there is nothing to answer", "messages", "empty_content")
    try:
        functions = parse_tools(body["tools"], "tools") if body.get("tools") is not None else []
        choice = parse_tool_choice(body.get("tool_choice"), functions, "tool_choice")
    except ToolSpecError as e:
        raise _bad(str(e), e.param, "invalid_value") from None
    if choice is not None and choice != "none" and not functions:
        raise _bad("tool_choice needs tools", "tool_choice", "invalid_value")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if limit is None:
        limit = max_tokens
    elif isinstance(limit, bool) or not isinstance(limit, int):
        raise _bad(f"{param} must be an integer", param, "invalid_type")
    elif limit < 1:
        raise _bad(f"{param} must be at least 1, not {limit}", param, "invalid_value")
    elif limit > max_tokens:
        raise _bad(f"{param} is too large: {limit}. This server returns at most {max_tokens} completion tokens "
                   "(api.max_tokens)", param, "invalid_value")
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n: this server returns one choice per request; n must be 1", "n", "unsupported_value")
    if body.get("logprobs"):
        raise _bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format: only {'type': 'text'} is supported by this server", "response_format",
                   "unsupported_value")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop",
                   "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options", "invalid_type")
    if options and not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    include_usage = bool((options or {}).get("include_usage", False))
    return ChatRequest(
        messages=chat,
        model=model_id,
        max_tokens=limit,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        stop=list(stops),
        seed=seed,
        stream=bool(stream),
        include_usage=include_usage,
        tools=[chat_tool(f) for f in functions],
        tool_choice=chat_tool_choice(choice) if choice is not None else None,
    )


def _message(message: Any, i: int) -> dict[str, Any]:
    """One request message as the engine's side takes it (see ChatRequest.messages)."""
    if not isinstance(message, dict):
        raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type")
    role = message.get("role")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not 1 <= len(call_id) <= MAX_TOOL_CALL_ID:
            raise _bad(f"messages[{i}]: a tool message needs its 'tool_call_id'", f"messages[{i}].tool_call_id",
                       "invalid_value")
        return {"role": "tool", "tool_call_id": call_id, "content": _content(message, i)}
    if role not in ROLES:
        if role == "function":
            raise _bad(f"messages[{i}]: the legacy role 'function' is not supported: use 'tool'", f"messages[{i}].role",
                       "unsupported_value")
        raise _bad(f"messages[{i}]: unknown role {str(role)[:40]!r}; expected one of {', '.join([*ROLES, 'tool'])}",
                   f"messages[{i}].role", "invalid_value")
    calls = message.get("tool_calls")
    if not calls or role != "assistant":
        if calls:
            raise _bad(f"messages[{i}]: only assistant messages carry tool_calls", f"messages[{i}].tool_calls", "invalid_value")
        return {"role": ROLES[role], "content": _content(message, i)}
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments", ""), str)
            for c in calls):
        raise _bad(f"messages[{i}]: tool_calls must be function calls with an id, a name and arguments as a string",
                   f"messages[{i}].tool_calls", "invalid_value")
    content = _content(message, i) if message.get("content") is not None else None
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                                                          "arguments": c["function"].get("arguments") or "{}"}}
        for c in calls]}


class _ClientGone(Exception):
    """The client disconnected (or its request was cancelled) before the answer was complete."""


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Returns when the client is gone (once the request body has been read, the next message
    an ASGI server delivers is `http.disconnect`)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Callable[[], Awaitable[dict[str, Any]]], work: Awaitable[Any]) -> Any:
    """`await work`, cancelled (so its engine request is aborted) the moment the client goes away."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _ClientGone
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # its finally blocks (the engine abort) have run when this returns


class ChatService:
    """One engine behind the API: validation, parameters, the in-flight limit, statistics."""

    def __init__(self, llm: LocalDLM, api: ApiConfig, *, token: str = "", model_id: str, replica: str) -> None:
        self.llm = llm
        self.api = api
        self.model_id = model_id
        self.replica = replica
        self._token = token
        self.in_flight = 0
        self.created = int(time.time())

    @classmethod
    def of(cls, llm: LocalDLM, config: Config, *, replica: str | None = None) -> ChatService:
        """The service of `llm` under `config` (module docstring); `replica` None: host:pid."""
        return cls(llm, config.api, token=config.server.token, model_id=llm.name.removeprefix("local:"),
                   replica=replica or f"{socket.gethostname()}:{os.getpid()}")

    def check_token(self, headers: Any) -> None:
        """ApiError 401 unless the request carries the access token (or none is set)."""
        if not token_ok(self._token, headers.get("authorization", "")):
            raise ApiError(401, "Incorrect or missing API key: send the server's access token as 'Authorization: Bearer "
                           "<token>'", code="invalid_api_key")

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the api.max_requests places in flight; ApiError 429 where none is free."""
        if self.in_flight >= self.api.max_requests:
            raise ApiError(429, f"This server has {self.api.max_requests} requests in flight (api.max_requests); "
                           "retry shortly", kind="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.api.retry_after_s)})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def health(self) -> dict[str, Any]:
        """The tier's /healthz (no token, as the voice server's): what this engine holds now."""
        load = self.llm.load()
        return {"status": "ok", "model": self.model_id, "replica": self.replica, "pid": os.getpid(),
                "requests_in_flight": self.in_flight, "engine": {"rows": load.rows, "queued": load.queued}}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "voice-agent"}

    def params(self, request: ChatRequest) -> Any:
        """The engine's `GenerationParams`: the configured decoding, the request's sampling."""
        params = self.llm.params()
        params.max_new_tokens = request.max_tokens
        params.stop = list(request.stop)
        params.seed = request.seed
        # OpenAI's top_p = 0 keeps only the most likely token: greedy, as temperature 0 is.
        greedy = request.temperature == 0.0 or request.top_p == 0.0
        params.temperature = 0.0 if greedy else request.temperature
        params.top_p = 1.0 if greedy else request.top_p
        return params

    async def prepare(self, request: ChatRequest) -> tuple[list[int], Any, str | None]:
        """(prompt token ids, params, the opening of the function call the reply is, if it is
        one), or ApiError 400 where the engine would refuse the request."""
        params = self.params(request)
        opening = None
        try:
            if request.tools and request.tool_choice != "none":
                options = LlmOptions(tools=request.tools, tool_choice=request.tool_choice)
                prompt, opening = await asyncio.to_thread(self.llm.tool_prompt, request.messages, params, options)
            else:
                prompt = plain_messages(request.messages)
            prompt_ids = await asyncio.to_thread(self.llm.prepare, prompt, params)
        except LlmError as e:
            raise _bad(str(e), "tools", "invalid_value") from None
        except InvalidRequestError as e:
            message = str(e)
            if "context" in message:
                raise _bad(f"{message} (this model's context is {self.llm.max_seq_len} tokens)", "messages",
                           "context_length_exceeded") from None
            raise _bad(message, None, "invalid_value") from None
        return prompt_ids, params, opening

    def stats(self, last: Any, first_text_s: float | None) -> dict[str, Any]:
        """The extension field of a finished request, from its last delta and the seconds from the
        request's arrival to its first text (None: no text)."""
        forwards = last.steps or 0
        prefill = last.prefill_steps or 0
        decoding = max(0, forwards - prefill)
        tokens = last.tokens or 0
        prefill_tokens = min(last.prefill_tokens or 0, tokens)
        return {
            "completion_tokens": tokens,  # also in a streamed reply without include_usage (frontends count with it)
            "forwards": forwards,
            "prefill_forwards": prefill,
            "prefill_tokens": prefill_tokens,
            "tokens_per_forward": round(tokens / forwards, 3) if forwards else None,
            "decode_tokens_per_forward": round((tokens - prefill_tokens) / decoding, 3) if decoding else None,
            "finish_reason": last.finish_reason,
            "replica": self.replica,
            "first_text_ms": None if first_text_s is None else round(first_text_s * 1000, 1),
        }


def _json_response(status: int, body: dict[str, Any], replica: str, headers: dict[str, str] | None = None) -> Response:
    """JSON with the replica header (none where there is no engine to name)."""
    return JSONResponse(body, status_code=status, headers={**({REPLICA_HEADER: replica} if replica else {}),
                                                            **(headers or {})})


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"The request body is larger than this server accepts ({limit} bytes: api.max_body_bytes)",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _Completions:
    """`POST /v1/chat/completions` as a plain ASGI endpoint: it reads the body itself (the token
    first, then the size limit) and watches for the client going away while it answers."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        service = self.service
        request = Request(scope, receive)
        arrived = time.monotonic()
        try:
            service.check_token(request.headers)
            with service.slot():
                raw = await _read_body(request, service.api.max_body_bytes)
                chat = parse_chat_request(raw, model_id=service.model_id, max_tokens=service.api.max_tokens)
                prompt_ids, params, opening = await _unless_disconnected(receive, service.prepare(chat))
                request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
                started = time.monotonic()
                if chat.stream:
                    last = await _unless_disconnected(receive, self._stream(send, chat, request_id, prompt_ids, params,
                                                                            opening, arrived))
                else:
                    text, last, first_text_s = await _unless_disconnected(
                        receive, self._collect(request_id, prompt_ids, params, opening, arrived))
                    await _json_response(200, self._completion(chat, request_id, prompt_ids, text, last, first_text_s),
                                         service.replica)(scope, receive, send)
                if last is not None:
                    log.info("chat %s: %d prompt + %d completion tokens, %d forwards, %s, %.2f s", request_id,
                             len(prompt_ids), last.tokens or 0, last.steps or 0, last.finish_reason,
                             time.monotonic() - started)
        except ApiError as e:
            await _json_response(e.status, e.body(), service.replica, e.headers)(scope, receive, send)
        except _ClientGone:
            log.info("chat: the client went away; its request was aborted")

    async def _collect(self, request_id: str, prompt_ids: list[int], params: Any, opening: str | None,
                       arrived: float) -> tuple[str, Any, float | None]:
        """(the reply's text, its last delta, seconds from `arrived` to its first text)."""
        parts, last, first_text_s = [], None, None
        try:
            async for delta in self.service.llm.stream(prompt_ids, params=params, owner=request_id, call_opening=opening):
                if delta.text and first_text_s is None:
                    first_text_s = time.monotonic() - arrived
                parts.append(delta.text)
                last = delta
        except LlmError as e:
            log.warning("chat %s failed: %s", request_id, e)
            raise ApiError(500, f"The engine failed this request: {e}", kind="server_error", code="engine_error") from None
        return "".join(parts), last, first_text_s

    def _completion(self, chat: ChatRequest, request_id: str, prompt_ids: list[int], text: str, last: Any,
                    first_text_s: float | None) -> dict:
        completion = last.tokens or 0
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": None if last.tool_calls else text, "refusal": None,
                            **({"tool_calls": _tool_calls(last, request_id)} if last.tool_calls else {})},
                "logprobs": None,
                "finish_reason": "tool_calls" if last.tool_calls else FINISH_REASONS.get(last.finish_reason, "stop"),
            }],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                      "total_tokens": len(prompt_ids) + completion},
            STATS_FIELD: self.service.stats(last, first_text_s),
        }

    async def _stream(self, send: Any, chat: ChatRequest, request_id: str, prompt_ids: list[int], params: Any,
                      opening: str | None, arrived: float) -> Any:
        """Sends the reply as server-sent events; returns the last delta (None if it failed).
        `arrived`: the request's arrival (monotonic), for the first text's time in the stats."""
        service = self.service
        created = int(time.time())

        def event(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                     "choices": choices, **extra}
            if chat.include_usage:
                chunk.setdefault("usage", None)
            return chunk

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

        async def emit(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            try:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            except OSError:  # uvicorn: the client disconnected
                raise _ClientGone from None

        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), (REPLICA_HEADER.encode(), service.replica.encode())]})
        await emit(event(choice({"role": "assistant", "content": ""})))
        last, first_text_s = None, None
        deltas = service.llm.stream(prompt_ids, params=params, owner=request_id, call_opening=opening)
        try:
            async for delta in deltas:
                if delta.text:
                    await emit(event(choice({"content": delta.text})))
                    if first_text_s is None:
                        first_text_s = time.monotonic() - arrived
                last = delta
        except LlmError as e:
            log.warning("chat %s failed mid-stream: %s", request_id, e)
            await emit({"error": {"message": f"The engine failed this request: {e}", "type": "server_error",
                                  "param": None, "code": "engine_error"}})
            last = None
        finally:
            await deltas.aclose()  # aborts the engine request unless it finished
        if last is not None:
            if last.tool_calls:  # a call comes whole: its name and arguments in one chunk
                calls = [{"index": i, **call} for i, call in enumerate(_tool_calls(last, request_id))]
                await emit(event(choice({"tool_calls": calls})))
            finish = "tool_calls" if last.tool_calls else FINISH_REASONS.get(last.finish_reason, "stop")
            await emit(event(choice({}, finish), **{STATS_FIELD: service.stats(last, first_text_s)}))
            if chat.include_usage:
                completion = last.tokens or 0
                await emit(event([], usage={"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                                            "total_tokens": len(prompt_ids) + completion}))
            await emit("[DONE]")
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return last


def _tool_calls(last: Any, request_id: str) -> list[dict[str, Any]]:
    """The reply's function calls as Chat Completions writes them (ids made from the request's)."""
    return [{"id": f"call_{request_id.removeprefix('chatcmpl-')[:16]}_{i}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for i, call in enumerate(last.tool_calls)]


def chat_app(service: ChatService | None, *, fallback: Callable[[str], Awaitable[tuple[int, bytes, str]]] | None = None,
             unavailable: str = "") -> Starlette:
    """The ASGI app. `fallback(path) -> (status, body, content type)` answers the other GET routes
    (a `VoiceServer`'s page, /healthz, /metrics) where the app shares a port with them. Without a
    service, every API route answers 404 with `unavailable` as the reason."""
    replica = service.replica if service is not None else ""

    def needs_service() -> ChatService:
        if service is None:
            raise ApiError(404, f"No chat API here: {unavailable}", code="unknown_url")
        return service

    def models(request: Request) -> Response:
        served = needs_service()
        served.check_token(request.headers)
        return _json_response(200, {"object": "list", "data": [served.model_card()]}, replica)

    def model(request: Request) -> Response:
        served = needs_service()
        served.check_token(request.headers)
        name = request.path_params["model"]
        if name != served.model_id:
            raise ApiError(404, f"The model {name[:100]!r} does not exist; this server serves {served.model_id!r}",
                           param="model", code="model_not_found")
        return _json_response(200, served.model_card(), replica)

    def unknown(request: Request) -> Response:
        needs_service()
        raise ApiError(404, f"Unknown route: {request.method} {request.url.path[:100]}", code="unknown_url")

    async def other(request: Request) -> Response:
        assert fallback is not None
        status, body, content_type = await fallback(request.url.path)
        return Response(body, status_code=status, media_type=content_type, headers={"Cache-Control": "no-cache"})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _json_response(exc.status, exc.body(), replica, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {405: f"Method {request.method} is not allowed on {request.url.path[:100]}"}.get(exc.status_code,
                                                                                                   str(exc.detail))
        return _json_response(exc.status_code, ApiError(exc.status_code, message).body(), replica,
                              dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("chat API: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _json_response(500, ApiError(500, "The server failed this request", kind="server_error").body(), replica)

    def not_allowed(allow: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            raise HTTPException(405, headers={"Allow": allow})

        return endpoint

    every = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    completions = _Completions(service) if service is not None else unknown
    routes = [
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        # The same paths with another method: 405 (not the catch-all's 404).
        Route("/v1/chat/completions", not_allowed("POST"), methods=every),
        Route("/v1/models", not_allowed("GET"), methods=every),
        Route("/v1/models/{model:path}", not_allowed("GET"), methods=every),
        Route("/v1/{rest:path}", unknown, methods=every),
    ]
    if fallback is not None:
        routes.append(Route("/{rest:path}", other, methods=["GET"]))
    elif service is not None:
        routes.append(Route("/healthz", lambda request: _json_response(200, service.health(), replica), methods=["GET"]))
    origins = list(service.api.cors_origins) if service is not None else []
    middleware = [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                             allow_headers=["authorization", "content-type"], max_age=600)] if origins else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})

