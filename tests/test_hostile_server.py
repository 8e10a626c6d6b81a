"""Hostile HTTP input: every case is a 4xx in OpenAI's shape naming the problem (never a 500),
limits are checked before expensive work, chat templates that fail, loop or emit too much are
400s, and /health keeps answering while a large request is being prepared.

A real uvicorn in a thread, on a tiny random llama with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from choral.errors import ConfigError
from choral.executor import BatchingStrategy, Executor, ExecutorConfig
from choral.server.limits import ServerLimits, count_json_items
from tests.hostile_server import running_server

# Its fixtures serve a model (the fast tier, pytest --fast, leaves these out).
pytestmark = pytest.mark.model

LIMITS = ServerLimits(max_request_bytes=2**20, max_json_items=20_000, max_prompt_chars=50_000, max_prompts=8,
                      max_n=4, max_logit_bias=16, max_stop=4, max_template_chars=20_000, template_timeout_s=1.0)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_chat_dir: Path) -> Iterator[tuple[str, Executor]]:
    with running_server(tiny_chat_dir, LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def base(server: tuple[str, Executor]) -> str:
    return server[0]


def post(base: str, path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
    if content is not None:
        return httpx.post(f"{base}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=60)
    return httpx.post(f"{base}{path}", json=body, timeout=60)


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["code"] == status and isinstance(error["message"], str)
    for word in words:
        assert word in error["message"], error["message"]


# ---- case 1: the former 500s ---------------------------------------------------------------------

@pytest.mark.parametrize("text", [5, None, 1.5, ["a"], {"a": 1}])
def test_a_content_part_whose_text_is_not_a_str_is_a_400(base: str, text: Any) -> None:
    r = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "ok"}, {"type": "text", "text": text}]}], "max_tokens": 2})
    assert_error(r, 400, "messages[0].content[1].text")


def test_a_model_name_with_a_lone_surrogate_is_a_404_the_client_can_read(base: str) -> None:
    raw = b'{"model": "x\\udc80", "prompt": "hi", "max_tokens": 1}'
    r = post(base, "/v1/completions", content=raw)
    assert_error(r, 404, "x\\udc80")
    r = post(base, "/v1/chat/completions", content=b'{"model": "\\ud800", "messages": [{"role": "user", '
                                                     b'"content": "hi"}]}')
    assert_error(r, 404)
    assert httpx.get(f"{base}/v1/models/%ED%B2%80", timeout=10).status_code == 404


def test_tokenize_with_no_messages_is_a_400(base: str) -> None:
    assert_error(post(base, "/tokenize", {"messages": []}), 400, "messages")


@pytest.mark.parametrize("field, value", [("top_k", 2**63), ("top_k", 2**31), ("max_tokens", 2**63),
                                          ("seed", 2**64), ("min_tokens", 2**63), ("stop_token_ids", [2**63]),
                                          ("logit_bias", {"99999999999999999999": 1})])
def test_integers_beyond_what_the_loop_can_use_are_400s(base: str, field: str, value: Any) -> None:
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        assert_error(post(base, path, {**body, "max_tokens": 2, field: value}), 400)


@pytest.mark.parametrize("field", ["priority", "temperature", "top_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"NaN", b"Infinity"])
def test_non_finite_numbers_are_400s(base: str, field: str, number: bytes) -> None:
    raw = b'{"prompt": "hi", "max_tokens": 2, "' + field.encode() + b'": ' + number + b"}"
    assert_error(post(base, "/v1/completions", content=raw), 400, field)


def test_a_request_without_mass_is_a_400_naming_the_knob(base: str) -> None:
    for body, knob in (({"temperature": 1.0, "logit_bias": {"1": 1e308}}, "logit_bias"),
                       ({"repetition_penalty": 1e-308}, "repetition_penalty")):
        r = post(base, "/v1/completions", {"prompt": "hi there", "max_tokens": 3, **body})
        assert_error(r, 400, knob)
        with httpx.stream("POST", f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                                   **body}, timeout=60) as s:
            text = s.read().decode()
        assert knob in text and '"code": 400' in text and text.endswith("data: [DONE]\n\n")
    assert post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


# ---- case 2: limits before expensive work --------------------------------------------------------

def test_size_limits_are_checked_before_any_work(base: str) -> None:
    big = b'{"prompt": "' + b"a" * (2**20) + b'"}'
    assert_error(post(base, "/v1/completions", content=big), 413, "--max-request-bytes")
    # A chunked body (no Content-Length) is cut off as soon as it passes the limit.
    chunks = iter([b'{"prompt": "', b"a" * 2**19, b"a" * 2**19, b"a" * 2**19, b'"}'])
    r = httpx.post(f"{base}/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert_error(r, 413, "--max-request-bytes")
    many = b'{"prompt": [' + b"1," * 30_000 + b'1]}'
    assert_error(post(base, "/v1/completions", content=many), 413, "--max-json-items")
    assert_error(post(base, "/v1/completions", {"prompt": "a " * 30_000}), 400, "--max-prompt-chars")
    assert_error(post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a " * 30_000}]}),
                 400, "--max-prompt-chars")
    assert_error(post(base, "/tokenize", {"prompt": "a " * 30_000}), 400, "--max-prompt-chars")
    assert_error(post(base, "/v1/completions", {"prompt": ["a"] * 9}), 400, "--max-prompts")
    assert_error(post(base, "/v1/completions", {"prompt": "a", "n": 5}), 400, "--max-n")
    assert_error(post(base, "/v1/completions", {"prompt": "a", "logit_bias": {str(i): 1 for i in range(17)}}),
                 400, "--max-logit-bias")
    assert_error(post(base, "/v1/chat/completions", {"messages": CHAT, "stop": ["x"] * 5}), 400, "--max-stop")
    # Within every limit: served.
    r = post(base, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "temperature": 1.0,
                                        "logit_bias": {"5": 1}, "stop": ["x"]})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_json_items_are_counted_outside_strings() -> None:
    assert count_json_items(b'{"a": [1, 2, 3]}', 100) == 4
    # Commas and colons inside strings (escaped quotes too) do not count once the quick count is over.
    text = b'{"prompt": "' + b'a,b:\\",' * 1000 + b'"}'
    assert count_json_items(text, 10) == 2


def test_limits_are_validated() -> None:
    for bad in (dict(max_request_bytes=0), dict(max_n=True), dict(template_timeout_s=0), dict(max_stop=1.5)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ServerLimits(**bad)  # type: ignore[arg-type]


def test_health_answers_while_a_large_prompt_is_prepared(tiny_chat_dir: Path) -> None:
    limits = ServerLimits(max_request_bytes=16 * 2**20, max_prompt_chars=8 * 2**20)
    with running_server(tiny_chat_dir, limits) as (base, _):
        prompt = "the quick brown fox jumps over the lazy dog. " * 15_000  # 680 kB: a second or more to tokenize
        done = threading.Event()
        answer: list[httpx.Response] = []

        def big() -> None:
            answer.append(post(base, "/tokenize", {"prompt": prompt}))
            done.set()

        threading.Thread(target=big, daemon=True).start()
        latencies = []
        with httpx.Client(base_url=base) as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get("/health", timeout=10).status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)
        assert answer[0].status_code == 200 and answer[0].json()["count"] > 100_000
        assert len(latencies) >= 5  # the big request took a while, and /health was answered throughout
        latencies.sort()
        # The bound is 100 ms; the median holds it on a busy shared machine too, and no
        # answer waits for the whole tokenization (seconds before the worker pool).
        assert latencies[len(latencies) // 2] < 0.1, latencies
        assert latencies[-1] < 1.0, latencies


# ---- case 4: chat templates ----------------------------------------------------------------------

@pytest.fixture
def template(server: tuple[str, Executor]) -> Iterator[Any]:
    """Set the served model's chat template for one test."""
    tok = server[1].engine.tokenizer
    assert tok is not None
    original = tok.hf_tokenizer.chat_template

    def set_template(text: str) -> None:
        tok.hf_tokenizer.chat_template = text

    yield set_template
    tok.hf_tokenizer.chat_template = original


