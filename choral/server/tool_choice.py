"""A chat request's tools and tool_choice, resolved once: what to render, how to read the answer,
and how to constrain it.

- ``auto``: the model decides; its answer is read with its family's format (tool_parsers.py).
- ``required``: the answer is constrained (llguidance, choral/sampling/structured.py) to a JSON
  array of calls, ``[{"name": ..., "parameters": {...}}, ...]``, each matching its function's
  schema, so the calls always parse (vLLM does the same).
- a named function: the answer is constrained to that function's arguments schema.
- ``none`` (or no tools): no tools are rendered and the answer is plain content.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from choral.errors import InvalidRequestError
from choral.executor.request import Request
from choral.server.errors import ApiError
from choral.server.protocol import ChatCompletionRequest
from choral.server.tool_parsers import ToolCallFormat
from choral.server.tool_stream import ToolCallStream

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """The tools of one request, after validation."""

    tools: list[dict[str, Any]]  # OpenAI's tool dicts, as rendered for the template
    fmt: ToolCallFormat
    named: str | None  # the function tool_choice names
    required: bool
    parallel: bool

    def stream(self) -> ToolCallStream:
        """A fresh reader for one choice's answer."""
        if self.named is not None:
            return ToolCallStream(named=self.named, parallel=self.parallel)
        if self.required:
            return ToolCallStream(required=True, parallel=self.parallel)
        return ToolCallStream(self.fmt, parallel=self.parallel)

    def constrain(self, request: Request) -> Request:
        """``request`` with the constraint tool_choice asks for (InvalidRequestError names tools)."""
        changes: dict[str, Any] = {}
        if self.named is not None:
            changes["json_schema"] = json.dumps(self._parameters(self.named))
        elif self.required:
            changes["json_schema"] = json.dumps(self._required_schema())
        elif self.fmt.special_markers:
            changes["skip_special_tokens"] = False  # the calls' markers are special tokens
        if not changes:
            return request
        try:
            sampling = dataclasses.replace(request.sampling, **changes)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"tools: {e}") from None
        return dataclasses.replace(request, sampling=sampling)

    def _parameters(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or _ANY_OBJECT
        raise AssertionError(name)  # plan_tools checked the name

    def _required_schema(self) -> dict[str, Any]:
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                    "parameters": t["function"].get("parameters") or _ANY_OBJECT},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema


def plan_tools(body: ChatCompletionRequest, fmt: ToolCallFormat) -> ToolPlan | None:
    """The request's ToolPlan, None when no tool may be called. A 400 names what is wrong."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice: a function is required but the request has no tools",
                           param="tool_choice")
        return None
    if choice == "none":
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two functions have the same name", param="tools")
    for t in body.tools:
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise ApiError(400, f"tools: {t.function.name}'s parameters must be a JSON schema of an object",
                           param="tools")
    named = None
    if choice is not None and not isinstance(choice, str):
        named = choice.function.name
        if named not in names:
            raise ApiError(400, f"tool_choice: no tool is named {named!r} (tools: {', '.join(names)})",
                           param="tool_choice")
    if (named is not None or choice == "required") and body.response_format is not None \
            and body.response_format.type != "text":
        raise ApiError(400, "response_format cannot be combined with a tool_choice that forces a call",
                       param="response_format")
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    return ToolPlan(tools=tools, fmt=fmt, named=named, required=choice == "required",
                    parallel=body.parallel_tool_calls)
