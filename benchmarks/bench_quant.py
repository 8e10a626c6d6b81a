#!/usr/bin/env python
"""Native quantized weights (issue 19) against llama.cpp on the same GGUF, same threads, same run.

Measures, for ``--model`` (default: the bundled Q4_1 SmolLM2) with ``weights="native"``:

- the machine's read bandwidth and the decode floor: packed weight bytes / bandwidth;
- batch-1 decode tok/s at a context of ~256 tokens, and 512-token prefill tok/s, against
  ``llama-bench`` (``-p 512``, ``-n 64 -d 256``);
- offline throughput of bench_executor.py's 128-request workload (prompts 32-512 random ids,
  outputs 32-256, EOS ignored, greedy) against ``llama-server -np 16 -kvu`` fed the same token ids;
- resident memory after load: choral's RSS growth from loading (weights, tokenizer; no KV cache)
  against llama-server's RSS minus the KV cache it allocated (``-c`` tokens x its KV bytes/token);
- with ``--kernels``: the projection kernels per batch size (integer dots vs dequantized panels).

llama.cpp's tools come from ``--llama-bin`` (a directory with llama-bench and llama-server, e.g. the
one the peers' build script prints) or $LLAMA_CPP_BIN; without them only choral's side runs.

    python benchmarks/bench_quant.py [--model smollm2-135m-instruct] [--threads 2] [--llama-bin DIR]
        [--requests 128] [--repeats 3] [--kernels] [--no-offline]

The machines are shared: the script prints ``uptime`` before and after; compare A/B within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from common import add_model_args, apply_threads, cpu_name, log, mark
from limits import read_bandwidth_gbs

from choral import LLM, SamplingParams
from choral.loader.load import load_model
from choral.loader.resolve import resolve_model_path

TARGET_DECODE = 1.0  # batch-1 decode >= llama.cpp
TARGET_OFFLINE = 2.0  # offline throughput >= 2x llama-server
TARGET_MEMORY = 1.2  # resident memory <= llama.cpp + 20%


def uptime() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def rss_mib(pid: int | None = None) -> float:
    path = f"/proc/{pid or 'self'}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- choral ---------------------------------------------------------------------------------

def choral_memory(model: str) -> dict[str, float]:
    """RSS growth from loading the model (no KV cache), and the packed weight bytes."""
    import gc

    gc.collect()
    before = rss_mib()
    loaded = load_model(model, "auto", "cpu", None, "native")
    gc.collect()
    after = rss_mib()
    out = {"rss_before_mib": before, "rss_delta_mib": after - before,
           "weight_mib": loaded.model.weight_bytes / 2**20}
    del loaded
    gc.collect()
    return out


def choral_speed(model: str, threads: int, repeats: int) -> dict[str, Any]:
    llm = LLM(model, weights="native", num_threads=threads, kv_cache_tokens=4096, max_model_len=2048)
    vocab = llm.engine.loaded.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 100, (512,), generator=gen).tolist()

    def timed(prompt: list[int], n: int) -> float:
        t0 = time.perf_counter()
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - t0

    timed(ids[:64], 4)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        prefill.append(512 / timed(ids, 1))
        t_short, t_long = timed(ids[:256], 1), timed(ids[:256], 65)
        decode.append(64 / (t_long - t_short))
    llm.close()
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


def choral_offline(model: str, threads: int, requests: int) -> dict[str, Any]:
    from bench_executor import fill_prompts, make_lengths

    from choral.executor import Executor, ExecutorConfig, Request

    work = make_lengths(requests, (32, 512), (32, 256), seed=0)
    ex = Executor(model, ExecutorConfig(max_queue_size=4096), weights="native", num_threads=threads,
                  kv_cache_tokens=64 * 784, max_model_len=1024, max_num_seqs=64)
    fill_prompts(work, ex.engine.loaded.spec.vocab_size, set(ex.engine.eos_token_ids) | set(range(17)), seed=0)
    ex.submit(Request(list(range(100, 164)), SamplingParams(temperature=0, max_tokens=4)), timeout=600)
    reqs = [Request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(work.prompts, work.output_lens, strict=True)]
    t0 = time.perf_counter()
    responses = ex.await_responses(ex.enqueue_many(reqs), timeout=24 * 3600)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.result.output_token_ids) for r in responses if r.result is not None)
    ex.shutdown()
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "work": work}


# ---- llama.cpp -------------------------------------------------------------------------------

def llama_bench(binary: Path, gguf: Path, threads: int, repeats: int) -> dict[str, float]:
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "64", "-d", "256",
           "-r", str(repeats), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:  # older llama-bench without -d: no context depth
        cmd = [c for c in cmd if c not in ("-d", "256")]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
    rows = json.loads(out.stdout)
    res = {}
    for row in rows:
        key = "prefill_tok_s" if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0 else "decode_tok_s"
        res[key] = float(row["avg_ts"])
    return res


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=24 * 3600) as r:
        return dict(json.loads(r.read()))


def llama_server(binary: Path, gguf: Path, threads: int, work: Any, port: int = 8797,
                 ctx: int = 16384) -> dict[str, Any]:
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-np", "16", "-c", str(ctx), "-cb", "--no-webui", "-kvu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        rss = rss_mib(proc.pid)
        url = f"http://127.0.0.1:{port}/completion"

        def one(i: int) -> int:
            body = {"prompt": work.prompts[i], "n_predict": work.output_lens[i], "ignore_eos": True,
                    "temperature": 0, "cache_prompt": False}
            return int(_post(url, body).get("tokens_predicted", 0))

        one(0)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=32) as pool:
            tokens = sum(pool.map(one, range(len(work.prompts))))
        wall = time.perf_counter() - t0
        return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "rss_mib": rss, "ctx": ctx}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- kernels ---------------------------------------------------------------------------------

def kernel_table(model: str) -> list[str]:
    """Per batch size, one layer's projections: integer dots vs dequantized panels + fp32 GEMM."""
    from choral.quant import linear

    loaded = load_model(model, "auto", "cpu", None, "native")
    layer = loaded.model.layers[0]
    projections = [layer.qkv, layer.o, layer.gate_up, layer.down]
    lines = ["| T | integer dots (ms) | dequantized panels (ms) |", "|---|---|---|"]
    saved = linear.INT8_MAX_TOKENS
    try:
        for t in (1, 8, 16, 32, 48, 64, 128, 256):
            times = {}
            for mode, limit in (("int8", 1 << 30), ("panels", 0)):
                linear.INT8_MAX_TOKENS = limit
                xs = [torch.randn(t, p.in_features) for p in projections]
                best = float("inf")
                for _ in range(5):
                    t0 = time.perf_counter()
                    for p, x in zip(projections, xs, strict=True):
                        p(x)
                    best = min(best, time.perf_counter() - t0)
                times[mode] = best * 1e3
            lines.append(f"| {t} | {times['int8']:.2f} | {times['panels']:.2f} |")
    finally:
        linear.INT8_MAX_TOKENS = saved
    return lines


