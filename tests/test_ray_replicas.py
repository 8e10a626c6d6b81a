"""``choral serve --replicas 2`` on this machine (one local Ray cluster and one Serve app for the
whole module, started as a user starts it): the official openai client (stream and not) and the
API key, prefix-aware routing (20 prompts sharing a 256-token prefix land on one replica, counted
from /metrics and response headers), a killed replica (its in-flight stream ends with a clear 503
error, Serve replaces it and the service keeps answering), and SIGTERM (Serve and Ray stop, no
process left behind). Skipped when Ray is not installed (pip install choral[ray])."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve")
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


@dataclass
class Service:
    url: str
    process: subprocess.Popen[str]


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return out


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and
            not Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"}


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """``choral serve --replicas 2`` (a local Ray cluster on this machine's 2 CPUs), as a user runs it."""
    port = _free_port()
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "choral.cli", "serve", "--replicas", "2", "--port", str(port), "--api-key", KEY,
         "--model", MODEL, "--kv-cache-tokens", "4096", "--max-model-len", "2048"],
        stdout=log, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            log.seek(0)
            if "Ctrl-C stops" in log.read():
                break
            time.sleep(0.5)
        else:
            log.seek(0)
            pytest.fail(f"choral serve --replicas 2 did not start:\n{log.read()[-3000:]}")
        yield Service(f"http://127.0.0.1:{port}", process)
    finally:
        if process.poll() is None:  # a test failed before the shutdown test: still stop everything
            left = _descendants(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
            for pid in _alive(left):
                os.kill(pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def url(service: Service) -> str:
    return service.url


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


def test_sigterm_stops_serve_and_ray_with_no_process_left(service: Service) -> None:
    started = _descendants(service.process.pid)
    assert len(started) >= 5  # Ray's head processes, the Serve controller and proxy, 3 replicas
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(90) == 0
    deadline = time.monotonic() + 30
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(started), [Path(f"/proc/{p}/cmdline").read_text() for p in _alive(started)]


def test_build_app_validates_before_anything_starts() -> None:
    from ray.serve import Application

    from choral.errors import ConfigError
    from choral.scale.ray_serve import build_app

    assert isinstance(build_app(model=MODEL, replicas=3, routing="pow2", kv_cache_tokens=4096), Application)
    with pytest.raises(ConfigError, match="unknown engine option"):
        build_app(model=MODEL, replicas=2, kv_tokens=4096)
    with pytest.raises(ConfigError, match="num_replicas"):
        build_app(model=MODEL, replicas=0)
