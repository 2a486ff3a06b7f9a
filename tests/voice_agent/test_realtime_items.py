"""Sans-I/O tests of the /v1/realtime framing's conversation items, function calls, usage and the
session settings that clients such as Pipecat send (issue 20). Every server message is validated
with the openai SDK's own models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from openai.types.realtime import (
    ConversationItemAdded,
    ConversationItemDeletedEvent,
    RealtimeErrorEvent,
    ResponseDoneEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    SessionUpdatedEvent,
)
from openai.types.realtime.realtime_server_event import ConversationItemRetrieved

from voice_agent.events import (
    AddItem,
    CancelResponse,
    ConfigureSession,
    CreateResponse,
    DeleteItem,
    FunctionCall,
    ReplyAudio,
    ReplyOptions,
    ReplyStarted,
    ReplyTextDelta,
    ResponseDone,
    SpeechStopped,
    TranscriptFinal,
    Usage,
    UserText,
    VadSettings,
)
from voice_agent.transports.realtime import IMAGE_NOTE, MAX_REMEMBERED_ITEMS, RealtimeProtocol

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SERVER_EVENTS = {
    "conversation.item.added": ConversationItemAdded,
    "conversation.item.retrieved": ConversationItemRetrieved,
    "conversation.item.deleted": ConversationItemDeletedEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.function_call_arguments.delta": ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": ResponseFunctionCallArgumentsDoneEvent,
    "response.done": ResponseDoneEvent,
    "session.updated": SessionUpdatedEvent,
    "error": RealtimeErrorEvent,
}


def proto() -> RealtimeProtocol:
    return RealtimeProtocol(instructions="Be brief.")


def send(p: RealtimeProtocol, event: dict) -> list:
    return p.feed(json.dumps(event))


def validated(messages: list[dict]) -> list[dict]:
    for m in messages:
        if m["type"] in SERVER_EVENTS:
            SERVER_EVENTS[m["type"]].model_validate(m)
    return messages


def out(p: RealtimeProtocol) -> list[dict]:
    return validated([json.loads(m) for m in p.take_outgoing()])


def encoded(p: RealtimeProtocol, event) -> list[dict]:
    return validated([json.loads(m.data) for m in p.encode(event)])


def create(role: str, text: str, **item) -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "conversation.item.create", "item": {"type": "message", "role": role,
                                                         "content": [{"type": kind, "text": text}], **item}}


def test_system_and_assistant_messages_enter_the_conversation():
    p = proto()
    (system,) = send(p, create("system", "The caller is Ana.", id="ctx_1"))
    assert system == AddItem(message={"role": "system", "content": "The caller is Ana."}, item_id="ctx_1")
    assert [m["type"] for m in out(p)] == ["conversation.item.added", "conversation.item.done"]
    # Pipecat sends assistant lines as input_text parts: taken too.
    (line,) = send(p, {"type": "conversation.item.create",
                       "item": {"type": "message", "role": "assistant", "content": [{"type": "input_text", "text": "Hi Ana!"}]}})
    assert line.message == {"role": "assistant", "content": "Hi Ana!"}
    added = out(p)[0]
    assert added["previous_item_id"] == "ctx_1" and added["item"]["role"] == "assistant"
    # An id that is taken is refused, naming the client's event.
    assert send(p, {**create("system", "again", id="ctx_1"), "event_id": "evt_9"}) == []
    (error,) = out(p)
    assert error["error"]["code"] == "item_already_exists" and error["error"]["event_id"] == "evt_9"


def test_an_image_is_kept_in_the_item_and_the_llm_reads_a_note():
    p = proto()
    item = {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/4AAQ"},
    ]}
    (typed,) = send(p, {"type": "conversation.item.create", "item": item})
    assert isinstance(typed, UserText) and typed.text == f"What is this? {IMAGE_NOTE}"
    added = out(p)[0]
    assert added["item"]["content"][1] == {"type": "input_image", "detail": "auto"}


def test_function_call_items_and_outputs_from_the_client():
    p = proto()
    (call,) = send(p, {"type": "conversation.item.create", "item": {
        "type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}})
    assert call.message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    (result,) = send(p, {"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_1", "output": '{"temp_c": 4}'}})
    assert result.message == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4}'}
    assert [m["item"]["type"] for m in out(p) if m["type"] == "conversation.item.added"] == ["function_call", "function_call_output"]


def test_retrieve_and_delete_items_of_every_origin():
    p = proto()
    send(p, create("system", "Context.", id="ctx"))
    encoded(p, SpeechStopped(turn_id=1, audio_end_ms=900))
    encoded(p, TranscriptFinal(turn_id=1, text="Hello there", audio_s=0.9))
    encoded(p, ReplyStarted(turn_id=1, audio_output=False))
    encoded(p, ReplyTextDelta(turn_id=1, text="Hi!"))
    encoded(p, ResponseDone(turn_id=1, status="completed", text="Hi!", heard="Hi!", audio_output=False))
    out(p)
    user_id, reply_id = p._user_item(1), p._responses[1].item_id
    send(p, {"type": "conversation.item.retrieve", "item_id": user_id, "event_id": "rci_1"})
    (retrieved,) = out(p)
    assert retrieved["item"]["content"] == [{"type": "input_audio", "transcript": "Hello there"}]
    send(p, {"type": "conversation.item.retrieve", "item_id": reply_id})
    assert out(p)[0]["item"]["content"][0]["text"] == "Hi!"
    # Deleting names the session's history entry: the client's id, or the turn and role.
    assert send(p, {"type": "conversation.item.delete", "item_id": "ctx"}) == [DeleteItem(item_id="ctx")]
    assert send(p, {"type": "conversation.item.delete", "item_id": user_id}) == [DeleteItem(turn_id=1, role="user")]
    assert send(p, {"type": "conversation.item.delete", "item_id": reply_id}) == [DeleteItem(turn_id=1, role="assistant")]
    assert [m["type"] for m in out(p)] == ["conversation.item.deleted"] * 3
    # Gone is gone: Pipecat reads the code and the event id it sent.
    assert send(p, {"type": "conversation.item.retrieve", "item_id": "ctx", "event_id": "rci_ctx"}) == []
    (error,) = out(p)
    assert error["error"]["code"] == "item_retrieve_invalid_item_id" and error["error"]["event_id"] == "rci_ctx"


def test_remembered_items_are_bounded():
    p = proto()
    for i in range(MAX_REMEMBERED_ITEMS + 10):
        send(p, create("system", f"note {i}", id=f"n{i}"))
    out(p)
    assert len(p._items) == MAX_REMEMBERED_ITEMS
    send(p, {"type": "conversation.item.retrieve", "item_id": "n0"})
    assert out(p)[0]["error"]["code"] == "item_retrieve_invalid_item_id"


def test_a_reply_that_only_calls_a_function_holds_no_message():
    p = proto()
    assert [m["type"] for m in encoded(p, ReplyStarted(turn_id=3, audio_output=True))] == ["response.created"]
    call = FunctionCall(turn_id=3, call_id="call_x", name="get_weather", arguments='{"city": "Oslo"}')
    messages = encoded(p, call)
    assert [m["type"] for m in messages] == [
        "response.output_item.added", "conversation.item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "conversation.item.done",
    ]
    assert messages[3]["call_id"] == "call_x" and json.loads(messages[3]["arguments"]) == {"city": "Oslo"}
    (done,) = encoded(p, ResponseDone(turn_id=3, status="completed", text="", heard="", audio_output=True,
                                      usage=Usage(120, 9)))
    response = done["response"]
    assert [o["type"] for o in response["output"]] == ["function_call"]
    assert response["usage"]["input_tokens"] == 120 and response["usage"]["output_tokens"] == 9
    assert response["usage"]["total_tokens"] == 129


def test_words_then_a_call_are_two_outputs_in_order():
    p = proto()
    encoded(p, ReplyStarted(turn_id=4, audio_output=True))
    samples = np.zeros(2400, np.float32)
    first = encoded(p, ReplyAudio(turn_id=4, chunk_index=0, text="Let me check.", samples=samples, sample_rate_hz=24000))
    assert first[0]["type"] == "response.output_item.added" and first[0]["output_index"] == 0
    call = FunctionCall(turn_id=4, call_id="c", name="get_weather", arguments="{}")
    assert encoded(p, call)[0]["output_index"] == 1
    done = encoded(p, ResponseDone(turn_id=4, status="completed", text="Let me check.", heard="Let me check.",
                                   audio_output=True))[-1]
    assert [o["type"] for o in done["response"]["output"]] == ["message", "function_call"]
    assert done["response"]["usage"] is None  # the session said nothing about tokens


def test_a_reply_cut_at_its_token_limit_is_incomplete():
    p = proto()
    encoded(p, ReplyStarted(turn_id=5, audio_output=False))
    encoded(p, ReplyTextDelta(turn_id=5, text="One two"))
    done = encoded(p, ResponseDone(turn_id=5, status="completed", text="One two", heard="One two", audio_output=False,
                                   reason="length"))[-1]
    assert done["response"]["status"] == "incomplete"
    assert done["response"]["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["response"]["output"][0]["status"] == "incomplete"


def test_a_tool_choice_naming_a_removed_function_goes_back_to_auto():
    p = proto()
    send(p, {"type": "session.update", "session": {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}})
    timer = {**WEATHER, "name": "set_timer"}
    (configure,) = send(p, {"type": "session.update", "session": {"tools": [timer]}})
    assert configure.tool_choice == "auto" and p.settings.tool_choice == "auto"


def test_session_settings_map_to_the_session_and_echo_back():
    p = proto()
    (configure,) = send(p, {"type": "session.update", "session": {
        "type": "realtime",
        "tools": [WEATHER],
        "tool_choice": "auto",
        "max_output_tokens": 40,
        "audio": {
            "input": {"turn_detection": {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                         "silence_duration_ms": 350, "create_response": True},
                      "transcription": {"model": "whisper-1", "language": "en"},
                      "noise_reduction": {"type": "near_field"}},
            "output": {"speed": 1.25, "voice": "alloy"},
        },
    }})
    assert configure.vad == VadSettings(silence_duration_ms=350, threshold=0.6, prefix_padding_ms=200, create_response=True)
    assert configure.max_output_tokens == 40 and configure.speed == 1.25
    assert configure.tools == [{"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    assert configure.tool_choice == "auto"
    session = out(p)[0]["session"]
    assert session["audio"]["input"]["turn_detection"] == {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                                                          "silence_duration_ms": 350, "create_response": True}
    assert session["audio"]["output"]["speed"] == 1.25 and session["tools"] == [WEATHER] and session["max_output_tokens"] == 40
    # Semantic VAD's eagerness; "inf" lifts the reply limit again.
    (configure,) = send(p, {"type": "session.update", "session": {
        "max_output_tokens": "inf", "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}})
    assert configure.vad == VadSettings(eagerness="high") and configure.max_output_tokens == 0
    assert out(p)[0]["session"]["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "high"}


def test_pipecat_turns_server_vad_off_with_false():
    p = proto()
    (configure,) = send(p, {"type": "session.update", "session": {"audio": {"input": {"turn_detection": False}}}})
    assert configure.server_vad is False
    assert out(p)[0]["session"]["audio"]["input"]["turn_detection"] is None


def test_response_create_options_and_event_ids():
    p = proto()
    send(p, {"type": "session.update", "session": {"tools": [WEATHER]}})
    out(p)
    (create_,) = send(p, {"type": "response.create", "event_id": "evt_r", "response": {
        "output_modalities": ["text"], "instructions": "Greet the caller.", "max_output_tokens": 12,
        "tool_choice": {"type": "function", "name": "get_weather"}, "metadata": {"k": "v"}}})
    assert create_ == CreateResponse(client_event_id="evt_r", options=ReplyOptions(
        instructions="Greet the caller.", audio_output=False, max_output_tokens=12,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert send(p, {"type": "response.cancel", "event_id": "evt_c"}) == [CancelResponse(client_event_id="evt_c")]


@pytest.mark.parametrize("session", [
    {"tools": [WEATHER, WEATHER]},  # two functions of one name
    {"tools": [{"type": "mcp", "server_label": "x"}]},
    {"max_output_tokens": 0},
    {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "sometimes"}}}},
])
def test_invalid_settings_change_nothing(session):
    p = proto()
    before = p.session_json()
    assert send(p, {"type": "session.update", "session": session}) == []
    assert out(p)[0]["type"] == "error"
    assert p.session_json() == before


def test_configure_session_carries_nothing_it_was_not_given():
    p = proto()
    (configure,) = send(p, {"type": "session.update", "session": {"instructions": "Hi."}})
    assert configure == ConfigureSession(instructions="Hi.", input_rate_hz=24000, output_rate_hz=24000)


def test_instructions_are_bounded_in_the_llms_tokens_for_the_session_and_for_a_response():
    p = RealtimeProtocol(instructions="Be brief.", max_instructions_tokens=20, count_tokens=lambda t: len(t.split()))
    fits = " ".join(["word"] * 20)  # 99 characters, 20 tokens
    over = " ".join(["word"] * 21)
    assert any(isinstance(e, ConfigureSession) for e in send(p, {"type": "session.update", "session": {"instructions": fits}}))
    for event, param in (({"type": "session.update", "session": {"instructions": over}}, "session.instructions"),
                         ({"type": "response.create", "response": {"instructions": over}}, "response.instructions"),
                         ({"type": "response.create", "response": {"instructions": "x" * 200}}, "response.instructions")):
        out(p)
        assert send(p, event) == []
        [error] = [m for m in out(p) if m["type"] == "error"]
        assert error["error"]["code"] == "string_above_max_length" and error["error"]["param"] == param
    assert p.settings.instructions == fits
    [created] = send(p, {"type": "response.create", "response": {"instructions": fits}})
    assert isinstance(created, CreateResponse) and created.options.instructions == fits
