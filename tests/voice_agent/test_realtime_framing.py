"""Sans-I/O tests of the /v1/realtime framing: messages in -> events; events -> messages out."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemTruncatedEvent,
    InputAudioBufferSpeechStartedEvent,
    RealtimeErrorEvent,
    ResponseAudioDeltaEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)

from audio.codecs import float32_to_pcm16, mulaw_encode
from voice_agent.events import (
    AudioIn,
    CancelResponse,
    ClearAudio,
    CommitAudio,
    ConfigureSession,
    CreateResponse,
    DenoiseStep,
    ErrorEvent,
    Flush,
    PlaybackTruncate,
    ReplyAudio,
    ReplyStarted,
    ReplyTextDelta,
    ResponseDone,
    SpeechStarted,
    SpeechStopped,
    TranscriptDelta,
    TranscriptFinal,
    TurnMetrics,
    UserText,
)
from voice_agent.transports.realtime import RealtimeProtocol


def proto(**kw) -> RealtimeProtocol:
    return RealtimeProtocol(instructions="Be brief.", **kw)


def send(p: RealtimeProtocol, event: dict) -> list:
    return p.feed(json.dumps(event))


def out(p: RealtimeProtocol) -> list[dict]:
    return [json.loads(m) for m in p.take_outgoing()]


def encoded(p: RealtimeProtocol, event) -> list[dict]:
    return [json.loads(m.data) for m in p.encode(event)]


def single_error(p: RealtimeProtocol) -> dict:
    messages = out(p)
    assert [m["type"] for m in messages] == ["error"]
    RealtimeErrorEvent.model_validate(messages[0])
    return messages[0]["error"]


def test_session_created_validates_as_the_sdk_type():
    p = proto()
    created = json.loads(p.start()[0])
    SessionCreatedEvent.model_validate(created)
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


def test_session_object_names_the_models_by_role():
    models = {"asr": "tiny.en", "llm": "default", "tts": "en_US-joe-medium"}
    created = json.loads(RealtimeProtocol(instructions="x", models=models).start()[0])
    SessionCreatedEvent.model_validate(created)
    assert created["session"]["voice_agent"]["models"] == models


def test_session_update_rates_text_mode_and_vendor_fields():
    p = proto()
    events = send(
        p,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "Speak like a pirate.",
                "output_modalities": ["text"],
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}},
                "voice_agent": {"denoise_steps": True},
            },
        },
    )
    assert events == [
        ConfigureSession(
            instructions="Speak like a pirate.",
            input_rate_hz=16000,
            output_rate_hz=24000,
            server_vad=False,
            audio_output=False,
            trace_steps=True,
        )
    ]
    updated = out(p)[0]
    # 16 kHz PCM is our extension: the SDK's strict model only knows 24 kHz, so the standard
    # field leaves the rate out and the vendor field carries it.
    SessionUpdatedEvent.model_validate(updated)
    assert updated["session"]["output_modalities"] == ["text"]
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm"}
    assert updated["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert updated["session"]["voice_agent"]["input_rate_hz"] == 16000
    assert updated["session"]["voice_agent"]["output_rate_hz"] == 24000
    send(p, {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}}})
    SessionUpdatedEvent.model_validate(out(p)[0])
    # Beta-style formats are understood too.
    send(p, {"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}})
    assert p.settings.input_format.type == "audio/pcmu" and p.settings.input_format.rate_hz == 8000
    updated = out(p)[0]
    SessionUpdatedEvent.model_validate(updated)
    assert updated["session"]["voice_agent"]["input_rate_hz"] == 8000


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 32000, 44100, 48000])
def test_session_events_validate_as_the_sdk_types_at_every_rate(rate):
    p = proto(sample_rate_hz=rate)
    SessionCreatedEvent.model_validate(json.loads(p.start()[0]))
    fmt = {"type": "audio/pcm", "rate": rate}
    send(p, {"type": "session.update", "session": {"audio": {"input": {"format": fmt}, "output": {"format": fmt}}}})
    updated = out(p)[0]
    SessionUpdatedEvent.model_validate(updated)
    assert updated["session"]["voice_agent"]["input_rate_hz"] == updated["session"]["voice_agent"]["output_rate_hz"] == rate


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 12345}}}}, "session.audio.input.format.rate"),
        ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format.type"),
        ({"instructions": 42}, "session.instructions"),
        ({"output_modalities": ["video"]}, "session.output_modalities"),
        ({"voice_agent": {"denoise_steps": "yes"}}, "session.voice_agent.denoise_steps"),
    ],
)
def test_session_update_rejects_bad_values_and_changes_nothing(session, param):
    p = proto()
    assert send(p, {"type": "session.update", "session": session}) == []
    assert single_error(p)["param"] == param
    assert p.settings.input_format.rate_hz == 24000 and p.settings.instructions == "Be brief."


def test_append_decodes_pcm16_and_mulaw():
    p = proto()
    x = np.linspace(-0.5, 0.5, 480, dtype=np.float32)
    (event,) = send(p, {"type": "input_audio_buffer.append", "audio": base64.b64encode(float32_to_pcm16(x)).decode()})
    assert isinstance(event, AudioIn) and event.sample_rate_hz == 24000
    np.testing.assert_allclose(event.samples, x, atol=1e-4)
    send(p, {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    out(p)
    (event,) = send(p, {"type": "input_audio_buffer.append", "audio": base64.b64encode(mulaw_encode(x)).decode()})
    assert event.sample_rate_hz == 8000 and len(event.samples) == 480


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_event"),
        ('{"no_type": 1}', "invalid_event"),
        ('{"type": 7}', "invalid_event"),
        ('{"type": "conversation.item.frobnicate", "item_id": "x"}', "unknown_event_type"),
        ('{"type": "conversation.item.retrieve", "item_id": "x"}', "item_retrieve_invalid_item_id"),
        ('{"type": "conversation.item.delete", "item_id": "x"}', "item_delete_invalid_item_id"),
        ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_type"),
        ('{"type": "input_audio_buffer.append"}', "missing_required_parameter"),
        ('{"type": "input_audio_buffer.append", "audio": "%%%not base64"}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AA=="}', "invalid_audio"),  # odd PCM16 length
        ('{"type": "session.update", "session": "x"}', "invalid_type"),
        ('{"type": "conversation.item.create", "item": {"role": "system", "content": []}}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"role": "tool", "content": []}}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c"}}',
         "missing_required_parameter"),
        ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": 2}}}}}', "invalid_value"),
        ('{"type": "session.update", "session": {"audio": {"output": {"speed": 3}}}}', "invalid_value"),
        ('{"type": "session.update", "session": {"tools": [{"type": "function"}]}}', "invalid_value"),
        ('{"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "nope"}}}', "invalid_value"),
        ('{"type": "response.create", "response": {"conversation": "none"}}', "unsupported_feature"),
        ('{"type": "response.create", "response": {"tool_choice": {"type": "function", "function": "x"}}}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"role": "system", "content": [{"type": "input_audio", "transcript": "x"}]}}',
         "invalid_value"),
        ('{"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 10}', "item_not_found"),
    ],
)
def test_malformed_and_unknown_messages_give_an_error_and_the_call_goes_on(message, code):
    p = proto()
    assert p.feed(message) == []
    assert single_error(p)["code"] == code
    assert p.feed('{"type": "response.create"}') == [CreateResponse()]


def test_error_echoes_the_client_event_id():
    p = proto()
    p.feed('{"type": "bogus", "event_id": "evt_42"}')
    assert single_error(p)["event_id"] == "evt_42"


def test_oversized_and_binary_messages():
    p = proto(max_message_bytes=100)
    assert p.feed(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 200})) == []
    assert single_error(p)["code"] == "message_too_large"
    assert p.feed(b"\x00\x01") == []
    assert single_error(p)["code"] == "invalid_message"


def test_client_events_map_to_input_events():
    p = proto()
    assert send(p, {"type": "input_audio_buffer.commit"}) == [CommitAudio(respond=False)]
    assert send(p, {"type": "input_audio_buffer.clear"}) == [ClearAudio()]
    assert [m["type"] for m in out(p)] == ["input_audio_buffer.cleared"]
    assert send(p, {"type": "response.cancel"}) == [CancelResponse()]
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}
    (typed,) = send(p, {"type": "conversation.item.create", "item": item})
    assert typed == UserText(text="Hi there", respond=False, item_id=typed.item_id) and typed.item_id
    assert [m["type"] for m in out(p)] == ["conversation.item.added", "conversation.item.done"]


def spoken_turn(p: RealtimeProtocol) -> list[dict]:
    samples = np.zeros(22050, np.float32)  # 1 s at the TTS rate
    messages = []
    for event in (
        SpeechStarted(turn_id=1, audio_start_ms=120),
        TranscriptDelta(turn_id=1, text="what is"),
        TranscriptDelta(turn_id=1, text="what is the"),
        TranscriptDelta(turn_id=1, text="what was"),  # a revision: no delta
        SpeechStopped(turn_id=1, audio_end_ms=1500),
        TranscriptFinal(turn_id=1, text="What is the weather?", audio_s=1.4),
        ReplyStarted(turn_id=1, audio_output=True),
        ReplyAudio(turn_id=1, chunk_index=0, text="It is sunny.", samples=samples, sample_rate_hz=22050),
        ResponseDone(turn_id=1, status="completed", text="It is sunny.", heard="It is sunny.", audio_output=True),
        TurnMetrics(turn_id=1, values={"voice_to_voice_ms": 640.0}),
    ):
        messages += encoded(p, event)
    return messages


def test_a_spoken_turn_encodes_to_the_realtime_sequence_and_validates():
    p = proto()
    messages = spoken_turn(p)
    kinds = [m["type"] for m in messages]
    assert kinds[:8] == [
        "input_audio_buffer.speech_started",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.delta",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
    ]
    assert [m["delta"] for m in messages[1:3]] == ["what is", " the"]
    assert kinds.count("response.output_audio.delta") == 10  # 100 ms each
    assert kinds[-2:] == ["response.done", "voice_agent.metrics"]
    # Vendor events name the response they belong to.
    assert messages[-1]["response_id"] == messages[-2]["response"]["id"]
    InputAudioBufferSpeechStartedEvent.model_validate(messages[0])
    ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(messages[6])
    ResponseCreatedEvent.model_validate(messages[7])
    audio = [m for m in messages if m["type"] == "response.output_audio.delta"]
    ResponseAudioDeltaEvent.model_validate(audio[0])
    assert len(base64.b64decode(audio[0]["delta"])) == 2400 * 2  # 100 ms at 24 kHz, PCM16
    done = next(m for m in messages if m["type"] == "response.done")
    ResponseDoneEvent.model_validate(done)
    assert done["response"]["status"] == "completed"
    assert done["response"]["output"][0]["content"][0]["transcript"] == "It is sunny."
    ids = {m["event_id"] for m in messages}
    assert len(ids) == len(messages)


def test_local_playback_marks_are_attached_to_the_last_audio_message():
    p = proto()
    encoded(p, ReplyStarted(turn_id=3, audio_output=True))
    msgs = p.encode(ReplyAudio(turn_id=3, chunk_index=2, text="Hi.", samples=np.zeros(4800, np.float32), sample_rate_hz=24000))
    audio = [m for m in msgs if m.audio_s]
    assert [m.played_chunk for m in audio] == [None, 2]
    assert sum(m.audio_s for m in audio) == pytest.approx(0.2)


def test_text_only_reply_and_cancellation():
    p = proto()
    send(p, {"type": "session.update", "session": {"output_modalities": ["text"]}})
    assert [m["type"] for m in encoded(p, ReplyStarted(turn_id=2, audio_output=False))] == ["response.created"]
    # The message item opens at the reply's first words.
    *opened, delta = encoded(p, ReplyTextDelta(turn_id=2, text="Hello"))
    assert [m["type"] for m in opened] == ["response.output_item.added", "conversation.item.added", "response.content_part.added"]
    assert delta["type"] == "response.output_text.delta" and delta["delta"] == "Hello"
    assert [m["type"] for m in encoded(p, ReplyTextDelta(turn_id=2, text=" there"))] == ["response.output_text.delta"]
    (cleared,) = encoded(p, Flush(turn_id=2, reason="speech"))
    assert cleared["type"] == "output_audio_buffer.cleared"
    done = encoded(p, ResponseDone(turn_id=2, status="cancelled", text="Hello there", heard="Hello", audio_output=False, reason="speech"))
    final = done[-1]
    ResponseDoneEvent.model_validate(final)
    assert final["response"]["status"] == "cancelled"
    assert final["response"]["status_details"]["reason"] == "turn_detected"
    assert final["response"]["output"][0]["content"][0]["text"] == "Hello"


def test_truncate_maps_the_item_to_its_turn_and_checks_the_length():
    p = proto()
    spoken_turn(p)
    item_id = next(iter(p._assistant_items))
    events = send(p, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 400})
    assert events == [PlaybackTruncate(turn_id=1, audio_end_ms=400)]
    ConversationItemTruncatedEvent.model_validate(out(p)[0])
    assert send(p, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 99999}) == []
    assert single_error(p)["param"] == "audio_end_ms"


def test_vendor_events_only_where_enabled():
    p = proto()
    step = DenoiseStep(turn_id=1, step=1, block_start=32, tokens=["Hi", "<mask>"])
    assert encoded(p, step) == []
    send(p, {"type": "session.update", "session": {"voice_agent": {"denoise_steps": True, "metrics": False}}})
    message = encoded(p, step)[0]
    assert message["type"] == "voice_agent.denoise_step"
    assert (message["block_start"], message["tokens"]) == (32, ["Hi", "<mask>"])
    assert encoded(p, TurnMetrics(turn_id=1, values={})) == []


def test_events_of_a_reply_that_never_started_encode_to_nothing():
    p = proto()
    assert encoded(p, ResponseDone(turn_id=9, status="cancelled", text="", heard="", audio_output=True)) == []
    assert encoded(p, Flush(turn_id=9, reason="speech")) == []
    err = encoded(p, ErrorEvent(code="llm_error", message="down"))[0]
    assert err["error"]["type"] == "server_error"
