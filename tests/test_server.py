"""The OpenAI-compatible server: a real process on a loopback port, the official client, httpx."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from choral.sampling.params import SamplingParams

# Every test talks to a server process on the bundled model (or builds one on a tiny model).
pytestmark = pytest.mark.model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    # The dequantized fp32 model: its answers are the ones asserted (native weights: test_quant_model).
    cmd = [sys.executable, "-m", "choral.cli", "serve", "--port", str(port), "--dtype", "float32",
           "--weights", "dequantize", "--kv-cache-tokens", "16384", "--max-model-len", "2048", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    # The port opens at once and /health says 503 while the model loads: wait as long as it loads
    # (minutes on a loaded CI machine).
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, base = start_server("--max-queue-size", "256")
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0  # graceful shutdown exits 0


@pytest.fixture(scope="module")
def client(server: str):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric(base, "choral_num_requests_running") == 0 and metric(base, "choral_kv_cache_used_blocks") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("requests still running / KV still used")


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_and_stream_agree(client) -> None:  # type: ignore[no-untyped-def]
    full = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                          max_tokens=20)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens == 37 and full.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                                 max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_stream_n_stop_seed(client) -> None:  # type: ignore[no-untyped-def]
    done = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.choices[0].text
    pieces = list(client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    two = client.completions.create(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=12,
                                    temperature=1.0, n=2, seed=5)
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = client.completions.create(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=12,
                                      temperature=1.0, n=2, seed=5)
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    word = done.choices[0].text.split()[0]
    stopped = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                        max_tokens=8, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text


def test_logprobs(client) -> None:  # type: ignore[no-untyped-def]
    chat = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0,
                                          max_tokens=5, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token
        assert item.logprob <= 0
    comp = client.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=4, temperature=0,
                                     logprobs=2)
    assert len(comp.choices[0].logprobs.token_logprobs) == 4


def test_json_schema(client) -> None:  # type: ignore[no-untyped-def]
    import openai

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    structured = "json_schema" in {f.name for f in dataclasses.fields(SamplingParams)}
    if not structured:
        with pytest.raises(openai.BadRequestError, match="structured output"):
            client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, response_format=fmt)
        return
    out = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, response_format=fmt,
                                         max_tokens=40, temperature=0)
    assert isinstance(json.loads(out.choices[0].message.content)["city"], str)


def test_models_tokenize_detokenize(server: str, client) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    tok = httpx.post(f"{server}/tokenize", json={"messages": QUESTION}).json()
    assert tok["count"] == 37 and tok["tokens"][0] == 1
    text = httpx.post(f"{server}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert "capital of France" in text


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-4", "messages": QUESTION}, 404, "does not exist"),
        ({"messages": QUESTION, "temperature": 5}, 400, "temperature"),
        ({"messages": QUESTION, "audio": {"voice": "alloy"}}, 400, "audio"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "context holds 2048"),
        ({"messages": QUESTION, "max_tokens": 5000}, 400, "maximum context length"),
    ],
)
def test_errors(server: str, body: dict, status: int, needle: str) -> None:  # type: ignore[type-arg]
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == status


@pytest.mark.parametrize("prompt", [[True, False], ["5", 6], [[1, True]]])
def test_completion_prompt_token_ids_must_be_ints(server: str, prompt: list) -> None:  # type: ignore[type-arg]
    r = httpx.post(f"{server}/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text


def test_malformed_json(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_disconnect_cancels_and_frees(server: str) -> None:
    body = {"prompt": "Count forever:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(server, "choral_num_requests_running") >= 1
    wait_idle(server)  # blocks back at once
    assert metric(server, 'choral_request_success_total') >= 0


def test_load_with_disconnects(server: str) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."}],
                "max_tokens": 24 + i, "temperature": 0.7, "seed": i, "stream": True}
        async with client.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            finish = None
            count = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return f"done:{finish}"
                payload = json.loads(line[6:])
                count += 1
                if payload["choices"] and payload["choices"][0]["finish_reason"]:
                    finish = payload["choices"][0]["finish_reason"]
                if i % 4 == 0 and count == 3:
                    return "disconnected"  # leaving the block closes the connection
        return "truncated"

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    outcomes = asyncio.run(main())
    assert outcomes.count("disconnected") == 8
    assert all(o in ("done:stop", "done:length") for o in outcomes if o != "disconnected"), outcomes
    wait_idle(server)


def test_bench_against_the_server(server: str, capsys) -> None:  # type: ignore[no-untyped-def]
    from choral.cli import main

    rc = main(["bench", "--url", server, "--concurrency", "2", "--num-prompts", "4", "--input-len", "16",
               "--output-len", "6", "--vocab", "49152", "--quiet"])
    assert rc == 0
    assert "| 2 | 4 |" in capsys.readouterr().out
    wait_idle(server)


def test_api_key_and_queue_full(tiny_models) -> None:  # type: ignore[no-untyped-def]
    from choral.executor import BatchingStrategy, Executor, ExecutorConfig, Request
    from choral.server.app import create_app

    directory, _ = tiny_models["llama"]
    cfg = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=100, max_queue_size=1)
    ex = Executor(str(directory), cfg, dtype="float32", block_size=4, kv_cache_tokens=256, max_model_len=64)
    app = create_app(ex, "tiny", api_key="sekret")

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"prompt": [5, 6, 7], "max_tokens": 2}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 401
            ex.enqueue(Request([5], SamplingParams(max_tokens=1)))  # fills the queue (FIXED_SIZE holds it)
            r = await client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "queue full" in r.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 200  # not behind the key

    asyncio.run(main())
    ex.shutdown(wait=False)
    os.environ.pop("UNUSED", None)


# ---- edges: disconnects, echo, logprobs, usage, error shapes ----------------------------------------
def finished_total(base: str, cancelled: bool = False) -> float:
    """Sequences that ran to their end so far (or, with ``cancelled``, the ones cancelled: every
    request is counted when it ends, however it ends)."""
    text = httpx.get(f"{base}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("choral_request_success_total{")
               and ('finished_reason="cancelled"' in line) == cancelled)


def wait_all_idle(base: str, timeout: float) -> None:
    """Nothing running, nothing waiting, no KV block used, within ``timeout`` seconds."""
    names = ("choral_num_requests_running", "choral_num_requests_waiting", "choral_kv_cache_used_blocks")
    deadline = time.monotonic() + timeout
    while any(metric(base, name) for name in names):
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout} s: {[metric(base, name) for name in names]}")
        time.sleep(0.05)


LONG = {"max_tokens": 1500, "temperature": 0.8, "seed": 1, "ignore_eos": True}  # ~a minute to run out


def test_nonstreaming_disconnect_cancels_and_frees(server: str) -> None:
    wait_all_idle(server, 60)
    finished, cancelled = finished_total(server), finished_total(server, cancelled=True)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and goes away
        httpx.post(f"{server}/v1/completions", json={"prompt": "Count forever:", **LONG}, timeout=1.0)
    wait_all_idle(server, 10)  # cancelled, its blocks freed: long before its 1500 tokens
    assert finished_total(server) == finished  # cancelled, not run to its end
    assert finished_total(server, cancelled=True) == cancelled + 1


def test_closing_a_multi_prompt_stream_cancels_every_prompt(server: str) -> None:
    wait_all_idle(server, 60)
    finished = finished_total(server)
    cancelled = finished_total(server, cancelled=True)
    body = {"prompt": ["Once upon a time", "The weather", "In 1492"], **LONG, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(3):  # prompt 0 streams; 1 and 2 run, unread
            next(lines)
        assert metric(server, "choral_num_requests_running") >= 1
    wait_all_idle(server, 10)  # all three end with the response, not when the GC finds them
    assert finished_total(server) == finished
    assert finished_total(server, cancelled=True) == cancelled + 3


def test_echo_streams_the_prompt_and_logprobs_cover_it(client) -> None:  # type: ignore[no-untyped-def]
    import openai

    prompt = "The capital of France is"
    args = {"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True}
    full = client.completions.create(**args, logprobs=1)
    text, lp = full.choices[0].text, full.choices[0].logprobs
    assert text.startswith(prompt) and len(text) > len(prompt)
    # OpenAI's echo: the prompt's tokens first, the very first without a logprob.
    assert len(lp.tokens) == full.usage.prompt_tokens + full.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == text  # ASCII: each token's text, in order
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(**args, stream=True))
    assert chunks[0].choices[0].text.startswith(prompt)  # the first chunk carries the echo
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    plain = client.completions.create(**{**args, "echo": False}, logprobs=0).choices[0]
    assert plain.logprobs.text_offset[0] == 0 and "".join(plain.logprobs.tokens) == plain.text
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(**args, logprobs=1, stream=True)


def test_logprob_bytes_are_the_tokens_bytes(client) -> None:  # type: ignore[no-untyped-def]
    # Emojis come in tokens that are partial UTF-8: their bytes must be the raw bytes, not U+FFFD's.
    ask = [{"role": "user", "content": "Write five emojis:"}]
    chat = client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert any(item.token.startswith("bytes:") for item in content)  # "bytes:\xf0\x9f", OpenAI's spelling
    assert bytes(b for item in content for b in item.bytes).decode("utf-8", "replace") == \
        chat.choices[0].message.content
    for item in content:
        assert 0xFFFD not in [ord(c) for c in item.token]
        assert item.top_logprobs[0].bytes == item.bytes
    comp = client.completions.create(model="smollm2-135m-instruct", prompt="Write five emojis:", max_tokens=8,
                                     temperature=0, logprobs=1).choices[0]
    offsets = comp.logprobs.text_offset
    assert len(offsets) == len(comp.logprobs.tokens) and offsets == sorted(offsets)
    assert offsets[0] == 0 and offsets[-1] < len(comp.text)


def test_streamed_usage_has_cached_tokens(client) -> None:  # type: ignore[no-untyped-def]
    prompt = "Once upon a time, in a small village near the mountains, there lived an old man who"
    args = {"model": "smollm2-135m-instruct", "max_tokens": 2, "temperature": 0}
    client.completions.create(prompt=prompt, **args)  # fills the prefix cache
    done = client.completions.create(prompt=prompt, **args).usage
    assert done.prompt_tokens_details.cached_tokens > 0
    streamed = [c.usage for c in client.completions.create(prompt=prompt, **args, stream=True,
                                                           stream_options={"include_usage": True}) if c.usage]
    assert streamed[0].model_dump() == done.model_dump()
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(messages=messages, **args)
    chat_done = client.chat.completions.create(messages=messages, **args).usage
    chat_streamed = [c.usage for c in client.chat.completions.create(
        messages=messages, **args, stream=True, stream_options={"include_usage": True}) if c.usage]
    assert chat_streamed[0].prompt_tokens_details.cached_tokens == chat_done.prompt_tokens_details.cached_tokens > 0


def test_every_error_has_openais_shape(server: str, client) -> None:  # type: ignore[no-untyped-def]
    import openai

    def error(r: httpx.Response, status: int) -> dict:  # type: ignore[type-arg]
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error"} and body["error"]["code"] == status
        assert not body["error"]["message"].startswith("None")
        return body["error"]  # type: ignore[no-any-return]

    invalid_utf8 = b'{"prompt": "a\xffb", "max_tokens": 2}'
    headers = {"content-type": "application/json"}
    assert "UTF-8" in error(httpx.post(f"{server}/v1/completions", content=invalid_utf8, headers=headers), 400)[
        "message"]
    assert error(httpx.post(f"{server}/v1/completions", content=b"[1, 2]", headers=headers), 400)[
        "message"].startswith("request body")
    assert error(httpx.get(f"{server}/v1/completions"), 405)["type"] == "MethodNotAllowedError"
    assert error(httpx.post(f"{server}/v1/images/generations", json={}), 404)["type"] == "NotFoundError"
    assert error(httpx.post(f"{server}/v1/embeddings", json={}), 400)["param"] == "input"
    assert client.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_json_schema_is_a_400(server: str, stream: bool) -> None:
    if "json_schema" not in {f.name for f in dataclasses.fields(SamplingParams)}:
        pytest.skip("no structured output in this build")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 5, "stream": stream,
                                                          "response_format": fmt}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and "nonsense" in error["message"]
