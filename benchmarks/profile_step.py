#!/usr/bin/env python
"""Profile decode steps of the engine with torch.profiler: where does a step's time go?

Prefills ``--batch`` random prompts of ``--context`` tokens, then profiles ``--steps`` decode
steps (one forward + greedy sampling each) and prints the wall time per step, the time the
device was busy (CUDA kernels) and the top operators by self time on the host and the device.

    python benchmarks/profile_step.py [--model M] [--device cuda] [--dtype bfloat16]
                                      [--batch 32] [--context 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import sync  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from choral.config import EngineConfig  # noqa: E402
from choral.engine.llm_engine import LLMEngine  # noqa: E402
from choral.engine.model_runner import Chunk  # noqa: E402
from choral.kv.block_pool import blocks_for_tokens  # noqa: E402
from choral.sampling.params import SamplingParams  # noqa: E402
from choral.sampling.sampler import Row  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    args = parser.parse_args(argv)

    total = args.context + 2 * args.steps + 4
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=0,
                                    max_model_len=max(total, 512), kv_cache_tokens=args.batch * (total + 16)))
    runner, pool, sampler = engine.runner, engine.pool, engine.sampler
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, engine.loaded.spec.vocab_size, (args.batch, args.context), generator=gen).tolist()
    tables = [pool.allocate(blocks_for_tokens(total, pool.block_size)) for _ in prompts]
    rows = [Row(SamplingParams(temperature=0.0)) for _ in prompts]
    last = [t for i in range(args.batch) for t in runner.execute([Chunk(prompts[i], 0, tables[i], logits="last")])]
    ids = sampler.sample(torch.cat([t for t in last if t is not None]), rows).token_ids
    length = args.context

    def step() -> None:
        nonlocal ids, length
        chunks = [Chunk([ids[j]], length, tables[j], logits="last") for j in range(args.batch)]
        logits = torch.cat([t for t in runner.execute(chunks) if t is not None])
        ids = sampler.sample(logits, rows).token_ids
        length += 1

    for _ in range(args.steps):  # warm-up: allocator, kernel selection
        step()
    sync(args.device)
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(args.device)
    wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) / args.steps if len(activities) > 1 else 0.0
    print(f"## {args.dtype} on {args.device}, batch {args.batch}, context {args.context}")
    print(f"wall per step (profiled) {wall * 1e3:.2f} ms; device busy {device_us / 1e3:.2f} ms per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if len(activities) > 1:
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    for t in tables:
        pool.free(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
