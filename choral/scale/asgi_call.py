"""One HTTP request through an in-process ASGI app, its response streamed back as plain data.

A replica runs the single-process server's app (``create_app``) unchanged; the ingress hands it
each request as an :class:`HttpCall` and relays what comes back: first an :class:`HttpStart`
(status and headers), then the body's chunks as they are sent (a stream's events one by one).
Closing the iterator early is the client going away: the app's ``receive`` then answers
``http.disconnect``, so it cancels the request's work exactly as it does behind uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

from choral.server.errors import error_body

# How long an app may take to wind down after its client left before it is cancelled outright.
_WIND_DOWN_S = 5.0


@dataclass(frozen=True)
class HttpCall:
    """An HTTP request as plain data (what crosses from the ingress to a replica)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class HttpStart:
    """The response's status and headers (its first item)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class _End:
    pass


def _scope(call: HttpCall) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": call.method, "scheme": "http", "path": call.path, "raw_path": call.path.encode("latin-1"),
            "root_path": "", "query_string": call.query_string, "headers": list(call.headers),
            "client": call.client, "server": None, "state": {}}


async def call_asgi(app: ASGIApp, call: HttpCall) -> AsyncIterator[HttpStart | bytes]:
    """Run ``call`` through ``app``: yields one HttpStart, then the body's chunks."""
    messages: asyncio.Queue[Message | _End | BaseException] = asyncio.Queue()
    left = asyncio.Event()  # the caller stopped listening: the client is gone
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which answers it
            await messages.put(e)
        else:
            await messages.put(_End())

    task = asyncio.create_task(run())
    started = finished = False
    try:
        while not finished:
            message = await messages.get()
            if isinstance(message, _End):
                break
            if isinstance(message, BaseException):
                if started:
                    raise message
                # The app failed before answering (uvicorn would send a bare 500): our error shape.
                yield HttpStart(500, ((b"content-type", b"application/json"),))
                yield _json(error_body(500, f"internal error: {type(message).__name__}"))
                break
            if message["type"] == "http.response.start":
                started = True
                yield HttpStart(int(message["status"]), tuple((bytes(k), bytes(v)) for k, v in message["headers"]))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                finished = not message.get("more_body", False)
    finally:
        left.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), _WIND_DOWN_S)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()
