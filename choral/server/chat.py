"""Chat completion responses, whole or streamed: content, tool calls, logprobs, finish reasons.

Each choice's text goes through a ToolCallStream (tool_stream.py) when the request has tools, so
a streamed answer and a whole one are read by the same code. A choice that called tools finishes
with ``tool_calls``. With ``echo`` and a continued assistant message (prefill), the answer's
content starts with the prefill, as vLLM's does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from choral.executor import FinishReason, Result
from choral.executor.completion import Completion, SequenceOutput
from choral.server.logprobs import TokenBytes
from choral.server.protocol import ChatCompletionRequest
from choral.server.sse import DONE, event
from choral.server.tool_choice import ToolPlan
from choral.server.tool_stream import ToolCallStream


def finish_reason(reason: FinishReason, called_tools: bool) -> str | None:
    """OpenAI's finish_reason; ``tool_calls`` for a choice that called tools and stopped."""
    name = reason.api_name
    return "tool_calls" if called_tools and name == "stop" else name


def usage_of(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's ``usage``, the same whether streamed or not."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChatResponder:
    """Builds one chat request's response from the executor's results."""

    def __init__(self, rid: str, model_name: str, body: ChatCompletionRequest, plan: ToolPlan | None,
                 prefill: str, token_bytes: Callable[[], TokenBytes]):
        self.rid, self.model_name, self.body, self.plan = rid, model_name, body, plan
        self.echo = prefill if body.echo else ""
        self.token_bytes = token_bytes

    def response(self, completion: Completion) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = [self._choice(out) for out in completion.outputs]
        usage = usage_of(len(completion.prompt_token_ids), sum(len(o.token_ids) for o in completion.outputs),
                         completion.num_cached_tokens)
        return {"id": self.rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": usage}

    def _choice(self, out: SequenceOutput) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.echo + out.text}
        called = False
        if self.plan is not None:
            content, calls = self.plan.stream().message(out.text)
            if calls:
                called = True
                message = {"role": "assistant", "content": self.echo + content if content else (self.echo or None),
                           "tool_calls": calls}
        return {"index": out.index, "message": message,
                "logprobs": self.token_bytes().chat_logprobs(out.token_ids, out.logprobs)
                if out.logprobs is not None else None,
                "finish_reason": finish_reason(out.finish_reason, called)}

    async def stream(self, results: AsyncIterator[Result]) -> AsyncGenerator[str, None]:
        """The SSE events of a streamed response."""
        body = self.body
        base = {"id": self.rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name}

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
            return event({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                               "finish_reason": finish}]})

        readers: dict[int, ToolCallStream] = {}
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": self.echo})
            if self.plan is not None:
                readers[index] = self.plan.stream()
        prompt_tokens = cached_tokens = completion_tokens = 0
        async for result in results:
            completion_tokens += len(result.output_token_ids)
            prompt_tokens, cached_tokens = result.num_prompt_tokens, result.num_cached_tokens
            index = result.sequence_index
            reader = readers.get(index)
            deltas: list[dict[str, Any]] = reader.feed(result.text) if reader is not None else \
                ([{"content": result.text}] if result.text else [])
            if result.is_sequence_final and reader is not None:
                deltas += reader.finish()
            logprobs = self.token_bytes().chat_logprobs(result.output_token_ids, result.logprobs) \
                if result.logprobs is not None else None
            finish = None
            if result.is_sequence_final:
                called = reader is not None and any(c.complete for c in reader.calls)
                finish = finish_reason(result.finish_reason, called)
            # The tokens' logprobs ride on the first delta; the finish reason on the last.
            if not deltas:
                if logprobs is None and finish is None:
                    continue  # text held back (it may begin a tool call): nothing to send yet
                deltas = [{}]
            for k, delta in enumerate(deltas):
                last = k == len(deltas) - 1
                yield chunk(index, delta, logprobs if k == 0 else None, finish if last else None)
        if body.stream_options and body.stream_options.include_usage:
            yield event({**base, "choices": [], "usage": usage_of(prompt_tokens, completion_tokens, cached_tokens)})
        yield DONE
