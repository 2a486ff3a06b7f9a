"""Faults: a failing LLM, ASR or TTS fails one turn with an error event while other calls are
served; SIGTERM drains calls within `server.shutdown_grace_s`; kill -9 mid-call leaves a
readable store with every turn the caller saw finish."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from va_fakes import FakeLLM, FakeServices, bursts, count_bursts, silence
from va_server import (
    bystander_turn,
    pcm_b64,
    recv_json,
    recv_until,
    running,
    text_session,
    text_turn,
    url,
    user_text,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from voice_agent.llm import LocalDLM
from voice_agent.store import list_calls

HERE = Path(__file__).parent


class PickyLLM(FakeLLM):
    """Raises a plain exception (not LlmError: a bug, not a reported failure) on 'boom'."""

    async def stream(self, messages, *, trace_steps=False, owner=None, options=None):
        if "boom" in messages[-1]["content"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        async for delta in super().stream(messages, trace_steps=trace_steps, owner=owner, options=options):
            yield delta


def test_llm_exception_fails_one_turn_and_other_calls_are_served():
    async def main():
        async with running(services=FakeServices(PickyLLM("Fine, thanks."))) as server, connect(url(server)) as ws:
            await text_session(ws)
            await ws.send(user_text("boom"))
            await ws.send(json.dumps({"type": "response.create"}))
            events = await recv_until(ws, "response.done")
            error = next(e for e in events if e["type"] == "error")
            assert error["error"]["code"] == "llm_error" and "illegal memory access" in error["error"]["message"]
            assert events[-1]["response"]["status"] == "failed"
            assert await bystander_turn(server) == "Fine, thanks."
            assert (await text_turn(ws, "and now?"))["response"]["status"] == "completed"  # same call
            assert server.metrics.errors_total["llm_error"] == 1

    asyncio.run(main())


class FakeEngine:
    """The dlm Engine's interface: its worker thread fails the request whose prompt says 'boom'."""

    def __init__(self) -> None:
        self.aborted: list[int] = []
        self._next = 0

    def submit(self, prompt, params, on_delta=None, owner=None):
        import threading

        self._next += 1
        request_id = self._next
        boom = "boom" in prompt[-1]["content"]

        def work():
            if boom:
                on_delta(SimpleNamespace(text="", finished=True, finish_reason="error", error="RuntimeError: NaN in logits", steps=1, tokens=0))
                return
            for i, word in enumerate(["All ", "good."]):
                last = i == 1
                on_delta(SimpleNamespace(text=word, finished=last, finish_reason="eos" if last else None, error=None, steps=i + 1, tokens=i + 1))

        threading.Thread(target=work, daemon=True).start()
        return SimpleNamespace(request_id=request_id)

    def abort(self, request_id):
        self.aborted.append(request_id)

    def abort_owner(self, owner):
        pass  # nothing outlives a request here: each ends on its own at once

    def hold_owner(self, owner, held):
        pass  # requests here do not step

    def close(self):
        pass


def test_engine_error_inside_local_dlm_fails_that_turn_only():
    async def main():
        services = FakeServices()
        services.llm = LocalDLM(FakeEngine(), lambda trace: None)
        async with running(services=services) as server, connect(url(server)) as bad, connect(url(server)) as good:
            await text_session(bad)
            await text_session(good)
            await bad.send(user_text("boom"))
            await bad.send(json.dumps({"type": "response.create"}))
            done = await text_turn(good, "hello")
            events = await recv_until(bad, "response.done")
            assert done["response"]["status"] == "completed"
            assert done["response"]["output"][0]["content"][0]["text"] == "All good."
            assert events[-1]["response"]["status"] == "failed"
            assert any(e["type"] == "error" and "NaN in logits" in e["error"]["message"] for e in events)

    asyncio.run(main())


