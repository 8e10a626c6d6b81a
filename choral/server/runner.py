"""Queueing a request's prompts (all or none), running or streaming them, and ending them all as
soon as the response is over, however it ends.

An HTTP request with several prompts becomes several executor requests. The AsyncExecutor queues
them one at a time, so when one is refused (QueueFull) the ones already queued are cancelled at
once: the client gets its 429 and nothing runs on for it. A client that goes away cancels every
one of them too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import Request as HttpRequest

from choral.errors import ExecutorLoopError, InvalidRequestError, ProcessorStopped, QueueFull, RequestFailedError
from choral.executor import AsyncExecutor, Executor, Request, Result
from choral.executor.completion import Completion
from choral.server.errors import ApiError, queue_full
from choral.server.metrics import ServerMetrics
from choral.server.sse import uncancel

# How often a non-streaming request looks whether its client is still there.
_DISCONNECT_POLL_S = 0.05


class Runner:
    """Runs the executor requests of HTTP requests; their failures become ApiErrors."""

    def __init__(self, executor: Executor, metrics: ServerMetrics):
        self.executor = executor
        self.ax = AsyncExecutor(executor)
        self.metrics = metrics  # counts the HTTP requests that end early (observe_abort)

    def check_room(self, count: int) -> None:
        """Refuse a request of more prompts than the queue ever holds: all or none could never
        be queued (a 400: retrying cannot help)."""
        size = self.executor.config.max_queue_size
        if count > size:
            raise ApiError(400, f"prompt: {count} prompts exceed the server's max_queue_size {size}", param="prompt")

    async def run_all(self, requests: list[Request], http: HttpRequest) -> list[Completion]:
        """Run ``requests`` to completion together. The first to fail (QueueFull for a later
        prompt, say) ends the others at once, and so does the client going away."""
        tasks = [asyncio.ensure_future(self._generate(r)) for r in requests]
        try:
            while True:
                failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
                if failed and failed[0] is not None:
                    raise failed[0]
                if all(t.done() for t in tasks):
                    break
                if await http.is_disconnected():
                    self.metrics.observe_abort("client_disconnected")
                    raise ApiError(499, "client disconnected")
                await asyncio.wait(tasks, timeout=_DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION)
            results = [t.result() for t in tasks]
        except asyncio.CancelledError:
            # uvicorn cancels what still runs once --graceful-timeout is over: answer that rather
            # than with a bare 500 (the requests are cancelled below).
            uncancel()
            self.metrics.observe_abort("server_shutdown")
            raise ApiError(503, "the server is shutting down; the request was cancelled") from None
        finally:
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()  # a started one cancels and releases its request; one not started queued none
            await asyncio.gather(*pending, return_exceptions=True)
        return results

    def open_streams(self, requests: list[Request]) -> list[AsyncIterator[Result]]:
        """Queue ``requests`` as streams (all or none); end them with :meth:`close`."""
        streams: list[AsyncIterator[Result]] = []
        try:
            for request in requests:
                streams.append(self.ax.start_stream(request))
        except BaseException as e:
            streams.clear()  # the requests already queued end as their streams go (see close)
            raise _api_error(e) from None
        return streams

    @staticmethod
    async def close(streams: list[AsyncIterator[Result]]) -> None:
        """End every stream's request now. Closing a started stream runs its cleanup, which
        cancels and releases the request; a stream never started has no cleanup to run, and the
        AsyncExecutor ends its request when the stream is freed, which dropping the last
        reference (this list's) does at once."""
        for stream in streams:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()
        streams.clear()

    async def _generate(self, request: Request) -> Completion:
        try:
            return await self.ax.generate(request)
        except (QueueFull, ProcessorStopped, InvalidRequestError, RequestFailedError, ExecutorLoopError) as e:
            raise _api_error(e) from None


def _api_error(e: BaseException) -> BaseException:
    """The ApiError for an executor error (any other exception as it is)."""
    if isinstance(e, QueueFull):
        return queue_full(str(e))
    if isinstance(e, ProcessorStopped):
        return ApiError(503, str(e))
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e))
    if isinstance(e, RequestFailedError) and isinstance(e.__cause__, InvalidRequestError):
        return ApiError(400, str(e.__cause__))  # its own settings (SamplingError): the client's to fix
    if isinstance(e, RequestFailedError | ExecutorLoopError):  # accepted, then failed while it ran
        return ApiError(500, str(e))
    return e

