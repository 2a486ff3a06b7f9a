"""A voice frontend (`serve` with llm.backend = "openai") on the LLM tier (`serve-llm`): its calls
are answered by the tier; while the tier is down /healthz says so (503) and a turn fails with an
`llm_error` while the call goes on; once the tier is back, both recover."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx2 as httpx
from tier_helpers import TOKEN, RunningTier, tier_config, tiny_model
from va_fakes import FakeServices
from va_server import make_config, recv_until, running, text_session, url, user_text
from websockets.asyncio.client import connect

from voice_agent.config import LlmConfig
from voice_agent.llm import OpenAICompatibleLLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _turn(ws, text: str) -> list[dict]:
    await ws.send(user_text(text))
    await ws.send(json.dumps({"type": "response.create"}))
    return await recv_until(ws, "response.done")


async def _health(server) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{server.port}/healthz")


def test_a_frontend_reports_its_tier_down_and_recovers(tmp_path):
    port = _free_port()
    tier_cfg = tier_config(tiny_model(tmp_path / "model"))
    remote = LlmConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=10, max_new_tokens=8)
    llm = OpenAICompatibleLLM(remote, api_key=TOKEN)

    async def main():
        async with running(make_config(), FakeServices(llm)) as server:
            down = await _health(server)
            assert down.status_code == 503
            assert down.json()["status"] == "degraded" and "ConnectError" in down.json()["llm_error"]
            async with connect(url(server)) as ws:
                await text_session(ws)
                events = await _turn(ws, "Hello?")
                errors = [e for e in events if e["type"] == "error"]
                assert errors and errors[0]["error"]["code"] == "llm_error"
                assert events[-1]["response"]["status"] == "failed"
                tier = RunningTier(tier_cfg, port=port)
                await asyncio.to_thread(tier.__enter__)
                try:
                    for _ in range(100):  # the health answer is cached for up to HEALTH_CACHE_S
                        if (await _health(server)).status_code == 200:
                            break
                        await asyncio.sleep(0.1)
                    assert (await _health(server)).json()["llm_reachable"] is True
                    events = await _turn(ws, "Hello again?")  # the same call, answered by the tier now
                    done = events[-1]["response"]
                    # A random tiny model talks until its 8 tokens are out: "incomplete", not "failed".
                    assert done["status"] == "completed" or done["status_details"]["reason"] == "max_output_tokens", done
                    assert done["output"][0]["content"][0]["text"]
                    assert not [e for e in events if e["type"] == "error"]
                finally:
                    await asyncio.to_thread(tier.__exit__, None, None, None)
        await llm.aclose()

    asyncio.run(main())
