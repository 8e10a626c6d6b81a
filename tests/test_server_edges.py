"""The server at its edges, in process on a tiny random model: a request of several prompts that
the queue cannot take, a client leaving a non-streaming request behind the API key, requests still
open when the server shuts down; and the logprob bytes of a SentencePiece vocabulary.

The executors here batch FIXED_SIZE with a batch the tests never fill, so an accepted request
waits in the queue until it is cancelled: nothing finishes by itself, and each check is about
what the server cancels. Every wait has a deadline, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from choral.executor import BatchingStrategy, Executor, ExecutorConfig, Request
from choral.sampling.params import SamplingParams
from choral.server.app import create_app

HANG_S = 30.0


def held_executor(tiny_models: Any, max_queue_size: int) -> Executor:
    """An executor whose requests wait in the queue until cancelled (the batch never fills)."""
    directory, _ = tiny_models["llama"]
    cfg = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=100, max_queue_size=max_queue_size)
    return Executor(str(directory), cfg, dtype="float32", block_size=4, kv_cache_tokens=256, max_model_len=64)


def until(check: Callable[[], bool], what: str, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def serve_asgi(ex: Executor, main: Callable[[httpx.AsyncClient], Any], **app_args: Any) -> None:
    app = create_app(ex, "tiny", **app_args)

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await asyncio.wait_for(main(client), HANG_S)

    asyncio.run(run())


@pytest.fixture
def uvicorn_server(tiny_models: Any) -> Iterator[Callable[..., tuple[Any, str, Executor]]]:
    """Start a real uvicorn (loopback, a free port) in a thread: ``start(**app_args)`` returns
    the uvicorn Server, the base URL and the executor."""
    import uvicorn

    started: list[tuple[Any, threading.Thread, Executor]] = []

    def start(**app_args: Any) -> tuple[Any, str, Executor]:
        ex = held_executor(tiny_models, max_queue_size=8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        config = uvicorn.Config(create_app(ex, "tiny", **app_args), host="127.0.0.1", port=port,
                                log_level="warning", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        until(lambda: server.started, "the server started")
        started.append((server, thread, ex))
        return server, f"http://127.0.0.1:{port}", ex

    yield start
    for server, thread, ex in started:
        server.should_exit = True
        thread.join(timeout=HANG_S)
        ex.shutdown(wait=False)


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_later_prompt_cancels_the_earlier_ones(tiny_models: Any, stream: bool) -> None:
    ex = held_executor(tiny_models, max_queue_size=2)
    ex.enqueue(Request([5], SamplingParams(max_tokens=1)))  # one place of two taken

    async def main(client: httpx.AsyncClient) -> None:
        # The first prompt takes the last place, the second is refused.
        body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "stream": stream}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert "queue full" in r.json()["error"]["message"]
        r = await client.post("/v1/completions", json={**body, "prompt": [[5], [6], [7]]})
        assert r.status_code == 400 and "max_queue_size 2" in r.json()["error"]["message"]  # could never fit

    serve_asgi(ex, main)  # before the fix the first prompt held the request open: a timeout here
    until(lambda: ex.aggregate.cancelled == 1, "the first prompt's request was cancelled", timeout=5)
    assert ex.aggregate.total_requests == 1  # the filler still waits
    ex.shutdown(wait=False)


def test_nonstreaming_request_is_cancelled_when_its_client_leaves(uvicorn_server: Any) -> None:
    # With the API key on: the key check must not hide the disconnect from the request.
    _, base, ex = uvicorn_server(api_key="sekret")
    key = {"Authorization": "Bearer sekret"}
    assert httpx.post(f"{base}/v1/completions", json={"prompt": [5], "max_tokens": 2}).status_code == 401
    with pytest.raises(httpx.ReadTimeout):  # the request waits in the queue: no answer comes
        httpx.post(f"{base}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 8}, headers=key, timeout=0.5)
    until(lambda: ex.aggregate.cancelled == 1, "the abandoned request was cancelled", timeout=10)


def test_shutdown_answers_the_requests_still_open(uvicorn_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server, base, ex = uvicorn_server()
    lines: list[str] = []
    answers: list[httpx.Response] = []

    def stream() -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=HANG_S) as r:
            assert r.status_code == 200
            lines.extend(line for line in r.iter_lines() if line)

    def wait() -> None:
        answers.append(httpx.post(f"{base}/v1/completions", json={"prompt": [5, 6], "max_tokens": 8},
                                  timeout=HANG_S))

    clients = [threading.Thread(target=stream), threading.Thread(target=wait)]
    for c in clients:
        c.start()
    until(lambda: metric(base, "choral_num_requests_waiting") == 2, "both requests were queued")
    with caplog.at_level(logging.ERROR):
        server.should_exit = True  # what SIGTERM does; both outlive the 1 s grace period
        for c in clients:
            c.join(timeout=HANG_S)
            assert not c.is_alive()
        # The stream ends with an error event, not a cut connection; the other gets a JSON 503.
        *_, last, done = lines
        assert done == "data: [DONE]"
        error = json.loads(last.removeprefix("data: "))["error"]
        assert error["code"] == 503 and "shutting down" in error["message"]
        assert answers[0].status_code == 503 and "shutting down" in answers[0].json()["error"]["message"]
        # The app stops the executor before the event loop closes, so nothing is delivered to a
        # closed loop afterwards ("Event loop is closed" from the executor's thread).
        until(lambda: not ex.is_running, "the app stopped the executor")
        ex._loop.thread.join(timeout=HANG_S)
    assert not [r for r in caplog.records if "Event loop is closed" in r.getMessage() or r.exc_info]


def test_token_bytes_of_a_sentencepiece_vocabulary() -> None:
    from types import SimpleNamespace

    from choral.server.logprobs import TokenBytes

    # "▁hi ✓": "✓" is E2 9C 93, spelt as byte tokens (SentencePiece's byte fallback); 9 is special.
    pieces = {0: "▁hi", 1: "▁", 2: "<0xE2>", 3: "<0x9C>", 4: "<0x93>", 9: "</s>"}
    hf = SimpleNamespace(added_tokens_decoder={9: None}, all_special_ids=[9])  # no byte-level decoder
    tokens = TokenBytes(SimpleNamespace(hf_tokenizer=hf, token_to_piece=pieces.__getitem__))  # type: ignore[arg-type]
    assert [tokens.raw(t) for t in (0, 1, 2, 9)] == [b" hi", b" ", b"\xe2", b"</s>"]
    assert tokens.text(2) == "bytes:\\xe2" and tokens.text(0) == " hi"
    ids = [0, 1, 2, 3, 4, 9]
    lp = tokens.completion_logprobs(ids, [None, *[(-1.0, [(0, -1.0)])] * 5], tokens.offsets(0, True))
    # " hi ✓": the three bytes of "✓" all start where it does; the skipped special token adds nothing.
    assert lp["text_offset"] == [0, 3, 4, 4, 4, 5]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert b"".join(tokens.raw(t) for t in ids[:-1]).decode() == " hi \u2713"
