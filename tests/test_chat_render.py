"""Chat rendering for tools: a template that reads ``tools`` gets them (and call arguments as
objects); one that ignores them gets our system text and calls written as text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from choral.server.chat_render import render_chat
from choral.server.errors import ApiError
from choral.server.protocol import ChatCompletionRequest
from choral.server.tool_choice import plan_tools
from choral.server.tool_parsers import FORMATS, detect_format
from choral.tokenizer import Tokenizer

# A template written for this test in the style of Qwen's: tools in a system block, calls in
# <tool_call> tags with their arguments through tojson, results in <tool_response> tags.
TOOL_TEMPLATE = (
    "{% if tools %}SYSTEM tools={{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
    "{% for c in m.tool_calls %}A <tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>\n"
    "{% endfor %}{% elif m.role == 'tool' %}T <tool_response>{{ m.content }}</tool_response>\n"
    "{% else %}{{ m.role[0] | upper }} {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A{% if enable_thinking is defined and not enable_thinking %} nothink{% endif %}"
    "{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "f", "description": "d",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
]


def tokenizer(template: str) -> Tokenizer:
    """A character-level tokenizer (made in memory) with ``template`` as its chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({chr(i) for i in range(32, 127)} | {"\n"})
    raw = RawTokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=" "))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw)
    hf.chat_template = template
    return Tokenizer(hf, [])


def render(template: str, **body: Any) -> str:
    tok = tokenizer(template)
    request = ChatCompletionRequest.model_validate({"messages": HISTORY, **body})
    fmt = detect_format(template, "m")
    rendered = render_chat(tok, request, plan_tools(request, fmt))
    return tok.decode(rendered.token_ids)


def test_a_template_that_reads_tools_gets_them() -> None:
    assert detect_format(TOOL_TEMPLATE, "m").name == "hermes"
    text = render(TOOL_TEMPLATE, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert text == (f"SYSTEM tools={json.dumps(TOOLS)}\nU hi\n"
                    'A <tool_call>f {"x": 1}</tool_call>\nT <tool_response>42</tool_response>\nA nothink')
    # tool_choice none: no tools rendered; the history is still the template's to write.
    assert render(TOOL_TEMPLATE, tools=TOOLS, tool_choice="none").startswith("U hi\n")


def test_a_template_that_ignores_tools_gets_our_system_text() -> None:
    text = render(PLAIN_TEMPLATE, tools=TOOLS)
    system = FORMATS["hermes"].instructions(TOOLS)
    assert text == (f"system: {system}\nuser: hi\n"
                    'assistant: <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
                    "user: <tool_response>\n42\n</tool_response>\nassistant:")
    assert json.dumps(TOOLS[0]) in system


def test_bad_tool_history_is_a_400() -> None:
    broken = [HISTORY[0], {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                 "function": {"name": "f", "arguments": "{x"}}]}]
    tok = tokenizer(TOOL_TEMPLATE)
    request = ChatCompletionRequest.model_validate({"messages": broken})
    with pytest.raises(ApiError, match="arguments are not valid JSON"):
        render_chat(tok, request, None)
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]})
    with pytest.raises(ApiError, match="content: required"):
        render_chat(tok, request, None)
