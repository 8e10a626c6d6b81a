"""A chat request's messages -> the prompt's token ids, through the model's chat template.

- OpenAI content parts: text parts are joined; parts we cannot read (images, audio, files) are a
  400, never silently dropped.
- Tools: given to the template as ``tools``; a template that ignores them (the bundled SmolLM2's
  ChatML, say) gets a system text describing them in the model family's call syntax instead, and
  the history's tool calls and tool results are written as text in that syntax.
- Assistant prefill: a last assistant message is continued (``continue_final_message``), by
  default when the request ends with one and does not set ``add_generation_prompt``.
- ``chat_template_kwargs`` are more variables for the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from choral.errors import InvalidRequestError
from choral.server.errors import ApiError
from choral.server.protocol import ChatCompletionRequest
from choral.server.tool_choice import ToolPlan
from choral.server.tool_parsers import template_renders_tool_calls, template_renders_tools
from choral.tokenizer import Tokenizer

# Names the renderer sets itself: chat_template_kwargs may not override them.
_RESERVED = {"messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize", "documents",
             "chat_template", "conversation", "return_dict"}


@dataclass(frozen=True)
class RenderedChat:
    token_ids: list[int]
    prefill: str  # the continued assistant message's text ("" when a new message starts)


def render_chat(tokenizer: Tokenizer, body: ChatCompletionRequest, plan: ToolPlan | None,
                **limits: Any) -> RenderedChat:
    """The prompt of ``body``; a 400 (naming the field) for what cannot be rendered. ``limits``
    (``timeout_s``, ``max_chars``) bound the template (Tokenizer.apply_chat_template)."""
    template = tokenizer.chat_template
    messages = [_message(i, m.model_dump(exclude_none=True)) for i, m in enumerate(body.messages)]
    continue_final = _continues(body, messages)
    tools = None
    if plan is not None:
        if template_renders_tools(template):
            tools = plan.tools
        else:
            messages = _with_system_text(messages, plan.fmt.instructions(plan.tools))
    if template_renders_tool_calls(template):
        messages = [_arguments_as_objects(m) for m in messages]
    else:
        messages = [_tool_turn_as_text(m, plan) for m in messages]
    kwargs = dict(body.chat_template_kwargs or {})
    clash = sorted(_RESERVED & kwargs.keys())
    if clash:
        raise ApiError(400, f"chat_template_kwargs: {clash[0]!r} is set by the server", param="chat_template_kwargs")
    add_generation_prompt = body.add_generation_prompt if body.add_generation_prompt is not None else True
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                            continue_final_message=continue_final, template_kwargs=kwargs,
                                            **limits)
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param="messages") from None
    prefill = (messages[-1].get("content") or "") if continue_final else ""
    return RenderedChat(ids, str(prefill))


def _message(i: int, m: dict[str, Any]) -> dict[str, Any]:
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content[{j}].text: must be a str, got "
                                        f"{type(part.get('text')).__name__}", param=f"messages.{i}.content.{j}.text")
                texts.append(part["text"])
            elif kind in ("image_url", "input_image", "input_audio", "audio_url", "video_url", "file"):
                raise ApiError(400, f"messages[{i}].content[{j}]: {kind} parts are not supported: this model "
                                    "reads text only", param=f"messages[{i}].content")
            else:
                raise ApiError(400, f"messages[{i}].content[{j}]: unknown content part type {kind!r}",
                               param=f"messages[{i}].content")
        m["content"] = "".join(texts)
    if "content" not in m:
        if m["role"] != "assistant" or not m.get("tool_calls"):
            raise ApiError(400, f"messages[{i}].content: required for a {m['role']} message without tool_calls",
                           param=f"messages[{i}].content")
        m["content"] = None
    return m


def _continues(body: ChatCompletionRequest, messages: list[dict[str, Any]]) -> bool:
    """Whether the last message is continued rather than answered."""
    last_is_assistant = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    if body.continue_final_message is None:
        return last_is_assistant and body.add_generation_prompt is None
    if body.continue_final_message and body.add_generation_prompt:
        raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")
    if body.continue_final_message and not last_is_assistant:
        raise ApiError(400, "continue_final_message: the last message must be an assistant message with content",
                       param="continue_final_message")
    return body.continue_final_message


def _with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _arguments_as_objects(m: dict[str, Any]) -> dict[str, Any]:
    """Templates write a call's arguments with ``tojson``: give them the object, not its JSON text."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for call in m["tool_calls"]:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise ApiError(400, "messages: a tool call's arguments are not valid JSON", param="messages") from None
        calls.append({**call, "function": function})
    return {**m, "tool_calls": calls}


def _tool_turn_as_text(m: dict[str, Any], plan: ToolPlan | None) -> dict[str, Any]:
    """For a template without tool support: calls become text in the format the model is asked
    to use, and a tool's result a user turn (templates that know only user and assistant)."""
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
    if m["role"] != "assistant" or not m.get("tool_calls"):
        return m
    parts = [m["content"]] if m.get("content") else []
    for call in m["tool_calls"]:
        function = call.get("function") or {}
        args = function.get("arguments") or "{}"
        try:
            args_value = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            raise ApiError(400, "messages: a tool call's arguments are not valid JSON", param="messages") from None
        key = "parameters" if plan is not None and plan.fmt.name == "llama3_json" else "arguments"
        call_json = json.dumps({"name": function.get("name"), key: args_value}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{call_json}\n</tool_call>" if plan is None or plan.fmt.name == "hermes"
                     else call_json)
    return {"role": "assistant", "content": "\n".join(parts)}
