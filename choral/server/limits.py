"""How much one request may ask of the server, checked before any expensive work.

The cheap checks come first, on the event loop: the body's size in bytes and its number of JSON
items (both before it is parsed, so parsing and validation stay short), then the number of
prompts, ``n``, logit_bias entries, stop strings and prompt characters (before tokenizing).
Tokenization, chat templates and the request's full validation run in a small worker pool
(``Preparer``), the template with a time limit, so one large request never holds the event loop:
``/health`` and every other client keep their answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from choral.errors import ConfigError
from choral.server.errors import ApiError, error_response

T = TypeVar("T")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits of the HTTP server (``choral serve --max-request-bytes ...``).

    Attributes:
        max_request_bytes: the body's size in bytes (413 past it). Default 4 MiB.
        max_json_items: values in the body's JSON (array elements and object members, counted
            outside strings, before parsing; 413 past it). Default 262144.
        max_prompt_chars: characters of one text prompt, checked before it is tokenized. None
            (the default) means 32 characters per token of the model's context, at least 65536.
        max_prompts: prompts in one completion request. Default 64.
        max_n: ``n`` (choices per prompt). Default 16.
        max_logit_bias: logit_bias entries. Default 1024.
        max_stop: stop strings. Default 64.
        max_template_chars: characters a chat template may render. None (the default) means
            max_prompt_chars.
        template_timeout_s: seconds a chat template may run before it is stopped (a 400). Default 5.
        prep_workers: threads that tokenize, render templates and validate requests. Default 2.
    """

    max_request_bytes: int = 4 * 2**20
    max_json_items: int = 2**18
    max_prompt_chars: int | None = None
    max_prompts: int = 64
    max_n: int = 16
    max_logit_bias: int = 1024
    max_stop: int = 64
    max_template_chars: int | None = None
    template_timeout_s: float = 5.0
    prep_workers: int = 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "template_timeout_s":
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 3600:
                    raise ConfigError(f"template_timeout_s: must be a number of seconds in (0, 3600), got {value!r}")
                continue
            if value is None and f.name in ("max_prompt_chars", "max_template_chars"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{f.name}: must be a positive int, got {value!r}")

    def prompt_chars(self, max_model_len: int) -> int:
        """The limit on a text prompt's characters for a model of ``max_model_len`` tokens."""
        return self.max_prompt_chars if self.max_prompt_chars is not None else max(65536, 32 * max_model_len)

    def template_chars(self, max_model_len: int) -> int:
        return self.max_template_chars if self.max_template_chars is not None else self.prompt_chars(max_model_len)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included


def count_json_items(raw: bytes, limit: int) -> int:
    """An upper bound of the values in JSON text ``raw`` (separators outside strings, plus one),
    exact enough to refuse a body of a million tiny items before parsing it. Counting the raw
    separators first is a fast path: strings are only stripped when that count is over ``limit``."""
    quick = raw.count(b",") + raw.count(b":") + 1
    if quick <= limit:
        return quick
    bare = _STRING.sub(b"", raw)
    return bare.count(b",") + bare.count(b":") + 1


class Preparer:
    """The worker pool where requests are tokenized, templated and validated, off the event loop."""

    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="choral-prep")

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_count(name: str, count: int, limit: int, flag: str) -> None:
    """A 400 naming ``name`` when ``count`` exceeds the server's ``limit`` (set with ``flag``)."""
    if count > limit:
        raise ApiError(400, f"{name}: {count} is more than this server's limit of {limit} ({flag})", param=name)


class BodyLimit:
    """Read a POST body up to ``max_request_bytes`` (413 past it, as soon as the header or the
    bytes say so), refuse one of more than ``max_json_items`` values (413), then hand it on.

    Plain ASGI (see ApiKeyGuard): once the body is handed on, ``receive`` is the server's own
    again, so a disconnect still reaches ``Request.is_disconnected()``."""

    def __init__(self, app: ASGIApp, limits: ServerLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_request_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(f"the request body has {length.decode('latin-1')[:20]} bytes, more than this "
                             f"server's limit of {limit} (--max-request-bytes)", scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(f"the request body is more than this server's limit of {limit} bytes "
                                 "(--max-request-bytes)", scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        items = count_json_items(body, self.limits.max_json_items)
        if items > self.limits.max_json_items:
            await _too_large(f"the request body holds {items} JSON values, more than this server's limit of "
                             f"{self.limits.max_json_items} (--max-json-items)", scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(413, message)(scope, receive, send)
