"""The OpenAI-compatible HTTP API (FastAPI), on top of the Executor.

Every request body is validated into choral Requests before anything is queued, and a request
with several prompts queues all of them or none (runner.py). Errors come back in OpenAI's shape
(errors.py); a stream that fails after it started ends with such an error event, then ``[DONE]``
(sse.py). A client that disconnects cancels its requests at once: a stream's response, once over,
ends every prompt's request; a non-streaming request is watched by polling the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HttpResponse
from pydantic import BaseModel, ConfigDict

from choral.engine.embedder import POOLINGS, Embedder
from choral.errors import ChoralError, ConfigError, InvalidRequestError
from choral.executor import Executor, Request, Result
from choral.executor.completion import Completion, SequenceOutput
from choral.lora.adapter import LoraAdapter
from choral.sampling.params import show
from choral.server.chat import ChatResponder, usage_of
from choral.server.chat_render import render_chat
from choral.server.embeddings import install_embeddings
from choral.server.errors import ApiError, ApiKeyGuard, install_error_handlers
from choral.server.fields import IGNORED_HEADER, check_fields
from choral.server.limits import BodyLimit, Preparer, ServerLimits, check_count
from choral.server.logprobs import TextOffsets, TokenBytes
from choral.server.lora_routes import install_lora_routes
from choral.server.metrics import ServerMetrics
from choral.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _Common,
    to_request,
    with_response_format,
)
from choral.server.runner import Runner
from choral.server.sse import DONE, EventStream, event
from choral.server.tool_choice import ToolPlan, plan_tools
from choral.server.tool_parsers import detect_format, format_named


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


def create_app(executor: Executor, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None, strict: bool = False, tool_call_parser: str | None = None,
               pooling: str = "last") -> FastAPI:
    """Build the FastAPI app serving ``executor`` under ``model_name``, each request within
    ``limits`` (ServerLimits' defaults when None). When the app stops (its lifespan ends: the
    server shut down) it shuts ``executor`` down, cancelling what still runs.

    ``strict`` refuses unknown request fields (default: ignored with a warning, see fields.py);
    ``tool_call_parser`` names the tool-call format (default: read from the chat template);
    ``pooling`` is how /v1/embeddings pools the tokens' hidden states (``last`` or ``mean``)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
    engine = executor.engine
    tokenizer = engine.tokenizer
    template = tokenizer.chat_template if tokenizer is not None else None
    tool_format = format_named(tool_call_parser) if tool_call_parser else detect_format(template, model_name)
    token_bytes = TokenBytes(tokenizer) if tokenizer is not None else None
    metrics = ServerMetrics(executor, model_name)
    runner = Runner(executor, metrics)
    created = int(time.time())
    limits = limits if limits is not None else ServerLimits()
    if not isinstance(limits, ServerLimits):
        raise ConfigError(f"limits: must be a ServerLimits, got {type(limits).__name__}")
    preparer = Preparer(limits.prep_workers)
    prompt_chars = limits.prompt_chars(engine.max_model_len)
    template_chars = limits.template_chars(engine.max_model_len)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has cancelled the requests still running; the executor's thread delivers their
        # last responses to this event loop. Stop it while the loop still runs: a response
        # delivered after the loop closed is an "Event loop is closed" error in the executor's log.
        await asyncio.to_thread(executor.shutdown, False)
        preparer.shutdown()

    app = FastAPI(title="choral", description="OpenAI-compatible API for choral", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limits=limits)
    if api_key:  # outside BodyLimit: a caller without the key gets no body read
        app.add_middleware(ApiKeyGuard, api_key=api_key)

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        # 503 while loading comes from loading.py; here the model is loaded.
        ok = executor.is_running
        return JSONResponse({"status": "ok" if ok else "error"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def get_metrics() -> HttpResponse:  # a worker thread: render() waits for the core's lock
        return HttpResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(), *(_lora_card(a) for a in engine.core.loras.adapters())]}

    @app.get("/v1/models/{model:path}")  # :path: a model id may hold slashes (org/name)
    async def model(model: str) -> dict[str, Any]:
        lora = _check_model(model, adapters=True)
        return _model_card() if lora is None else _lora_card(engine.core.loras.get(lora))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, adapters=True)
        tok = _tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None and not body.messages:
            raise ApiError(400, "messages: must hold at least one message", param="messages")
        if body.prompt is not None:
            _check_prompt_chars("prompt", len(body.prompt))
            work = partial(tok.encode, body.prompt, body.add_special_tokens)
        else:
            messages = body.messages or []
            _check_prompt_chars("messages", sum(len(str(m.get("content", ""))) for m in messages))
            work = partial(_apply_template, messages)
        try:
            ids = await preparer.run(work)
        except ChoralError as e:
            raise ApiError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        _check_model(body.model, adapters=True)
        vocab = engine.loaded.spec.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: token id {show(bad[0])} is out of range [0, {vocab})", param="tokens")
        text = await preparer.run(partial(_tokenizer().decode, body.tokens, skip_special_tokens=False))
        return {"prompt": text}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest, response: HttpResponse) -> Any:
        headers = _ignored(body, "/v1/completions", response)
        served = _check_model(body.model, adapters=True) or model_name
        _check_sizes(body)
        if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int):
            check_count("prompt", len(body.prompt), limits.max_prompts, "--max-prompts")
            runner.check_room(len(body.prompt))
        if body.logprobs is not None:
            _token_bytes()
            if body.echo and body.stream:  # the executor streams the generated tokens' logprobs only
                raise ApiError(400, "echo with logprobs: the prompt's logprobs are only returned without streaming",
                               param="echo")
        requests, echoes = await preparer.run(partial(_prepare_completion, body))
        runner.check_room(len(requests))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            streams = runner.open_streams(requests)
            return EventStream(_stream_completion(rid, body, streams, echoes, served), partial(runner.close, streams),
                               metrics.observe_abort, headers)
        results = await runner.run_all(requests, http)
        choices = []
        for p, completion in enumerate(results):
            for out in completion.outputs:
                choices.append({"index": p * body.n + out.index, "text": echoes[p] + out.text,
                                "logprobs": _completion_logprobs(body, completion, out, echoes[p]),
                                "finish_reason": out.finish_reason.api_name})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": served,
                "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: HttpRequest, response: HttpResponse) -> Any:
        headers = _ignored(body, "/v1/chat/completions", response)
        served = _check_model(body.model, adapters=True) or model_name
        _check_sizes(body)
        _check_prompt_chars("messages", sum(_chars(m.content) for m in body.messages))
        plan = plan_tools(body, tool_format)
        request, prefill = await preparer.run(partial(_prepare_chat, body, plan))
        responder = ChatResponder(f"chatcmpl-{uuid.uuid4().hex}", served, body, plan, prefill, _token_bytes)
        if body.stream:
            streams = runner.open_streams([request])
            return EventStream(responder.stream(streams[0]), partial(runner.close, streams), metrics.observe_abort,
                               headers)
        (completion,) = await runner.run_all([request], http)
        return responder.response(completion)

    # ---- requests: cheap checks on the event loop, the rest in the worker pool ---------------------
    def _check_sizes(body: _Common) -> None:
        check_count("n", body.n, limits.max_n, "--max-n")
        check_count("logit_bias", len(body.logit_bias or {}), limits.max_logit_bias, "--max-logit-bias")
        if isinstance(body.stop, list):
            check_count("stop", len(body.stop), limits.max_stop, "--max-stop")

    def _check_prompt_chars(name: str, count: int) -> None:
        if count > prompt_chars:
            raise ApiError(400, f"{name}: {count} characters is more than this server's limit of {prompt_chars} "
                                "(--max-prompt-chars)", param=name)

    def _apply_template(messages: list[dict[str, Any]]) -> list[int]:
        """(worker pool) The chat template within the server's limits, tokenized."""
        return list(_tokenizer().apply_chat_template(messages, timeout_s=limits.template_timeout_s,
                                                     max_chars=template_chars))

    def _prepare_completion(body: CompletionRequest) -> tuple[list[Request], list[str]]:
        """(worker pool) The completion's prompts tokenized and its requests built and validated."""
        prompts = _completion_prompts(body.prompt)
        # OpenAI's echo with logprobs covers the prompt's tokens too: the engine computes them.
        prompt_logprobs = body.logprobs if body.echo else None
        # Built (and their token ids validated) before the echo decodes them: a bad id is a 400.
        requests = [_build(body, ids, body.max_tokens or 16, body.logprobs, prompt_logprobs) for ids in prompts]
        echoes = [_tokenizer().decode(ids, body.skip_special_tokens) if body.echo else "" for ids in prompts]
        return requests, echoes

    def _prepare_chat(body: ChatCompletionRequest, plan: ToolPlan | None) -> tuple[Request, str]:
        """(worker pool) The chat rendered (tools, prefill) within the template limits, tokenized,
        and its request built and validated; with the continued message's text."""
        rendered = render_chat(_tokenizer(), body, plan, timeout_s=limits.template_timeout_s,
                               max_chars=template_chars)
        ids = rendered.token_ids
        limit = body.max_completion_tokens or body.max_tokens or max(1, engine.max_model_len - len(ids))
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        return _build(body, ids, limit, top, tools=plan), rendered.prefill

    def _tokenizer() -> Any:
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer")
        return tokenizer

    def _token_bytes() -> TokenBytes:
        if token_bytes is None:
            raise ApiError(400, "logprobs: this model has no tokenizer to spell tokens with", param="logprobs")
        return token_bytes

    def _ignored(body: BaseModel, endpoint: str, response: HttpResponse) -> dict[str, str]:
        """Unknown fields: refused (--strict) or ignored and named in a response header."""
        ignored = check_fields(body, strict, endpoint)
        # Header values are latin-1 without control characters: field names are sent escaped
        # (a name like "\\r" or "Ā" was a 500 or a dropped connection).
        names = ", ".join(name.encode("unicode_escape").decode("ascii") for name in ignored)
        headers = {IGNORED_HEADER: names} if ignored else {}
        response.headers.update(headers)
        return headers

    def _check_model(name: str | None, adapters: bool = False) -> str | None:
        """None for the base model; a loaded LoRA adapter's name where ``adapters`` allows one."""
        if name is None or name == model_name:
            return None
        if name in engine.core.loras.names():
            if not adapters:
                raise ApiError(400, f"model: `{name}` is a LoRA adapter; this endpoint serves the base model "
                                    f"`{model_name}` only", param="model")
            return name
        raise ApiError(404, f"The model `{name}` does not exist.", param="model")

    def _lora_card(adapter: LoraAdapter) -> dict[str, Any]:
        return {"id": adapter.name, "object": "model", "created": created, "owned_by": "choral",
                "root": adapter.path or adapter.name, "parent": model_name, "max_model_len": engine.max_model_len}

    def _model_card() -> dict[str, Any]:
        spec, model = engine.loaded.spec, engine.loaded.model
        return {"id": model_name, "object": "model", "created": created, "owned_by": "choral",
                "root": str(engine.loaded.path), "parent": None, "max_model_len": engine.max_model_len,
                "meta": {"architecture": spec.architecture, "vocab_size": spec.vocab_size,
                         "hidden_size": spec.hidden_size, "num_layers": spec.num_layers,
                         "context_length": spec.max_position_embeddings, "num_parameters": model.num_parameters,
                         "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                         "chat_template": tokenizer is not None and tokenizer.has_chat_template,
                         "tool_call_parser": tool_format.name}}

    def _completion_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise ApiError(400, "prompt is empty", param="prompt")
        for p in items:
            if isinstance(p, str):
                _check_prompt_chars("prompt", len(p))
        try:
            return [(_tokenizer().encode(p) if isinstance(p, str) else list(p)) for p in items]
        except InvalidRequestError as e:  # text that cannot be encoded (a lone surrogate, say)
            raise ApiError(400, str(e), param="prompt") from e

    def _build(body: _Common, ids: list[int], max_tokens: int, logprobs: int | None,
               prompt_logprobs: int | None = None, tools: ToolPlan | None = None) -> Request:
        if len(ids) + max_tokens > engine.max_model_len and (body.max_tokens or getattr(
                body, "max_completion_tokens", None)):
            raise ApiError(400, f"This model's maximum context length is {engine.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion).", param="max_tokens")
        try:
            # Metrics see every response on the executor's thread, a cancelled request's too.
            request = to_request(body, ids, max_tokens, logprobs, body.stream, prompt_logprobs, metrics.observe)
            lora = _check_model(body.model, adapters=True)
            if lora is not None:
                request = dataclasses.replace(request, lora=lora)
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        try:
            fmt = body.response_format if isinstance(body, ChatCompletionRequest) else None
            if fmt is not None and fmt.type != "text":
                request = with_response_format(request, fmt)
            if tools is not None:
                request = tools.constrain(request)
            # The final request, response format included (its schema is compiled here): what is
            # wrong with it is a 400 now, before anything is queued or streamed.
            executor.validate(request)
        except InvalidRequestError as e:
            if str(e).startswith("tools"):
                raise ApiError(400, str(e), param="tools") from None
            if str(e).startswith(("response_format", "json_schema")):
                raise ApiError(400, str(e) if str(e).startswith("response_format") else f"response_format: {e}",
                               param="response_format") from None
            raise ApiError(400, str(e)) from None
        return request

    # ---- responses -----------------------------------------------------------------------------
    def _usage(completions: list[Completion]) -> dict[str, Any]:
        return usage_of(sum(len(c.prompt_token_ids) for c in completions),
                         sum(len(o.token_ids) for c in completions for o in c.outputs),
                         sum(c.num_cached_tokens for c in completions))

    def _completion_logprobs(body: CompletionRequest, completion: Completion, out: SequenceOutput,
                             echo: str) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        tokens = _token_bytes()
        outputs = tokens.completion_logprobs(out.token_ids, out.logprobs,
                                             tokens.offsets(len(echo), body.skip_special_tokens))
        if not body.echo:
            return outputs
        # The prompt's tokens first, from offset 0; the first has no logprob (nothing precedes it).
        prompt = completion.prompt_token_ids
        prompt_logprobs = completion.prompt_logprobs or [None] * len(prompt)
        echoed = tokens.completion_logprobs(prompt, prompt_logprobs, tokens.offsets(0, body.skip_special_tokens))
        return {key: echoed[key] + outputs[key] for key in outputs}

    async def _stream_completion(rid: str, body: CompletionRequest, streams: list[AsyncIterator[Result]],
                                 echoes: list[str], served: str) -> AsyncGenerator[str, None]:
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": served}
        offsets: dict[int, TextOffsets | None] = {}  # by choice index, once its first chunk is out
        prompt_tokens, cached_tokens, completion_tokens = [0] * len(streams), [0] * len(streams), 0
        for p, stream in enumerate(streams):  # the executor runs them all; they are sent in turn
            async for result in stream:
                index = p * body.n + result.sequence_index
                text = result.text
                if index not in offsets:  # OpenAI sends the echoed prompt as a choice's first text
                    text = echoes[p] + text
                    offsets[index] = None if result.logprobs is None else \
                        _token_bytes().offsets(len(echoes[p]), body.skip_special_tokens)
                logprobs = None
                if result.logprobs is not None:
                    counter = offsets[index]
                    assert counter is not None
                    logprobs = _token_bytes().completion_logprobs(result.output_token_ids, result.logprobs, counter)
                completion_tokens += len(result.output_token_ids)
                prompt_tokens[p], cached_tokens[p] = result.num_prompt_tokens, result.num_cached_tokens
                yield event({**base, "choices": [{
                    "index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": result.finish_reason.api_name if result.is_sequence_final else None}]})
        if body.stream_options and body.stream_options.include_usage:
            yield event({**base, "choices": [],
                         "usage": usage_of(sum(prompt_tokens), completion_tokens, sum(cached_tokens))})
        yield DONE

    embedder = Embedder(engine.loaded, engine.max_model_len, engine.config.block_size,
                        attention_backend=engine.config.attention_backend)
    def _check_base(name: str | None) -> None:  # embeddings run the base model only
        _check_model(name)

    install_embeddings(app, embedder, tokenizer, model_name, pooling, _ignored, _check_base)
    if engine.config.enable_lora:
        install_lora_routes(app, engine.core, model_name)

    app.state.executor = executor
    app.state.metrics = metrics
    return app



def _chars(content: str | list[dict[str, Any]] | None) -> int:
    """Characters of a message's text (its text parts'), for the prompt-size limit."""
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p.get("text"), str))
    return len(content or "")
