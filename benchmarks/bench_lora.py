#!/usr/bin/env python
"""Offline throughput with 0, 1, 4 and 16 distinct LoRA adapters mixed in every batch (issue 23).

The bundled SmolLM2-135M-Instruct, the executor benchmark's 128-request workload (seed 0: prompts
of 32-512 random token ids, 32-256 output tokens, EOS ignored, greedy). Adapters are random,
rank 16 over all seven projections, written in PEFT's format; request i uses adapter i mod N, so
every batch mixes all N. One engine (``max_loras`` = 16) runs every configuration in turn, in
the same process, repeated ``--repeats`` times in alternating order; the table gives the best
and the spread, and the ratio against no adapter (target: >= 0.8 with 16 adapters).

    python benchmarks/bench_lora.py [--requests 128] [--min-output 32] [--max-output 256]
        [--repeats 2] [--dtype float32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from bench_executor import fill_prompts, make_lengths, special_ids  # noqa: E402
from common import log, mark  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from choral import SamplingParams  # noqa: E402
from choral.executor import Executor, ExecutorConfig, Request  # noqa: E402
from choral.lora.adapter import MODULES, module_shape  # noqa: E402
from choral.models.spec import ModelSpec  # noqa: E402

COUNTS = (0, 1, 4, 16)
RANK = 16
TARGET = 0.8


def write_adapter(directory: Path, spec: ModelSpec, seed: int) -> None:
    """A random rank-16 PEFT adapter over every projection of every layer."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module in MODULES:
            fan_in, fan_out = module_shape(spec, module)
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=g) * 0.02
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(MODULES),
              "lora_dropout": 0.0, "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def run(ex: Executor, prompts: list[list[int]], outputs: list[int], names: list[str]) -> tuple[float, int]:
    """Wall seconds and output tokens of one pass of the workload over ``names`` (round robin)."""
    requests = [Request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        lora=names[i % len(names)] if names else None)
                for i, (p, n) in enumerate(zip(prompts, outputs, strict=True))]
    t0 = time.monotonic()
    ids = ex.enqueue_many(requests)
    responses = ex.await_responses(ids, timeout=24 * 3600)
    wall = time.monotonic() - t0
    tokens = 0
    for r in responses:
        if r.has_error or r.result is None:
            raise RuntimeError(f"request {r.request_id} failed: {r.error}")
        tokens += len(r.result.output_token_ids)
    return wall, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    work = make_lengths(args.requests, (args.min_prompt, args.max_prompt), (args.min_output, args.max_output), 0)
    kv_tokens = args.max_num_seqs * (args.max_prompt + args.max_output + 16)
    ex = Executor(args.model, ExecutorConfig(max_queue_size=4096), dtype=args.dtype, kv_cache_tokens=kv_tokens,
                  max_model_len=1024, max_num_seqs=args.max_num_seqs, num_threads=args.threads, seed=0,
                  enable_lora=True, max_loras=max(COUNTS), max_lora_rank=RANK)
    spec = ex.engine.loaded.spec
    fill_prompts(work, spec.vocab_size, special_ids(ex), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"adapter{i}" for i in range(max(COUNTS))]
        for i, name in enumerate(names):
            write_adapter(Path(tmp) / name, spec, seed=i)
            ex.engine.core.load_lora(name, str(Path(tmp) / name))
        log("warm-up")
        run(ex, [p[:32] for p in work.prompts[:16]], [4] * 16, names)
        results: dict[int, list[float]] = {n: [] for n in COUNTS}
        for rep in range(args.repeats):
            order = COUNTS if rep % 2 == 0 else tuple(reversed(COUNTS))
            for count in order:
                wall, tokens = run(ex, work.prompts, work.output_lens, names[:count])
                results[count].append(tokens / wall)
                log(f"repeat {rep}: {count:2d} adapters: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s")
    ex.shutdown()
    base = max(results[0])
    print(f"\nLoRA offline throughput: {args.model} {args.dtype}, {args.requests} requests "
          f"(prompts {args.min_prompt}-{args.max_prompt}, outputs {args.min_output}-{args.max_output}), "
          f"rank {RANK} on all projections, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}\n")
    print("| adapters | best tok/s | spread (min-max) | vs no adapter | target |")
    print("|---:|---:|---:|---:|---|")
    for count in COUNTS:
        best = max(results[count])
        ratio = best / base
        target = f">= {TARGET} {mark(ratio >= TARGET)}" if count == max(COUNTS) else ""
        print(f"| {count} | {best:.1f} | {min(results[count]):.1f}-{best:.1f} | {ratio:.2f}x | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
