"""How each model family writes tool calls, and which family a model belongs to.

A format says how a tool call looks in the model's output, so that tool_stream.py can cut it out
of the text as it streams, and, for chat templates that ignore ``tools``, how to tell the model
about its tools (a system text, as vLLM and llama.cpp do for generic templates).

- ``hermes`` (Hermes, Qwen 2.5/3, and our default): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
- ``llama3_json`` (Llama 3.1+): the answer is ``{"name": ..., "parameters": {...}}``, maybe after
  ``<|python_tag|>``; several calls are separated by ``;``
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or, in newer templates,
  ``[TOOL_CALLS]name[ARGS]{...}``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from choral.errors import ConfigError

# A call in JSON whose name comes before its arguments: what the stream reads incrementally.
_JSON_HEADER = r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'


@dataclass(frozen=True)
class ToolCallFormat:
    """One family's tool-call syntax."""

    name: str
    # Text that switches the output into tool calls wherever it appears ("" for none).
    marker: str
    # The output is tool calls only when it starts (after whitespace) with one of these.
    starts: tuple[str, ...]
    # Regexes of a call's head: group 1 is the function's name; the arguments' JSON follows.
    headers: tuple[str, ...]
    # Whether the markers are special tokens (the text must keep special tokens to see them).
    special_markers: bool
    example: str

    def header(self) -> re.Pattern[str]:
        return re.compile("|".join(f"(?:{h})" for h in self.headers))

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        """The system text that tells a model whose template ignores ``tools`` how to call them."""
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("You may call one or more functions to answer the user. The functions, as JSON schemas:\n"
                f"<tools>\n{listed}\n</tools>\n"
                "To call functions, answer only with the calls, each with the function's name and its "
                f"arguments as a JSON object, like this:\n{self.example}\n"
                "Otherwise answer normally.")


FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat(
        name="hermes", marker="<tool_call>", starts=(), headers=(_JSON_HEADER,), special_markers=False,
        example='<tool_call>\n{"name": "<function-name>", "arguments": {"<arg>": "<value>"}}\n</tool_call>'),
    "llama3_json": ToolCallFormat(
        name="llama3_json", marker="<|python_tag|>", starts=("{",), headers=(_JSON_HEADER,), special_markers=True,
        example='{"name": "<function-name>", "parameters": {"<arg>": "<value>"}}'),
    "mistral": ToolCallFormat(
        name="mistral", marker="[TOOL_CALLS]", starts=(), special_markers=True,
        headers=(_JSON_HEADER, r"(?:^|\[TOOL_CALLS\]|\s)([A-Za-z0-9_.\-]+)\[ARGS\]"),
        example='[TOOL_CALLS][{"name": "<function-name>", "arguments": {"<arg>": "<value>"}}]'),
}

# The JSON array that tool_choice="required" constrains the output to (see tool_choice.py).
REQUIRED_HEADER = re.compile(_JSON_HEADER)


def format_named(name: str) -> ToolCallFormat:
    """``--tool-call-parser NAME``: ConfigError for a name we do not know."""
    if name not in FORMATS:
        raise ConfigError(f"tool_call_parser: unknown parser {name!r}; choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def detect_format(chat_template: str | None, model_name: str) -> ToolCallFormat:
    """The format a model writes tool calls in, read from its chat template (what it was trained
    to answer), else from its name; ``hermes`` when neither says (it is what we ask for in the
    system text of templates that ignore tools)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or "ipython" in template:
        return FORMATS["llama3_json"]
    name = model_name.lower()
    if "mistral" in name or "mixtral" in name:
        return FORMATS["mistral"]
    if "llama-3" in name or "llama3" in name:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the template reads ``tools`` (else the tools go in a system text we write)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template or "") is not None


def template_renders_tool_calls(chat_template: str | None) -> bool:
    """Whether the template renders assistant ``tool_calls`` and ``tool`` messages itself."""
    return bool(chat_template) and "tool_calls" in (chat_template or "")
