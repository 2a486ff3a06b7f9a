"""The chat API on `voice-agent serve`'s own port (voice_agent/shared_port.py): the openai SDK and
a WebSocket call on one port, the server's GET routes on a connection the API took over, a
server without a local model saying so, odd request lines, the shutdown."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx2 as httpx
import openai
import pytest
from tier_helpers import TOKEN, tiny_model
from va_fakes import FakeLLM, FakeServices
from va_server import make_config, running, text_session, text_turn, url
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from voice_agent.chat_api import REPLICA_HEADER
from voice_agent.config import LlmConfig
from voice_agent.llm import build_llm

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model", slow=True)


@pytest.fixture()
def local_llm(model_path):
    llm = build_llm(LlmConfig(model=str(model_path), dtype="float32", loop_guard=False))
    yield llm
    llm._engine.close()


def _base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_the_sdk_and_a_call_share_the_port_and_the_token(local_llm):
    asyncio.run(_the_sdk_and_a_call_share_the_port_and_the_token(local_llm))


async def _the_sdk_and_a_call_share_the_port_and_the_token(local_llm):
    async with running(make_config(token=TOKEN), FakeServices(local_llm)) as server:
        client = openai.AsyncOpenAI(base_url=_base(server) + "/v1", api_key=TOKEN, max_retries=0)
        model_id = local_llm.name.removeprefix("local:")
        raw = await client.chat.completions.with_raw_response.create(model=model_id, messages=HELLO, max_tokens=5,
                                                                     temperature=0)
        completion = raw.parse()
        assert completion.usage.completion_tokens == 5 and completion.choices[0].message.content
        assert raw.headers[REPLICA_HEADER]
        # A call on the same port, while a streamed completion runs.
        stream = await client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=40, temperature=0,
                                                      stream=True)
        async with connect(url(server), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await text_session(ws)
            done = await text_turn(ws, "What is the weather like?")
            assert done["response"]["status"] == "completed"
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=_base(server) + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(InvalidStatus):  # the calls' own check is unchanged
            async with connect(url(server)):
                pass


def test_get_routes_work_on_a_connection_the_api_took_over(local_llm):
    asyncio.run(_get_routes_work_on_a_connection_the_api_took_over(local_llm))


async def _get_routes_work_on_a_connection_the_api_took_over(local_llm):
    async with running(make_config(), FakeServices(local_llm)) as server, \
            httpx.AsyncClient(base_url=_base(server), limits=httpx.Limits(max_connections=1)) as http:
        response = await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert response.status_code == 200
        # One connection, kept alive: these reach the chat app, which answers as the server does.
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["llm_reachable"] is True
        assert "llm_rows" in health.json()["work"]
        assert (await http.get("/metrics")).text.startswith("#")
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/no-such-file")).status_code == 404
        response = await http.post("/healthz")
        assert response.status_code == 405 and response.json()["error"]["message"]
        response = await http.post("/v1/realtime")
        assert response.status_code == 404


def test_without_a_local_model_the_api_says_why():
    asyncio.run(_without_a_local_model_the_api_says_why())


async def _without_a_local_model_the_api_says_why():
    async with running(make_config(), FakeServices(FakeLLM())) as server, httpx.AsyncClient(base_url=_base(server)) as http:
        response = await http.post("/v1/chat/completions", json={"messages": HELLO})
        assert response.status_code == 404
        assert "not local" in response.json()["error"]["message"]
        assert (await http.get("/v1/models")).status_code == 404
        assert (await http.get("/healthz")).status_code == 200
    config = make_config()
    config.api.enabled = False
    async with running(config, FakeServices(FakeLLM())) as server, httpx.AsyncClient(base_url=_base(server)) as http:
        response = await http.post("/v1/chat/completions", json={"messages": HELLO})
        assert response.status_code == 404 and "api.enabled" in response.json()["error"]["message"]


async def _raw(server, data: bytes, *, chunks: int = 1, read: bool = True, eof: bool = True) -> bytes:
    """Send `data` in `chunks` pieces, then (`eof`) half-close; the reply, up to the server's close.
    (The chat app takes a half-close before its answer for a client that went away, as uvicorn does.)"""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
        await asyncio.sleep(0.01)
    if eof:
        writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10) if read else b""
    writer.close()
    return reply


def test_odd_request_lines_do_not_disturb_the_server(local_llm):
    asyncio.run(_odd_request_lines_do_not_disturb_the_server(local_llm))


async def _odd_request_lines_do_not_disturb_the_server(local_llm):
    async with running(make_config(), FakeServices(local_llm)) as server:
        await _raw(server, b"POS", read=False)  # a partial request line, then EOF
        await _raw(server, b"GET /heal", read=False)
        assert b" 400 " in (await _raw(server, b"X" * 20000))[:20]  # no request line at all: refused
        reply = await _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", chunks=20)  # byte by byte
        assert reply.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in reply
        body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reply = await _raw(server, request, chunks=30, eof=False)
        assert reply.startswith(b"HTTP/1.1 200") and b"chat.completion" in reply
        async with connect(url(server)) as ws:  # and calls go on
            await text_session(ws)


def test_shutdown_ends_api_requests_in_progress(local_llm, caplog):
    asyncio.run(_shutdown_ends_api_requests_in_progress(local_llm, caplog))


async def _shutdown_ends_api_requests_in_progress(local_llm, caplog):
    caplog.set_level(logging.INFO)
    config = make_config(shutdown_grace_s=0.5)
    server_cm = running(config, FakeServices(local_llm))
    server = await server_cm.__aenter__()
    client = openai.AsyncOpenAI(base_url=_base(server) + "/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(model=local_llm.name.removeprefix("local:"), messages=HELLO,
                                                  max_tokens=1000, temperature=0, stream=True)
    await stream.__anext__()
    await asyncio.wait_for(server_cm.__aexit__(None, None, None), 10)
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        async for _ in stream:
            pass
    for _ in range(100):
        if local_llm.load().idle:
            break
        await asyncio.sleep(0.02)
    assert local_llm.load().idle  # the engine request was aborted with the server
