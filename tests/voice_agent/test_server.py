"""The server on localhost with fake models: routes, limits, the openai SDK, Twilio, the store."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import urllib.request

import numpy as np
import pytest
from va_fakes import FakeLLM, FakeServices, bursts, silence
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from audio.codecs import float32_to_pcm16, mulaw_encode
from audio.resample import resample
from voice_agent.config import Config
from voice_agent.server import VoiceServer
from voice_agent.store import CallStore, get_call, list_calls


def make_config(**server) -> Config:
    config = Config()
    config.server.port = 0
    config.server.playback_lead_ms = 50
    for k, v in server.items():
        setattr(config.server, k, v)
    config.agent.speculative_start = False
    return config


async def started(config: Config, services=None, store=None) -> VoiceServer:
    server = VoiceServer(config, services or FakeServices(FakeLLM("Sure. It is sunny today.")), store=store)
    await server.start()
    return server


def http_get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_http_routes():
    async def main():
        server = await started(make_config())
        port = server.port
        status, ctype, body = await asyncio.to_thread(http_get, port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, ctype, body = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert "voice_agent_calls_active 0" in body
        assert 'voice_agent_stage_latency_seconds_bucket{stage="first_audio_sent",le="+Inf"} 0' in body
        status, ctype, body = await asyncio.to_thread(http_get, port, "/")
        assert status == 200 and ctype.startswith("text/")
        for bad in ("/nope.js", "/../voice_agent/server.py", "/__init__.py", "/.hidden"):
            assert (await asyncio.to_thread(http_get, port, bad))[0] == 404
        await server.shutdown()

    asyncio.run(main())


def test_token_is_checked_before_the_upgrade():
    async def main():
        server = await started(make_config(token="s3cret"))
        url = f"ws://127.0.0.1:{server.port}"
        for route in ("/v1/realtime", "/twilio"):
            with pytest.raises(InvalidStatus) as info:
                async with connect(url + route, additional_headers={"Authorization": "Bearer wrong"}):
                    pass
            assert info.value.response.status_code == 401
            with pytest.raises(InvalidStatus):
                async with connect(url + route):
                    pass
        async with connect(url + "/v1/realtime", additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        async with connect(url + "/v1/realtime?token=s3cret") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
        assert server.metrics.calls_rejected["unauthorized"] == 4
        await server.shutdown()

    asyncio.run(main())


def test_too_many_calls_are_closed_with_1013_and_a_reason():
    async def main():
        server = await started(make_config(max_calls=1))
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        async with connect(url) as first:
            await first.recv()
            async with connect(url) as second:
                with pytest.raises(ConnectionClosed) as info:
                    await second.recv()
                assert info.value.rcvd.code == 1013
                assert "too many calls" in info.value.rcvd.reason
        await server.shutdown()

    asyncio.run(main())


def test_an_ended_call_is_freed_without_the_cyclic_garbage_collector():
    """With the collector off, a call's session (its audio, history and tasks) must die with the
    call: a reference cycle would keep every ended call of a busy server for minutes (issue 18's
    memory bar). Both routes; replies finished, cancelled by a new turn and cut by the hang-up."""
    import gc
    import weakref

    async def main():
        server = await started(make_config(), FakeServices(FakeLLM("Sure. It is sunny today.", piece_delay_s=0.02)))
        gone: list[weakref.ref] = []

        def watch() -> None:
            (session,) = server.sessions.values()
            gone.append(weakref.ref(session))

        async def read_all(ws) -> None:  # a client that reads: its close handshake ends at once
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass

        speech = np.concatenate([bursts(3), silence(900)])
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            await ws.recv()
            watch()
            reader = asyncio.create_task(read_all(ws))
            for text in ("Hello there", "And again", "Once more"):
                await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
                await ws.send(json.dumps({"type": "response.create"}))
                await asyncio.sleep(0.05)  # the next turn cuts this reply short
            for start in range(0, len(speech), 3200):
                pcm = float32_to_pcm16(resample(speech[start:start + 3200], 16_000, 24_000))
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
            await asyncio.sleep(1.2)  # the spoken turn's reply is under way at the hang-up
        await reader
        async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
            await ws.send(json.dumps({"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1"}, "streamSid": "MZ1"}))
            await asyncio.sleep(0.1)
            watch()
            payload = base64.b64encode(mulaw_encode(resample(speech, 16_000, 8_000))).decode()
            await ws.send(json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": payload}}))
            await asyncio.sleep(1.2)
        for _ in range(100):
            if not server.sessions:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the calls' tasks finish
        alive = [ref() for ref in gone if ref() is not None]
        await server.shutdown()
        assert len(gone) == 2 and not alive, [f"{s.call_id}: {[type(r).__name__ for r in gc.get_referrers(s)]}" for s in alive]

    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()


def test_the_heap_is_trimmed_once_the_last_call_has_ended(monkeypatch):
    import voice_agent.server as server_module

    assert server_module.release_free_memory() is True  # glibc: the call exists and runs
    trims: list[int] = []

    async def main():
        server = await started(make_config())
        # What /healthz says while the trim runs: a work gauge, so that "idle" waits for it too.
        monkeypatch.setattr(server_module, "release_free_memory",
                            lambda: trims.append((server.metrics.calls_active, server._work()["heap_trim"])))
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        async with connect(url) as first:
            await first.recv()
            async with connect(url) as second:
                await second.recv()
            await asyncio.sleep(0.3)
            assert trims == []  # a call is still on
            assert json.loads((await server.answer_get("/healthz"))[1])["work"]["heap_trim"] == 0
        for _ in range(50):
            if trims and not server._trimming:
                break
            await asyncio.sleep(0.02)
        assert trims == [(0, 1)]
        assert json.loads((await server.answer_get("/healthz"))[1])["work"]["heap_trim"] == 0
        await server.shutdown()

    asyncio.run(main())


def test_idle_calls_are_closed():
    async def main():
        server = await started(make_config(idle_timeout_s=0.3))
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            await ws.recv()
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.reason == "idle timeout"
        await server.shutdown()

    asyncio.run(main())


def test_openai_sdk_text_conversation():
    from openai import AsyncOpenAI

    async def main():
        server = await started(make_config())
        client = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="voice-agent") as conn:
            await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}
            )
            await conn.response.create()
            text, kinds = "", []
            async for event in conn:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type == "response.done":
                    assert event.response.status == "completed"
                    break
            assert text.strip() == "Sure. It is sunny today."
            assert kinds[0] == "session.created" and "session.updated" in kinds
            # Unknown events get an error (naming the client's event) and the call goes on.
            await conn.send({"type": "conversation.item.frobnicate", "item_id": "x", "event_id": "evt_42"})
            event = await conn.recv()
            while event.type == "voice_agent.metrics":
                event = await conn.recv()
            assert event.type == "error" and event.error.code == "unknown_event_type" and event.error.event_id == "evt_42"
        await server.shutdown()

    asyncio.run(main())


def test_openai_sdk_spoken_turn_with_server_vad_and_the_store(tmp_path):
    from openai import AsyncOpenAI

    async def main():
        store = CallStore(tmp_path / "calls.db")
        server = await started(make_config(), store=store)
        client = AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="voice-agent") as conn:
            audio24 = resample(np.concatenate([bursts(2), silence(800)]), 16000, 24000)
            pcm = float32_to_pcm16(audio24)
            for i in range(0, len(pcm), 4800):  # 100 ms per append, faster than real time
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
            kinds, audio_bytes, metrics = [], 0, None
            async for event in conn:
                kinds.append(event.type)
                if event.type == "response.output_audio.delta":
                    audio_bytes += len(base64.b64decode(event.delta))
                if event.type == "voice_agent.metrics":
                    metrics = event.metrics  # vendor event: parsed without a model
                    break
            assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped")
            assert "conversation.item.input_audio_transcription.completed" in kinds
            assert kinds.index("response.created") < kinds.index("response.output_audio.delta") < kinds.index("response.done")
            assert audio_bytes > 0
            assert metrics["voice_to_voice_ms"] is not None
        await server.shutdown()
        store.close()
        (call,) = list_calls(tmp_path / "calls.db")
        assert call["route"] == "realtime" and call["turns"] == 1 and call["ended_at"]
        turn = get_call(tmp_path / "calls.db", call["call_id"][:6])["turns"][0]
        assert turn["user_text"] == "what is" and turn["heard"] == "Sure. It is sunny today."
        with sqlite3.connect(tmp_path / "calls.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    asyncio.run(main())


def twilio_start() -> str:
    return json.dumps(
        {"event": "start", "streamSid": "MZ1", "start": {"streamSid": "MZ1", "callSid": "CA1", "customParameters": {}}}
    )


def twilio_media(samples_8k: np.ndarray) -> list[str]:
    data = mulaw_encode(samples_8k)
    return [
        json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(data[i : i + 160]).decode()}})
        for i in range(0, len(data), 160)
    ]


def test_twilio_call_with_marks_and_barge_in(tmp_path):
    async def main():
        llm = FakeLLM("One two three four five six seven. Eight nine ten eleven twelve. Thirteen fourteen.")
        store = CallStore(tmp_path / "calls.db")
        server = await started(make_config(), FakeServices(llm), store=store)
        async with connect(f"ws://127.0.0.1:{server.port}/twilio") as ws:
            await ws.send(json.dumps({"event": "connected"}))
            await ws.send(twilio_start())
            for m in twilio_media(resample(np.concatenate([bursts(2), silence(800)]), 16000, 8000)):
                await ws.send(m)
            # Receive the first chunk's media and its mark, echo the mark as Twilio would.
            first_mark = None
            while first_mark is None:
                msg = json.loads(await ws.recv())
                assert msg["event"] in ("media", "mark")
                if msg["event"] == "mark":
                    first_mark = msg["mark"]["name"]
                    await ws.send(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": first_mark}}))
            # The caller talks over the reply: the server must send `clear`.
            for m in twilio_media(resample(np.concatenate([bursts(1), silence(100)]), 16000, 8000)):
                await ws.send(m)
            events = []
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                events.append(msg["event"])
                if msg["event"] == "clear":
                    break
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZ1"}))
        await server.shutdown()
        store.close()
        (call,) = list_calls(tmp_path / "calls.db")
        turns = get_call(tmp_path / "calls.db", call["call_id"])["turns"]
        assert turns[0]["status"] == "cancelled"
        assert turns[0]["heard"] == "One two three four five six seven."  # up to the echoed mark
        assert call["info"]["call_sid"] == "CA1"

    asyncio.run(main())


def test_shutdown_closes_calls_with_1001_and_flushes_the_store(tmp_path):
    async def main():
        store = CallStore(tmp_path / "calls.db")
        server = await started(make_config(), store=store)
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await ws.send(json.dumps({"type": "response.create"}))
            while json.loads(await ws.recv())["type"] != "response.done":
                pass
            await server.shutdown()
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.recv()
            assert info.value.rcvd.code == 1001
        calls = list_calls(tmp_path / "calls.db")  # readable before close: every turn committed
        assert calls[0]["turns"] == 2 and calls[0]["ended_at"]
        store.close()

    asyncio.run(main())
