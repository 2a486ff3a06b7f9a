"""`serve-llm --ray`: the chat API on Ray Serve with two replicas, in a real local Ray instance
(`--num-cpus 2`) and the official openai SDK as the client: requests spread over the replicas,
refusals keep OpenAI's shape through Ray's proxy, a client that goes away frees its replica's
engine, and a replica killed mid-stream (SIGKILL) fails only its own requests and is replaced.

The tier runs as the real command in a subprocess: Ray's driver (its gRPC channels, its threads)
stays out of the pytest process, whose own resources other tests count."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx2 as httpx
import openai
import pytest
from tier_helpers import TOKEN, tiny_model

from voice_agent.chat_api import REPLICA_HEADER

pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'voice-agent[ray]')")

pytestmark = pytest.mark.slow  # starts Ray (~15 s) and loads a model in each replica

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    from voice_agent.bench.servers import start_server, wait_healthy

    model = tiny_model(tmp_path_factory.mktemp("tiny") / "model", slow=True)
    overrides = [f"llm.model={model}", "llm.dtype=float32", "llm.loop_guard=false", f"server.token={TOKEN}",
                 "api.max_tokens=600"]
    server = start_server("tier", overrides, tmp_path_factory.mktemp("ray"), command_name="serve-llm",
                          args=["--ray", "--replicas", "2", "--num-cpus", "2"])
    try:
        wait_healthy(server, 180)
        # Ray's proxy learns of the replicas from its controller a moment after the deployment is
        # up: wait until both answer through it.
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(httpx.get(f"{server.url}/healthz", timeout=30).json()["replica"])
        assert len(seen) == 2, f"only {seen} answered within 60 s"
        yield f"{server.url}/v1"
    finally:
        server.stop(grace_s=60)  # SIGTERM: the command removes its application and stops Ray
        assert server.process.returncode == 0, server.log_tail()


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=60)


async def _stream_on(url: str, max_tokens: int) -> tuple[str, object]:
    """A streamed request that has produced its first text: (its replica, the open stream)."""
    raw = await _client(url).chat.completions.with_raw_response.create(
        model=None, messages=HELLO, max_tokens=max_tokens, temperature=0, stream=True)  # greedy: no early EOS
    stream = raw.parse()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    return raw.headers[REPLICA_HEADER], stream


def _model(url: str) -> str:
    return httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()["data"][0]["id"]


def test_concurrent_requests_are_spread_over_both_replicas(tier):
    url = tier
    model = _model(url)

    async def main():
        client = _client(url)

        async def one(i: int) -> tuple[str, str]:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"Hello number {i}"}], max_tokens=20, temperature=0)
            return raw.headers[REPLICA_HEADER], raw.parse().choices[0].message.content

        return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(main())
    replicas = {replica for replica, _ in results}
    assert len(replicas) == 2, replicas
    assert all(replica.startswith("SERVE_REPLICA::") for replica in replicas)
    assert all(text for _, text in results)


def test_refusals_keep_their_shape_through_the_proxy(tier):
    url = tier
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = httpx.post(f"{url}/chat/completions", content=b"{nope", headers=auth, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers[REPLICA_HEADER].startswith("SERVE_REPLICA::")
    response = httpx.post(f"{url}/chat/completions", json={"messages": HELLO}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(f"{url}/chat/completions", json={"messages": HELLO, "max_tokens": 10**6}, headers=auth, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["replica"].startswith("SERVE_REPLICA::")


def _wait_replicas_idle(url: str, replicas: set[str], timeout_s: float = 20.0) -> bool:
    """Until each replica in `replicas` has said, on /healthz (Ray picks the replica), that its
    engine holds nothing."""
    idle: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not replicas <= idle:
        health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30).json()
        if health["engine"] == {"rows": 0, "queued": 0}:
            idle.add(health["replica"])
        else:
            idle.discard(health["replica"])
        time.sleep(0.05)
    return replicas <= idle


def test_a_client_that_goes_away_frees_its_replica(tier):
    url = tier

    async def main():
        replicas = set()
        for _ in range(4):  # long streams (600 tokens: ~9 s each), dropped after their first text
            replica, stream = await _stream_on(url, 600)
            replicas.add(replica)
            await stream.close()
        return replicas

    started = time.monotonic()
    replicas = asyncio.run(main())
    assert _wait_replicas_idle(url, replicas, timeout_s=5.0), "an engine kept working for a client that left"
    assert time.monotonic() - started < 8.0


def _pid_of(url: str, replica: str, timeout_s: float = 20.0) -> int:
    """The process of `replica`, from its /healthz (Ray picks which replica answers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30).json()
        if health["replica"] == replica:
            return health["pid"]
    raise AssertionError(f"{replica} never answered /healthz")


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(tier):
    url = tier

    async def main():
        streams: dict[str, object] = {}
        for _ in range(20):  # until one long stream runs on each replica
            replica, stream = await _stream_on(url, 400)
            if replica in streams:
                await stream.close()
            else:
                streams[replica] = stream
            if len(streams) == 2:
                break
        assert len(streams) == 2, "Ray never routed to the second replica"
        victim, survivor = sorted(streams)
        os.kill(await asyncio.to_thread(_pid_of, url, victim), signal.SIGKILL)

        async def finish(stream) -> str:
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return text

        outcomes = await asyncio.gather(finish(streams[victim]), finish(streams[survivor]), return_exceptions=True)
        return victim, survivor, outcomes

    victim, survivor, (lost, kept) = asyncio.run(main())
    # The victim's stream is cut: an error (or a stream that ends without [DONE], which the
    # openai SDK also raises on) -- never a reply that looks whole.
    assert isinstance(lost, Exception), f"the killed replica's stream ended as if whole: {lost!r}"
    assert isinstance(kept, str) and kept, kept  # the other replica's client got its whole reply
    # Ray replaces the replica; new requests are served (by the survivor meanwhile, then by both).
    model = _model(url)
    deadline = time.monotonic() + 90
    seen: set[str] = set()
    while time.monotonic() < deadline and not (seen - {victim, survivor}):
        response = httpx.post(f"{url}/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert response.status_code == 200, response.text
        seen.add(response.headers[REPLICA_HEADER])
        time.sleep(0.1)
    assert victim not in seen
    assert seen - {victim, survivor}, "no new replica served within 90 s"
