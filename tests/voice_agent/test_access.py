"""Access control: the token is checked before any audio is read, on every WebSocket route; it
never appears in logs (websockets' DEBUG lines included) or metrics; browser Origins are checked."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import pytest
from va_fakes import FakeLLM, FakeServices
from va_server import make_config, recv_json, running, text_session, text_turn, url
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from voice_agent.server import ROUTES

TOKEN = "tok-5ecret-9f3a"


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def test_wrong_or_missing_token_is_rejected_before_any_audio_on_every_route(caplog):
    services = FakeServices(FakeLLM("Hello."))

    async def main():
        async with running(make_config(token=TOKEN), services) as server:
            attempts = 0
            for route in ROUTES:
                for headers, query in (
                    ({}, ""),
                    ({"Authorization": "Bearer wrong"}, ""),
                    ({"Authorization": f"Bearer {TOKEN}x"}, ""),
                    ({"Authorization": f"Basic {TOKEN}"}, ""),
                    ({}, "?token=wrong"),
                    ({}, f"?token={TOKEN[:-1]}"),
                    ({"Authorization": "Bearer wrong"}, f"?token={TOKEN}"),  # the header wins
                ):
                    attempts += 1
                    with pytest.raises(InvalidStatus) as info:
                        async with connect(url(server, route) + query, additional_headers=headers) as ws:
                            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": ""}))
                    assert info.value.response.status_code == 401
            assert server.metrics.calls_rejected["unauthorized"] == attempts
            assert sum(server.metrics.calls_total.values()) == 0  # no session was ever made
            assert services.transcribed == [] and services.llm.requests == []
            # The right token, by header and by query, on both routes.
            async with connect(url(server), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
                await text_session(ws)
                assert (await text_turn(ws, "hi"))["response"]["status"] == "completed"
            async with connect(url(server, "/twilio") + f"?token={TOKEN}") as ws:
                await ws.send(json.dumps({"event": "connected"}))
            metrics = await asyncio.to_thread(http_get, server.port, "/metrics")
            health = await asyncio.to_thread(http_get, server.port, "/healthz")
            assert TOKEN not in metrics and TOKEN not in health

    with caplog.at_level(logging.DEBUG):  # websockets logs request lines and headers at DEBUG
        asyncio.run(main())
    # The server's records (this test's own client logs what it sends: not the server's business).
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client"))
    assert "GET /v1/realtime?token=<redacted>" in logged and "Authorization: Bearer <redacted>" in logged
    assert TOKEN[:8] not in logged  # neither the token nor the near misses that were tried


def test_origin_check_for_browsers():
    async def main():
        config = make_config(allowed_origins=["https://app.example.com"])
        async with running(config) as server:
            with pytest.raises(InvalidStatus) as info:
                async with connect(url(server), origin="https://evil.example.com"):
                    pass
            assert info.value.response.status_code == 403
            async with connect(url(server), origin="https://app.example.com") as ws:
                assert (await recv_json(ws))["type"] == "session.created"
            async with connect(url(server)) as ws:  # no Origin: not a browser
                assert (await recv_json(ws))["type"] == "session.created"
        async with running(make_config()) as server, connect(url(server), origin="https://anywhere.example") as ws:
            assert (await recv_json(ws))["type"] == "session.created"  # empty list: any origin

    asyncio.run(main())


def test_token_and_origin_together():
    async def main():
        config = make_config(token=TOKEN, allowed_origins=["https://app.example.com"])
        async with running(config) as server:
            for origin, query, status in (
                ("https://evil.example.com", f"?token={TOKEN}", 403),
                ("https://app.example.com", "?token=nope", 401),
            ):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(url(server) + query, origin=origin):
                        pass
                assert info.value.response.status_code == status
            async with connect(url(server) + f"?token={TOKEN}", origin="https://app.example.com") as ws:
                assert (await recv_json(ws))["type"] == "session.created"
            assert sum(server.metrics.calls_total.values()) == 1

    asyncio.run(main())
