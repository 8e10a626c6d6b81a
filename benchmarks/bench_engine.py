#!/usr/bin/env python
"""Benchmark choral's forward on the bundled SmolLM2-135M-Instruct (GGUF), fp32 and bf16.

Measures, in one run:

- decode at batch 1, 8 and 32 with a context of ~256 tokens (one batched forward of one token
  per sequence plus greedy sampling per step), through ``ModelRunner.execute`` and ``Sampler``;
- prefill of one 512-token prompt (logits for the last token only);
- the machine's limits: fp32/bf16 matmul GFLOP/s and read bandwidth GB/s, from which a
  roofline floor per step is computed;
- HF transformers on the same weights and the same token ids, for a speed ratio.

Prints a markdown table (see benchmarks/README.md for the columns). Progress goes to stderr.

    python benchmarks/bench_engine.py [--dtypes float32,bfloat16] [--steps 32] [--no-hf]
                                      [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar

import torch  # noqa: E402
from common import add_model_args, apply_threads, device_name, load_hf, log, mark, sync  # noqa: E402
from limits import floor_gflops, matmul_rates, matmul_size, model_cost, read_bandwidth_gbs  # noqa: E402

from choral.config import EngineConfig  # noqa: E402
from choral.engine.llm_engine import LLMEngine  # noqa: E402
from choral.engine.model_runner import Chunk  # noqa: E402
from choral.kv.block_pool import blocks_for_tokens  # noqa: E402
from choral.loader.resolve import resolve_model_path  # noqa: E402
from choral.sampling.params import SamplingParams  # noqa: E402
from choral.sampling.sampler import Row as SampleRow  # noqa: E402

MODEL = "smollm2-135m-instruct"
CONTEXT = 256  # prompt tokens per sequence before the decode steps
PREFILL_LEN = 512
BLOCK_SIZE = 16  # KV block size (EngineConfig's default)
DECODE_BATCHES = (1, 8, 32)
DECODE_WARMUP = 2  # untimed decode steps after the prefill
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}

# Targets.
DECODE_FLOOR_TARGET = 2.0  # batch-32 decode within 2x of the roofline floor
SAMPLER_SHARE_TARGET = 10.0  # % of a batch-32 decode step spent in the sampler
# The heavy-knob decode case: every row samples with these, seeded per row.
HEAVY = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
             presence_penalty=0.5, frequency_penalty=0.5)
PREFILL_BF16_TARGET = 3000.0  # tok/s


# ---- machine limits -----------------------------------------------------------------------

def median_time(fn, reps: int, warmup: int = 1, device: str | torch.device = "cpu") -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- choral -------------------------------------------------------------------------------

@dataclass
class Row:
    dtype: str
    case: str  # "decode" | "prefill"
    batch: int
    context: float  # mean keys per query token during the timed steps (prefill: the prompt length)
    steps: int  # decode steps timed, or prefill runs
    ms: float  # ms per decode step (mean over the timed steps) or per prefill (median)
    tok_s: float
    sampler_ms: float | None = None  # decode: sampler's ms per step (included in ms)
    knobs: str = "greedy"  # decode: "greedy", or "heavy" (top-k/top-p/min-p + penalties, seeded)
    floor: dict[str, float] = field(default_factory=dict)
    hf_ms: float | None = None
    hf_tok_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def x_floor(self) -> float:
        return self.ms / self.floor["floor_ms"] if self.floor else float("nan")

    @property
    def vs_hf(self) -> float | None:
        return self.tok_s / self.hf_tok_s if self.hf_tok_s else None


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def choral_decode(engine: LLMEngine, prompts: torch.Tensor, steps: int,
                  heavy: bool = False) -> tuple[list[float], float, list[int]]:
    """Prefill ``prompts`` [B, CONTEXT] (untimed), then time ``steps`` decode steps. ``heavy``
    samples every row with the HEAVY knobs (penalties read each row's whole token history).

    Returns (seconds of each timed step, sampler seconds in all, sequence 0's tokens)."""
    runner, pool, sampler = engine.runner, engine.pool, engine.sampler
    batch, ctx = prompts.shape
    total_tokens = ctx + DECODE_WARMUP + steps  # the prompt, then each step's input token
    tables = [pool.allocate(blocks_for_tokens(total_tokens, pool.block_size)) for _ in range(batch)]
    rows = prompts.tolist()
    if heavy:
        sample_rows = [SampleRow(SamplingParams(**HEAVY, seed=j), list(rows[j]), ctx,  # type: ignore[arg-type]
                                 torch.Generator(device=runner.device).manual_seed(j)) for j in range(batch)]
    else:
        sample_rows = [SampleRow(SamplingParams(temperature=0.0)) for _ in range(batch)]

    def sample(logits: torch.Tensor) -> list[int]:
        ids = sampler.sample(logits, sample_rows).token_ids
        if heavy:
            for r, t in zip(sample_rows, ids, strict=True):
                r.token_ids.append(t)
        return ids
    try:
        # Prefill in forwards of at most max_num_batched_tokens tokens, like the scheduler would.
        per_fwd = max(1, engine.config.max_num_batched_tokens // ctx)
        last: list[torch.Tensor] = []
        for i in range(0, batch, per_fwd):
            chunks = [Chunk(rows[j], 0, tables[j], logits="last") for j in range(i, min(batch, i + per_fwd))]
            last.extend(t for t in runner.execute(chunks) if t is not None)
        next_ids = sample(torch.cat(last))
        out = [next_ids[0]]
        length = ctx  # tokens already in the cache
        times: list[float] = []
        sampler_s = 0.0
        for step in range(DECODE_WARMUP + steps):
            t0 = time.perf_counter()
            chunks = [Chunk([next_ids[j]], length, tables[j], logits="last") for j in range(batch)]
            logits = torch.cat([t for t in runner.execute(chunks) if t is not None])
            t1 = time.perf_counter()
            next_ids = sample(logits)
            t2 = time.perf_counter()
            length += 1
            out.append(next_ids[0])
            if step >= DECODE_WARMUP:
                times.append(t2 - t0)
                sampler_s += t2 - t1
        return times, sampler_s, out
    finally:
        for t in tables:
            pool.free(t)


def choral_prefill(engine: LLMEngine, prompt: list[int], runs: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one forward over ``prompt`` (last logits only), and those logits."""
    runner, pool = engine.runner, engine.pool
    logits: list[torch.Tensor] = []

    def once() -> None:
        table = pool.allocate(blocks_for_tokens(len(prompt), pool.block_size))
        try:
            (out,) = runner.execute([Chunk(prompt, 0, table, logits="last")])
            assert out is not None
            logits[:] = [out]
        finally:
            pool.free(table)

    return median_time(once, runs, device=runner.device), logits[0]


# ---- HF transformers ----------------------------------------------------------------------

@torch.inference_mode()
def hf_decode(model, prompts: torch.Tensor, steps: int) -> tuple[list[float], list[int]]:  # type: ignore[no-untyped-def]
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    prompts = prompts.to(model.device)
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1].argmax(-1)
    tokens = [int(next_ids[0])]
    times: list[float] = []
    for step in range(DECODE_WARMUP + steps):
        t0 = time.perf_counter()
        out = model(input_ids=next_ids[:, None], past_key_values=cache, use_cache=True)
        next_ids = out.logits[:, -1].argmax(-1)
        tokens.append(int(next_ids[0]))  # .item() syncs like choral's .tolist() does
        if step >= DECODE_WARMUP:
            times.append(time.perf_counter() - t0)
    return times, tokens


@torch.inference_mode()
def hf_prefill(model, prompt: list[int], runs: int) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt], device=model.device)
    logits: list[torch.Tensor] = []

    def once() -> None:
        out = model(input_ids=ids, logits_to_keep=1)
        logits[:] = [out.logits[0, -1:].float()]

    return median_time(once, runs, device=model.device), logits[0]


# ---- the run ------------------------------------------------------------------------------

def bench_dtype(dtype: str, args: argparse.Namespace, limits: dict[str, float],
                hf_fp32: Any) -> tuple[list[Row], dict[str, Any]]:
    steps = args.steps
    max_len = max(PREFILL_LEN, CONTEXT + DECODE_WARMUP + steps)
    per_seq = blocks_for_tokens(CONTEXT + DECODE_WARMUP + steps, BLOCK_SIZE) * BLOCK_SIZE
    config = EngineConfig(model=args.model, dtype=dtype, device=args.device, max_model_len=max_len,
                          block_size=BLOCK_SIZE,
                          kv_cache_tokens=max(max(DECODE_BATCHES) * per_seq, max_len),
                          num_threads=args.threads, seed=0)
    log(f"{dtype}: loading choral engine")
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t0
    cost = model_cost(engine)
    vocab = engine.loaded.spec.vocab_size
    rates = {d: limits[f"matmul_gflops_{d}"] for d in TORCH_DTYPES if f"matmul_gflops_{d}" in limits}
    gflops, gflops_dtype = floor_gflops(rates, dtype)
    gbs = limits["read_gbs"]
    log(f"{dtype}: floors at the {SHORT[gflops_dtype]} matmul rate, {gflops:.1f} GFLOP/s")
    info = {"choral_load_s": load_s, "attention_backend": type(engine.runner.attention).__name__,
            "kv_cache_tokens": engine.kv_size.num_tokens, "weight_bytes": cost.weight_bytes,
            "matmul_params_per_token": cost.layer_params + cost.lm_head_params}

    # Warm up (first-call allocations, kernel library load).
    choral_prefill(engine, random_prompts(1, 32, vocab, 99)[0].tolist(), 1)

    hf = None
    if hf_fp32 is not None:
        hf = hf_fp32 if dtype == "float32" else copy.deepcopy(hf_fp32).to(TORCH_DTYPES[dtype])
        hf_prefill(hf, random_prompts(1, 32, vocab, 99)[0].tolist(), 1)

    rows: list[Row] = []
    for batch in DECODE_BATCHES:
        prompts = random_prompts(batch, CONTEXT, vocab, seed=batch)
        log(f"{dtype}: decode batch {batch} (choral)")
        times, sampler_s, tokens = choral_decode(engine, prompts, steps)
        total = sum(times)
        # Keys seen per query in timed step s = 1..steps: CONTEXT + DECODE_WARMUP + s.
        ctx = CONTEXT + DECODE_WARMUP + (steps + 1) / 2
        row = Row(dtype, "decode", batch, ctx, steps, total / steps * 1e3, batch * steps / total,
                  sampler_ms=sampler_s / steps * 1e3,
                  floor=cost.decode_floor(batch, ctx, gflops, gbs))
        row.extra["median_step_ms"] = statistics.median(times) * 1e3
        row.extra["min_step_ms"] = min(times) * 1e3
        if hf is not None:
            log(f"{dtype}: decode batch {batch} (HF)")
            hf_times, hf_tokens = hf_decode(hf, prompts, steps)
            hf_total = sum(hf_times)
            row.extra["hf_median_step_ms"] = statistics.median(hf_times) * 1e3
            row.hf_ms = hf_total / steps * 1e3
            row.hf_tok_s = batch * steps / hf_total
            # Greedy tokens of sequence 0 that agree with HF's, up to the first divergence.
            agree = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens, strict=True)) if a != b),
                         len(tokens))
            row.extra["greedy_prefix_agree"] = f"{agree}/{len(tokens)}"
        rows.append(row)
        gc.collect()

    batch = max(DECODE_BATCHES)
    log(f"{dtype}: decode batch {batch}, heavy sampling knobs (choral)")
    times, sampler_s, _ = choral_decode(engine, random_prompts(batch, CONTEXT, vocab, seed=batch), steps,
                                        heavy=True)
    ctx = CONTEXT + DECODE_WARMUP + (steps + 1) / 2
    rows.append(Row(dtype, "decode", batch, ctx, steps, sum(times) / steps * 1e3, batch * steps / sum(times),
                    sampler_ms=sampler_s / steps * 1e3, knobs="heavy",
                    floor=cost.decode_floor(batch, ctx, gflops, gbs)))

    log(f"{dtype}: prefill {PREFILL_LEN} (choral)")
    prompt = random_prompts(1, PREFILL_LEN, vocab, seed=PREFILL_LEN)[0].tolist()
    secs, logits = choral_prefill(engine, prompt, args.prefill_runs)
    row = Row(dtype, "prefill", 1, PREFILL_LEN, args.prefill_runs, secs * 1e3, PREFILL_LEN / secs,
              floor=cost.prefill_floor(PREFILL_LEN, gflops, gbs))
    if hf is not None:
        log(f"{dtype}: prefill {PREFILL_LEN} (HF)")
        hf_secs, hf_logits = hf_prefill(hf, prompt, args.prefill_runs)
        row.hf_ms = hf_secs * 1e3
        row.hf_tok_s = PREFILL_LEN / hf_secs
        row.extra["max_abs_logit_diff_vs_hf"] = float((logits.float().cpu() - hf_logits.cpu()).abs().max())
        row.extra["argmax_agrees_with_hf"] = bool(logits.argmax() == hf_logits.argmax())
    rows.append(row)

    assert engine.pool.num_free_blocks == engine.pool.num_blocks, "benchmark leaked KV blocks"
    del engine, hf
    gc.collect()
    return rows, info


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r.case == "decode" and r.batch == 32 and r.sampler_ms is not None:
            share = 100 * r.sampler_ms / r.ms
            out.append({"dtype": r.dtype, "target": f"batch-32 {r.knobs} decode: sampler < "
                        f"{SAMPLER_SHARE_TARGET:g}% of the step", "value": f"{share:.1f}%",
                        "pass": share < SAMPLER_SHARE_TARGET})
        if r.case == "decode" and r.batch == 32 and r.knobs == "greedy":
            out.append({"dtype": r.dtype, "target": f"batch-32 decode <= {DECODE_FLOOR_TARGET:g}x floor",
                        "value": f"{r.x_floor:.2f}x", "pass": r.x_floor <= DECODE_FLOOR_TARGET})
        if r.case == "decode" and r.batch == 1 and r.vs_hf is not None:
            out.append({"dtype": r.dtype, "target": "batch-1 decode faster than HF",
                        "value": f"{r.vs_hf:.2f}x HF", "pass": r.vs_hf > 1.0})
        if r.case == "prefill" and r.dtype == "bfloat16":
            out.append({"dtype": r.dtype, "target": f"bf16 prefill >= {PREFILL_BF16_TARGET:g} tok/s",
                        "value": f"{r.tok_s:.0f} tok/s", "pass": r.tok_s >= PREFILL_BF16_TARGET})
    return out


def row_target(r: Row) -> str:
    if r.case == "decode" and r.knobs == "heavy" and r.sampler_ms is not None:
        return f"sampler < {SAMPLER_SHARE_TARGET:g}%: {mark(100 * r.sampler_ms / r.ms < SAMPLER_SHARE_TARGET)}"
    if r.case == "decode" and r.batch == 32:
        return f"<= {DECODE_FLOOR_TARGET:g}x floor: {mark(r.x_floor <= DECODE_FLOOR_TARGET)}"
    if r.case == "decode" and r.batch == 1 and r.vs_hf is not None:
        return f"> HF: {mark(r.vs_hf > 1.0)}"
    if r.case == "prefill" and r.dtype == "bfloat16":
        return f">= {PREFILL_BF16_TARGET:g} tok/s: {mark(r.tok_s >= PREFILL_BF16_TARGET)}"
    return ""


def render(rows: list[Row], limits: dict[str, float], meta: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        f"## choral engine benchmark: {meta['model_file']}",
        "",
        f"threads {meta['threads']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"decode context {CONTEXT} (+{DECODE_WARMUP} warm-up steps), {meta['steps']} timed decode "
        f"steps, prefill median of {meta['prefill_runs']}, attention backend "
        f"{meta['attention_backend']}, {meta['device']}",
        "",
        "| machine limit | value |",
        "|---|---:|",
    ]
    n = meta["matmul_n"]
    for dtype in TORCH_DTYPES:
        if f"matmul_gflops_{dtype}" in limits:
            lines.append(f"| matmul {SHORT[dtype]} {n}^3 | {limits[f'matmul_gflops_{dtype}']:.1f} GFLOP/s |")
    lines.append(f"| read bandwidth (sum of 1 GiB fp32) | {limits['read_gbs']:.1f} GB/s |")
    lines += [
        "",
        "Floors take the faster of the dtype's and fp32's matmul rate (a bf16 model can run on fp32 arithmetic).",
        "",
        "| dtype | case | batch | ctx | ms/step | tok/s | floor ms | bound | x floor | sampler % "
        "| HF ms/step | HF tok/s | choral/HF | target |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        case = (f"decode ({r.knobs})" if r.knobs != "greedy" else "decode") if r.case == "decode" \
            else f"prefill {PREFILL_LEN}"
        sampler = f"{100 * r.sampler_ms / r.ms:.1f}" if r.sampler_ms is not None else "-"
        lines.append(
            f"| {SHORT[r.dtype]} | {case} | {r.batch} | {r.context:.0f} | {r.ms:.2f} | {r.tok_s:.1f} "
            f"| {r.floor['floor_ms']:.2f} | {r.floor['bound']} | {r.x_floor:.2f} | {sampler} "
            f"| {f(r.hf_ms, '.2f')} | {f(r.hf_tok_s, '.1f')} | {f(r.vs_hf, '.2f')} | {row_target(r)} |"
        )
    lines += ["", "Targets:", ""]
    for t in targets(rows):
        lines.append(f"- [{mark(t['pass'])}] {SHORT[t['dtype']]}: {t['target']} (measured {t['value']})")
    notes = []
    for dtype in meta["dtypes"]:
        for r in rows:
            if r.dtype != dtype:
                continue
            if r.case == "decode" and r.batch == 32 and r.sampler_ms is not None:
                notes.append(f"{SHORT[dtype]} batch-32 {r.knobs} decode step: sampler {r.sampler_ms:.2f} ms of "
                             f"{r.ms:.2f} ms ({100 * r.sampler_ms / r.ms:.1f}%)")
            if "max_abs_logit_diff_vs_hf" in r.extra:
                notes.append(f"{SHORT[dtype]} prefill: last-token logits vs HF max |diff| "
                             f"{r.extra['max_abs_logit_diff_vs_hf']:.3g}, argmax "
                             f"{'agrees' if r.extra['argmax_agrees_with_hf'] else 'DIFFERS'}")
        agree = [f"batch {r.batch} {r.extra['greedy_prefix_agree']}" for r in rows
                 if r.dtype == dtype and "greedy_prefix_agree" in r.extra]
        if agree:
            notes.append(f"{SHORT[dtype]} decode: sequence 0's greedy tokens equal to HF's up to the "
                         f"first difference: {', '.join(agree)} (bf16 rounding may diverge early)")
    if meta.get("hf_load"):
        notes.append(f"HF model loaded via {meta['hf_load']}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, MODEL)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated, from: float32, bfloat16 (default: both)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per case (default 32)")
    parser.add_argument("--prefill-runs", type=int, default=3,
                        help="prefill repetitions, the median is reported (default 3)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in TORCH_DTYPES]
    if bad or not dtypes:
        parser.error(f"--dtypes: {bad or dtypes} not in {', '.join(TORCH_DTYPES)}")
    if args.steps < 1 or args.prefill_runs < 1:
        parser.error("--steps and --prefill-runs must be positive")
    apply_threads(parser, args)

    started = time.perf_counter()
    path = resolve_model_path(args.model)
    log(f"model {path}, device {args.device}, {args.threads} threads")

    log("machine limits")
    limits = {f"matmul_gflops_{d}": g for d, g in matmul_rates(dtypes, args.device).items()}
    limits["read_gbs"] = read_bandwidth_gbs(args.device)

    hf_fp32 = None
    hf_how = None
    import transformers

    if not args.no_hf:
        log("loading HF transformers model")
        hf_fp32, hf_how = load_hf(path, args.device)

    rows: list[Row] = []
    infos: dict[str, Any] = {}
    # fp32 first: the HF fp32 model is used as loaded, other dtypes get a cast copy.
    for dtype in sorted(dtypes, key=lambda d: d != "float32"):
        dtype_rows, infos[dtype] = bench_dtype(dtype, args, limits, hf_fp32)
        rows.extend(dtype_rows)
    rows.sort(key=lambda r: dtypes.index(r.dtype))
    del hf_fp32
    gc.collect()

    meta = {"model_file": path.name, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "steps": args.steps,
            "prefill_runs": args.prefill_runs, "dtypes": dtypes, "device": device_name(args.device),
            "matmul_n": matmul_size(args.device),
            "hf_load": hf_how,
            "attention_backend": ", ".join(sorted({i["attention_backend"] for i in infos.values()}))}
    print(render(rows, limits, meta))
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed:.0f} s")

    if args.json:
        doc = {
            "meta": {**meta, "context": CONTEXT, "prefill_len": PREFILL_LEN,
                     "decode_warmup_steps": DECODE_WARMUP, "elapsed_s": elapsed, "engine": infos},
            "limits": limits,
            "rows": [{**asdict(r), "x_floor": r.x_floor, "choral_over_hf": r.vs_hf} for r in rows],
            "targets": targets(rows),
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
