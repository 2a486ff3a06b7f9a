"""The chat API (`serve-llm` without Ray) with the official openai SDK as the client, a real
uvicorn server and the real engine on a tiny random checkpoint: completions streamed and not,
usage, stop strings, every refusal, the access token, aborts when the client goes away."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx2 as httpx
import openai
import pytest
from tier_helpers import TOKEN, RunningTier, tier_config, tiny_model

from voice_agent.chat_api import REPLICA_HEADER

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there, how are you?"}]
LONG = [{"role": "user", "content": "Hello there, how are you?"}]  # greedy: 1000 tokens and no EOS


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    config = tier_config(tiny_model(tmp_path_factory.mktemp("tiny") / "model", slow=True), max_tokens=400)
    config.llm.loop_guard = False  # a random model repeats itself: keep its replies whole
    with RunningTier(config) as running:
        yield running


@pytest.fixture()
def client(tier):
    return openai.OpenAI(base_url=tier.url, api_key=TOKEN, max_retries=0, timeout=60)


def _post(tier, body, *, token: str | None = TOKEN, raw: bytes | None = None, headers: dict | None = None):
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{tier.url}/chat/completions", json=None if raw is not None else body, content=raw,
                      headers={**auth, **(headers or {})}, timeout=60)


def _error(response) -> dict:
    return response.json()["error"]


def test_models_list_and_retrieve(tier, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [tier.service.model_id]
    assert client.models.retrieve(tier.service.model_id).owned_by == "voice-agent"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion_with_usage_finish_reason_and_statistics(tier, client):
    raw = client.chat.completions.with_raw_response.create(model=tier.service.model_id, messages=HELLO, max_tokens=6,
                                                           temperature=0)
    assert raw.headers[REPLICA_HEADER] == tier.service.replica
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # a random model does not say EOS within 6 tokens
    prompt = tier.service.llm.prepare(HELLO, tier.service.llm.params())
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == len(prompt) + 6
    stats = completion.model_extra["voice_agent"]  # the SDK keeps the extension, ignoring it
    assert stats["completion_tokens"] == 6 and stats["forwards"] >= 6 and stats["prefill_forwards"] >= 1
    assert stats["tokens_per_forward"] == pytest.approx(6 / stats["forwards"], abs=1e-3)
    # the first token came from the prefill's logits; after it, an AR engine makes one a forward
    assert stats["prefill_tokens"] == 1 and stats["decode_tokens_per_forward"] == 1.0
    assert stats["finish_reason"] == "length" and stats["replica"] == tier.service.replica
    assert stats["first_text_ms"] > 0


def test_streamed_reply_is_the_same_text_with_a_usage_chunk_last(tier, client):
    whole = client.chat.completions.create(messages=HELLO, model=tier.service.model_id, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(messages=HELLO, model=tier.service.model_id, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["voice_agent"]["forwards"] >= 12
    # The server's own time to the first text: within the client's (which adds the transport).
    started = time.monotonic()
    stream = client.chat.completions.create(messages=HELLO, model=tier.service.model_id, max_tokens=12, temperature=0,
                                            stream=True)
    client_first_ms = None
    for chunk in stream:
        if client_first_ms is None and chunk.choices and chunk.choices[0].delta.content:
            client_first_ms = (time.monotonic() - started) * 1000
        if chunk.choices and chunk.choices[0].finish_reason:
            server_first_ms = chunk.model_extra["voice_agent"]["first_text_ms"]
    assert 0 < server_first_ms <= client_first_ms
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(messages=HELLO, model=tier.service.model_id, max_tokens=3, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_stop_strings_and_max_completion_tokens(tier, client):
    kwargs = dict(model=tier.service.model_id, messages=HELLO, temperature=0)
    text = client.chat.completions.create(max_completion_tokens=16, **kwargs).choices[0].message.content
    stop = text[4:6]
    assert stop and stop in text
    stopped = client.chat.completions.create(max_completion_tokens=16, stop=[stop, "never-said"], **kwargs)
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.model_extra["voice_agent"]["finish_reason"] == "stop"
    streamed = client.chat.completions.create(max_tokens=16, stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_sampling_parameters_reach_the_engine(tier, client):
    kwargs = dict(model=tier.service.model_id, messages=HELLO, max_tokens=10)
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    assert client.chat.completions.create(top_p=0, **kwargs).choices[0].message.content == greedy  # top_p 0: greedy
    seeded = [client.chat.completions.create(temperature=1.5, seed=7, **kwargs).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # the seed makes sampling repeatable
    others = {client.chat.completions.create(temperature=1.5, seed=s, **kwargs).choices[0].message.content
              for s in range(8, 12)}
    assert len(others | {seeded[0]}) > 1  # ...and it samples: seeds give different replies


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"messages": []}, 400, "empty_array", "messages"),
    ({}, 400, "invalid_type", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user"}]}, 400, "invalid_type", "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "empty_content", "messages"),
    ({"messages": [{"role": "tool", "content": "42"}]}, 400, "invalid_value", "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "content": "42", "name": "f"}]}, 400, "unsupported_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c"}]}]}, 400, "invalid_value",
     "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "unsupported_value", "messages[0].content"),
    ({"messages": HELLO, "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ({"messages": HELLO, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"messages": HELLO, "max_tokens": 10**9}, 400, "invalid_value", "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": "lots"}, 400, "invalid_type", "max_completion_tokens"),
    ({"messages": HELLO, "temperature": 3}, 400, "invalid_value", "temperature"),
    ({"messages": HELLO, "top_p": True}, 400, "invalid_type", "top_p"),
    ({"messages": HELLO, "stop": [""]}, 400, "invalid_value", "stop"),
    ({"messages": HELLO, "n": 2}, 400, "unsupported_value", "n"),
    ({"messages": HELLO, "tools": [{"type": "web_search"}]}, 400, "invalid_value", "tools[0].type"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400, "invalid_value",
     "tools[0].name"),
    ({"messages": HELLO, "tool_choice": "required"}, 400, "invalid_value", "tool_choice"),
    ({"messages": HELLO, "functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, 400, "invalid_value", "stream_options"),
    ({"messages": HELLO, "temprature": 0.5}, 400, "unknown_parameter", "temprature"),
    ({"messages": HELLO, "model": "gpt-4o"}, 404, "model_not_found", "model"),
])
def test_bad_requests_get_openai_errors(tier, body, status, code, param):
    response = _post(tier, body)
    assert response.status_code == status, response.text
    error = _error(response)
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert response.headers[REPLICA_HEADER] == tier.service.replica


def test_malformed_json_and_a_prompt_beyond_the_context(tier, client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        response = _post(tier, None, raw=raw)
        assert response.status_code == 400 and "JSON" in _error(response)["message"]
    long = [{"role": "user", "content": "Hello there, how are you? " * 400}]  # far past 2048 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=tier.service.model_id, messages=long, max_tokens=5)
    assert caught.value.code == "context_length_exceeded"
    params = tier.service.llm.params()
    params.max_new_tokens = 1
    per_sentence = len(tier.service.llm.prepare([{"role": "user", "content": "Hello there, how are you? " * 11}], params)) - \
        len(tier.service.llm.prepare([{"role": "user", "content": "Hello there, how are you? " * 10}], params))
    fits = [{"role": "user", "content": "Hello there, how are you? " * (1800 // per_sentence)}]  # ~1800 of 2048
    with pytest.raises(openai.BadRequestError) as caught:  # fits alone, not with max_tokens on top
        client.chat.completions.create(model=tier.service.model_id, messages=fits, max_tokens=400, stream=True)
    assert caught.value.code == "context_length_exceeded"
    # The server goes on serving.
    assert client.chat.completions.create(model=tier.service.model_id, messages=HELLO, max_tokens=2).choices


def test_oversized_body_is_refused_before_it_is_read(tier):
    limit = tier.service.api.max_body_bytes
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (limit + 10)}]}).encode()
    response = _post(tier, None, raw=huge)
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"


def test_too_many_requests_in_flight_get_429_with_retry_after(tier, client):
    service = tier.service
    hold = threading.Event()
    started = threading.Event()

    def long_stream():
        stream = client.chat.completions.create(model=service.model_id, messages=LONG, max_tokens=400, temperature=0,
                                                stream=True)
        for _ in stream:
            started.set()
            if hold.wait(0):
                break
        stream.close()

    old = service.api.max_requests
    service.api.max_requests = 1
    worker = threading.Thread(target=long_stream)
    try:
        worker.start()
        assert started.wait(30)
        response = _post(tier, {"messages": HELLO, "max_tokens": 2})
        assert response.status_code == 429
        assert response.headers["Retry-After"] == str(service.api.retry_after_s)
        assert _error(response)["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=service.model_id, messages=HELLO, max_tokens=2)
    finally:
        hold.set()
        worker.join(30)
        service.api.max_requests = old
    assert _wait_idle(service)
    assert _post(tier, {"messages": HELLO, "max_tokens": 2}).status_code == 200  # room again


def test_the_token_is_checked_first_and_never_logged(tier, caplog):
    caplog.set_level(logging.DEBUG)
    for token in (None, "wrong", TOKEN + "x"):
        # Even a body that is not JSON (or is too big) gets 401: nothing is read before the token.
        response = _post(tier, None, token=token, raw=b"{not json")
        assert response.status_code == 401 and _error(response)["code"] == "invalid_api_key"
    assert httpx.get(f"{tier.url}/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tier.url, api_key="nope", max_retries=0).models.list()
    assert _post(tier, {"messages": HELLO, "max_tokens": 2}).status_code == 200
    assert TOKEN not in caplog.text


def test_unknown_routes_and_methods_get_openai_errors(tier):
    response = httpx.get(f"{tier.url}/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 404 and _error(response)["code"] == "unknown_url"
    response = httpx.get(f"{tier.url}/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 405 and "GET" in _error(response)["message"]


def _wait_idle(service, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.llm.load().idle:
            return True
        time.sleep(0.01)
    return False


def _count_steps(service, monkeypatch) -> list[float]:
    """The times of the engine's denoising steps from now on."""
    decoder = service.llm._engine._decoder
    step, times = decoder.step, []

    def counted(*args, **kwargs):
        times.append(time.monotonic())
        return step(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", counted)
    return times


def test_a_streaming_client_that_goes_away_aborts_its_request(tier, monkeypatch):
    service = tier.service
    times = _count_steps(service, monkeypatch)
    body = {"messages": LONG, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{tier.url}/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while '"content": ""' in (line := next(lines)) or not line.startswith("data:"):
            pass  # up to the first chunk with text
        closed_at = time.monotonic()
    assert _wait_idle(service, 5.0)
    # The engine stopped within a step or two of the close (400 tokens take ~6 s).
    assert sum(t > closed_at for t in times) <= 3, f"{sum(t > closed_at for t in times)} steps after the close"


def test_a_waiting_client_that_goes_away_aborts_its_request(tier, monkeypatch):
    service = tier.service
    times = _count_steps(service, monkeypatch)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tier.url}/chat/completions", json={"messages": LONG, "max_tokens": 400, "temperature": 0}, timeout=0.5,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    closed_at = time.monotonic()
    assert _wait_idle(service, 5.0)
    assert sum(t > closed_at for t in times) <= 3
    assert len(times) < 200  # nowhere near the 400 tokens asked for


def test_an_engine_failure_mid_stream_fails_that_request_only(tier, client, monkeypatch):
    decoder = tier.service.llm._engine._decoder
    step, calls = decoder.step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated fault in the forward")
        return step(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", failing)
    # Greedy: a sampled reply might end (EOS) before the fourth step.
    stream = client.chat.completions.create(model=tier.service.model_id, messages=LONG, max_tokens=20, temperature=0,
                                            stream=True)
    with pytest.raises(openai.APIError, match="engine failed"):
        for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError):
        calls.clear()
        client.chat.completions.create(model=tier.service.model_id, messages=LONG, max_tokens=20, temperature=0)
    monkeypatch.setattr(decoder, "step", step)
    assert client.chat.completions.create(model=tier.service.model_id, messages=HELLO, max_tokens=3).choices


def test_a_taken_port_is_a_clear_error(tier):
    from voice_agent.errors import UserError

    with pytest.raises(UserError, match="cannot listen"):
        RunningTier(tier.config, port=tier.port).__enter__()  # a second engine of its own, closed on the way out


def test_cors_only_for_the_configured_origins(tmp_path):
    """A page from a listed origin may call the API (its preflight needs no token, the call still
    does); other origins, and every origin where none is configured, get no CORS headers."""
    config = tier_config(tiny_model(tmp_path / "model"), cors_origins=["https://app.example"])
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with RunningTier(config) as running:
        ok = httpx.options(f"{running.url}/chat/completions", headers=preflight, timeout=30)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in ok.headers["access-control-allow-methods"]
        other = httpx.options(f"{running.url}/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                              timeout=30)
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        call = httpx.get(f"{running.url}/models", headers={"Origin": "https://app.example"}, timeout=30)
        assert call.status_code == 401  # the token is still required
        assert call.headers["access-control-allow-origin"] == "https://app.example"
    with RunningTier(tier_config(tiny_model(tmp_path / "model2"))) as running:
        plain = httpx.get(f"{running.url}/models", headers={"Origin": "https://app.example",
                                                            "Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