# ---- main ------------------------------------------------------------------------------------

def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, "smollm2-135m-instruct")
    parser.add_argument("--llama-bin", default=os.environ.get("LLAMA_CPP_BIN"),
                        help="directory with llama-bench and llama-server")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", action="store_true", help="also time the projection regimes")
    parser.add_argument("--no-offline", action="store_true", help="skip the 128-request workload")
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    gguf = resolve_model_path(args.model)
    bin_dir = Path(args.llama_bin) if args.llama_bin else None
    have_llama = bin_dir is not None and (bin_dir / "llama-bench").exists() and (bin_dir / "llama-server").exists()
    load_before = uptime()
    log(f"load average before: {load_before}")

    bandwidth = read_bandwidth_gbs()
    mem = choral_memory(args.model)
    floor_ms = mem["weight_mib"] * 2**20 / (bandwidth * 1e9) * 1e3
    speed = choral_speed(args.model, args.threads, args.repeats)
    ref = llama_bench(bin_dir / "llama-bench", gguf, args.threads, args.repeats) if have_llama else {}
    offline = None if args.no_offline else choral_offline(args.model, args.threads, args.requests)
    server = (llama_server(bin_dir / "llama-server", gguf, args.threads, offline["work"])
              if have_llama and offline is not None else None)

    spec = load_model(args.model, "auto", "cpu", None, "native").spec
    kv_bytes_token = 2 * spec.num_layers * spec.kv_size * 2  # llama.cpp's default f16 K and V
    print(f"## bench_quant: {args.model} ({gguf.name}), native weights, {args.threads} threads, {cpu_name()}")
    print(f"load average before {load_before}, after {uptime()}\n")
    print(f"read bandwidth {bandwidth:.1f} GB/s; packed weights {mem['weight_mib']:.1f} MiB "
          f"(GGUF file {gguf.stat().st_size / 2**20:.1f} MiB): decode floor {floor_ms:.2f} ms/token "
          f"= {1e3 / floor_ms:.0f} tok/s\n")
    print("| measurement | choral (median, range) | llama.cpp | ratio | target |")
    print("|---|---|---|---|---|")
    dec = statistics.median(speed["decode_tok_s"])
    for name, mine, theirs, target in (("batch-1 decode tok/s (ctx 256)", speed["decode_tok_s"],
                                        ref.get("decode_tok_s"), TARGET_DECODE),
                                       ("prefill 512 tok/s", speed["prefill_tok_s"], ref.get("prefill_tok_s"), None)):
        value = statistics.median(mine)
        ratio = f"{value / theirs:.2f}x" if theirs else "-"
        verdict = f">= {target}x {mark(value / theirs >= target)}" if theirs and target else "-"
        print(f"| {name} | {spread(mine)} | {f'{theirs:.1f}' if theirs else 'not run'} | {ratio} | {verdict} |")
    print(f"| decode vs its bandwidth floor | {dec:.1f} of {1e3 / floor_ms:.0f} tok/s "
          f"({dec * floor_ms / 1e3:.0%}) | | | |")
    if offline is not None:
        theirs = server["tok_s"] if server else None
        ratio = f"{offline['tok_s'] / theirs:.2f}x" if theirs else "-"
        verdict = f">= {TARGET_OFFLINE}x {mark(offline['tok_s'] / theirs >= TARGET_OFFLINE)}" if theirs else "-"
        print(f"| offline {args.requests} requests, output tok/s | {offline['tok_s']:.1f} "
              f"({offline['tokens']} tok in {offline['wall_s']:.1f} s) | "
              f"{f'{theirs:.1f}' if theirs else 'not run'} | {ratio} | {verdict} |")
    if server is not None:
        kv_mib = server["ctx"] * kv_bytes_token / 2**20
        theirs_mem = server["rss_mib"] - kv_mib
        ratio = mem["rss_delta_mib"] / theirs_mem
        print(f"| resident memory after load, MiB (KV excluded) | {mem['rss_delta_mib']:.1f} | "
              f"{theirs_mem:.1f} (RSS {server['rss_mib']:.1f} - KV {kv_mib:.1f}) | {ratio:.2f}x | "
              f"<= {TARGET_MEMORY}x {mark(ratio <= TARGET_MEMORY)} |")
    else:
        print(f"| resident memory after load, MiB | {mem['rss_delta_mib']:.1f} | not run | - | - |")
    print(f"\n(choral's process RSS before loading, torch and choral imported: {mem['rss_before_mib']:.0f} MiB)")
    if args.kernels:
        print("\n### one layer's projections per batch size (best of 5)\n")
        print("\n".join(kernel_table(args.model)))
    if not have_llama:
        print("\nllama.cpp not run: pass --llama-bin (the peers' build_llama_cpp.sh prints it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
