#!/usr/bin/env python
"""Speculative decoding (n-gram prompt lookup and a draft model) against plain decoding, in the same run.

Two workloads on the bundled SmolLM2-135M-Instruct, greedy, chat-templated prompts:

- editing: "correct / repeat this passage" prompts whose answers largely repeat a passage of the
  prompt: n-gram proposals are accepted in runs (target: >= 2x output tok/s at batch 1, >= 1.3x
  at batch 16);
- fresh: open questions, whose answers repeat little: adaptive proposal lengths must keep
  speculation from costing more than a few percent (target: >= 0.95x).

Each (workload, batch) runs plain, n-gram and draft back to back, ``--repeats`` times, alternating
the order; the draft model is by default a quantized copy of the target (the same GGUF, its
weights run natively, next to a target whose weights are dequantized to fp32). The table shows
the median output tok/s of each, the ratio (with its spread over repeats), the acceptance rate,
the mean accepted length per verification, and whether the greedy outputs were identical.
Batch 1 runs the requests one after another; batch 16 submits 16 at once.

    python benchmarks/bench_speculative.py [--threads 2] [--repeats 3] [--max-tokens 160]
        [--methods ngram,draft] [--draft-model PATH --draft-weights native]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import add_model_args, apply_threads, device_name, log  # noqa: E402

from choral import SamplingParams  # noqa: E402
from choral.config import EngineConfig  # noqa: E402
from choral.engine.llm_engine import LLMEngine  # noqa: E402
from choral.executor import Executor, ExecutorConfig, Request  # noqa: E402
from choral.speculative import SpeculativeConfig  # noqa: E402

MODEL = "smollm2-135m-instruct"

PASSAGES = [
    "The lighthouse stood on a narrow spit of rock at the edge of the bay. Every evening the keeper "
    "climbed the one hundred and twelve steps to light the lamp, and every morning he climbed them "
    "again to put it out. Ships passing in the night saw the beam sweep across the water and knew "
    "that the rocks were near.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon "
    "dioxide into sugar and oxygen. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts, which contain the green pigment chlorophyll. The sugar feeds the plant "
    "and the oxygen is released into the air.",
    "To make a simple bread, mix flour, water, salt and yeast in a large bowl until a soft dough "
    "forms. Knead the dough for ten minutes, then leave it covered in a warm place for one hour "
    "until it doubles in size. Shape it into a loaf and bake it in a hot oven for about thirty "
    "minutes.",
    "The city council met on Tuesday to discuss the new park. Residents asked for more trees, a "
    "playground for young children and a quiet area with benches. The council agreed to publish a "
    "plan next month and to hold a public meeting before any work begins.",
]
TASKS = [
    "Repeat the following passage exactly, word for word:\n\n{}",
    "Copy this text back to me without changing anything:\n\n{}",
    "Rewrite the following passage, keeping every sentence as it is:\n\n{}",
    "Here is a paragraph. Write it out again in full:\n\n{}",
]
QUESTIONS = [
    "Why is the sky blue?", "Write a short story about a dragon who is afraid of fire.",
    "What are three tips for learning a new language?", "Explain how a bicycle works.",
    "What would happen if the moon disappeared?", "Describe your ideal weekend.",
    "How do bees make honey?", "Give me some ideas for a birthday party.",
    "What is the difference between weather and climate?", "Write a poem about the ocean.",
    "How can I sleep better at night?", "Explain what a computer virus is.",
    "What makes a good friend?", "Describe a walk through a forest in autumn.",
    "Why do cats purr?", "What should I pack for a camping trip?",
]


def workload(name: str) -> list[str]:
    if name == "editing":
        return [TASKS[i // len(PASSAGES)].format(PASSAGES[i % len(PASSAGES)]) for i in range(16)]
    return list(QUESTIONS)


@dataclass
class Run:
    tok_s: float  # output tokens per wall-clock second
    tok_cpu_s: float  # per second of this process's CPU time: less moved by other load on a shared machine
    outputs: list[list[int]]
    proposed: int
    accepted: int
    verifications: int


def run(engine: LLMEngine, prompts: list[str], batch: int, spec: SpeculativeConfig | None, max_tokens: int) -> Run:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    with Executor(engine, ExecutorConfig(speculative=spec)) as ex:
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs: list[list[int]] = []
        for i in range(0, len(prompts), batch):
            ids = ex.submit_many([Request([{"role": "user", "content": p}], params) for p in prompts[i : i + batch]])
            for rid in ids:
                done = ex.poll(rid, timeout=None)
                assert done is not None
                outputs.append(done.token_ids)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        sp = ex.stepper.speculator
        tokens = sum(map(len, outputs))
        return Run(tokens / elapsed, tokens / cpu, outputs, sp.num_proposed, sp.num_accepted, sp.num_verifications)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, MODEL)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--weights", default="auto,dequantize",
                        help="comma-separated EngineConfig.weights to run (default: auto,dequantize: the "
                             "GGUF's native quantized kernels, then the same weights as fp32)")
    parser.add_argument("--methods", default="ngram,draft",
                        help="speculation methods measured against plain decoding (default: ngram,draft)")
    parser.add_argument("--draft-model", default=None,
                        help="draft model (default: the model itself, its quantized weights run natively: "
                             "a quantized copy of the target)")
    parser.add_argument("--draft-weights", default="native")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--k", type=int, default=4, help="most tokens proposed per step (default 4)")
    parser.add_argument("--batch-1-prompts", type=int, default=4, help="requests run one by one at batch 1")
    parser.add_argument("--workloads", default="editing,fresh")
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 2
    apply_threads(parser, args)
    methods = {"ngram": SpeculativeConfig(k=args.k), "draft": SpeculativeConfig(method="draft", k=args.k)}
    chosen = {m: methods[m] for m in args.methods.split(",") if m}
    for weights in args.weights.split(","):
        draft = args.draft_model or args.model
        if "draft" in chosen and draft == args.model and args.draft_weights == weights:
            log(f"weights={weights}: the draft would be the target itself; draft skipped")
            specs = {m: c for m, c in chosen.items() if m != "draft"}
        else:
            specs = chosen
        engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, seed=0,
                                        weights=weights, draft_model=draft if "draft" in specs else None,
                                        draft_weights=args.draft_weights))
        bench(engine, weights, specs, args)


def bench(engine: LLMEngine, weights: str, specs: dict[str, SpeculativeConfig], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    draft = engine.core.draft
    print(f"\n## Speculative decoding: {args.model}, weights={weights} ({engine.loaded.model.dtype}), "
          f"{device_name(args.device)}, {args.threads} threads, greedy, max_tokens {args.max_tokens}, k={args.k}, "
          f"adaptive; n-gram n=2..4"
          + (f"; draft {draft.name} (weights={args.draft_weights}, p_min 0.75)" if draft else "")
          + f"; load average at start {load[0]:.2f}\n")
    print("| workload | batch | method | plain tok/s | method tok/s | ratio (min..max) | ratio per CPU-s (min..max) | "
          "acceptance | mean accepted length | identical outputs | target (wall ratio) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        prompts_all = workload(name)
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = prompts_all[: args.batch_1_prompts] if batch == 1 else prompts_all[:batch]
            for spec in specs.values():
                run(engine, prompts[:1], batch, spec, 8)  # warm-up (kernels, caches)
            runs: dict[str, list[Run]] = {"plain": [], **{m: [] for m in specs}}
            order: list[tuple[str, SpeculativeConfig | None]] = [("plain", None), *specs.items()]
            for r in range(args.repeats):
                for method, cfg in (order if r % 2 == 0 else order[::-1]):
                    runs[method].append(run(engine, prompts, batch, cfg, args.max_tokens))
                log(f"{name} batch {batch} repeat {r + 1}: "
                    + ", ".join(f"{m} {v[-1].tok_s:.1f} tok/s" for m, v in runs.items()))
            plain = runs["plain"]
            for method in specs:
                got = runs[method]
                ratios = [n.tok_s / p.tok_s for p, n in zip(plain, got, strict=True)]
                cpu_ratios = [n.tok_cpu_s / p.tok_cpu_s for p, n in zip(plain, got, strict=True)]
                proposed = sum(n.proposed for n in got)
                accepted = sum(n.accepted for n in got)
                verifications = sum(n.verifications for n in got)
                same = all(n.outputs == plain[0].outputs for n in got)
                target = (2.0 if batch == 1 else 1.3) if name == "editing" else 0.95
                ratio = statistics.median(ratios)
                print(f"| {name} | {batch} | {method} | {statistics.median(p.tok_s for p in plain):.1f} | "
                      f"{statistics.median(n.tok_s for n in got):.1f} | "
                      f"{ratio:.2f}x ({min(ratios):.2f}..{max(ratios):.2f}) | "
                      f"{statistics.median(cpu_ratios):.2f}x ({min(cpu_ratios):.2f}..{max(cpu_ratios):.2f}) | "
                      f"{accepted / proposed if proposed else 0:.2f} | "
                      f"{accepted / verifications if verifications else 0:.2f} | {'yes' if same else 'NO'} | "
                      f">= {target}x {'PASS' if ratio >= target else 'FAIL'} |", flush=True)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
