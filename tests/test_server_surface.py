"""The request surface in process on a tiny random model: unknown fields ignored with a warning
and a header (refused under strict), and /health while the model loads."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from test_server_edges import HANG_S, serve_asgi, until

from choral.executor import Executor, ExecutorConfig
from choral.server.app import create_app
from choral.server.loading import LoadingApp


def tiny_executor(tiny_models: Any) -> Executor:
    directory, _ = tiny_models["llama"]
    return Executor(str(directory), ExecutorConfig(max_queue_size=8), dtype="float32", block_size=4,
                    kv_cache_tokens=256, max_model_len=64)


BODY = {"prompt": [5, 6, 7], "max_tokens": 2, "store": True, "cache_prompt": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_fields_are_ignored_with_a_warning_and_a_header(tiny_models: Any, stream: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    ex = tiny_executor(tiny_models)

    async def main(client: httpx.AsyncClient) -> None:
        with caplog.at_level(logging.WARNING, logger="choral.server"):
            r = await client.post("/v1/completions", json={**BODY, "stream": stream})
        assert r.status_code == 200, r.text
        assert r.headers["x-choral-ignored-fields"] == "store, cache_prompt, stream_options.continuous_usage_stats"
        warned = [rec.getMessage() for rec in caplog.records if rec.name == "choral.server"]
        assert warned == [f"/v1/completions: ignoring the unknown field {n!r}"
                          for n in ("store", "cache_prompt", "stream_options.continuous_usage_stats")]
        r = await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 1})
        assert "x-choral-ignored-fields" not in r.headers

    serve_asgi(ex, main)
    ex.shutdown(wait=False)


def test_strict_refuses_unknown_fields(tiny_models: Any) -> None:
    ex = tiny_executor(tiny_models)

    async def main(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/completions", json=BODY)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "unknown field 'store' (the server runs with --strict)"
        assert r.json()["error"]["param"] == "store"
        r = await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 1})
        assert r.status_code == 200

    serve_asgi(ex, main, strict=True)
    ex.shutdown(wait=False)


def test_suffix_is_refused_even_when_lenient(tiny_models: Any) -> None:
    ex = tiny_executor(tiny_models)

    async def main(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/completions", json={"prompt": [5], "suffix": "end", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"

    serve_asgi(ex, main)
    ex.shutdown(wait=False)


def test_health_is_503_while_loading_then_200(tiny_models: Any) -> None:
    import uvicorn

    release = threading.Event()
    built: list[Executor] = []

    def build() -> FastAPI:
        assert release.wait(HANG_S)
        built.append(tiny_executor(tiny_models))
        return create_app(built[0], "tiny")

    app = LoadingApp(build)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        until(lambda: server.started, "the port is open")
        for path in ("/health", "/v1/health"):
            r = httpx.get(base + path)
            assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [5], "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == "the model is still loading; retry shortly"
        release.set()
        until(lambda: httpx.get(f"{base}/health").status_code == 200, "the model is loaded")
        assert httpx.get(f"{base}/v1/health").json() == {"status": "ok"}
        r = httpx.post(f"{base}/v1/completions", json={"prompt": [5], "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=HANG_S)
    assert not built[0].is_running  # the app's end shut the executor down


def test_a_failed_load_is_reported() -> None:
    failures: list[BaseException] = []

    def build() -> FastAPI:
        raise RuntimeError("no such model")

    app = LoadingApp(build, failures.append)
    app._load()
    assert app.error is not None and str(failures[0]) == "no such model" and not app.is_loading
