"""Server-sent events that always end in a way the client can read.

Once the 200 and some chunks are out, an error can no longer be a status code: the stream ends
with an OpenAI-shaped error event, then ``data: [DONE]``. That holds for a request that fails in
the executor, and for a stream the server cancels at shutdown (uvicorn cancels the response task
when ``--graceful-timeout`` runs out): the last event is then sent shielded from the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from choral.errors import ExecutorLoopError, InvalidRequestError, ProcessorStopped, RequestFailedError
from choral.server.errors import ApiError, error_body

DONE = "data: [DONE]\n\n"
# The last event of a cancelled stream gets this long to leave (a client that stopped reading
# must not hold up the shutdown).
_LAST_SEND_S = 1.0


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream`` of ``events``. However the response ends (done, failed, client gone,
    cancelled at shutdown, or even before ``events`` started), it then closes ``events`` and awaits
    ``on_close`` (which ends the requests behind the stream)."""

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]] | None = None,
                 on_abort: Callable[[str], None] | None = None, headers: dict[str, str] | None = None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **(headers or {})})
        self._events = events
        self._on_close = on_close
        self._on_abort = on_abort  # called with the reason when the stream ends before its end
        self._ended = False  # the last event (an error, then [DONE]) is out
        self._finished = False  # the stream ran to its end, or ended with its request's own error
        self._client_left = False

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        self._client_left = True  # Starlette now cancels the response: an abort, not a shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            if not self._ended:
                raise
            # uvicorn cancelled the response at shutdown and the client has had its last event:
            # the response is complete, so end normally (uvicorn would log the cancellation as
            # an "Exception in ASGI application").
            uncancel()
        except OSError:  # the client went away while we wrote
            self._client_left = True
            raise
        finally:
            if not self._finished and self._on_abort is not None:
                self._on_abort("client_disconnected" if self._client_left else "server_shutdown")
            # Here, not in stream_response: a disconnect can cancel that before it starts. Shielded:
            # this runs inside a cancelled scope, and the cleanup must run to its end.
            with anyio.CancelScope(shield=True):
                await self._events.aclose()
                if self._on_close is not None:
                    await self._on_close()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        except BaseException as e:
            self._ended = await _send_last(send, event(_terminal_error(e)) + DONE)
            if isinstance(e, ApiError | RequestFailedError | ExecutorLoopError | ProcessorStopped):
                self._finished = True
                return  # the client has been told; nothing for the server log
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self._finished = True


def _terminal_error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ApiError):
        return error_body(e.status, e.message, e.type, e.param)
    if isinstance(e, ProcessorStopped):
        return error_body(503, str(e))
    if isinstance(e, asyncio.CancelledError):  # a disconnect (nobody reads this) or the server's shutdown
        return error_body(503, "the server is shutting down; the request was cancelled")
    if isinstance(e, RequestFailedError) and isinstance(e.__cause__, InvalidRequestError):
        return error_body(400, str(e.__cause__))  # its own settings (SamplingError): the client's to fix
    if isinstance(e, RequestFailedError | ExecutorLoopError):  # accepted, then failed while it ran
        return error_body(500, str(e))
    return error_body(500, f"internal error: {type(e).__name__}")


def uncancel() -> None:
    """Take back the cancellation of the current task, which has handled it by answering."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _send_last(send: Send, text: str) -> bool:
    """Send ``text`` as the body's end, shielded from the cancellation that may be why; whether it went."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_LAST_SEND_S), contextlib.suppress(Exception):
        await send({"type": "http.response.body", "body": text.encode(), "more_body": False})
        return True
    return False
