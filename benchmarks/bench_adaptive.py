#!/usr/bin/env python
"""The ADAPTIVE strategy at work: the same Poisson arrivals under CONTINUOUS and ADAPTIVE.

ADAPTIVE shrinks its sequence cap to 3/4 after a step slower than ``latency_target_ms`` and
grows it by one after a faster step while requests wait (docs/executor.md). Under a load that
fills the batch, CONTINUOUS lets every step grow as long as ``max_num_seqs`` allows, so the time
per output token (TPOT) follows the batch; ADAPTIVE holds decode steps near the target and
leaves the excess waiting (longer TTFT). The table shows both, with the step latencies and the
caps ADAPTIVE chose.

    python benchmarks/bench_adaptive.py [--rate 3] [--requests 120] [--latency-target-ms 100]
        [--dtype float32] [--threads N]

Prompts are 16-64 random token ids and outputs 64-128 tokens (greedy, EOS ignored), so decode
steps dominate: their latency is what the batch size moves.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import add_model_args, apply_threads, device_name, log  # noqa: E402

from choral import SamplingParams  # noqa: E402
from choral.config import EngineConfig  # noqa: E402
from choral.engine.llm_engine import LLMEngine  # noqa: E402
from choral.executor import BatchingStrategy, Executor, ExecutorConfig, Request  # noqa: E402

MODEL = "smollm2-135m-instruct"


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Outcome:
    strategy: str
    ttft: list[float]
    tpot: list[float]
    decode_steps_ms: list[float]  # steps that carried no prompt chunk
    caps: list[int]
    running: list[int]
    output_tokens: int
    span_s: float


def run(engine: LLMEngine, config: ExecutorConfig, name: str, prompts: list[list[int]], outputs: list[int],
        offsets: list[float]) -> Outcome:
    with Executor(engine, config) as ex:
        ex.submit(Request(list(reversed(prompts[0])), SamplingParams(temperature=0, max_tokens=2)))  # warm-up
        ex.get_latest_iteration_stats()
        log(f"{name}: {len(prompts)} requests over ~{offsets[-1]:.0f} s")
        start = time.monotonic()
        ids = []
        for prompt, n, offset in zip(prompts, outputs, offsets, strict=True):
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids.append(ex.submit_async(Request(prompt, SamplingParams(temperature=0, max_tokens=n,
                                                                      ignore_eos=True))))
        done = [ex.poll(rid, timeout=None) for rid in ids]
        time.sleep(0.1)  # the last step's stats are recorded after its responses
        stats = ex.get_latest_iteration_stats()
    ttft, tpot, tokens, first, last = [], [], 0, float("inf"), 0.0
    for c in done:
        assert c is not None
        t = c.timing
        assert t.time_to_first_token is not None and t.latency is not None and t.finished is not None
        n = len(c.token_ids)
        tokens += n
        ttft.append(t.time_to_first_token)
        if n > 1:
            tpot.append((t.latency - t.time_to_first_token) / (n - 1))
        first, last = min(first, t.arrival), max(last, t.finished)
    return Outcome(name, ttft, tpot, [s.step_latency_s * 1e3 for s in stats if s.num_prefill_tokens == 0],
                   [s.seq_cap for s in stats], [s.num_running for s in stats], tokens, last - first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, MODEL)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rate", type=float, default=3.0, help="Poisson arrivals, requests/s (default 3)")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--latency-target-ms", type=float, default=100.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    apply_threads(parser, args)

    rng = random.Random(args.seed)
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=0,
                                    max_model_len=512, max_num_seqs=args.max_num_seqs,
                                    kv_cache_tokens=args.max_num_seqs * 256))
    vocab = engine.loaded.spec.vocab_size
    special = set(engine.eos_token_ids)
    prompts = [[t for t in (rng.randrange(vocab) for _ in range(rng.randint(16, 64))) if t not in special]
               for _ in range(args.requests)]
    outputs = [rng.randint(64, 128) for _ in range(args.requests)]
    offsets, t = [], 0.0
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        offsets.append(t)

    results = [
        run(engine, ExecutorConfig(), "CONTINUOUS", prompts, outputs, offsets),
        run(engine, ExecutorConfig(strategy=BatchingStrategy.ADAPTIVE, latency_target_ms=args.latency_target_ms,
                                   batch_size=8), "ADAPTIVE", prompts, outputs, offsets),
    ]
    print(f"## ADAPTIVE vs CONTINUOUS: {args.requests} requests at {args.rate:g} req/s "
          f"(Poisson, seed {args.seed}), {args.dtype}, {device_name(args.device)}, {args.threads} threads; "
          f"max_num_seqs {args.max_num_seqs}, ADAPTIVE latency_target_ms {args.latency_target_ms:g}\n")
    print("| strategy | decode step p50 / p99 ms | TPOT p50 / p99 ms | TTFT p50 / p99 ms | running mean / max "
          "| seq cap mean / min / max | output tok/s |")
    print("|---|---|---|---|---|---|---:|")
    for r in results:
        print(f"| {r.strategy} | {percentile(r.decode_steps_ms, 50):.0f} / {percentile(r.decode_steps_ms, 99):.0f} "
              f"| {percentile(r.tpot, 50) * 1e3:.0f} / {percentile(r.tpot, 99) * 1e3:.0f} "
              f"| {percentile(r.ttft, 50) * 1e3:.0f} / {percentile(r.ttft, 99) * 1e3:.0f} "
              f"| {sum(r.running) / max(1, len(r.running)):.1f} / {max(r.running, default=0)} "
              f"| {sum(r.caps) / max(1, len(r.caps)):.1f} / {min(r.caps, default=0)} / {max(r.caps, default=0)} "
              f"| {r.output_tokens / r.span_s:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
