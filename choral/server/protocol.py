"""OpenAI request bodies (pydantic) and their translation to choral Requests.

Unknown fields are kept aside (``extra="allow"``) for fields.py to ignore with a warning, or to
refuse under ``--strict``; never silently dropped. choral's extra sampling fields (top_k, min_p,
priority, ...) are accepted as vLLM accepts them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from choral.errors import InvalidRequestError
from choral.executor.request import Request, Response
from choral.sampling.params import MAX_INT, SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)  # the server's limit: ServerLimits.max_n
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # choral / vLLM extras
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    priority: float = 0.0
    skip_special_tokens: bool = True
    # Speculative decoding for this request: {"method": "ngram", "k": 4} or {"method": "off"}
    # (None: the server's --speculative default).
    speculative: dict[str, Any] | None = None


class CompletionRequest(_Common):
    # StrictInt: JSON true/false or "5" are not token ids (lax ints would read [true] as [1]).
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    # A message's other keys (name, tool_calls, tool_call_id, ...) go to the chat template.
    model_config = ConfigDict(extra="allow")
    keeps_extra: ClassVar[bool] = True  # fields.py: not unknown fields
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's chat extras: assistant prefill, the template's own options, the prefill echoed.
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def _optional(name: str, value: Any, default: Any) -> dict[str, Any]:
    """A sampling field the engine may not have: pass it on, or refuse a non-default value."""
    if value == default or value is None:
        return {}
    if name not in _SAMPLING_FIELDS:
        raise InvalidRequestError(f"{name}: not supported by this server")
    return {name: value}


def sampling_params(body: _Common, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    options: dict[str, Any] = dict(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=body.seed, max_tokens=max_tokens, min_tokens=min(body.min_tokens, max_tokens),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
    )
    options.update(_optional("prompt_logprobs", prompt_logprobs, None))
    options.update(_optional("presence_penalty", body.presence_penalty, 0.0))
    options.update(_optional("frequency_penalty", body.frequency_penalty, 0.0))
    options.update(_optional("repetition_penalty", body.repetition_penalty, 1.0))
    options.update(_optional("speculative", body.speculative, None))
    if body.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise InvalidRequestError("logit_bias: keys must be token ids") from None
        options.update(_optional("logit_bias", bias, None))
    return SamplingParams(**options)


def to_request(body: _Common, prompt: Any, max_tokens: int, logprobs: int | None, streaming: bool,
               prompt_logprobs: int | None = None, callback: Callable[[Response], None] | None = None) -> Request:
    return Request(prompt, sampling_params(body, max_tokens, logprobs, prompt_logprobs), streaming=streaming, n=body.n,
                   priority=body.priority, client_id=body.user, callback=callback)


def with_response_format(request: Request, fmt: ResponseFormat) -> Request:
    """``request`` constrained to JSON: any object (``json_object``) or ``fmt``'s schema.
    Raises InvalidRequestError naming response_format."""
    if "json_schema" not in _SAMPLING_FIELDS:
        raise InvalidRequestError("response_format: structured output is not supported by this server")
    schema: Any = {"type": "object"}
    if fmt.type == "json_schema":
        if not fmt.json_schema or "schema" not in fmt.json_schema:
            raise InvalidRequestError("response_format.json_schema.schema is required")
        schema = fmt.json_schema["schema"]
    try:
        changes: dict[str, Any] = {"json_schema": json.dumps(schema)}
        sampling = dataclasses.replace(request.sampling, **changes)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"response_format: {e}") from None
    return dataclasses.replace(request, sampling=sampling)
