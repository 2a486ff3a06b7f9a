"""A hostile client against `voice-agent serve` on the real embedded models (issue: no work
outlives its call). The server runs in a subprocess, as a user runs it, so its CPU time and
resident memory are its own; the client is `voice_agent.bench.hostile` (a seeded mix of junk and
abuse on both routes). Slow: the server loads whisper, piper and the LLM once for the module.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect

from voice_agent.bench import hostile, servers
from voice_agent.commands.bench_hostile import process_usage
from voice_agent.errors import UserError

pytestmark = pytest.mark.slow

IDLE_BAR_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from voice_agent.models import resolve_asr_model, resolve_llm_model, resolve_tts_voice

    try:  # the embedded models: skip (not fail) where a model package is not installed
        resolve_asr_model("tiny.en"), resolve_tts_voice("en_US-joe-medium"), resolve_llm_model("default")
    except UserError as e:
        pytest.skip(f"embedded models missing: {e}")
    process = servers.start_server("hostile", ["server.max_calls=16", "llm.max_new_tokens=40"], tmp_path_factory.mktemp("hostile"))
    try:
        servers.wait_healthy(process, 300)
        yield process
    finally:
        process.stop()


async def text_turn(base_url: str, text: str) -> tuple[float, str, str]:
    """One honest typed turn: (seconds to the reply's first text, status, reply text)."""
    async with connect(base_url.replace("http://", "ws://") + "/v1/realtime") as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        started = time.monotonic()
        await ws.send(json.dumps({"type": "response.create"}))
        first, reply = None, ""
        async with asyncio.timeout(60):
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "response.output_text.delta":
                    first = first if first is not None else time.monotonic() - started
                    reply += event["delta"]
                elif event["type"] == "response.done":
                    return first if first is not None else float("inf"), event["response"]["status"], reply
    raise AssertionError("no response.done")


def test_server_is_idle_within_a_second_of_the_last_hostile_close(server):
    before = [asyncio.run(text_turn(server.url, "What is the capital of France?")) for _ in range(2)]  # also warms up
    assert all(status == "completed" for _, status, _ in before)

    async def together(n: int) -> list:
        return await asyncio.gather(*(text_turn(server.url, "Tell me about Paris.") for _ in range(n)))

    # The flood runs several replies at once (greetings from response.create): the engine's and
    # oneDNN's first buffers for a batch of rows are allocated once, here, not counted as growth.
    for n in (2, 4, 6):
        asyncio.run(together(n))
    _, rss_start_mb = process_usage(server.process.pid)
    report = asyncio.run(hostile.run_hostile(server.url, messages=3000, connections=6, seed=11))
    trace: list = []
    idle_s = hostile.wait_idle(server.url, 30.0, since=report.last_close_t, trace=trace)
    assert report.sent == 3000
    assert idle_s is not None and idle_s <= IDLE_BAR_S, f"idle {idle_s} s after the last close; work on the way: {trace}"
    health = servers.check_url(server.url)
    assert health["calls_active"] == 0, health
    cpu0, _ = process_usage(server.process.pid)
    time.sleep(1.0)
    cpu1, rss_mb = process_usage(server.process.pid)
    assert cpu1 - cpu0 <= 0.05, f"{cpu1 - cpu0:.2f} CPU seconds in 1 s with no call"
    print(f"resident memory {rss_start_mb:.0f} -> {rss_mb:.0f} MB")
    assert rss_mb - rss_start_mb <= 100, f"resident memory {rss_start_mb:.0f} -> {rss_mb:.0f} MB"
    # An honest caller afterwards is answered as fast as before the flood.
    first_s, status, reply = asyncio.run(text_turn(server.url, "What is the capital of France?"))
    assert status == "completed" and reply.strip()
    assert first_s <= 2 * max(f for f, _, _ in before) + 0.5, (first_s, before)
