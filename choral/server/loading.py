"""Open the port at once and load the model behind it: ``/health`` says 503 until it is ready.

``choral serve`` hands uvicorn a :class:`LoadingApp`: its lifespan start-up begins loading on a
thread and returns at once, so the port opens before the model is read. Until the app (the
executor and the FastAPI app over it) is built, ``/health`` and ``/v1/health`` answer 503
``{"status": "loading"}`` and every other route a 503 in OpenAI's error shape with
``Retry-After``; then every request goes to the built app. A failed load is logged, the server
stops, and ``choral serve`` exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from choral.server.errors import error_response

logger = logging.getLogger("choral.server")

HEALTH_PATHS = ("/health", "/v1/health")


class LoadingApp:
    """An ASGI app that answers 503 while ``build`` (run on a thread) makes the real app."""

    def __init__(self, build: Callable[[], FastAPI], on_failure: Callable[[BaseException], None] | None = None):
        self._build = build
        self._on_failure = on_failure
        self.app: FastAPI | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_loading(self) -> bool:
        return self.app is None and self.error is None

    def _load(self) -> None:
        try:
            self.app = self._build()
        except BaseException as e:  # noqa: BLE001 - any failure ends the server
            self.error = e
            logger.error("choral: loading the model failed: %s", e)
            if self._on_failure is not None:
                self._on_failure(e)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] in HEALTH_PATHS:
            status = "loading" if self.error is None else "error"
            await JSONResponse({"status": status}, status_code=503)(scope, receive, send)
            return
        message = "the model is still loading; retry shortly" if self.error is None else \
            f"the model failed to load: {self.error}"
        await error_response(503, message, headers={"Retry-After": "1"})(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._thread = threading.Thread(target=self._load, name="choral-load", daemon=True)
                self._thread.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                app = self.app
                if app is not None:  # what the built app's own lifespan would do at its end
                    await asyncio.to_thread(app.state.executor.shutdown, False)
                await send({"type": "lifespan.shutdown.complete"})
                return
