"""The one HTTP entry point in front of the replicas: reads each request, hashes its prompt for
the router, forwards it to the chosen replica and relays the answer as it streams back.

Routes, validation, errors and streaming are the replicas' own (the single server's app); the
ingress adds only what one replica cannot do:

- the API key and body-size checks first (the single server's own middleware), so a caller
  without the key costs no tokenization;
- ``/metrics``: every replica's metrics in one exposition, each sample labelled ``replica``;
- a replica that dies under a request: a 503 in OpenAI's error shape (or, once a stream has
  started, an error event then ``[DONE]``), never a hang; Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from choral.loader.load import load_tokenizer
from choral.scale.asgi_call import HttpCall, HttpStart
from choral.scale.config import ReplicaConfig
from choral.scale.metrics_merge import merge
from choral.scale.prompt_hashes import PromptHasher
from choral.scale.router import RouteHint
from choral.server.errors import ApiKeyGuard, error_body, error_response
from choral.server.limits import BodyLimit, Preparer
from choral.server.sse import DONE, event

# How long /metrics waits for each replica's text (a replica that does not answer is left out).
_METRICS_TIMEOUT_S = 5.0
# The context length assumed for the hashing limits when the config leaves it to the model.
_DEFAULT_MODEL_LEN = 32768


class ChoralIngress:
    """A Serve ingress deployment (``serve.ingress()`` builds its ASGI app on the replica)."""

    def __init__(self, replicas: DeploymentHandle, config: ReplicaConfig):
        self.replicas = replicas
        self.config = config
        server = config.server
        self.hasher: PromptHasher | None = None
        if config.routing.policy == "prefix":  # pow2 ignores prefixes: nothing to hash
            self.hasher = PromptHasher(load_tokenizer(config.engine.model), config.engine.block_size,
                                       server.model_name, server.limits,
                                       config.engine.max_model_len or _DEFAULT_MODEL_LEN, server.tool_call_parser)
        self.preparer = Preparer(server.limits.prep_workers)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app: ASGIApp = BodyLimit(self._app, self.config.server.limits)
        if self.config.server.api_key:
            app = ApiKeyGuard(app, self.config.server.api_key)
        return app

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["path"] == "/metrics" and scope["method"] == "GET":
                await self._metrics(scope, receive, send)
            else:
                await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.preparer.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---- requests ------------------------------------------------------------------------------
    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return  # the client left before sending its request
        client = scope.get("client")
        call = HttpCall(scope["method"], scope["path"], scope.get("query_string", b""),
                        tuple((bytes(k), bytes(v)) for k, v in scope["headers"]), body,
                        (str(client[0]), int(client[1])) if client else None)
        hint = RouteHint()
        if self.hasher is not None and call.method == "POST":
            hint = RouteHint(await self.preparer.run(partial(self.hasher.hashes, call.path, body)))
        stream: Any = self.replicas.options(stream=True).forward.remote(call, hint=hint)  # a response generator
        try:
            start = await stream.__anext__()
        except Exception as e:  # noqa: BLE001 - the replica died or is unreachable: a clear 503
            await error_response(503, _failed(e))(scope, receive, send)
            return
        if not isinstance(start, HttpStart):
            stream.cancel()
            await error_response(500, "internal error: a replica answered without a status")(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": start.status, "headers": list(start.headers)})
        is_sse = (start.header(b"content-type") or b"").startswith(b"text/event-stream")
        relay = asyncio.ensure_future(_relay(stream, send, is_sse))
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not relay.done() or relay.cancelled() or relay.exception() is not None:
            stream.cancel()  # the client left (or could not be written to): stop the replica's work on it
            relay.cancel()
        gone.cancel()
        await asyncio.gather(relay, gone, return_exceptions=True)

    # ---- /metrics ------------------------------------------------------------------------------
    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        texts: dict[str, str] = {}
        # One call at a time: calls made while serving one HTTP request share its request id, and
        # Serve's router matches a routed replica to its pending call by that id.
        for i in range(self.config.num_replicas):
            with contextlib.suppress(Exception):  # a replica that does not answer is left out
                replica, text = await asyncio.wait_for(
                    self.replicas.metrics_text.remote(hint=RouteHint(target=i)), _METRICS_TIMEOUT_S)
                texts.setdefault(replica, text)  # a replica reached twice (during a restart) counts once
        if not texts:
            await error_response(503, "no replica answered for /metrics")(scope, receive, send)
            return
        payload = merge(sorted(texts.items())).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client goes away."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - the proxy's channel failed: no word on the client, keep relaying
        await asyncio.Event().wait()


async def _relay(stream: Any, send: Send, is_sse: bool) -> None:
    """Send the replica's body chunks on; a replica that dies mid-answer ends a stream with an
    error event and ``[DONE]`` (a plain body is cut: its status is already out)."""
    try:
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except Exception as e:  # noqa: BLE001 - the replica died mid-answer
        if is_sse:
            text = event(error_body(503, _failed(e))) + DONE
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _failed(error: BaseException) -> str:
    return (f"the replica serving this request failed ({type(error).__name__}); it is being replaced, "
            "retry the request")
