"""Decode speed by thread setting on a CPU whose cores other processes also want.

Each setting runs in a fresh process (libgomp reads OMP_WAIT_POLICY / GOMP_SPINCOUNT once, when
torch loads it): SmolLM2 greedy decode, batch 1, tokens per second. With ``--busy N``, N busy-loop
processes compete for the cores during every run (the machine's own load adds to them). Settings
are interleaved and repeated, and the table shows the median and spread of each.

    python benchmarks/bench_threads.py --busy 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "threads=1": ({}, ["1"]),
    "threads=2": ({}, ["2"]),
    "threads=2 OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["2"]),
    "threads=2 GOMP_SPINCOUNT=10000": ({"GOMP_SPINCOUNT": "10000"}, ["2"]),
    "choral default (load-aware)": ({}, ["auto"]),
}

CHILD = """
import json, sys, time
from choral import LLM, SamplingParams
threads = None if sys.argv[1] == "auto" else int(sys.argv[1])
llm = LLM("smollm2-135m-instruct", dtype="float32", kv_cache_tokens=1024, max_model_len=512, num_threads=threads)
params = SamplingParams(temperature=0, max_tokens=int(sys.argv[2]), ignore_eos=True)
llm.generate(["warm up"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
start = time.perf_counter()
out = llm.generate(["Tell me a story about a lighthouse."], params, use_tqdm=False)
elapsed = time.perf_counter() - start
import torch
print(json.dumps({"tok_s": len(out[0].outputs[0].token_ids) / elapsed, "threads": torch.get_num_threads()}))
"""


def busy() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes competing (default: 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.busy)]
    for h in hogs:
        h.start()
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    chosen: dict[str, int] = {}
    load_before = os.getloadavg()[0]
    try:
        for _ in range(args.repeats):
            for name, (env, argv) in SETTINGS.items():
                out = subprocess.run([sys.executable, "-c", CHILD, *argv, str(args.tokens)], capture_output=True,
                                     text=True, env={**os.environ, **env}, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[name].append(row["tok_s"])
                chosen[name] = row["threads"]
    finally:
        for h in hogs:
            h.terminate()
    print(f"cores {os.cpu_count()}, busy loops {args.busy}, load average at start {load_before:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}; {time.strftime('%H:%M:%S')}")
    print(f"{'setting':40s} {'threads':>7s} {'tok/s median':>12s} {'min':>7s} {'max':>7s}")
    for name, values in results.items():
        print(f"{name:40s} {chosen[name]:7d} {statistics.median(values):12.1f} {min(values):7.1f} {max(values):7.1f}")


if __name__ == "__main__":
    main()
