"""Tool calls cut out of streamed text: every split of the text gives the same calls and content."""

from __future__ import annotations

import json
from typing import Any

import pytest

from choral.errors import ConfigError
from choral.server.tool_parsers import FORMATS, detect_format, format_named, template_renders_tools
from choral.server.tool_stream import ToolCallStream


def reassemble(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """What the openai SDK's stream accumulator does with the deltas."""
    content, calls = "", {}  # type: ignore[var-annotated]
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert call["id"] is None, "the id comes once, in the first delta"
                call["id"], call["name"] = tc["id"], tc["function"]["name"]
                assert tc["type"] == "function"
            call["arguments"] += tc["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def run(stream: ToolCallStream, text: str, step: int) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = []
    for i in range(0, len(text), step):
        deltas += stream.feed(text[i:i + step])
    return deltas + stream.finish()


HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
          '"note": "a } and \\" in a string"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
          '</tool_call>')


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_calls_stream_the_same_at_every_split(step: int) -> None:
    content, calls = reassemble(run(ToolCallStream(FORMATS["hermes"]), HERMES, step))
    assert content == "Let me look.\n"
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": [1, 2], "note": 'a } and " in a string'}
    assert calls[1]["arguments"] == "{}"
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["id"].startswith("call_")


def test_arguments_stream_in_pieces_before_the_call_ends() -> None:
    s = ToolCallStream(FORMATS["hermes"])
    first = s.feed('<tool_call>{"name": "f", "arguments": {"a": ')
    assert first[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert first[1]["tool_calls"][0]["function"]["arguments"] == '{"a": '
    assert s.feed("1}")[0]["tool_calls"][0]["function"]["arguments"] == "1}"
    assert s.feed("}</tool_call>") == []  # the outer object's end is not part of the arguments


def test_parallel_false_keeps_the_first_call() -> None:
    _, calls = reassemble(run(ToolCallStream(FORMATS["hermes"], parallel=False), HERMES, 5))
    assert [c["name"] for c in calls] == ["get_weather"]


def test_plain_text_is_content_and_a_partial_marker_is_released_at_the_end() -> None:
    s = ToolCallStream(FORMATS["hermes"])
    assert s.feed("Hello <tool") == [{"content": "Hello "}]
    assert s.finish() == [{"content": "<tool"}]
    assert s.message("") == ("Hello <tool", [])


def test_a_broken_call_is_returned_as_text() -> None:
    text = "<tool_call>not json at all</tool_call>"
    assert ToolCallStream(FORMATS["hermes"]).message(text) == (text, [])
    truncated = '<tool_call>{"name": "f", "arguments": {"a": 1'
    assert ToolCallStream(FORMATS["hermes"]).message(truncated) == (truncated, [])


def test_arguments_before_the_name_are_read_at_the_end() -> None:
    text = '<tool_call>{"arguments": {"x": 1}, "name": "g"}</tool_call>'
    content, calls = ToolCallStream(FORMATS["hermes"]).message(text)
    assert content is None and calls[0]["function"] == {"name": "g", "arguments": '{"x": 1}'}


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_llama3_json(step: int) -> None:
    text = '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}; {"name": "other", "parameters": {"n": 2}}'
    content, calls = reassemble(run(ToolCallStream(FORMATS["llama3_json"]), text, step))
    assert content == "" and [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("search", {"q": "x"}), ("other", {"n": 2})]
    content, calls = reassemble(run(ToolCallStream(FORMATS["llama3_json"]), "  Paris is {big}.", step))
    assert calls == [] and content == "  Paris is {big}."


@pytest.mark.parametrize("text", [
    '[TOOL_CALLS][{"name": "a", "arguments": {"k": "v"}}, {"name": "b", "arguments": {}}]',
    '[TOOL_CALLS]a[ARGS]{"k": "v"}[TOOL_CALLS]b[ARGS]{}'])
def test_mistral_both_syntaxes(text: str) -> None:
    content, calls = ToolCallStream(FORMATS["mistral"]).message(text)
    assert content is None
    read = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert read == [("a", {"k": "v"}), ("b", {})]


def test_named_and_required() -> None:
    content, calls = reassemble(run(ToolCallStream(named="f"), ' {"a": 1}', 2))
    assert content == "" and calls[0]["name"] == "f" and json.loads(calls[0]["arguments"]) == {"a": 1}
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"b": [2]}}]'
    _, calls = reassemble(run(ToolCallStream(required=True), text, 3))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("f", {"a": 1}), ("g", {"b": [2]})]


def test_string_encoded_arguments_are_decoded() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    _, calls = ToolCallStream(FORMATS["hermes"]).message(text)
    assert calls[0]["function"]["arguments"] == '{"a": 1}'


def test_detect_format() -> None:
    assert detect_format("{% if tools %}<tool_call>{% endif %}", "x").name == "hermes"
    assert detect_format("<|python_tag|>", "x").name == "llama3_json"
    assert detect_format("[TOOL_CALLS]", "x").name == "mistral"
    assert detect_format("plain chatml", "Mistral-7B").name == "mistral"
    assert detect_format(None, "smollm2").name == "hermes"
    assert not template_renders_tools("{{ message['content'] }}") and template_renders_tools("{% if tools %}")
    with pytest.raises(ConfigError, match="tool_call_parser: unknown parser 'nope'"):
        format_named("nope")
