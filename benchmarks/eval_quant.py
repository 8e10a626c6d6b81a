#!/usr/bin/env python
"""Native quantized weights against the same model dequantized to fp32: top-1 agreement of the
next-token logits and perplexity over a few thousand tokens of English text (issue 19's targets:
>= 99% agreement, perplexity within 1%).

The native engine runs with ``max_num_batched_tokens`` = ``--chunk`` (default 32), so every forward
stays in the integer-dot regime that decode steps use (prompt chunks above
``choral.quant.linear.INT8_MAX_TOKENS`` rows run on dequantized panels, which match fp32 to
rounding). The text: docstrings of stdlib modules, which every Python install has.

    python benchmarks/eval_quant.py [--model smollm2-135m-instruct] [--tokens 3000] [--chunk 32]
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

from common import add_model_args, apply_threads

from choral import LLM, SamplingParams

MODULES = ["argparse", "subprocess", "pickle", "heapq", "bisect", "difflib", "shlex", "textwrap", "tarfile",
           "zipfile", "json", "inspect", "typing", "dataclasses", "functools", "collections", "threading"]
WINDOW = 512  # tokens per scored prompt


def scores(llm: LLM, windows: list[list[int]]) -> list[tuple[float, int]]:
    """(log p(actual next token), greedy token) for every position after each window's first."""
    outs = llm.generate(windows, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    result = []
    for window, out in zip(windows, outs, strict=True):
        assert out.prompt_logprobs is not None
        for pos in range(1, len(window)):
            entry = out.prompt_logprobs[pos]  # {token: Logprob}: the actual token and the top-1
            assert entry is not None
            greedy = max(entry, key=lambda token: entry[token].logprob)  # noqa: B023 (used at once)
            result.append((entry[window[pos]].logprob, greedy))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, "smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=32)
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    text = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in MODULES)
    results = {}
    for weights in ("native", "dequantize"):
        options = dict(max_num_batched_tokens=args.chunk) if weights == "native" else dict(dtype="float32")
        llm = LLM(args.model, weights=weights, kv_cache_tokens=4 * WINDOW, max_model_len=WINDOW + 1,
                  num_threads=args.threads, **options)
        assert llm.tokenizer is not None
        ids = llm.tokenizer.encode(text)[: args.tokens]
        windows = [ids[i : i + WINDOW] for i in range(0, len(ids), WINDOW) if len(ids[i : i + WINDOW]) > 1]
        t0 = time.perf_counter()
        results[weights] = scores(llm, windows)
        print(f"{weights}: {len(results[weights])} positions in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        llm.close()
    native, reference = results["native"], results["dequantize"]
    agree = sum(a[1] == b[1] for a, b in zip(native, reference, strict=True)) / len(native)
    ppl = {k: math.exp(-sum(s[0] for s in v) / len(v)) for k, v in results.items()}
    ratio = ppl["native"] / ppl["dequantize"]
    print("| model | positions | top-1 agreement | ppl native | ppl fp32 | ratio |")
    print("|---|---|---|---|---|---|")
    agree_mark = "PASS" if agree >= 0.99 else "FAIL"
    ratio_mark = "PASS" if abs(ratio - 1) < 0.01 else "FAIL"
    print(f"| {args.model} | {len(native)} | {agree:.2%} {agree_mark} (>= 99%) | "
          f"{ppl['native']:.3f} | {ppl['dequantize']:.3f} | {ratio:.4f} {ratio_mark} (within 1%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
