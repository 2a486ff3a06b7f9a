"""Helpers for tests that run the real server on 127.0.0.1 with fake models.

Every loop here is bounded (a count or a timeout): a broken server fails a test, never hangs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from va_fakes import FakeLLM, FakeServices
from websockets.asyncio.client import ClientConnection, connect

from audio.codecs import float32_to_pcm16, mulaw_encode
from dlm.memory import resident_bytes
from voice_agent.config import Config
from voice_agent.server import VoiceServer

RECV_TIMEOUT_S = 10.0


def make_config(**server) -> Config:
    config = Config()
    config.server.port = 0
    config.server.playback_lead_ms = 50
    for k, v in server.items():
        setattr(config.server, k, v)
    config.agent.speculative_start = False
    config.store.path = ""
    return config


@contextlib.asynccontextmanager
async def running(config: Config | None = None, services=None, store=None) -> AsyncIterator[VoiceServer]:
    server = VoiceServer(config or make_config(), services or FakeServices(FakeLLM("Sure. It is sunny today.")), store=store)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def url(server: VoiceServer, route: str = "/v1/realtime") -> str:
    return f"ws://127.0.0.1:{server.port}{route}"


async def recv_json(ws: ClientConnection, timeout_s: float = RECV_TIMEOUT_S) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def recv_until(ws: ClientConnection, type_: str, *, limit: int = 10_000) -> list[dict]:
    """Messages up to and including the first of type `type_`."""
    out = []
    for _ in range(limit):
        event = await recv_json(ws)
        out.append(event)
        if event.get("type") == type_:
            return out
    raise AssertionError(f"no {type_!r} within {limit} messages")


def user_text(text: str) -> str:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return json.dumps({"type": "conversation.item.create", "item": item})


async def text_session(ws: ClientConnection) -> None:
    """After connecting: read session.created, switch to text output."""
    assert (await recv_json(ws))["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
    await recv_until(ws, "session.updated")


async def text_turn(ws: ClientConnection, text: str) -> dict:
    """One typed turn; returns the `response.done` event."""
    await ws.send(user_text(text))
    await ws.send(json.dumps({"type": "response.create"}))
    return (await recv_until(ws, "response.done"))[-1]


async def bystander_turn(server: VoiceServer) -> str:
    """A separate, well-behaved call: one typed turn; returns the reply text."""
    async with connect(url(server)) as ws:
        await text_session(ws)
        done = await text_turn(ws, "Are you still there?")
        assert done["response"]["status"] == "completed", done
        return done["response"]["output"][0]["content"][0]["text"]


def pcm_b64(samples_16k: np.ndarray) -> str:
    return base64.b64encode(float32_to_pcm16(samples_16k)).decode()


def twilio_start(stream_sid: str = "MZ1") -> str:
    start = {"streamSid": stream_sid, "callSid": "CA1", "customParameters": {}}
    return json.dumps({"event": "start", "streamSid": stream_sid, "start": start})


def twilio_media(samples_8k: np.ndarray, stream_sid: str = "MZ1") -> list[str]:
    data = mulaw_encode(samples_8k)
    return [
        json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": base64.b64encode(data[i : i + 160]).decode()}})
        for i in range(0, len(data), 160)
    ]


# Resources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    rss_mb: float
    tasks: int
    threads: int  # threads other than the event loop's default executor's workers
    pool_threads: int  # the default executor's workers: started lazily, reused, bounded
    fds: int
    thread_names: tuple[str, ...] = ()  # for the message of a failed assertion
    task_names: tuple[str, ...] = ()  # each task's coroutine and where it waits, likewise


# asyncio's default executor names its workers "asyncio_0", "asyncio_1", ... It starts them one at
# a time as concurrent work needs them (up to min(32, cpus + 4)) and keeps them: a worker started
# after warm-up is not a leak, so they are counted apart and bounded by POOL_MAX_THREADS.
POOL_MAX_THREADS = min(32, (os.cpu_count() or 1) + 4)


def rss_mb() -> float:
    rss = resident_bytes()
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status")
    return rss / 2**20


async def resources(*, settle_s: float = 0.2) -> Resources:
    """Tasks, threads and file descriptors of this process once things have settled."""
    await asyncio.sleep(settle_s)
    gc.collect()
    names = [t.name for t in threading.enumerate()]
    pool = sum(1 for name in names if name.startswith("asyncio_"))
    tasks = asyncio.all_tasks()
    return Resources(
        rss_mb(), len(tasks), len(names) - pool, pool, len(os.listdir("/proc/self/fd")), tuple(sorted(names)),
        tuple(sorted(_task_name(t) for t in tasks)),
    )


async def settled(before: Resources, *, timeout_s: float = 5.0) -> Resources:
    """`resources()` once tasks, threads and file descriptors are back to `before`'s counts, or
    as they are after `timeout_s`: work that ends a moment after the last call (a connection's
    closing handshake, a worker thread's last job on a loaded machine) is not a leak, and what
    leaks is still there when the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = await resources()
        back = now.tasks <= before.tasks and now.threads <= before.threads and now.fds <= before.fds
        if back or time.monotonic() >= deadline:
            return now


def _task_name(task: asyncio.Task) -> str:
    coro = task.get_coro()
    frames = task.get_stack(limit=1)
    where = f" at {frames[0].f_code.co_filename.rsplit('/', 1)[-1]}:{frames[0].f_lineno}" if frames else ""
    return f"{getattr(coro, '__qualname__', coro)}{where}"
