"""Sans-I/O tests of the /twilio framing (Twilio Media Streams, bidirectional)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from audio.codecs import mulaw_encode
from voice_agent.events import (
    AudioIn,
    CallEnded,
    CallStarted,
    ConfigureSession,
    Dtmf,
    Flush,
    PlaybackMark,
    ReplyAudio,
    TurnMetrics,
)
from voice_agent.transports.twilio import TwilioProtocol, mark_name, parse_mark_name

START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "streamSid": "MZ123",
        "accountSid": "AC1",
        "callSid": "CA9",
        "tracks": ["inbound"],
        "customParameters": {"lang": "en"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
    "streamSid": "MZ123",
}


def started() -> TwilioProtocol:
    p = TwilioProtocol()
    assert p.feed(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})) == []
    events = p.feed(json.dumps(START))
    assert events == [
        CallStarted(call_sid="CA9", stream_sid="MZ123", parameters={"lang": "en"}),
        ConfigureSession(input_rate_hz=8000, output_rate_hz=8000),
    ]
    return p


def media(payload: bytes) -> str:
    return json.dumps({"event": "media", "streamSid": "MZ123", "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": base64.b64encode(payload).decode()}})


def test_inbound_messages():
    p = started()
    x = np.linspace(-0.5, 0.5, 160, dtype=np.float32)
    (audio,) = p.feed(media(mulaw_encode(x)))
    assert isinstance(audio, AudioIn) and audio.sample_rate_hz == 8000
    np.testing.assert_allclose(audio.samples, x, atol=0.02)
    assert p.feed(json.dumps({"event": "dtmf", "streamSid": "MZ123", "dtmf": {"track": "inbound_track", "digit": "5"}})) == [Dtmf(digit="5")]
    assert p.feed(json.dumps({"event": "mark", "streamSid": "MZ123", "mark": {"name": "r3.1"}})) == [PlaybackMark(turn_id=3, chunk_index=1)]
    assert p.feed(json.dumps({"event": "stop", "streamSid": "MZ123", "stop": {"callSid": "CA9"}})) == [CallEnded()]
    assert p.errors == []


def test_malformed_and_out_of_order_messages_are_counted_not_fatal():
    p = TwilioProtocol(max_message_bytes=2000)
    assert p.feed(media(b"\xff" * 160)) == []  # media before start
    assert p.feed("{oops") == []
    assert p.feed(b"\x00") == []
    assert p.feed(json.dumps({"event": 5})) == []
    assert p.feed("x" * 3000) == []
    assert len(p.errors) == 5
    p = started()
    assert p.feed(json.dumps(START)) == []  # a second start
    assert p.feed(json.dumps({"event": "media", "streamSid": "MZ123", "media": {"payload": "%%%"}})) == []
    assert p.feed(json.dumps({"event": "mark", "streamSid": "MZ123", "mark": {"name": "someone-elses"}})) == []
    assert p.feed(json.dumps({"event": "dtmf", "streamSid": "MZ123", "dtmf": {}})) == []
    assert p.feed(json.dumps({"event": "teleport", "streamSid": "MZ123"})) == []
    assert len(p.errors) == 5
    assert p.feed(media(b"\xff" * 160)) != []  # and the call goes on


def test_reply_audio_becomes_20ms_media_frames_then_a_mark():
    p = started()
    samples = np.zeros(22050 // 2, np.float32)  # 0.5 s at 22.05 kHz
    msgs = p.encode(ReplyAudio(turn_id=2, chunk_index=0, text="Hi.", samples=samples, sample_rate_hz=22050))
    decoded = [json.loads(m.data) for m in msgs]
    assert [d["event"] for d in decoded] == ["media"] * 25 + ["mark"]
    assert all(len(base64.b64decode(d["media"]["payload"])) == 160 for d in decoded[:-1])
    assert all(d["streamSid"] == "MZ123" for d in decoded)
    assert decoded[-1]["mark"]["name"] == "r2.0"
    assert sum(m.audio_s for m in msgs) == pytest.approx(0.5)
    assert msgs[-1].audio_s == 0 and msgs[-1].played_chunk is None  # Twilio echoes the mark itself


def test_flush_becomes_clear_and_other_events_send_nothing():
    p = started()
    (clear,) = p.encode(Flush(turn_id=2, reason="speech"))
    assert json.loads(clear.data) == {"event": "clear", "streamSid": "MZ123"}
    assert p.encode(TurnMetrics(turn_id=2, values={})) == []
    assert TwilioProtocol().encode(Flush(turn_id=1, reason="speech")) == []  # nothing before start


def test_mark_names_round_trip():
    assert parse_mark_name(mark_name(12, 3)) == (12, 3)
    assert parse_mark_name("r1") is None and parse_mark_name("x1.2") is None
