"""Tensor parallelism on one host: step times TP=1 vs TP=2, the all-reduce's share, gloo vs shm.

Three tables, all measured in the same run (the machine is shared: compare within a table):

1. All-reduce alone, two processes: gloo (loopback TCP) against the shared-memory all-reduce
   (choral/distributed/shm_all_reduce.py), for the sizes a step sends: [T, hidden] fp32 with T
   tokens in the step. Median microseconds per call and the p10-p90 spread, alternated over
   ``--repeats`` rounds.
2. Engine steps on the bundled model: a batch-8 decode step (context ~128) and a 128-token
   prefill chunk, TP=1 against TP=2 (and TP=2 with CHORAL_TP_ALLREDUCE=shm), configurations
   alternated. Medians in ms and the spread over the repeats.
3. Where a TP=2 step goes on rank 0: time inside the all-reduce calls (2 per layer: the transfer
   plus waiting for the other rank to get there) as a share of the step.

    python benchmarks/bench_tp.py [--repeats 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN = 576  # SmolLM2-135M's hidden size: what each all-reduce carries per token
TOKENS = (1, 8, 32, 128, 512)


# ---- 1. all-reduce alone ------------------------------------------------------------------------------
def _peer(rank: int, port: int, path: str, slot_bytes: int, iters: int, rounds: int) -> None:
    _all_reduce_loop(rank, port, path, slot_bytes, iters, rounds)


def _all_reduce_loop(rank: int, port: int, path: str, slot_bytes: int, iters: int,
                     rounds: int) -> dict[tuple[str, int], list[float]]:
    import torch.distributed as dist

    from choral.distributed.group import CommGroup
    from choral.distributed.shm_all_reduce import ShmAllReduce

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, rank == 0, datetime.timedelta(seconds=120))
    gloo = CommGroup(store, rank, 2, torch.device("cpu"), 120.0)
    shm = ShmAllReduce(path, rank, 2, slot_bytes)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for tokens in TOKENS:
            t = torch.randn(tokens, HIDDEN)
            for name, fn in (("gloo", gloo.all_reduce), ("shm", shm.all_reduce)):
                fn(t)  # warm-up, and both ranks in step
                per = []
                for _ in range(iters):
                    start = time.perf_counter()
                    fn(t)
                    per.append(time.perf_counter() - start)
                times.setdefault((name, tokens), []).extend(per)
    shm.close()
    return times


def bench_all_reduce(iters: int, rounds: int) -> None:
    from choral.distributed.shm_all_reduce import create_segment

    slot_bytes = max(TOKENS) * HIDDEN * 4
    path = create_segment(2, slot_bytes)
    import socket

    with socket.socket() as s:  # a free port for the store (the peer connects to it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    peer = ctx.Process(target=_peer, args=(1, port, path, slot_bytes, iters, rounds), daemon=True)
    peer.start()
    try:
        times = _all_reduce_loop(0, port, path, slot_bytes, iters, rounds)
    finally:
        peer.join(60)
        os.unlink(path)
    print(f"\n## all-reduce of [T, {HIDDEN}] fp32 between 2 processes ({iters} calls x {rounds} rounds; "
          "median us, p10-p90)")
    print(f"| {'T':>4} | {'KiB':>6} | {'gloo':>18} | {'shm':>18} | {'gloo / shm':>10} |")
    print(f"|{'-' * 6}|{'-' * 8}|{'-' * 20}|{'-' * 20}|{'-' * 12}|")
    for tokens in TOKENS:
        cells = []
        medians = []
        for name in ("gloo", "shm"):
            xs = sorted(x * 1e6 for x in times[(name, tokens)])
            med = statistics.median(xs)
            medians.append(med)
            cells.append(f"{med:7.1f} ({xs[len(xs) // 10]:.0f}-{xs[len(xs) * 9 // 10]:.0f})")
        print(f"| {tokens:>4} | {tokens * HIDDEN * 4 / 1024:>6.1f} | {cells[0]:>18} | {cells[1]:>18} | "
              f"{medians[0] / medians[1]:>9.1f}x |")


# ---- 2 + 3. engine steps ----------------------------------------------------------------------------------
class _Timed:
    """Wraps the model's all_reduce: total seconds spent inside it."""

    def __init__(self, fn):  # type: ignore[no-untyped-def]
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, t: torch.Tensor) -> None:
        start = time.perf_counter()
        self.fn(t)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def _engine(tp: int, allreduce: str, threads: int):  # type: ignore[no-untyped-def]
    from choral.config import EngineConfig
    from choral.engine.llm_engine import LLMEngine

    os.environ["CHORAL_TP_ALLREDUCE"] = allreduce
    return LLMEngine(EngineConfig(model="smollm2-135m-instruct", dtype="float32", weights="dequantize",
                                  kv_cache_tokens=4096, max_model_len=1024, num_threads=threads,
                                  tensor_parallel_size=tp))


