"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure
the server answers: our own, FastAPI's body validation, Starlette's 404 / 405, and the API key.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

# The ``type`` of each status, named as the openai client names its exception classes.
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 413: "RequestTooLargeError", 422: "UnprocessableEntityError",
          429: "RateLimitError", 499: "ClientClosedRequest", 500: "InternalServerError",
          503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An error answered with ``status`` (or, once a stream has started, sent as its last event)."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or _TYPES.get(status, "APIError")


def queue_full(message: str) -> ApiError:
    """A 429 the client should retry (OpenAI's client honours ``Retry-After``)."""
    return ApiError(429, message, headers={"Retry-After": "1"})


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None) -> dict[str, Any]:
    # The message may quote the client's own text, which may hold a lone surrogate (a model name
    # "\udc80"): UTF-8 cannot encode that, so it is written as its escape instead.
    return {"error": {"message": _encodable(message), "type": type_ or _TYPES.get(status, "APIError"),
                      "param": _encodable(param) if param is not None else None, "code": status}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape (FastAPI's default is ``{"detail": ...}``)."""

    @app.exception_handler(ApiError)
    async def on_api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error') or first.get('msg')}")
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unknown field {param!r}", param=param)
        # No location: the body as a whole (not a JSON object, or missing).
        return error_response(400, f"{param or 'request body'}: {first.get('msg')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI reads JSON bodies as UTF-8
            message = f"malformed JSON: the body is not valid UTF-8 ({exc.__cause__.reason} at byte " \
                      f"{exc.__cause__.start})"
        elif exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=dict(exc.headers or {}) or None)


class ApiKeyGuard:
    """Refuse the /v1 endpoints and /tokenize, /detokenize without ``Authorization: Bearer KEY``.

    Plain ASGI on purpose: an ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware) wraps
    ``receive``, after which ``Request.is_disconnected()`` never sees the client leave, so a
    non-streaming request would run to its end for nobody.
    """

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _guarded(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):  # constant time: no key guessing by timing
                await error_response(401, "invalid or missing API key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
