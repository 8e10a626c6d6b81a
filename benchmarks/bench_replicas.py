#!/usr/bin/env python
"""Replicas behind Ray Serve (docs/scale-out.md): throughput of 1 vs 2 replicas, and the prefix
cache's hit rate with 1 replica, 2 with choral's prefix-aware routing and 2 with Serve's
power-of-two-choices router.

One local Ray cluster; each configuration is deployed in turn as the same Serve app, serving the
bundled SmolLM2-135M-Instruct over HTTP. On a machine of C cores, 1 replica gets all C (C engine
threads) and 2 replicas get C/2 each, so the comparison is replicas at equal CPU.

- prefix workload (run first, on a cold cache): ``--groups`` system prompts of 256 random token
  ids, ``--per-group`` requests each (the system prompt + 16 tokens of its own, 4 tokens out),
  sent 4 at a time with the groups interleaved. Hit rate = cached prompt tokens / prompt tokens,
  from the responses' usage. The best possible here: every request but each group's first hits.
- throughput workload: ``--requests`` requests of 128 random prompt ids and 32 output tokens (EOS
  ignored), ``--concurrency`` at a time; output tokens per second, repeated ``--repeats`` times.

    python benchmarks/bench_replicas.py [--groups 4] [--per-group 8] [--requests 32]
        [--concurrency 8] [--repeats 2] [--cpus N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import ray
from ray import serve

from choral.scale.ray_serve import build_app

MODEL = "smollm2-135m-instruct"
PREFIX_TOKENS = 256
TAIL_TOKENS = 16


@dataclass(frozen=True)
class Setup:
    name: str
    replicas: int
    routing: str


SETUPS = (Setup("1 replica", 1, "prefix"), Setup("2 replicas, prefix routing", 2, "prefix"),
          Setup("2 replicas, pow2 routing", 2, "pow2"))


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return dict(r.json())


def prefix_hit_rate(url: str, groups: int, per_group: int, seed: int) -> tuple[float, float]:
    """(hit rate, best possible) of the prefix workload."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 20000) for _ in range(PREFIX_TOKENS)] for _ in range(groups)]
    bodies = [{"prompt": prefixes[g] + [rng.randrange(1000, 20000) for _ in range(TAIL_TOKENS)], "max_tokens": 4}
              for _ in range(per_group) for g in range(groups)]
    with ThreadPoolExecutor(4) as pool:
        usages = [r["usage"] for r in pool.map(lambda b: _post(url, b), bodies)]
    prompt = sum(int(u["prompt_tokens"]) for u in usages)  # type: ignore[index]
    cached = sum(int(u["prompt_tokens_details"]["cached_tokens"]) for u in usages)  # type: ignore[index]
    return cached / prompt, (groups * (per_group - 1) * PREFIX_TOKENS) / prompt


def throughput(url: str, requests: int, concurrency: int, seed: int) -> float:
    """Output tokens per second of the throughput workload."""
    rng = random.Random(seed)
    bodies = [{"prompt": [rng.randrange(1000, 20000) for _ in range(128)], "max_tokens": 32, "ignore_eos": True}
              for _ in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = sum(int(r["usage"]["completion_tokens"]) for r in pool.map(lambda b: _post(url, b), bodies))  # type: ignore[index]
    return out / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--per-group", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads in every replica (default: the load-aware default within its CPUs)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
             object_store_memory=100 * 2**20)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        for setup in SETUPS:
            load_before = os.getloadavg()[0]
            app = build_app(model=MODEL, replicas=setup.replicas, routing=setup.routing,
                            cpus_per_replica=args.cpus / setup.replicas, kv_cache_tokens=8192, max_model_len=2048,
                            num_threads=args.threads)
            serve.run(app, name="bench", route_prefix="/")
            threads = re.findall(r'choral_replica_info\{[^}]*threads="(\d+)"', httpx.get(f"{url}/metrics").text)
            hit, best = prefix_hit_rate(url, args.groups, args.per_group, seed=1)
            speeds = [throughput(url, args.requests, args.concurrency, seed=i) for i in range(args.repeats)]
            rows.append((setup, "+".join(threads), hit, best, speeds, load_before, os.getloadavg()[0]))
            print(f"{setup.name}: hit rate {hit:.3f} (best {best:.3f}), {', '.join(f'{v:.1f}' for v in speeds)} tok/s",
                  flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    base = max(rows[0][4])
    print(f"\n## bench_replicas: {MODEL}, {args.cpus} CPUs shared by the replicas, "
          f"prefix: {args.groups} x {args.per_group} requests ({PREFIX_TOKENS}-token shared prefix), "
          f"throughput: {args.requests} requests (128 in / 32 out), concurrency {args.concurrency}\n")
    print("| setup | engine threads | prefix hit rate | best possible | output tok/s (each run) | vs 1 replica (best) "
          "| load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for setup, threads, hit, best, speeds, before, after in rows:
        print(f"| {setup.name} | {threads} | {hit:.3f} | {best:.3f} | {' / '.join(f'{v:.1f}' for v in speeds)} | "
              f"{max(speeds) / base:.2f}x | {before:.1f} -> {after:.1f} |")


if __name__ == "__main__":
    main()
