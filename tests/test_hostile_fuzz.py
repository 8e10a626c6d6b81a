"""Bounded fuzzing of the HTTP API (issue 20): hostile values in every field of every endpoint, and
a property-based OpenAPI fuzzer (Schemathesis) over /openapi.json. No answer may be a 5xx, every
error is OpenAI-shaped, and a canary client keeps getting its answers within a deadline throughout.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from choral.server.limits import ServerLimits
from tests.hostile_server import running_server

# Its fixtures serve a model (the fast tier, pytest --fast, leaves these out).
pytestmark = pytest.mark.model

LIMITS = ServerLimits(max_request_bytes=2**20, max_json_items=50_000, max_prompt_chars=20_000, template_timeout_s=2.0)
# Deadlines for the canary: generous for a shared, busy 2-core machine, far below a stalled loop.
HEALTH_DEADLINE_S = 5.0
COMPLETION_DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def base(tiny_chat_dir: Path) -> Iterator[str]:
    with running_server(tiny_chat_dir, LIMITS, max_model_len=128) as (url, _):
        yield url


class Canary:
    """A client that asks /health and a tiny completion over and over; records how long each took."""

    def __init__(self, base: str):
        self.base = base
        self.stop = threading.Event()
        self.worst: dict[str, float] = {"health": 0.0, "completion": 0.0}
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                for name, call in (("health", lambda: client.get("/health")),
                                   ("completion", lambda: client.post("/v1/completions", json={
                                       "prompt": "canary", "max_tokens": 2, "temperature": 0}))):
                    start = time.perf_counter()
                    try:
                        r = call()
                        if r.status_code != 200:
                            self.failures.append(f"{name}: {r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as e:
                        self.failures.append(f"{name}: {e!r}")
                    self.worst[name] = max(self.worst[name], time.perf_counter() - start)
                time.sleep(0.05)

    def __enter__(self) -> Canary:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.failures, self.failures[:5]
        assert self.worst["health"] < HEALTH_DEADLINE_S, self.worst
        assert self.worst["completion"] < COMPLETION_DEADLINE_S, self.worst


# JSON fragments (raw, so NaN, 1e999 and lone surrogates can be sent) for any field.
HOSTILE = [
    "null", "true", "0", "-1", "1", "2", "3.5", "-2.5", "1e308", "-1e308", "1e999", "NaN", "Infinity", "-Infinity",
    str(2**31), str(2**63), str(2**64), "-" + str(2**63), "9" * 400, '""', '"x"', '"\\udc80"', '"\\ud800x"',
    '"' + "a" * 5000 + '"', "[]", "[1]", "[null]", '["a", 1]', "[[1, 2], [3]]", "[" * 200 + "]" * 200, "{}",
    '{"1": 5}', '{"a": "b"}', '{"1": 1e308}', '{"99999999999999999999": 1}', "[" + ",".join(["1"] * 3000) + "]",
    '[{"type": "text", "text": 5}]', '[{"type": "text"}]', '[{"type": "image_url", "image_url": {"url": "x"}}]',
    '{"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}', '{"type": "json_object"}',
]
ENDPOINTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/v1/completions": ({"prompt": "hi", "max_tokens": 2}, [
        "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
        "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p", "repetition_penalty",
        "min_tokens", "stop_token_ids", "ignore_eos", "priority", "skip_special_tokens", "logprobs", "echo", "model"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, [
        "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
        "logit_bias", "top_k", "repetition_penalty", "logprobs", "top_logprobs", "response_format", "model",
        "stream_options", "min_tokens", "priority"]),
    "/tokenize": ({"prompt": "hi"}, ["prompt", "messages", "add_special_tokens", "model"]),
    "/detokenize": ({"tokens": [1, 2]}, ["tokens", "model"]),
}
MESSAGE_FIELDS = ["role", "content"]


def cases(seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """(path, raw body): one field (or one message field) at a time set to a hostile value, then
    random mixes of several."""
    rng = random.Random(seed)
    singles = [(path, field, value) for path, (_, fields) in ENDPOINTS.items() for field in fields
               for value in HOSTILE]
    rng.shuffle(singles)
    for i in range(count):
        path, field, value = singles[i % len(singles)]
        body = dict(ENDPOINTS[path][0])
        raw = {k: json.dumps(v) for k, v in body.items()}
        if i % 5 == 4:  # a mix: several fields at once
            for extra in rng.sample(ENDPOINTS[path][1], min(3, len(ENDPOINTS[path][1]))):
                raw[extra] = rng.choice(HOSTILE)
        raw[field] = value
        if path == "/v1/chat/completions" and i % 7 == 3:  # inside a message
            raw["messages"] = '[{"role": "user", "' + rng.choice(MESSAGE_FIELDS) + '": ' + value + "}]"
        if raw.get("stream") == "true" and i % 2:
            raw["stream"] = "false"
        yield path, ("{" + ", ".join(f'"{k}": {v}' for k, v in raw.items()) + "}").encode()


def check_answer(path: str, body: bytes, r: httpx.Response) -> None:
    assert r.status_code < 500, (path, body[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["code"] == r.status_code
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
        for line in r.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                assert json.loads(line[6:])["error"]["code"] < 500, line


def test_hostile_values_in_every_field_never_5xx(base: str) -> None:
    with Canary(base), httpx.Client(base_url=base, timeout=120) as client:
        for path, body in cases(seed=20, count=400):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            check_answer(path, body, r)
        for raw in (b"", b"{", b"\xff\xfe", b"[]", b"null", b'"x"', b"{" * 10_000, b'{"prompt": "\\ud800"}'):
            for path in ENDPOINTS:
                check_answer(path, raw, client.post(path, content=raw, headers={"content-type": "application/json"}))
        for path in ("/v1/models/%ED%B2%80", "/v1/models/" + "x" * 5000, "/v1/models/..%2f..%2f", "/nope"):
            r = client.get(path)
            assert r.status_code in (404, 414), (path, r.status_code)


def test_bad_token_ids_with_echo_are_a_400(base: str) -> None:
    """Found by schemathesis: echo decoded the prompt's ids before they were validated (a 500)."""
    with httpx.Client(base_url=base, timeout=60) as client:
        for prompt in ([-1], [10**12], [[3, -5]]):
            r = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "max_tokens": 2})
            assert r.status_code == 400, (prompt, r.status_code, r.text[:200])
            assert "out of range" in r.json()["error"]["message"]


def test_schemathesis_over_the_openapi_schema_finds_no_5xx(base: str) -> None:
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/health"}
    with Canary(base):
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzz(op, mode, base)
                except Unsatisfiable:
                    # No invalid input exists for an operation without parameters (GET /health).
                    assert mode is GenerationMode.NEGATIVE, op.path


def fuzz(op: Any, mode: Any, base: str) -> None:
    """A bounded number of Schemathesis cases of ``op`` (valid or invalid ones, per ``mode``)."""

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        r = case.call(base_url=base, timeout=120)
        assert r.status_code < 500, (op.path, case.body, r.status_code, r.text[:300])

    check()
