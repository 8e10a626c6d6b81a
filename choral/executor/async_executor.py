"""asyncio on top of the Executor: ``async for r in ex.stream(req)`` and ``await ex.generate(req)``.

Responses travel from the loop thread to the event loop with ``call_soon_threadsafe``. Cancelling
the awaiting task cancels the request, which frees its blocks before the next step. A request that
fails on its own raises RequestFailedError in its task; if the loop thread dies, every waiting
task gets ExecutorLoopError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import AsyncIterator
from typing import Any

from choral.errors import RequestFailedError
from choral.executor.completion import Completion
from choral.executor.executor import Executor
from choral.executor.request import Request, Response, Result

# A dead loop thread delivers nothing more: waiting tasks look at it this often, so they fail
# with its error instead of waiting forever (a lock and a read each time, cheap).
_LOOP_CHECK_S = 0.5


class AsyncExecutor:
    """Wraps an :class:`Executor` (made from the same arguments when not given one)."""

    def __init__(self, executor: Executor | None = None, **executor_args: Any):
        self.executor = executor if executor is not None else Executor(**executor_args)

    async def stream(self, request: Request) -> AsyncIterator[Result]:
        """Yield each streamed Result (token and text deltas) until the request's final one."""
        async for result in self.start_stream(request):
            yield result

    def start_stream(self, request: Request) -> AsyncIterator[Result]:
        """Queue ``request`` now (QueueFull / InvalidRequestError raise here, synchronously) and
        return the iterator of its streamed Results. Must be called inside a running event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Response] = asyncio.Queue()
        user_callback = request.callback

        def deliver(response: Response) -> None:
            try:
                if user_callback is not None:
                    user_callback(response)
            finally:  # a raising callback (logged by the loop) must not starve the stream
                _post(loop, queue.put_nowait, response)

        rid = self.executor.submit_async(dataclasses.replace(request, streaming=True, callback=deliver))
        stream = self._drain(rid, queue)
        # A stream never iterated never runs _drain's cleanup: end its request when it is dropped.
        weakref.finalize(stream, _abandon, self.executor, rid)
        return stream

    async def _drain(self, rid: int, queue: asyncio.Queue[Response]) -> AsyncIterator[Result]:
        finished = False
        getter: asyncio.Task[Response] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                # Not wait_for: on Python 3.11 it returns a response that arrives as the task is
                # cancelled, dropping the cancellation (a client disconnect would go unnoticed).
                await asyncio.wait({getter}, timeout=_LOOP_CHECK_S)
                if not getter.done():
                    self.executor.raise_if_failed()
                    continue
                response, getter = getter.result(), None
                if response.error is not None:
                    finished = True  # the loop already ended it and freed its blocks
                    raise RequestFailedError(f"request {rid} failed: {response.error}") from response.error_cause
                assert response.result is not None
                yield response.result
                if response.result.is_final:
                    finished = True
                    break
        finally:
            # Synchronous on purpose: this also runs when the consuming task is being cancelled
            # (a client disconnect), where no further await would run.
            if getter is not None:
                getter.cancel()
            if not finished:
                self.executor.cancel(rid)
            self.executor.release(rid)

    async def generate(self, request: Request) -> Completion:
        """Run a request to completion without blocking the event loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        user_callback = request.callback

        def deliver(response: Response) -> None:
            try:
                if user_callback is not None:
                    user_callback(response)
            finally:  # a raising callback (logged by the loop) must not leave the task waiting
                if response.error is not None or (response.result is not None and response.result.is_final):
                    _post(loop, _resolve, done)

        rid = self.executor.submit_async(dataclasses.replace(request, callback=deliver))
        try:
            while True:
                await asyncio.wait({done}, timeout=_LOOP_CHECK_S)
                # Done: the Completion (or RequestFailedError). Else, after the timeout, a dead
                # loop raises here; a live one is simply not finished yet.
                completion = self.executor.poll(rid, timeout=0)
                if completion is not None:
                    return completion
        except asyncio.CancelledError:
            self.executor.cancel(rid)
            self.executor.release(rid)
            raise

    def shutdown(self, wait: bool = True) -> None:
        self.executor.shutdown(wait)

    async def __aenter__(self) -> AsyncExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.executor.shutdown, True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _abandon(executor: Executor, rid: int) -> None:
    # Both do nothing for a request already ended and collected (ids are never reused).
    executor.cancel(rid)
    executor.release(rid)


def _post(loop: asyncio.AbstractEventLoop, fn: Any, arg: Any) -> None:
    """Hand ``fn(arg)`` to the event loop from the executor's thread. A loop already closed
    (the application shut down mid-request) has nobody left to read it: drop it."""
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        pass
