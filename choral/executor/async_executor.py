"""asyncio on top of the Executor: ``async for r in ex.stream(req)`` and ``await ex.generate(req)``.

Responses travel from the loop thread to the event loop with ``call_soon_threadsafe``. Cancelling
the awaiting task cancels the request, which frees its blocks before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from choral.executor.completion import Completion
from choral.executor.executor import Executor
from choral.executor.request import Request, Response, Result


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
            if user_callback is not None:
                user_callback(response)
            loop.call_soon_threadsafe(queue.put_nowait, response)

        rid = self.executor.submit_async(dataclasses.replace(request, streaming=True, callback=deliver))
        return self._drain(rid, queue)

    async def _drain(self, rid: int, queue: asyncio.Queue[Response]) -> AsyncIterator[Result]:
        finished = False
        try:
            while True:
                response = await queue.get()
                assert response.result is not None
                yield response.result
                if response.result.is_final:
                    finished = True
                    break
        finally:
            # Synchronous on purpose: this also runs when the consuming task is being cancelled
            # (a client disconnect), where no further await would run.
            if not finished:
                self.executor.cancel(rid)
            self.executor.release(rid)

    async def generate(self, request: Request) -> Completion:
        """Run a request to completion without blocking the event loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        user_callback = request.callback

        def deliver(response: Response) -> None:
            if user_callback is not None:
                user_callback(response)
            if response.result is not None and response.result.is_final:
                loop.call_soon_threadsafe(_resolve, done)

        rid = self.executor.submit_async(dataclasses.replace(request, callback=deliver))
        try:
            await done
        except asyncio.CancelledError:
            self.executor.cancel(rid)
            self.executor.release(rid)
            raise
        completion = self.executor.poll(rid, timeout=None)
        assert completion is not None
        return completion

    def shutdown(self, wait: bool = True) -> None:
        self.executor.shutdown(wait)

    async def __aenter__(self) -> AsyncExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.executor.shutdown, True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
