"""voice_agent.tools and the local model's function calls: messages as text, routing, the call
grammar, parsing; end to end with the embedded SmolLM2 through LocalDLM."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from voice_agent.bench.tool_cases import TOOLS
from voice_agent.config import Config
from voice_agent.llm import LlmError, LlmOptions, ToolCall, build_llm
from voice_agent.tools import CALL_CLOSE, CALL_OPEN, call_grammar, parse_call, plain_messages


def test_calls_and_results_become_text_a_chat_template_takes():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4 C, snow"},
    ]
    plain = plain_messages(messages)
    assert plain[2] == {"role": "assistant", "content": CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Oslo"}}' + CALL_CLOSE}
    assert plain[3] == {"role": "user", "content": '<tool_response>{"name": "get_weather", "content": "4 C, snow"}</tool_response>'}
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in plain)


def test_a_call_parses_and_a_cut_one_is_an_error():
    assert parse_call(CALL_OPEN + '{"name": "f", "arguments": {"a": 1}}' + CALL_CLOSE) == ToolCall("f", '{"a": 1}')
    with pytest.raises(ValueError, match="cut short"):
        parse_call(CALL_OPEN + '{"name": "f", "argum')


@pytest.fixture(scope="module")
def llm():
    client = build_llm(Config().llm)  # the embedded default model (SmolLM2-135M-Instruct, AR)
    yield client
    asyncio.run(client.aclose())


def _ask(llm, messages, **options):
    async def main():
        return [d async for d in llm.stream(messages, options=LlmOptions(tools=TOOLS, **options))]

    deltas = asyncio.run(main())
    return "".join(d.text for d in deltas), deltas[-1].tool_calls


def test_an_uncompilable_schema_still_gives_a_json_object(llm, caplog):
    function = {"name": "odd", "parameters": {"type": "object", "properties": {"x": {"type": "strnig"}}}}
    with caplog.at_level(logging.WARNING, logger="voice_agent.tools"):
        grammar = call_grammar(function, llm._tokenizer)
    assert "cannot be enforced" in caplog.text and '"arguments": {"type": "object"}' in grammar.lark


def test_the_local_model_calls_the_function_the_request_needs_with_valid_arguments(llm):
    system = {"role": "system", "content": Config().agent.system_prompt}
    text, calls = _ask(llm, [system, {"role": "user", "content": "What's the weather like in Paris today?"}], tool_choice="auto")
    assert text == ""
    (call,) = calls
    arguments = json.loads(call.arguments)
    assert call.name == "get_weather" and set(arguments) == {"city"} and isinstance(arguments["city"], str)
    # No function needed: words. After a function's result: words about it.
    text, calls = _ask(llm, [system, {"role": "user", "content": "Tell me a joke."}], tool_choice="auto")
    assert text.strip() and calls is None
    result = [system, {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
              {"role": "tool", "tool_call_id": "c", "content": "Sunny, 21 degrees"}]
    text, calls = _ask(llm, result, tool_choice="auto")
    assert text.strip() and calls is None


def test_a_named_function_is_called_and_none_means_words(llm):
    system = {"role": "system", "content": "You answer the phone."}
    _, calls = _ask(llm, [system, {"role": "user", "content": "Hello there."}],
                    tool_choice={"type": "function", "function": {"name": "set_timer"}})
    (call,) = calls
    assert call.name == "set_timer" and isinstance(json.loads(call.arguments)["minutes"], int)
    # A reply limit too small for a call does not cut it: a call is finished whole.
    _, calls = _ask(llm, [system, {"role": "user", "content": "A timer for 3 minutes."}], max_tokens=2,
                    tool_choice={"type": "function", "function": {"name": "set_timer"}})
    assert json.loads(calls[0].arguments)["minutes"] == 3
    text, calls = _ask(llm, [system, {"role": "user", "content": "Set a timer for 3 minutes."}], tool_choice="none")
    assert text.strip() and calls is None
    with pytest.raises(LlmError, match="names no declared function"):
        _ask(llm, [system, {"role": "user", "content": "Hi"}], tool_choice={"type": "function", "function": {"name": "nope"}})


def test_bench_tools_scores_the_cases_and_writes_json(tmp_path, capsys):
    from voice_agent import cli

    out = tmp_path / "tools.json"
    assert cli.main(["bench", "tools", "--cases", "2", "--modes", "required", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = results["modes"]["required"]["rows"]
    assert [r["expected"] for r in rows] == ["get_weather", "get_weather"]
    assert all(r["called"] and r["valid"] for r in rows)  # the grammar: every call is valid for its schema
    scores = results["modes"]["required"]["scores"]
    assert scores["cases"] == 2 and scores["valid_calls"] == scores["calls"] == 2
    assert "required: right calls" in capsys.readouterr().out
    assert cli.main(["bench", "tools", "--modes", "sometimes"]) == 2
    assert "--modes takes auto, required" in capsys.readouterr().err
