"""A spoken conversation through a voice frontend whose LLM is the Ray Serve tier: espeak-ng speech
in over /v1/realtime (the official openai SDK), whisper on the frontend, SmolLM2 in a Ray Serve
replica behind the OpenAI-compatible API, the reply's text and audio out.

Slow: starts a local Ray instance and loads the real models; skipped without espeak-ng, Ray or
the embedded models."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from test_voice_e2e import QUESTION, espeak, relevant, spoken_turn

from voice_agent.config import load_config
from voice_agent.errors import UserError
from voice_agent.server import VoiceServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tier_url(tmp_path_factory):
    """`voice-agent serve-llm --ray` as a subprocess (Ray's driver stays out of pytest's process)."""
    pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'voice-agent[ray]')")
    from voice_agent.bench.servers import start_server, wait_healthy

    server = start_server("tier", ["llm.model=smollm2-135m-instruct"], tmp_path_factory.mktemp("ray"),
                          command_name="serve-llm", args=["--ray", "--replicas", "1", "--num-cpus", "2"])
    try:
        try:
            wait_healthy(server, 180)
        except UserError as e:
            pytest.skip(f"the tier could not start: {e}")
        yield f"{server.url}/v1"
    finally:
        server.stop(grace_s=60)


def test_a_spoken_call_answered_by_the_ray_tier(tier_url, tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from openai import AsyncOpenAI

    from voice_agent.services import ModelServices

    config = load_config(overrides=["server.port=0", "store.path=''", "llm.backend=openai", f"llm.base_url={tier_url}",
                                    "llm.max_new_tokens=40"])
    try:
        services = ModelServices.load(config)
    except UserError as e:
        pytest.skip(f"embedded models missing: {e}")
    utterance = espeak(QUESTION, tmp_path)

    async def main():
        server = VoiceServer(config, services)
        await server.start()
        client = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="voice-agent") as conn:
            turn = await spoken_turn(conn, utterance, timeout_s=120)
        await server.shutdown()
        await services.aclose()
        return turn

    turn = asyncio.run(main())
    print(f"\nuser: {turn['user_text']!r}\nreply text (from the Ray tier): {turn['transcript']!r}")
    assert not turn["errors"], turn["errors"]
    assert "capital" in turn["user_text"].lower()
    assert relevant(turn["transcript"]), turn["transcript"]
    assert len(turn["reply"]) > 24000 // 2, "less than half a second of reply audio"
    assert turn["metrics"]["voice_to_voice_ms"] is not None