def _steps(engine, steps: int) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Median seconds per step and the all-reduce share, for a decode batch and a prefill chunk."""
    from choral.engine.model_runner import Chunk

    runner = engine.runner
    timed = None
    if runner.model.all_reduce is not None:
        timed = _Timed(runner.model.all_reduce)
        runner.model.all_reduce = timed
    context = 128
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(8)]
    prompt = [(7 * j) % 4000 + 10 for j in range(context)]
    runner.execute([Chunk(prompt, 0, t, logits="none") for t in tables])  # fill 8 contexts
    out = {}
    shapes = {"decode x8": [Chunk([42], context, t) for t in tables],
              "prefill 128": [Chunk(prompt, 0, list(range(100, 110)))]}
    for name, chunks in shapes.items():
        runner.execute(chunks)
        per = []
        reduce_share = []
        for _ in range(steps):
            before = timed.seconds if timed else 0.0
            start = time.perf_counter()
            runner.execute(chunks)
            elapsed = time.perf_counter() - start
            per.append(elapsed)
            if timed:
                reduce_share.append((timed.seconds - before) / elapsed)
        out[name] = (statistics.median(per), statistics.median(reduce_share) if reduce_share else 0.0)
    return out


def bench_steps(steps: int, repeats: int) -> None:
    cores = os.cpu_count() or 2
    # TP=1 on every core, and on one core per rank's share (the same threads per process as TP=2).
    configs = [("TP=1", 1, "gloo", cores), (f"TP=1 {cores // 2}t", 1, "gloo", max(1, cores // 2)),
               ("TP=2 gloo", 2, "gloo", max(1, cores // 2)), ("TP=2 shm", 2, "shm", max(1, cores // 2))]
    engines = {label: _engine(tp, ar, threads) for label, tp, ar, threads in configs}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for _ in range(repeats):  # alternate the configurations: a busy moment hits all of them
            for label in engines:
                for shape, value in _steps(engines[label], steps).items():
                    results.setdefault((label, shape), []).append(value)
    finally:
        for engine in engines.values():
            engine.close()
    print(f"\n## engine steps on SmolLM2-135M fp32 (median of {steps} steps, best-worst over {repeats} repeats; "
          f"threads: {cores} at TP=1, {max(1, cores // 2)} at 'TP=1 {max(1, cores // 2)}t' and per rank at TP=2)")
    print(f"| {'config':<10} | {'shape':<11} | {'ms / step':>18} | {'vs TP=1':>7} | {'in all-reduce':>13} |")
    print(f"|{'-' * 12}|{'-' * 13}|{'-' * 20}|{'-' * 9}|{'-' * 15}|")
    for shape in ("decode x8", "prefill 128"):
        base = statistics.median(v[0] for v in results[("TP=1", shape)])
        for label, _, _, _ in configs:
            values = results[(label, shape)]
            ms = sorted(v[0] * 1e3 for v in values)
            share = statistics.median(v[1] for v in values)
            cell = f"{statistics.median(ms):7.1f} ({ms[0]:.0f}-{ms[-1]:.0f})"
            print(f"| {label:<10} | {shape:<11} | {cell:>18} | {statistics.median(ms) / 1e3 / base:>6.2f}x | "
                  f"{share * 100:>12.0f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--iters", type=int, default=200, help="all-reduce calls per size per round")
    parser.add_argument("--skip-engine", action="store_true", help="only the all-reduce table")
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min), {os.cpu_count()} CPUs")
    bench_all_reduce(args.iters, args.repeats)
    if not args.skip_engine:
        bench_steps(args.steps, args.repeats)
    print(f"\nload after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
