"""The OpenAI-compatible HTTP API (FastAPI), on top of the Executor.

Every request body is validated into a choral Request before anything is queued; errors come
back in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``); a stream that fails
after it started ends with such an error event, then ``[DONE]``. A client that disconnects cancels
its request at once (streaming: the response generator is cancelled; non-streaming: a watcher
polls the connection).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.responses import Response as HttpResponse
from pydantic import BaseModel, ConfigDict

from choral.errors import (
    ChoralError,
    ExecutorLoopError,
    InvalidRequestError,
    ProcessorStopped,
    QueueFull,
    RequestFailedError,
)
from choral.executor import AsyncExecutor, Executor, FinishReason, Request, Result
from choral.server.metrics import ServerMetrics
from choral.server.protocol import ChatCompletionRequest, CompletionRequest, _Common, to_request

_FINISH = {FinishReason.END_ID: "stop", FinishReason.STOP_WORDS: "stop", FinishReason.LENGTH: "length",
           FinishReason.CANCELLED: "abort", FinishReason.TIMED_OUT: "abort"}
_DISCONNECT_POLL_S = 0.05


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _error(status: int, message: str, type_: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, type_, param), status_code=status, headers=headers)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def create_app(executor: Executor, model_name: str, api_key: str | None = None) -> FastAPI:
    """Build the FastAPI app serving ``executor`` under ``model_name``."""
    app = FastAPI(title="choral", description="OpenAI-compatible API for choral")
    ax = AsyncExecutor(executor)
    engine = executor.engine
    tokenizer = engine.tokenizer
    metrics = ServerMetrics(executor, model_name)
    created = int(time.time())

    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1") or api_key and request.url.path in (
                "/tokenize", "/detokenize"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "invalid or missing API key", "AuthenticationError")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON: {first.get('msg')}", "BadRequestError")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"unknown field {param!r}", "BadRequestError", param)
        return _error(400, f"{param}: {first.get('msg')}", "BadRequestError", param)

    @app.exception_handler(ApiError)
    async def on_api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param)

    @app.get("/health")
    async def health() -> HttpResponse:
        return HttpResponse(status_code=200 if executor.is_running else 503)

    @app.get("/metrics")
    async def get_metrics() -> HttpResponse:
        return HttpResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "choral", "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(body.model)
        tok = _tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", param="prompt")
        try:
            ids = tok.encode(body.prompt, body.add_special_tokens) if body.prompt is not None else \
                tok.apply_chat_template(body.messages or [])
        except ChoralError as e:
            raise ApiError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        _check_model(body.model)
        vocab = engine.loaded.spec.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        return {"prompt": _tokenizer().decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest) -> Any:
        _check_model(body.model)
        prompts = _completion_prompts(body.prompt)
        logprobs = body.logprobs
        requests = [_build(body, ids, body.max_tokens or 16, logprobs, body.stream) for ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            streams = [_open_stream(r) for r in requests]
            return _sse(_stream_completion(rid, body, streams, prompts), http)
        results = await _run_all(requests, http)
        choices = []
        for p, (ids, completion) in enumerate(zip(prompts, results, strict=True)):
            for out in completion.outputs:
                text = (_tokenizer().decode(ids) if body.echo else "") + out.text
                choices.append({"index": p * body.n + out.index, "text": text,
                                "logprobs": _completion_logprobs(out.token_ids, out.logprobs),
                                "finish_reason": _FINISH.get(out.finish_reason)})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: HttpRequest) -> Any:
        _check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            if isinstance(m.get("content"), list):  # OpenAI content parts: keep the text ones
                m["content"] = "".join(part.get("text", "") for part in m["content"] if part.get("type") == "text")
        try:
            ids = _tokenizer().apply_chat_template(messages)
        except ChoralError as e:
            raise ApiError(400, str(e), param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens or max(1, engine.max_model_len - len(ids))
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        request = _build(body, ids, limit, top, body.stream)
        if body.response_format is not None and body.response_format.type != "text":
            request = _with_json_format(request, body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_stream_chat(rid, body, _open_stream(request)), http)
        (completion,) = await _run_all([request], http)
        choices = [{"index": out.index, "message": {"role": "assistant", "content": out.text},
                    "logprobs": _chat_logprobs(out.token_ids, out.logprobs) if body.logprobs else None,
                    "finish_reason": _FINISH.get(out.finish_reason)} for out in completion.outputs]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage([completion])}

    # ---- helpers -------------------------------------------------------------------------------
    def _tokenizer() -> Any:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer")
        return tokenizer

    def _check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def _completion_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise ApiError(400, "prompt is empty", param="prompt")
        try:
            return [(_tokenizer().encode(p) if isinstance(p, str) else list(p)) for p in items]
        except InvalidRequestError as e:  # text that cannot be encoded (a lone surrogate, say)
            raise ApiError(400, str(e), param="prompt") from e

    def _build(body: _Common, ids: list[int], max_tokens: int, logprobs: int | None, stream: bool) -> Request:
        if len(ids) + max_tokens > engine.max_model_len and (body.max_tokens or getattr(
                body, "max_completion_tokens", None)):
            raise ApiError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion).", param="max_tokens")
        try:
            request = to_request(body, ids, max_tokens, logprobs, stream)
            executor.validate(request)  # validate now: errors are 400s, nothing queued
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        return request

    def _with_json_format(request: Request, body: ChatCompletionRequest) -> Request:
        import dataclasses

        fmt = body.response_format
        assert fmt is not None
        fields = {f.name for f in dataclasses.fields(request.sampling)}
        if "json_schema" not in fields:
            raise ApiError(400, "response_format: structured output is not supported by this server",
                           param="response_format")
        schema: Any = {"type": "object"}
        if fmt.type == "json_schema":
            if not fmt.json_schema or "schema" not in fmt.json_schema:
                raise ApiError(400, "response_format.json_schema.schema is required", param="response_format")
            schema = fmt.json_schema["schema"]
        try:
            changes: dict[str, Any] = {"json_schema": json.dumps(schema)}
            sampling = dataclasses.replace(request.sampling, **changes)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param="response_format") from None
        return dataclasses.replace(request, sampling=sampling)

    async def _submit(request: Request) -> Any:
        try:
            return await ax.generate(request)
        except QueueFull as e:
            raise _QueueFullError(str(e)) from None
        except ProcessorStopped as e:
            raise ApiError(503, str(e), "ServiceUnavailableError") from None
        except (RequestFailedError, ExecutorLoopError) as e:  # accepted, then failed while it ran
            raise ApiError(500, str(e), "InternalServerError") from None

    async def _run_all(requests: list[Request], http: HttpRequest) -> list[Any]:
        tasks = [asyncio.ensure_future(_submit(r)) for r in requests]
        try:
            while not all(t.done() for t in tasks):
                if await http.is_disconnected():
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise ApiError(499, "client disconnected", "ClientClosedRequest")
                await asyncio.wait(tasks, timeout=_DISCONNECT_POLL_S)
            results = [t.result() for t in tasks]
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
        for completion in results:
            for out in completion.outputs:
                metrics.observe_final(_result_view(completion, out))
        return results

    def _result_view(completion: Any, out: Any) -> Result:
        return Result(is_final=True, is_sequence_final=True, sequence_index=out.index, output_token_ids=[],
                      text="", finish_reason=out.finish_reason, logprobs=None,
                      num_prompt_tokens=len(completion.prompt_token_ids),
                      num_output_tokens=len(out.token_ids), num_cached_tokens=completion.num_cached_tokens,
                      timing=completion.timing)

    def _usage(completions: list[Any]) -> dict[str, Any]:
        prompt = sum(len(c.prompt_token_ids) for c in completions)
        output = sum(len(o.token_ids) for c in completions for o in c.outputs)
        cached = sum(c.num_cached_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _piece(token_id: int) -> str:
        return _tokenizer().decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(token_ids: list[int], logprobs: Any) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        return {"tokens": [_piece(t) for t in token_ids], "token_logprobs": [lp for lp, _ in logprobs],
                "top_logprobs": [{_piece(t): v for t, v in top} for _, top in logprobs],
                "text_offset": []}

    def _chat_logprobs(token_ids: list[int], logprobs: Any) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        content = []
        for token, (lp, top) in zip(token_ids, logprobs, strict=False):
            piece = _piece(token)
            content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                            "top_logprobs": [{"token": _piece(t), "logprob": v, "bytes": list(_piece(t).encode())}
                                             for t, v in top]})
        return {"content": content}

    def _open_stream(request: Request) -> AsyncIterator[Result]:
        try:
            return ax.start_stream(request)
        except QueueFull as e:
            raise _QueueFullError(str(e)) from None
        except ProcessorStopped as e:
            raise ApiError(503, str(e), "ServiceUnavailableError") from None

    async def _observed(results: AsyncIterator[Result]) -> AsyncIterator[Result]:
        async for result in results:
            if result.is_sequence_final:
                metrics.observe_final(result)
            yield result

    async def _stream_completion(rid: str, body: CompletionRequest, streams: list[AsyncIterator[Result]],
                                 prompts: list[list[int]]) -> AsyncIterator[str]:
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        try:
            for p, stream in enumerate(streams):
                async for result in _observed(stream):
                    usage["completion_tokens"] += len(result.output_token_ids)
                    choice = {"index": p * body.n + result.sequence_index, "text": result.text,
                              "logprobs": _completion_logprobs(result.output_token_ids, result.logprobs),
                              "finish_reason": _FINISH.get(result.finish_reason) if result.is_sequence_final
                              else None}
                    yield _event({"id": rid, "object": "text_completion", "created": int(time.time()),
                                  "model": model_name, "choices": [choice]})
        except (RequestFailedError, ExecutorLoopError) as e:
            # The 200 and earlier chunks are sent: end the stream with the error instead of
            # dropping the connection. The prompts not streamed yet are cancelled as their
            # streams are dropped.
            yield _event(_error_body(500, str(e), "InternalServerError"))
            yield "data: [DONE]\n\n"
            return
        if body.stream_options and body.stream_options.include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield _event({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                          "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    async def _stream_chat(rid: str, body: ChatCompletionRequest, stream: AsyncIterator[Result]) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}
        for index in range(body.n):
            yield _event({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
        completion_tokens = 0
        prompt_tokens = 0
        try:
            async for result in _observed(stream):
                completion_tokens += len(result.output_token_ids)
                prompt_tokens = result.num_prompt_tokens
                delta = {"content": result.text} if result.text else {}
                yield _event({**base, "choices": [{
                    "index": result.sequence_index, "delta": delta,
                    "logprobs": _chat_logprobs(result.output_token_ids, result.logprobs) if body.logprobs else None,
                    "finish_reason": _FINISH.get(result.finish_reason) if result.is_sequence_final else None}]})
        except (RequestFailedError, ExecutorLoopError) as e:  # the 200 is sent: end with an error event
            yield _event(_error_body(500, str(e), "InternalServerError"))
            yield "data: [DONE]\n\n"
            return
        if body.stream_options and body.stream_options.include_usage:
            yield _event({**base, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
        yield "data: [DONE]\n\n"

    def _sse(events: AsyncIterator[str], http: HttpRequest) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.exception_handler(_QueueFullError)
    async def on_queue_full(_: HttpRequest, exc: _QueueFullError) -> JSONResponse:
        return _error(429, str(exc), "RateLimitError", headers={"Retry-After": "1"})

    app.state.executor = executor
    app.state.metrics = metrics
    return app


class _QueueFullError(Exception):
    pass


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
