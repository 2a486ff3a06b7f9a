"""Load, soak and churn on the real server with fake models: resident memory, tasks, threads and
file descriptors come back to where they were after warm-up.

CI runs the sizes the issue asks for (200 turns over 4 calls, 500 connection cycles). A longer
soak is the same test with bigger numbers:

    SOAK_TURNS=20000 SOAK_CALLS=8 SOAK_CYCLES=5000 .venv/bin/pytest -q -s tests/voice_agent/test_soak.py

`-s` shows one line of measurements per test (docs/reliability.md records them).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
from va_fakes import FakeLLM, FakeServices, bursts, silence
from va_server import (
    POOL_MAX_THREADS,
    make_config,
    pcm_b64,
    recv_json,
    recv_until,
    resources,
    running,
    settled,
    text_session,
    text_turn,
    twilio_media,
    twilio_start,
    url,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from audio.resample import resample

TURNS = int(os.environ.get("SOAK_TURNS", "200"))
CALLS = int(os.environ.get("SOAK_CALLS", "4"))
CYCLES = int(os.environ.get("SOAK_CYCLES", "500"))
MAX_RSS_GROWTH_MB = 50.0
REPLY = "Sure. It is sunny today, with a light breeze from the west. Take a hat!"


def spoken_messages() -> list[str]:
    """One spoken question at 16 kHz in 100 ms appends (sent faster than real time)."""
    audio = np.concatenate([bursts(3), silence(700)])
    return [json.dumps({"type": "input_audio_buffer.append", "audio": pcm_b64(audio[i : i + 1600])}) for i in range(0, len(audio), 1600)]


async def caller(server, turns: int, done: list[int]) -> None:
    """One call: spoken turns (server VAD, audio replies) alternate with typed text-only turns;
    every fourth spoken turn is interrupted by the caller."""
    speech = spoken_messages()
    async with connect(url(server)) as ws:
        await recv_json(ws)
        fmt = {"type": "audio/pcm", "rate": 16000}
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}))
        await recv_until(ws, "session.updated")
        for i in range(turns):
            if i % 2:
                await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
                done_event = await text_turn(ws, f"question {i}")
                await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["audio"]}}))
                assert done_event["response"]["status"] == "completed"
            else:
                for message in speech:
                    await ws.send(message)
                if i % 8 == 0:
                    await recv_until(ws, "response.output_audio.delta")
                    await ws.send(json.dumps({"type": "response.cancel"}))
                events = await recv_until(ws, "response.done")
                assert events[-1]["response"]["status"] in ("completed", "cancelled")
            done.append(i)


class ThreadedServices(FakeServices):
    """ASR and TTS in worker threads, like the real ModelServices (so threads are counted too)."""

    async def transcribe(self, audio_16k, *, priority=None, on_start=None, owner=None):
        if on_start is not None:
            on_start()
        return await asyncio.to_thread(self.asr, audio_16k)

    async def synthesize(self, text, speed=1.0, *, owner=None):
        samples = await asyncio.to_thread(np.full, len(text.split()) * self.tts_rate // 20, 0.05, np.float32)
        return samples, self.tts_rate


def test_soak_turns_over_concurrent_calls():
    # playback_lead_ms: the client here does not play audio, so the pacing need not wait.
    config = make_config(max_calls=max(8, CALLS), playback_lead_ms=60_000)
    # The soak's client asks for replies as fast as they come: lift the per-call rate limits.
    config.agent.max_responses_per_minute = config.agent.max_items_per_minute = 1_000_000
    llm = FakeLLM(REPLY)

    async def main():
        async with running(config, ThreadedServices(llm)) as server:
            warm: list[int] = []
            await asyncio.gather(*(caller(server, 6, warm) for _ in range(CALLS)))  # warm-up
            before = await resources()
            t0 = time.monotonic()
            done: list[int] = []
            per_call = -(-TURNS // CALLS)
            await asyncio.gather(*(caller(server, per_call, done) for _ in range(CALLS)))
            elapsed_s = time.monotonic() - t0
            after = await settled(before)
            assert len(done) == per_call * CALLS
            assert server.metrics.calls_active == 0 and server.sessions == {}
            assert server.metrics.turns_total["failed"] == 0
            growth = after.rss_mb - before.rss_mb
            print(
                f"\nsoak: {len(done)} turns over {CALLS} calls in {elapsed_s:.1f} s; RSS {before.rss_mb:.1f} -> {after.rss_mb:.1f} MB "
                f"(+{growth:.1f}); tasks {before.tasks} -> {after.tasks}; threads {before.threads} -> {after.threads}; "
                f"fds {before.fds} -> {after.fds}; turns by status {dict(server.metrics.turns_total)}"
            )
            assert growth < MAX_RSS_GROWTH_MB
            assert after.tasks <= before.tasks, (before.task_names, after.task_names)
            assert after.threads <= before.threads, (before.thread_names, after.thread_names)
            assert after.pool_threads <= POOL_MAX_THREADS
            assert after.fds <= before.fds

    asyncio.run(main())


async def one_cycle(server, i: int) -> None:
    """One connect/disconnect, of one of several kinds."""
    kind = i % 6
    if kind == 0:  # connect and hang up at once
        async with connect(url(server)) as ws:
            await recv_json(ws)
    elif kind == 1:  # drop the TCP connection mid-turn, no close frame
        ws = await connect(url(server))
        await recv_json(ws)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        ws.transport.abort()
    elif kind == 2:  # a Twilio call with a bit of audio, then stop
        async with connect(url(server, "/twilio")) as ws:
            await ws.send(twilio_start())
            for m in twilio_media(resample(bursts(1), 16000, 8000))[:10]:
                await ws.send(m)
            await ws.send(json.dumps({"event": "stop"}))
            try:
                async with asyncio.timeout(5):
                    async for _ in ws:
                        pass
            except ConnectionClosed:
                pass
    elif kind == 3:  # a typed turn, then hang up
        async with connect(url(server)) as ws:
            await text_session(ws)
            await text_turn(ws, "hello")
    elif kind == 4:  # a Twilio connection that goes away before `start`
        ws = await connect(url(server, "/twilio"))
        await ws.send(json.dumps({"event": "connected"}))
        ws.transport.abort()
    else:  # garbage, then hang up
        async with connect(url(server)) as ws:
            await recv_json(ws)
            await ws.send("{not json")
            await recv_json(ws)


def test_connection_churn_leaks_nothing():
    async def main():
        async with running(make_config(max_calls=64)) as server:
            for i in range(30):  # warm-up: every kind a few times
                await one_cycle(server, i)
            await _drained(server)
            before = await resources()
            t0 = time.monotonic()
            for i in range(CYCLES):
                await one_cycle(server, i)
            await _drained(server)
            elapsed_s = time.monotonic() - t0
            after = await settled(before)
            print(
                f"\nchurn: {CYCLES} connect/disconnect cycles in {elapsed_s:.1f} s; RSS {before.rss_mb:.1f} -> {after.rss_mb:.1f} MB; "
                f"tasks {before.tasks} -> {after.tasks}; threads {before.threads} -> {after.threads}; fds {before.fds} -> {after.fds}"
            )
            assert server.metrics.calls_active == 0 and server.sessions == {}
            assert after.tasks <= before.tasks and after.fds <= before.fds, (before.task_names, after.task_names)
            assert after.threads <= before.threads, (before.thread_names, after.thread_names)
            assert after.pool_threads <= POOL_MAX_THREADS
            assert after.rss_mb - before.rss_mb < MAX_RSS_GROWTH_MB
            # Rejected connections leak nothing either (the token check answers 401 before any call).
            server.config.server.token = "t"
            for _ in range(50):
                try:
                    async with connect(url(server)):
                        pass
                except InvalidStatus:
                    pass
            server.config.server.token = ""
            assert (await resources()).fds <= before.fds

    asyncio.run(main())


async def _drained(server, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while server.metrics.calls_active:  # noqa: ASYNC110 - polling a counter the server owns; bounded
            await asyncio.sleep(0.02)