def spoken_turn_audio() -> list[str]:
    audio = np.concatenate([bursts(3), silence(800)])
    return [json.dumps({"type": "input_audio_buffer.append", "audio": pcm_b64(audio[i : i + 1600])}) for i in range(0, len(audio), 1600)]


async def speak(ws) -> list[dict]:
    fmt = {"type": "audio/pcm", "rate": 16000}
    await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}))
    for message in spoken_turn_audio():
        await ws.send(message)
    return await recv_until(ws, "response.done")


def test_asr_failure_fails_one_turn_and_the_call_goes_on():
    async def main():
        services = FakeServices(FakeLLM("Heard you."))
        calls = {"n": 0}

        def asr(audio):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("CTranslate2: out of memory")
            return " ".join(["what", "is", "the"][: count_bursts(audio)])

        services.asr = asr
        async with running(services=services) as server, connect(url(server)) as ws:
            await recv_json(ws)
            fmt = {"type": "audio/pcm", "rate": 16000}
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}))
            for message in spoken_turn_audio():
                await ws.send(message)
            events = await recv_until(ws, "error")
            assert events[-1]["error"]["code"] == "asr_error" and events[-1]["error"]["type"] == "server_error"
            events = await speak(ws)  # the next turn works
            done = next(e for e in events if e["type"] == "response.done")
            assert done["response"]["status"] == "completed"
            assert server.metrics.errors_total["asr_error"] == 1
            assert server.metrics.turns_total["failed"] == 1

    asyncio.run(main())


class FlakyTTS(FakeServices):
    def __init__(self, *args, fail_on: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on

    async def synthesize(self, text, speed=1.0, *, owner=None):
        if self.fail_on in text:
            raise OSError("piper: onnxruntime session failed")
        return await super().synthesize(text, speed)


def test_tts_failure_fails_one_turn_and_the_call_goes_on():
    reply = " ".join(f"Sentence {i} is here." for i in range(40))  # more sentences than the queue holds

    async def main():
        services = FlakyTTS(FakeLLM(reply), fail_on="Sentence 1 ")
        async with running(services=services) as server, connect(url(server)) as ws:
            await recv_json(ws)
            await ws.send(user_text("Talk to me."))
            await ws.send(json.dumps({"type": "response.create"}))
            events = await recv_until(ws, "response.done")
            assert events[-1]["response"]["status"] == "failed"
            error = next(e for e in events if e["type"] == "error")
            assert error["error"]["code"] == "tts_error"
            services.fail_on = "never"
            await ws.send(json.dumps({"type": "response.create"}))
            assert (await recv_until(ws, "response.done"))[-1]["response"]["status"] == "completed"
            assert server.metrics.errors_total["tts_error"] == 1
            assert len(server.sessions[next(iter(server.sessions))]._tasks) <= 2  # no stray TTS task

    asyncio.run(main())


def test_a_bug_in_the_session_is_an_error_event_not_a_dead_call(monkeypatch):
    from voice_agent.session import Session

    original = Session._configure

    def broken(self, event):
        if event.instructions == "crash":
            raise KeyError("bug")
        return original(self, event)

    monkeypatch.setattr(Session, "_configure", broken)

    async def main():
        async with running() as server, connect(url(server)) as ws:
            await text_session(ws)
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "crash"}}))
            events = await recv_until(ws, "error")
            assert events[-1]["error"]["code"] == "server_error"
            assert (await text_turn(ws, "still there?"))["response"]["status"] == "completed"
            assert server.metrics.errors_total["session"] == 1

    asyncio.run(main())


# Signals, on a real `serve` loop in a subprocess ----------------------------------------------


