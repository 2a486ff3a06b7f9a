"""Hostile input on both WebSocket routes: every bad message gets an `error` (or, on Twilio, which
cannot receive errors, is counted and ignored) or a clean close with a reason, and the server and
the other calls carry on.

The framings are tested sans-I/O with hypothesis (thousands of messages, milliseconds each); the
server is tested on 127.0.0.1 with fake models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import string
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from va_fakes import FakeLLM, FakeServices, bursts, settle, silence
from va_server import (
    bystander_turn,
    make_config,
    pcm_b64,
    recv_json,
    recv_until,
    running,
    text_session,
    text_turn,
    twilio_media,
    twilio_start,
    url,
    user_text,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from audio.resample import resample
from voice_agent.config import AgentConfig
from voice_agent.session import Session
from voice_agent.transports.realtime import SUPPORTED_CLIENT_EVENTS, RealtimeProtocol
from voice_agent.transports.twilio import TwilioProtocol

# Examples per property (each a list of up to 8 messages); raise it for a longer hunt:
# HYPOTHESIS_EXAMPLES=5000 pytest tests/voice_agent/test_hostile.py -k framing
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "150"))

# Strategies -----------------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=6,
)
# Strategies are built once here: building them inside a draw makes hypothesis re-validate them
# at every example (ten times slower).
REALTIME_KEYS = ["type", "event_id", "session", "audio", "item", "item_id", "audio_end_ms", "content_index", "response", "response_id"]
SESSION_KEYS = ["instructions", "output_modalities", "modalities", "audio", "input_audio_format", "output_audio_format", "turn_detection", "voice_agent"]
b64ish = st.text(alphabet=string.ascii_letters + string.digits + "+/=-_ \n", max_size=64)
realtime_fields = st.dictionaries(st.sampled_from(REALTIME_KEYS), json_value, max_size=4)
realtime_types = st.sampled_from(SUPPORTED_CLIENT_EVENTS) | st.text(max_size=30)
session_fields = st.dictionaries(st.sampled_from(SESSION_KEYS), json_value, max_size=4)
audio_format = st.fixed_dictionaries({"type": st.sampled_from(["audio/pcm", "audio/pcmu", "audio/x"]) | json_value, "rate": st.sampled_from([8000, 24000, 1, -1, 2**40]) | json_value})
content_parts = st.lists(st.dictionaries(st.sampled_from(["type", "text"]), json_value | st.just("input_text"), max_size=2), max_size=3)
roles = st.sampled_from(["user", "assistant"]) | json_value


def _encode(event: dict, how: int) -> str | bytes:
    """The event as JSON text, as bytes (a binary frame), truncated, with junk after, in an array."""
    text = json.dumps(event)
    return [text, text.encode(), text[: len(text) // 2], text + "}", "[" + text + "]"][how]


@st.composite
def realtime_event_messages(draw) -> str | bytes:
    """Messages that look like client events: real types with fields of any type and shape."""
    event = draw(realtime_fields)
    event["type"] = draw(realtime_types)
    if event["type"] == "session.update" and draw(st.booleans()):
        session = draw(session_fields)
        fmt = draw(audio_format)
        where = draw(st.integers(0, 2))
        session["audio"] = [{"input": {"format": fmt}}, {"output": {"format": fmt}}, {"input": {"turn_detection": fmt}}][where]
        event["session"] = session
    if event["type"] == "input_audio_buffer.append" and draw(st.booleans()):
        event["audio"] = draw(b64ish)
    if event["type"] == "conversation.item.create" and draw(st.booleans()):
        event["item"] = {"type": "message", "role": draw(roles), "content": draw(content_parts)}
    return _encode(event, draw(st.integers(0, 4)))


realtime_messages = realtime_event_messages() | st.text(max_size=200) | st.binary(max_size=200)
twilio_kinds = st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop"]) | st.text(max_size=10) | json_value
twilio_fields = st.dictionaries(st.sampled_from(["streamSid", "start", "media", "mark", "dtmf", "sequenceNumber"]), json_value, max_size=4)
tracks = st.sampled_from(["inbound", "outbound"]) | json_value
mark_names = st.sampled_from(["r1.0", "r0.x", "r99999999999999999999.1", ""]) | st.text(max_size=10)


@st.composite
def twilio_event_messages(draw) -> str | bytes:
    msg = draw(twilio_fields)
    msg["event"] = kind = draw(twilio_kinds)
    if kind == "start" and draw(st.booleans()):
        msg["start"] = {"streamSid": "MZ1", "callSid": draw(json_value), "customParameters": draw(json_value), "mediaFormat": draw(json_value)}
    if kind == "media" and draw(st.booleans()):
        msg["media"] = {"payload": draw(b64ish), "track": draw(tracks)}
    if kind == "mark" and draw(st.booleans()):
        msg["mark"] = {"name": draw(mark_names)}
    return _encode(msg, draw(st.integers(0, 4)))


twilio_messages = twilio_event_messages() | st.text(max_size=100) | st.binary(max_size=100)


# The framings, sans-I/O -----------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(realtime_messages, min_size=1, max_size=8))
def test_realtime_framing_never_raises_and_answers_every_rejected_message(messages):
    framing = RealtimeProtocol(instructions="hi", max_message_bytes=10_000)
    framing.start()
    for message in messages:
        events = framing.feed(message)
        out = [json.loads(m) for m in framing.take_outgoing()]
        assert all(isinstance(m.get("type"), str) and m.get("event_id") for m in out)
        if not events:  # rejected, or answered directly (an acknowledgement)
            assert out or _is_silent_no_op(message)
        errors = [m for m in out if m["type"] == "error"]
        for error in errors:
            assert error["error"]["code"] and error["error"]["message"]
    json.dumps(framing.session_json())  # still a valid session after whatever was applied


def _is_silent_no_op(message: str | bytes) -> bool:
    """An append of zero bytes of audio is valid and produces nothing."""
    try:
        event = json.loads(message)
    except (ValueError, TypeError):
        return False
    return isinstance(event, dict) and event.get("type") == "input_audio_buffer.append" and event.get("audio") == ""


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(twilio_messages, min_size=1, max_size=8))
def test_twilio_framing_never_raises(messages):
    framing = TwilioProtocol(max_message_bytes=10_000)
    for message in messages:
        events = framing.feed(message)
        assert isinstance(events, list)
    assert all(isinstance(e, str) and e for e in framing.errors)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(realtime_messages, min_size=1, max_size=12))
def test_realtime_messages_through_a_session_never_break_it(messages):
    """Whatever a client sends, the session handles it and still answers a typed turn after."""

    async def main():
        services = FakeServices(FakeLLM("Fine."))
        session = Session(services, AgentConfig(speculative_start=True, sample_rate_hz=24000))
        framing = RealtimeProtocol(instructions="hi", max_message_bytes=10_000)
        for message in messages:
            for event in framing.feed(message):
                await session.handle(event)
            framing.take_outgoing()
            await settle(5)
        for event in framing.feed(user_text("hello")) + framing.feed(json.dumps({"type": "response.create"})):
            await session.handle(event)
        await settle(300)
        failed = [t for t in session._tasks if t.done() and not t.cancelled() and t.exception()]
        assert not failed
        assert [r.user_text for r in session.records if r.kind == "text"][-1] == "hello"
        assert session.records[-1].reply_text == "Fine."
        await session.close()

    asyncio.run(main())


# The server -----------------------------------------------------------------------------------

# (message, expected error code) on /v1/realtime
BAD_REALTIME = [
    ("{", "invalid_json"),
    ('{"type": "session.update", "session": {"instructions": "x"', "invalid_json"),
    ("[1, 2]", "invalid_event"),
    ('"text"', "invalid_event"),
    ('{"no_type": 1}', "invalid_event"),
    ('{"type": 42}', "invalid_event"),
    ('{"type": "response.explode"}', "unknown_event_type"),
    ('{"type": "session.update", "session": "audio"}', "invalid_type"),
    ('{"type": "session.update", "session": {"instructions": 7}}', "invalid_type"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 12345}}}}}', "invalid_value"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": "24000"}}}}}', "invalid_type"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}}', "invalid_value"),
    ('{"type": "input_audio_buffer.append"}', "missing_required_parameter"),
    ('{"type": "input_audio_buffer.append", "audio": 12}', "invalid_type"),
    ('{"type": "input_audio_buffer.append", "audio": "not base64!"}', "invalid_audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAA="}', "invalid_audio"),  # 2 bytes + padding: fine? see below
    ('{"type": "input_audio_buffer.append", "audio": "AA=="}', "invalid_audio"),  # one byte: odd PCM16 length
    ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": "hi"}}', "invalid_type"),
    ('{"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}', "item_not_found"),
    ('{"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": -5}', "invalid_value"),
    ('{"type": "response.cancel"}', "response_cancel_not_active"),
    ('{"type": "response.create", "response": []}', "invalid_type"),
]


def _expected(message: str, code: str | None) -> str | None:
    if message.endswith('"AAA="}'):
        return None  # "AAA=" is two bytes: one valid PCM16 sample
    return code


def test_realtime_bad_messages_get_errors_and_the_call_goes_on():
    async def main():
        async with running() as server, connect(url(server)) as ws:
            await text_session(ws)
            for message, code in BAD_REALTIME:
                code = _expected(message, code)
                await ws.send(json.dumps({"type": "x.ping", "event_id": "marker"}))  # a known answer after each
                if code is None:
                    await ws.send(message)
                    first = await recv_json(ws)
                    assert first["type"] == "error" and first["error"]["event_id"] == "marker"
                    continue
                await ws.send(message)
                events = [await recv_json(ws), await recv_json(ws)]
                assert events[0]["error"]["event_id"] == "marker"
                assert events[1]["type"] == "error" and events[1]["error"]["code"] == code, (message, events[1])
            await ws.send(b"\x00\x01binary")
            event = await recv_json(ws)
            assert event["type"] == "error" and event["error"]["code"] == "invalid_message"
            done = await text_turn(ws, "Still fine?")
            assert done["response"]["status"] == "completed"
            assert await bystander_turn(server) == "Sure. It is sunny today."

    asyncio.run(main())


def test_audio_of_the_wrong_rate_or_length_is_handled():
    config = make_config()
    config.agent.max_audio_burst_s = 60.0  # the ~31 s sent here at once: the inbox bound is tested

    async def main():
        async with running(config) as server, connect(url(server)) as ws:
            await text_session(ws)
            # Declared 8 kHz, then 48 kHz, with audio of odd sizes: resampled, never a crash.
            sent_s = 0.0
            for rate in (8000, 48000, 22050):
                fmt = {"type": "audio/pcm", "rate": rate}
                await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}))
                await recv_until(ws, "session.updated")
                for n in (1, 3, 7, 160, 4801, 48000):
                    sent_s += n / rate
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm_b64(np.full(n, 0.01, np.float32))}))
            # 20 s of speech in one message, then 0.9 s of silence at once (a client sending far
            # faster than real time): the inbox keeps the newest 2 s (agent.max_inbox_audio_s)
            # whether or not the session got to the first message before the second came.
            loud = np.tile(np.concatenate([bursts(3), silence(100)]), 20)[: 16000 * 20]
            fmt = {"type": "audio/pcm", "rate": 16000}
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": fmt}}}}))
            await recv_until(ws, "session.updated")
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm_b64(loud)}))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm_b64(silence(900))}))
            (session,) = server.sessions.values()
            done = await text_turn(ws, "Can you hear me?")
            assert done["response"]["status"] == "completed"
            sent_s += 20.9
            assert session.dropped_audio_s <= sent_s - 2.0 + 0.01  # the newest 2 s were kept
            assert await bystander_turn(server)

    asyncio.run(main())


def test_oversized_message_closes_with_1009_and_other_calls_go_on():
    async def main():
        async with running(make_config(max_message_bytes=64_000)) as server:
            async with connect(url(server), max_size=None) as ws:
                await text_session(ws)
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 100_000}))
                with pytest.raises(ConnectionClosed) as info:
                    for _ in range(100):
                        await recv_json(ws)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1009
            assert await bystander_turn(server)
            assert server.metrics.calls_active == 0 or await _calls_drain(server)

    asyncio.run(main())


async def _calls_drain(server, timeout_s: float = 5.0) -> bool:
    async with asyncio.timeout(timeout_s):
        while server.metrics.calls_active:  # noqa: ASYNC110 - polling a counter the server owns; bounded
            await asyncio.sleep(0.02)
    return True


def test_thousands_of_tiny_messages_each_get_an_answer():
    n = 3000

    async def main():
        async with running() as server, connect(url(server)) as ws:
            await text_session(ws)

            async def send_all():
                for i in range(n):
                    await ws.send(f'{{"type":"response.cancel","event_id":"e{i}"}}' if i % 2 else '{"type":"x"}')

            sender = asyncio.create_task(send_all())
            errors = 0
            async with asyncio.timeout(60):
                while errors < n:
                    event = await recv_json(ws)
                    errors += event["type"] == "error"
            await sender
            done = await text_turn(ws, "And now?")
            assert done["response"]["status"] == "completed"
            assert await bystander_turn(server)

    asyncio.run(main())


def test_twilio_garbage_is_counted_and_the_call_goes_on(caplog):
    async def main():
        async with running() as server:
            async with connect(url(server, "/twilio")) as ws:
                await ws.send(json.dumps({"event": "connected"}))
                await ws.send(json.dumps({"event": "media", "media": {"payload": "AAAA"}}))  # before start
                await ws.send(twilio_start())
                for bad in (
                    "{",
                    b"\x00binary",
                    "[]",
                    '{"event": 3}',
                    '{"event": "media", "media": {"payload": "%%%"}}',
                    '{"event": "media", "media": {"payload": 5}}',
                    '{"event": "media", "media": []}',
                    '{"event": "mark", "mark": {"name": "nope"}}',
                    '{"event": "dtmf", "dtmf": {}}',
                    '{"event": "teleport"}',
                    twilio_start("MZ2"),
                ):
                    await ws.send(bad)
                for m in twilio_media(resample(np.concatenate([bursts(2), silence(800)]), 16000, 8000)):
                    await ws.send(m)
                for _ in range(2000):  # the reply still comes: media then a mark
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if msg["event"] == "mark":
                        break
                await ws.send(json.dumps({"event": "stop"}))
            assert server.metrics.errors_total["protocol"] >= 12
            assert await bystander_turn(server)

    with caplog.at_level(logging.WARNING, logger="voice_agent.server"):
        asyncio.run(main())


def test_twilio_flood_of_bad_messages_does_not_flood_the_log(caplog):
    async def main():
        async with running() as server:
            async with connect(url(server, "/twilio")) as ws:
                for _ in range(2000):
                    await ws.send('{"event": "media", "media": {"payload": "AAAA"}}')  # never a start
                await ws.send(twilio_start())
                await ws.send(json.dumps({"event": "stop"}))
                with pytest.raises(ConnectionClosed):
                    for _ in range(100):
                        await asyncio.wait_for(ws.recv(), 10)
            assert server.metrics.errors_total["protocol"] == 2000

    with caplog.at_level(logging.INFO, logger="voice_agent"):
        asyncio.run(main())
    ignored = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) <= 20


def test_twilio_connection_that_never_sends_start_is_closed_with_a_reason():
    async def main():
        async with running(make_config(start_timeout_s=0.5)) as server:
            async with connect(url(server, "/twilio")) as ws:
                await ws.send(json.dumps({"event": "connected"}))
                for _ in range(10):  # media without start: ignored, and does not keep the call open
                    await ws.send(json.dumps({"event": "media", "media": {"payload": "AAAA"}}))
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                assert info.value.rcvd.code == 1008 and "start" in info.value.rcvd.reason
            await _calls_drain(server)

    asyncio.run(main())


def test_client_that_never_reads_is_closed_and_memory_stays_bounded():
    """The client floods requests whose answers it never reads: the server stops reading it
    (backpressure), holds a bounded backlog, then closes the call; other calls are served."""

    async def main():
        config = make_config(send_timeout_s=1.0, max_queued_messages=16)
        config.agent.max_instructions_tokens = 100_000  # the fake LLM counts words: 200 kB of "x" is one
        async with running(config) as server:
            # A small receive window and max_queue=1: the client stops reading at once. Each
            # session.update is answered with the whole session (200 kB of instructions), and
            # each response.cancel with an error event (through the session's urgent lane).
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            ws = await connect(url(server), sock=sock, max_queue=1)
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "x" * 200_000}}))
            sent, backlog, t0 = 0, 0, time.monotonic()
            try:
                for _ in range(100_000):
                    await asyncio.wait_for(ws.send('{"type":"session.update","session":{}}'), 3)
                    for _ in range(20):
                        await asyncio.wait_for(ws.send('{"type":"response.cancel"}'), 3)
                    sent += 21
                    for session in list(server.sessions.values()):
                        backlog = max(backlog, len(session.outbox))
            except (TimeoutError, ConnectionClosed):
                pass  # the server stopped reading (backpressure) or closed the call
            await _calls_drain(server, 10)
            elapsed_s = time.monotonic() - t0
            assert sent > 20
            assert backlog <= 2 * 16 + 4  # the ordered lane plus a bounded overflow
            assert server.metrics.errors_total["client_not_reading"] == 1
            assert elapsed_s < 15  # send_timeout_s for the stalled send, then for the close frame
            assert await bystander_turn(server)
            ws.transport.abort()

    asyncio.run(main())


def test_client_that_disconnects_mid_reply_leaves_nothing_behind():
    async def main():
        llm = FakeLLM("One. Two. Three. Four. Five. Six. Seven. Eight.", piece_delay_s=0.02)
        async with running(services=FakeServices(llm)) as server:
            for abrupt in (True, False):
                ws = await connect(url(server))
                await recv_json(ws)
                await ws.send(user_text("Count for me."))
                await ws.send(json.dumps({"type": "response.create"}))
                await recv_until(ws, "response.output_audio.delta")
                if abrupt:
                    ws.transport.abort()  # no close frame
                else:
                    await ws.close()
                await _calls_drain(server)
            assert server.metrics.turns_total["cancelled"] == 2
            assert llm.aborted == 2
            assert await bystander_turn(server)

    asyncio.run(main())


@pytest.mark.parametrize("seed", [1, 2])
def test_no_work_outlives_a_hostile_flood_on_both_routes(seed):
    """The issue's hostile client (voice_agent.bench.hostile) on both routes, with an LLM that
    never finishes a reply by itself: once the last connection is closed, every call is gone and
    no LLM request is held within 1 s; then an honest call is answered."""
    from voice_agent.bench.hostile import run_hostile

    async def main():
        llm = FakeLLM("Fine.", hold=True)
        async with running(make_config(max_calls=16), FakeServices(llm)) as server:
            report = await run_hostile(f"http://127.0.0.1:{server.port}", messages=3000, connections=6, seed=seed)
            assert report.sent == 3000
            assert report.errors["rate_limit_exceeded"] > 0  # the per-call limits were hit
            assert len(llm.requests) > 0  # replies were started, and held
            deadline = report.last_close_t + 1.0
            while (server.sessions or llm.open) and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll of server state
                await asyncio.sleep(0.01)
            assert server.sessions == {} and server.metrics.calls_active == 0
            assert llm.open == 0, f"{llm.open} LLM requests outlived their calls"
            assert server.services.work() == {"llm_streams": 0}
            llm.hold = False
            assert await bystander_turn(server)

    asyncio.run(main())
