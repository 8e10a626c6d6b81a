"""Two choral replicas behind Ray Serve on this machine (one Ray cluster and one Serve app for the
whole module): the official openai client (stream and not) and the API key, prefix-aware routing
(20 prompts sharing a 256-token prefix land on one replica, counted from /metrics and response
headers), and a killed replica: its in-flight stream ends with a clear 503 error, Serve replaces it
and the service keeps answering. Skipped when Ray is not installed (pip install choral[ray])."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
KEY = "replica-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    from choral.scale.ray_serve import build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, configure_logging=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        app = build_app(model=MODEL, replicas=2, api_key=KEY, cpus_per_replica=1.0, kv_cache_tokens=4096,
                        max_model_len=2048)
        serve.run(app, name="choral", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas(url: str) -> dict[str, int]:
    """replica id -> its process id, from the merged /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m[0]: int(m[1]) for m in re.findall(r'choral_replica_info\{replica="([^"]+)",pid="(\d+)"', text)}


def _served(url: str) -> Counter[str]:
    """Finished sequences per replica (choral_request_success_total, summed over reasons)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts: Counter[str] = Counter()
    for replica, value in re.findall(r'^choral_request_success_total\{replica="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        counts[replica] += int(float(value))
    return counts


def test_openai_client_stream_and_not(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                                 max_tokens=6, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content  # greedy, fp32: the same answer on either replica
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                           temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == completion.choices[0].text and len(completion.choices[0].text) > 0
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_api_key_and_errors_are_the_single_servers(url: str) -> None:
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": -1}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "model": "nope"}, headers=AUTH, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}


def test_prefix_routing_keeps_a_shared_prefix_on_one_replica(url: str) -> None:
    rng = random.Random(7)
    prefix = [rng.randrange(1000, 20000) for _ in range(256)]
    before = _served(url)
    hosts: Counter[str] = Counter()
    cached = []
    for _request in range(20):
        body = {"prompt": prefix + [rng.randrange(1000, 20000) for _ in range(8)], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        hosts[r.headers["x-choral-replica"]] += 1
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    after = _served(url)
    per_replica = {k: after[k] - before.get(k, 0) for k in after}
    assert sum(per_replica.values()) == 20
    assert max(per_replica.values()) >= 17, per_replica
    assert max(hosts.values()) >= 17 and hosts.most_common(1)[0][0] == max(per_replica, key=per_replica.__getitem__)
    # Every request after the first that reached the prefix's replica found its 16 blocks cached.
    assert sum(c == 256 for c in cached) >= 16, cached


def test_a_killed_replica_fails_its_requests_clearly_and_is_replaced(url: str) -> None:
    pids = _replicas(url)
    assert len(pids) == 2
    body: dict[str, Any] = {"prompt": "Count slowly:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    events: list[str] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        victim = r.headers["x-choral-replica"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 3:
                os.kill(pids[victim], signal.SIGKILL)
    assert time.monotonic() - start < 60
    assert events[-1] == "data: [DONE]"
    assert '"code": 503' in events[-2] and "replica" in events[-2], events[-2:]
    # Serve replaces it; meanwhile and afterwards every request is answered.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=60)
        assert r.status_code in (200, 503), r.text
        now = _replicas(url)
        if r.status_code == 200 and len(now) == 2 and victim not in now:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {_replicas(url)}")
    for _ in range(4):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=60)
        assert r.status_code == 200