class ServerProcess:
    def __init__(self, store: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("VOICE_AGENT_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "serve_fakes.py"), "--store", str(store), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.port = 0
        for _ in range(200):
            line = self.proc.stdout.readline()
            if not line:
                break
            if "demo at http://localhost:" in line:
                self.port = int(line.rsplit(":", 1)[1].strip("/\n"))
                break
        if not self.port:
            self.proc.kill()
            raise AssertionError(f"serve_fakes.py did not start: {self.proc.stdout.read()}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def output(self) -> str:
        return self.proc.stdout.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_kill_9_mid_call_leaves_every_finished_turn_in_the_store(tmp_path):
    store = tmp_path / "calls.db"
    server = ServerProcess(store, "--reply", "Counting: " + " ".join(str(i) for i in range(30)) + ".", "--piece-delay-s", "0.01")

    async def call(completed: list[int]) -> None:
        async with connect(server.url) as ws:
            await text_session(ws)
            for i in range(1_000):
                await text_turn(ws, f"turn {i}")
                completed.append(i)

    async def main():
        completed_a: list[int] = []
        completed_b: list[int] = []
        tasks = [asyncio.create_task(call(completed_a)), asyncio.create_task(call(completed_b))]
        async with asyncio.timeout(30):
            while len(completed_a) < 5 or len(completed_b) < 5:  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.37)  # somewhere inside a reply
        os.kill(server.proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ConnectionClosed | OSError) for r in results), results
        return len(completed_a), len(completed_b)

    try:
        seen = asyncio.run(main())
    finally:
        server.stop()
    assert server.proc.returncode == -signal.SIGKILL
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT call_id, COUNT(*) FROM turns WHERE status = 'completed' GROUP BY call_id").fetchall()
    # Every reply the client saw finish (response.done) is in the store, per call; at most the
    # one whose response.done was on its way is there too.
    stored = sorted(n for _, n in rows)
    assert len(stored) == 2
    assert all(c <= s <= c + 1 for s, c in zip(stored, sorted(seen), strict=True)), (stored, seen)
    calls = list_calls(store)  # the CLI's reader works on the killed server's file
    assert len(calls) == 2 and all(c["ended_at"] is None for c in calls)


def test_sigterm_lets_the_reply_in_progress_finish_then_closes_with_1001(tmp_path):
    store = tmp_path / "calls.db"
    server = ServerProcess(store, "--set", "server.shutdown_grace_s=5", "--piece-delay-s", "0.05")

    async def main():
        async with connect(server.url) as ws:
            await text_session(ws)
            await ws.send(user_text("count"))
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.output_text.delta")
            t_term = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            events = await recv_until(ws, "response.done")  # the reply is not cut
            assert events[-1]["response"]["status"] == "completed"
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(100):
                    await recv_json(ws)
            assert info.value.rcvd.code == 1001 and info.value.rcvd.reason == "server shutting down"
            return time.monotonic() - t_term

    try:
        drain_s = asyncio.run(main())
        assert server.proc.wait(10) == 0
    finally:
        server.stop()
    assert drain_s < 5
    (call,) = list_calls(store)
    assert call["turns"] == 2 and call["ended_at"]


def test_sigterm_closes_calls_after_the_grace_time(tmp_path):
    store = tmp_path / "calls.db"
    # A reply of ~40 s: longer than the grace time.
    server = ServerProcess(store, "--set", "server.shutdown_grace_s=1", "--piece-delay-s", "1.0")

    async def main():
        async with connect(server.url) as ws:
            await text_session(ws)
            await ws.send(user_text("talk"))
            await ws.send(json.dumps({"type": "response.create"}))
            await recv_until(ws, "response.output_text.delta")
            t_term = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                for _ in range(100):
                    await recv_json(ws)
            assert info.value.rcvd.code == 1001
            return time.monotonic() - t_term

    try:
        drain_s = asyncio.run(main())
        assert server.proc.wait(10) == 0
        exit_s = drain_s
    finally:
        server.stop()
    assert 0.9 < exit_s < 3.0
    with sqlite3.connect(store) as conn:
        statuses = [r[0] for r in conn.execute("SELECT status FROM turns ORDER BY turn_id")]
    assert statuses == ["no_reply", "cancelled"]  # the cut reply is stored, as heard