@pytest.mark.parametrize("text, words", [
    ("{{ raise_exception('no system prompt allowed') }}", ["no system prompt allowed"]),
    ("{% for m in messages %}{{ m.content.nope() }}{% endfor %}", ["chat template failed"]),
    ("{{ messages[99].content }}", ["chat template failed"]),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", ["was stopped"]),
    ("{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}", ["characters, more than"]),
])
def test_chat_template_failures_are_400s(base: str, template: Any, text: str, words: list[str]) -> None:
    template(text)
    start = time.monotonic()
    for path, body in (("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
                       ("/tokenize", {"messages": CHAT})):
        assert_error(post(base, path, body), 400, *words)
    assert time.monotonic() - start < 30
    assert httpx.get(f"{base}/health").status_code == 200


# ---- case 7: aborted requests in /metrics --------------------------------------------------------

def aborted(base: str, reason: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("choral_request_aborted_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnects_are_counted_in_metrics(tiny_chat_dir: Path) -> None:
    held = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=100, max_queue_size=8)
    with running_server(tiny_chat_dir, config=held) as (base, ex):
        for stream in (False, True):
            before = aborted(base, "client_disconnected")
            body = {"prompt": "hi", "max_tokens": 4, "stream": stream}
            with httpx.Client() as client:  # the request waits in the queue (the batch never fills)
                with pytest.raises(httpx.ReadTimeout):
                    with client.stream("POST", f"{base}/v1/completions", json=body, timeout=1.0) as r:
                        r.read()
            deadline = time.monotonic() + 30
            while aborted(base, "client_disconnected") < before + 1:
                assert time.monotonic() < deadline, "the disconnect was never counted"
                time.sleep(0.05)
            while ex.num_queued_not_scheduled or ex.scheduler.waiting:
                assert time.monotonic() < deadline, "the request was not cancelled"
                time.sleep(0.05)
