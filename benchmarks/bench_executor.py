#!/usr/bin/env python
"""Benchmark choral's Executor (continuous batching) against HF transformers, offline and online.

Issue 5's benchmark, on the bundled SmolLM2-135M-Instruct (GGUF), in fp32 and bf16:

- offline throughput: 128 requests (seed 0), prompts of 32-512 random token ids, 32-256 output
  tokens each, EOS ignored, greedy. choral's Executor vs HF transformers static batching
  (``model.generate`` on left-padded batches of 32) and HF continuous batching (the manager behind
  ``model.generate_batch``), same prompts, same process;
- latency: Poisson arrivals at a few request rates, choral only: TTFT and TPOT p50/p99 and
  throughput per rate.

Prints markdown tables (see benchmarks/README.md for the columns). Progress goes to stderr.

    python benchmarks/bench_executor.py [--dtypes float32,bfloat16] [--requests 128]
        [--min-output 32] [--max-output 256] [--no-hf] [--no-hf-cb] [--no-hf-static] [--rates 0.5,1,2]
        [--latency-requests 32] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar

import torch  # noqa: E402
from common import add_model_args, apply_threads, device_name, load_hf, log, mark  # noqa: E402
from limits import (  # noqa: E402
    ModelCost,
    floor_gflops,
    matmul_rates,
    matmul_size,
    model_cost,
    read_bandwidth_gbs,
)

from choral import SamplingParams  # noqa: E402
from choral.executor import Executor, ExecutorConfig, FinishReason, Request  # noqa: E402
from choral.loader.resolve import resolve_model_path  # noqa: E402

MODEL = "smollm2-135m-instruct"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
BLOCK_SIZE = 16  # EngineConfig's default KV block size
MAX_MODEL_LEN = 1024
HF_STATIC_BATCH = 32

# Targets (issue 5), in the same dtype.
TARGET_VS_STATIC = 4.0
TARGET_VS_CB = 10.0

# Rough rates on this 2-core machine, only for the up-front time estimate.
EST_HF_STATIC_STEP_S = 0.150  # HF fp32 decode step at batch 32
EST_HF_PREFILL_TOK_S = 900.0  # HF prefill (padded tokens)
EST_HF_CB_TOK_S = 100.0  # HF continuous batching output tok/s
EST_CHORAL_PREFILL_TOK_S = 900.0
EST_CHORAL_DECODE_TOK_S = 350.0
EST_BF16_FACTOR = 1.5  # bf16 runs slower than fp32 on this CPU (prefill ~540 vs ~940 tok/s)
EST_LOAD_S = 20.0  # per model load / cast
EST_HF_CB_SETUP_S = 20.0  # the CB manager's setup and warm-up


# ---- workload -----------------------------------------------------------------------------

@dataclass
class Workload:
    prompt_lens: list[int]
    output_lens: list[int]
    prompts: list[list[int]] = field(default_factory=list)  # filled once the vocabulary is known

    @property
    def total_output(self) -> int:
        return sum(self.output_lens)


def make_lengths(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                 seed: int) -> Workload:
    rng = random.Random(seed)
    prompt_lens = [rng.randint(*prompt_range) for _ in range(n)]
    output_lens = [rng.randint(*output_range) for _ in range(n)]
    return Workload(prompt_lens, output_lens)


def fill_prompts(work: Workload, vocab: int, special: set[int], seed: int) -> None:
    """Random token ids from a seeded generator, special ids (EOS, BOS, chat markers) excluded."""
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    gen = torch.Generator().manual_seed(seed)
    work.prompts = [allowed[torch.randint(0, len(allowed), (n,), generator=gen)].tolist()
                    for n in work.prompt_lens]


def special_ids(ex: Executor) -> set[int]:
    ids = set(ex.engine.eos_token_ids)
    tok = ex.engine.tokenizer
    hf_tok = getattr(tok, "_tok", None) if tok is not None else None
    if hf_tok is not None:
        ids |= set(getattr(hf_tok, "all_special_ids", []) or [])
        ids |= {int(i) for i in getattr(hf_tok, "added_tokens_decoder", {}) or {}}
    else:  # SmolLM2's special tokens are ids 0..16
        ids |= set(range(17))
    return ids


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---- results ------------------------------------------------------------------------------

@dataclass
class Row:
    system: str  # "choral" | "HF static" | "HF CB"
    dtype: str
    requests: int
    output_tokens: int  # useful: each request's own L
    generated_tokens: int  # what the system actually generated (padding to the batch max included)
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else float("nan")


@dataclass
class LatencyRow:
    dtype: str
    rate: float
    requests: int
    output_tokens: int
    span_s: float  # first arrival to last finish
    achieved_rate: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    latency_p50: float
    latency_p99: float

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.span_s if self.span_s > 0 else float("nan")


# ---- choral -------------------------------------------------------------------------------

def make_executor(dtype: str, args: argparse.Namespace) -> Executor:
    per_seq = -(-(args.max_prompt + max(args.max_output, args.latency_max_output)) // BLOCK_SIZE) * BLOCK_SIZE
    kv_tokens = args.max_num_seqs * per_seq
    kv_bytes = kv_tokens * 46_080 * (1 if dtype == "float32" else 0.5)  # SmolLM2: 46,080 B/token in fp32
    log(f"{dtype}: loading choral executor (KV cache {kv_tokens} tokens, ~{kv_bytes / 2**30:.2f} GiB)")
    return Executor(args.model, ExecutorConfig(max_queue_size=4096, iteration_stats_max=1_000_000),
                    dtype=dtype, device=args.device,
                    kv_cache_tokens=kv_tokens, max_model_len=MAX_MODEL_LEN, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads, seed=0)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def choral_warmup(ex: Executor, tokens: list[int]) -> None:
    # Reversed, so the warm-up leaves no prefix-cache blocks that a benchmark prompt could hit.
    ex.submit(Request(list(reversed(tokens[:64])), greedy(4)), timeout=600)
    ex.get_latest_iteration_stats()  # drop the warm-up's steps


def choral_throughput(ex: Executor, work: Workload, dtype: str) -> tuple[Row, list[list[int]]]:
    requests = [Request(p, greedy(n)) for p, n in zip(work.prompts, work.output_lens, strict=True)]
    log(f"{dtype}: choral, {len(requests)} requests, {work.total_output} output tokens")
    ex.get_latest_iteration_stats()
    wall0 = time.time()  # IterationStats.timestamp is time.time(), Timing is time.monotonic()
    t0 = time.monotonic()
    ids = ex.enqueue_many(requests)
    responses = ex.await_responses(ids, timeout=24 * 3600)
    t1 = time.monotonic()
    by_id = {r.request_id: r for r in responses}
    outputs: list[list[int]] = []
    bad = 0
    first_arrival, last_finish = math.inf, 0.0
    for rid, n in zip(ids, work.output_lens, strict=True):
        r = by_id.get(rid)
        if r is None or r.result is None or r.has_error:
            raise RuntimeError(f"choral request {rid}: no result ({r.error if r else 'missing'})")
        res = r.result
        outputs.append(res.output_token_ids)
        if len(res.output_token_ids) != n or res.finish_reason is not FinishReason.LENGTH:
            bad += 1
        first_arrival = min(first_arrival, res.timing.arrival)
        last_finish = max(last_finish, res.timing.finished or t1)
    # A step's stats are recorded after the responses it produced are delivered: give the last
    # step a moment, and drop any step that started before the enqueue (the warm-up's last one).
    time.sleep(0.2)
    steps = [s for s in ex.get_latest_iteration_stats() if s.timestamp - s.step_latency_s >= wall0]
    generated = sum(len(o) for o in outputs)
    row = Row("choral", dtype, len(requests), generated, generated, t1 - t0)
    row.extra.update({
        "wrong_length_or_reason": bad,
        "span_first_arrival_to_last_finish_s": last_finish - first_arrival,
        "steps": len(steps),
        "mean_seqs_per_step": sum(s.num_scheduled_sequences for s in steps) / max(1, len(steps)),
        "max_running": max((s.num_running for s in steps), default=0),
        "preemptions": sum(s.num_preemptions for s in steps),
        "prefix_hit_blocks": sum(s.prefix_hit_blocks for s in steps),
        "prefill_tokens": sum(s.num_prefill_tokens for s in steps),
        "decode_tokens": sum(s.num_decode_tokens for s in steps),
        "busy_s": sum(s.step_latency_s for s in steps),
    })
    return row, outputs


def choral_latency(ex: Executor, work: Workload, rate: float, dtype: str, seed: int) -> LatencyRow:
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in work.prompts:
        t += rng.expovariate(rate)
        offsets.append(t)
    log(f"{dtype}: latency at {rate:g} req/s, {len(offsets)} requests over ~{offsets[-1]:.0f} s of arrivals")
    requests = [Request(p, greedy(n)) for p, n in zip(work.prompts, work.output_lens, strict=True)]
    start = time.monotonic()
    ids = []
    for off, req in zip(offsets, requests, strict=True):
        delay = start + off - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ids.append(ex.enqueue(req))
    responses = ex.await_responses(ids, timeout=24 * 3600)
    ttft, tpot, lat = [], [], []
    out_tokens = 0
    first_arrival, last_finish = math.inf, 0.0
    for r in responses:
        assert r.result is not None and not r.has_error, r.error
        tm = r.result.timing
        n = len(r.result.output_token_ids)
        out_tokens += n
        assert tm.time_to_first_token is not None and tm.latency is not None and tm.finished is not None
        ttft.append(tm.time_to_first_token)
        lat.append(tm.latency)
        if n > 1:
            tpot.append((tm.latency - tm.time_to_first_token) / (n - 1))
        first_arrival = min(first_arrival, tm.arrival)
        last_finish = max(last_finish, tm.finished)
    span = last_finish - first_arrival
    return LatencyRow(dtype, rate, len(responses), out_tokens, span,
                      len(responses) / offsets[-1] if offsets[-1] > 0 else float("nan"),
                      percentile(ttft, 50), percentile(ttft, 99), percentile(tpot, 50), percentile(tpot, 99),
                      percentile(lat, 50), percentile(lat, 99))


# ---- HF transformers ----------------------------------------------------------------------

@torch.inference_mode()
def hf_static(model, work: Workload, pad_id: int, dtype: str,  # type: ignore[no-untyped-def]
              batch_size: int = HF_STATIC_BATCH) -> tuple[Row, list[list[int]]]:
    """Left-padded batches of ``batch_size`` in request order; each batch generates exactly the
    largest L in it (min_new_tokens = max_new_tokens), of which each request's own L is useful."""
    from transformers import GenerationConfig

    outputs: list[list[int]] = []
    generated = 0
    total_s = 0.0
    n = len(work.prompts)
    for b0 in range(0, n, batch_size):
        prompts = work.prompts[b0 : b0 + batch_size]
        lens = work.output_lens[b0 : b0 + batch_size]
        width, lmax = max(len(p) for p in prompts), max(lens)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=model.device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=model.device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        cfg = GenerationConfig(do_sample=False, max_new_tokens=lmax, min_new_tokens=lmax, pad_token_id=pad_id,
                               eos_token_id=pad_id)
        log(f"{dtype}: HF static batch {b0 // batch_size + 1}/{-(-n // batch_size)}: {len(prompts)} x "
            f"{width} prompt tokens (padded), {lmax} new tokens")
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        out = out.cpu()  # waits for the device
        total_s += time.perf_counter() - t0
        new = out[:, width:]
        if new.shape[1] != lmax:
            raise RuntimeError(f"HF static generated {new.shape[1]} tokens, expected {lmax}")
        generated += new.numel()
        outputs.extend(new[i, :L].tolist() for i, L in enumerate(lens))
    useful = sum(work.output_lens)
    row = Row("HF static", dtype, n, useful, generated, total_s)
    row.extra["batch_size"] = batch_size
    return row, outputs


@torch.no_grad()  # not inference_mode: the manager's thread updates tensors made here in place
def hf_cb(model, work: Workload, pad_id: int, dtype: str, mode: str,  # type: ignore[no-untyped-def]
          budget_s: float | None = None) -> tuple[Row, list[list[int]] | None]:
    """HF continuous batching.

    With ``budget_s`` (per-request mode only), the run stops after that many seconds if requests
    are still unfinished. The row then holds a bound, not a measurement: HF CB did not produce the
    run's useful tokens within ``budget_s``, so its throughput is below ``total / budget_s``
    (``extra["bound"]``), and choral's ratio over it is a lower bound. No outputs are returned.

    - ``per-request`` (default): the manager ``generate_batch`` runs on
      (``model.continuous_batching_context_manager``), one ``add_request`` per request with that
      request's own ``max_new_tokens``. Timed from the first ``add_request`` to the last result
      (the manager's setup and warm-up are not timed).
    - ``generate_batch``: one ``model.generate_batch`` call with ``max_new_tokens`` = the largest L
      (it takes one value for all requests); every request generates that many, each request's
      own L is counted as useful. The whole call is timed (manager setup included).
    """
    from transformers import GenerationConfig

    lmax = max(work.output_lens)
    cfg = GenerationConfig(max_new_tokens=lmax, do_sample=False, eos_token_id=-1, pad_token_id=pad_id)
    n = len(work.prompts)
    log(f"{dtype}: HF CB ({mode}), {n} requests")
    if mode == "generate_batch":
        t0 = time.perf_counter()
        results = model.generate_batch(inputs=work.prompts, generation_config=cfg, progress_bar=False)
        wall = time.perf_counter() - t0
        ordered = list(results.values())  # generate_batch returns them in input order
        setup_s = None
    else:
        options: dict[str, Any] = {}
        try:  # sizing hints for the manager's cache (newer transformers)
            from transformers.generation.continuous_batching.utils import WorkloadHints

            options["workload_hints"] = WorkloadHints(max_prompt_length=max(work.prompt_lens),
                                                      max_generated_length=lmax, num_requests=n)
        except ImportError:
            pass
        t_setup = time.perf_counter()
        with model.continuous_batching_context_manager(generation_config=cfg, block=True, timeout=5,
                                                       **options) as manager:
            t0 = time.perf_counter()
            setup_s = t0 - t_setup
            rids = [manager.add_request(p, request_id=f"bench_{i}", max_new_tokens=L, eos_token_id=-1)
                    for i, (p, L) in enumerate(zip(work.prompts, work.output_lens, strict=True))]
            got: dict[str, Any] = {}
            while len(got) < n:
                if budget_s is not None and time.perf_counter() - t0 > budget_s:
                    break
                res = manager.get_result(timeout=1)
                if res is not None and res.is_finished():
                    got[res.request_id] = res
                elif res is None and not manager.is_running():
                    break
            wall = time.perf_counter() - t0
        ordered = [got.get(rid) for rid in rids]
        if budget_s is not None and wall > budget_s and len(got) < n:
            log(f"{dtype}: HF CB stopped after {wall:.0f} s with {n - len(got)} of {n} requests unfinished")
            done = sum(len(r.generated_tokens) for r in got.values())
            row = Row("HF CB", dtype, n, work.total_output, done, wall)
            row.extra.update({"mode": mode, "setup_s": setup_s, "bound": True, "unfinished": n - len(got),
                              "finished_tokens": done})
            return row, None
    if len(ordered) != n or any(r is None or r.error is not None for r in ordered):
        errors = [getattr(r, "error", "missing") for r in ordered if r is None or r.error is not None]
        raise RuntimeError(f"HF CB: {n - len(ordered) + len(errors)} requests failed: {errors[:3]}")
    generated = sum(len(r.generated_tokens) for r in ordered)
    outputs = [list(r.generated_tokens)[:L] for r, L in zip(ordered, work.output_lens, strict=True)]
    short = sum(len(r.generated_tokens) < L for r, L in zip(ordered, work.output_lens, strict=True))
    useful = sum(min(len(r.generated_tokens), L) for r, L in zip(ordered, work.output_lens, strict=True))
    row = Row("HF CB", dtype, n, useful, generated, wall)
    row.extra.update({"mode": mode, "setup_s": setup_s, "requests_short_of_L": short})
    return row, outputs


def agree_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each request's tokens equal between two systems before the first difference."""
    fracs = []
    for x, y in zip(a, b, strict=True):
        k = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        fracs.append(k / max(1, len(x)))
    return sum(fracs) / max(1, len(fracs))


# ---- estimate -----------------------------------------------------------------------------

def estimate_s(work: Workload, lat_work: Workload, args: argparse.Namespace, dtypes: list[str]) -> dict[str, float]:
    prompt_tokens = sum(work.prompt_lens)
    est: dict[str, float] = {}
    for dtype in dtypes:
        k = 1.0 if dtype == "float32" else EST_BF16_FACTOR
        est[f"{dtype} choral"] = k * (prompt_tokens / EST_CHORAL_PREFILL_TOK_S
                                      + work.total_output / EST_CHORAL_DECODE_TOK_S) + EST_LOAD_S
        if not args.no_hf:
            s = 0.0
            for b0 in range(0, len(work.prompt_lens), HF_STATIC_BATCH):
                pl = work.prompt_lens[b0 : b0 + HF_STATIC_BATCH]
                ol = work.output_lens[b0 : b0 + HF_STATIC_BATCH]
                s += len(pl) * max(pl) / EST_HF_PREFILL_TOK_S + max(ol) * EST_HF_STATIC_STEP_S * len(pl) / 32
            if not args.no_hf_static:
                est[f"{dtype} HF static"] = k * s + EST_LOAD_S
            if not args.no_hf_cb:
                n, lmax = len(work.output_lens), max(work.output_lens)
                out = work.total_output if args.hf_cb_mode == "per-request" else n * lmax
                est[f"{dtype} HF CB"] = out / EST_HF_CB_TOK_S + EST_HF_CB_SETUP_S
    if args.rates:
        per_rate = sum(lat_work.prompt_lens) / EST_CHORAL_PREFILL_TOK_S + lat_work.total_output / 30.0
        for rate in args.rates:
            # The arrivals span N / rate; the tail is about one request's latency (guess: a few s).
            est[f"latency {rate:g} req/s"] = max(len(lat_work.prompt_lens) / rate + 10.0, per_rate)
    return est


def offline_flops(cost: ModelCost, work: Workload) -> float:
    """The useful arithmetic of the offline run: every prompt token through the layers with causal
    attention and one lm_head row per prompt (its logits give the first output token), then each
    further output token as one decode over its whole context. Padding and recompute are not
    useful work, so they are not counted."""
    attn_per_key = cost.attention_flops(1, 1)  # one query against one key, all layers and heads
    total = 0.0
    for p, n in zip(work.prompt_lens, work.output_lens, strict=True):
        total += 2.0 * cost.layer_params * p + 2.0 * cost.lm_head_params + attn_per_key * p * (p + 1) / 2
        decodes = n - 1
        total += decodes * 2.0 * (cost.layer_params + cost.lm_head_params)
        total += attn_per_key * (decodes * p + decodes * (decodes + 1) / 2)
    return total


# ---- output -------------------------------------------------------------------------------

def ratios(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if r.system != "choral":
            continue
        static = next((x for x in rows if x.dtype == r.dtype and x.system == "HF static"), None)
        cb = next((x for x in rows if x.dtype == r.dtype and x.system == "HF CB"), None)
        out[r.dtype] = {"vs_static": r.tok_s / static.tok_s if static else None,
                        "vs_cb": r.tok_s / cb.tok_s if cb else None}
    return out


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for dtype, rr in ratios(rows).items():
        if rr["vs_static"] is not None:
            out.append({"dtype": dtype, "target": f">= {TARGET_VS_STATIC:g}x HF static",
                        "value": rr["vs_static"], "pass": rr["vs_static"] >= TARGET_VS_STATIC})
        if rr["vs_cb"] is not None:
            bound = any(x.system == "HF CB" and x.dtype == dtype and x.extra.get("bound") for x in rows)
            out.append({"dtype": dtype, "target": f">= {TARGET_VS_CB:g}x HF CB", "lower_bound": bound,
                        "value": rr["vs_cb"],
                        # A lower bound under the target decides nothing: HF CB may be slower still.
                        "pass": True if rr["vs_cb"] >= TARGET_VS_CB else None if bound else False})
    return out


def render(rows: list[Row], lat: list[LatencyRow], meta: dict[str, Any]) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rr = ratios(rows)
    lines = [
        f"## choral executor benchmark: {meta['model_file']}",
        "",
        f"{meta['requests']} requests (seed {meta['seed']}), prompts {meta['prompt_range'][0]}-"
        f"{meta['prompt_range'][1]} tokens, outputs {meta['output_range'][0]}-{meta['output_range'][1]} "
        f"tokens (EOS ignored, greedy); choral max_num_seqs {meta['max_num_seqs']}, max_num_batched_tokens "
        f"{meta['max_num_batched_tokens']}; HF static batch {HF_STATIC_BATCH}; HF CB mode {meta['hf_cb_mode']}; "
        f"threads {meta['threads']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['device']}",
        "",
        "| system | dtype | requests | output tokens | generated | wall s | output tok/s | choral/HF-static "
        "| choral/HF-CB | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs_s = vs_c = None
        tgt = ""
        if r.system == "choral":
            vs_s, vs_c = rr[r.dtype]["vs_static"], rr[r.dtype]["vs_cb"]
            parts = []
            if vs_s is not None:
                parts.append(f">= {TARGET_VS_STATIC:g}x static: {mark(vs_s >= TARGET_VS_STATIC)}")
            if vs_c is not None:
                cb_ok = vs_c >= TARGET_VS_CB
                cb_bound_here = any(x.system == "HF CB" and x.dtype == r.dtype and x.extra.get("bound") for x in rows)
                parts.append(f">= {TARGET_VS_CB:g}x CB: "
                             + ("UNDECIDED" if cb_bound_here and not cb_ok else mark(cb_ok)))
            tgt = "; ".join(parts)
        # A budget-stopped HF CB run bounds its throughput from above, so choral's ratio from below.
        cb_bound = any(x.system == "HF CB" and x.dtype == r.dtype and x.extra.get("bound") for x in rows)
        tok = f"< {r.tok_s:.1f}" if r.extra.get("bound") else f"{r.tok_s:.1f}"
        vs_c_text = ("> " if cb_bound and vs_c is not None else "") + f(vs_c, ".2f")
        lines.append(f"| {r.system} | {SHORT[r.dtype]} | {r.requests} | {r.output_tokens} | {r.generated_tokens} "
                     f"| {r.wall_s:.1f} | {tok} | {f(vs_s, '.2f')} | {vs_c_text} | {tgt} |")
    tl = targets(rows)
    if tl:
        lines += ["", "Targets:", ""]
        for t in tl:
            verdict = "UNDECIDED" if t["pass"] is None else mark(t["pass"])
            lines.append(f"- [{verdict}] {SHORT[t['dtype']]}: choral {t['target']} "
                         f"({'at least' if t.get('lower_bound') else 'measured'} {t['value']:.2f}x)")
    limits = meta.get("limits")
    if limits:
        rates = limits["matmul_gflops"]
        lines += ["", f"Machine limits (same run, best of 10; matmul {limits['matmul_n']}^3): "
                      + ", ".join(f"matmul {SHORT[d]} {g:.1f} GFLOP/s" for d, g in rates.items())
                      + f", read {limits['read_gbs']:.1f} GB/s. choral's compute floor: the run's useful FLOPs at "
                      "the faster of its dtype's and fp32's matmul rate (a bf16 model can run on fp32 arithmetic):",
                  "",
                  "| dtype | floor at | useful TFLOP | floor s | choral wall s | choral / floor |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in rows:
            if r.system == "choral" and "floor_s" in r.extra:
                e = r.extra
                at = e.get("floor_rate_dtype", r.dtype)
                lines.append(f"| {SHORT[r.dtype]} | {SHORT[at]} {rates[at]:.0f} GFLOP/s "
                             f"| {e['useful_flops'] / 1e12:.2f} | {e['floor_s']:.1f} | {r.wall_s:.1f} "
                             f"| {r.wall_s / e['floor_s']:.2f}x |")
    if lat:
        lines += [
            "",
            f"### Latency (choral, Poisson arrivals, {meta['latency_requests']} requests per rate, outputs "
            f"{meta['latency_output_range'][0]}-{meta['latency_output_range'][1]} tokens)",
            "",
            "| dtype | rate req/s | achieved req/s | requests | output tokens | span s | output tok/s | TTFT p50 ms "
            "| TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | latency p50 s | latency p99 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in lat:
            lines.append(f"| {SHORT[x.dtype]} | {x.rate:g} | {x.achieved_rate:.2f} | {x.requests} | {x.output_tokens} "
                         f"| {x.span_s:.1f} | {x.tok_s:.1f} | {x.ttft_p50 * 1e3:.0f} | {x.ttft_p99 * 1e3:.0f} "
                         f"| {x.tpot_p50 * 1e3:.1f} | {x.tpot_p99 * 1e3:.1f} | {x.latency_p50:.2f} "
                         f"| {x.latency_p99:.2f} |")
    notes = []
    for r in rows:
        if r.system == "choral":
            e = r.extra
            notes.append(f"{SHORT[r.dtype]} choral: {e['steps']} steps, {e['mean_seqs_per_step']:.1f} sequences per "
                         f"step on average, at most {e['max_running']} running, {e['preemptions']} preemptions, "
                         f"{e['prefix_hit_blocks']} prefix-cache block hits, "
                         f"busy {e['busy_s']:.1f} s of {r.wall_s:.1f} s"
                         + (f", {e['wrong_length_or_reason']} requests with the WRONG length or finish reason"
                            if e["wrong_length_or_reason"] else ""))
            for k in ("agree_with_hf_static", "agree_with_hf_cb"):
                if k in e:
                    notes.append(f"{SHORT[r.dtype]} choral vs {'HF static' if k.endswith('static') else 'HF CB'}: "
                                 f"{100 * e[k]:.1f}% of output tokens equal before each request's first difference "
                                 f"(random-token prompts: near-ties; padding and bf16 rounding diverge early)")
        if r.system == "HF CB":
            e = r.extra
            if e.get("bound"):
                notes.append(f"{SHORT[r.dtype]} HF CB: stopped by --hf-cb-budget-s after {r.wall_s:.0f} s with "
                             f"{e['unfinished']} of {r.requests} requests unfinished ({e['finished_tokens']} tokens "
                             f"in finished requests): its throughput is below {r.tok_s:.1f} useful tok/s, and "
                             f"choral's ratio over it is a lower bound")
            if e["mode"] == "per-request":
                notes.append(f"{SHORT[r.dtype]} HF CB: per-request max_new_tokens through the generate_batch "
                             f"manager; manager setup {e['setup_s']:.1f} s not timed")
            else:
                notes.append(f"{SHORT[r.dtype]} HF CB: generate_batch with max_new_tokens = max L for all "
                             f"requests; {r.generated_tokens} generated, {r.output_tokens} counted as useful "
                             f"(raw {r.generated_tokens / r.wall_s:.1f} tok/s)")
            if e.get("requests_short_of_L"):
                notes.append(f"{SHORT[r.dtype]} HF CB: {e['requests_short_of_L']} requests returned fewer than L "
                             f"tokens")
        if r.system == "HF static":
            notes.append(f"{SHORT[r.dtype]} HF static: {r.generated_tokens} generated (padding to each batch's "
                         f"max L), {r.output_tokens} counted as useful (raw {r.generated_tokens / r.wall_s:.1f} tok/s)")
    if meta.get("hf_load"):
        notes.append(f"HF model loaded via {meta['hf_load']}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------

def parse_list(text: str, kind: type) -> list[Any]:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, MODEL)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--requests", type=int, default=128, help="offline requests (default 128)")
    parser.add_argument("--min-prompt", type=int, default=32, help="shortest prompt (default 32)")
    parser.add_argument("--max-prompt", type=int, default=512, help="longest prompt (default 512)")
    parser.add_argument("--min-output", type=int, default=None,
                        help="fewest output tokens (default 32, or --max-output if that is smaller)")
    parser.add_argument("--max-output", type=int, default=256, help="most output tokens (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=128,
                        help="choral's sequence cap (default 128: the whole offline run fits the KV pool)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="choral's token budget per step (default 512: on 2 CPU cores a 2048-token "
                             "step takes ~2.5 s, which every running decode waits out)")
    parser.add_argument("--no-hf", action="store_true", help="skip both HF baselines")
    parser.add_argument("--no-hf-cb", action="store_true", help="skip the HF continuous-batching baseline")
    parser.add_argument("--no-hf-static", action="store_true", help="skip the HF static-batching baseline")
    parser.add_argument("--hf-cb-budget-s", type=float, default=None,
                        help="stop HF CB after this many seconds and report a bound (per-request mode)")
    parser.add_argument("--hf-cb-mode", choices=("per-request", "generate_batch"), default="per-request",
                        help="per-request max_new_tokens through the CB manager (default), or one "
                             "generate_batch call with max L for all")
    parser.add_argument("--rates", default="0.5,1,2", help="Poisson arrival rates, req/s ('' = no latency run)")
    parser.add_argument("--latency-requests", type=int, default=32, help="requests per rate (default 32)")
    parser.add_argument("--latency-min-output", type=int, default=16)
    parser.add_argument("--latency-max-output", type=int, default=64)
    parser.add_argument("--latency-dtypes", default=None,
                        help="dtypes for the latency run (default: the first of --dtypes)")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    args = parser.parse_args(argv)

    if args.min_output is None:
        args.min_output = min(32, args.max_output)
    dtypes = parse_list(args.dtypes, str)
    bad = [d for d in dtypes if d not in TORCH_DTYPES]
    if bad or not dtypes:
        parser.error(f"--dtypes: {bad or dtypes} not in {', '.join(TORCH_DTYPES)}")
    args.rates = parse_list(args.rates, float)
    if any(r <= 0 for r in args.rates):
        parser.error("--rates must be positive")
    lat_dtypes = parse_list(args.latency_dtypes, str) if args.latency_dtypes is not None else dtypes[:1]
    if any(d not in dtypes for d in lat_dtypes):
        parser.error("--latency-dtypes must be among --dtypes")
    if not (1 <= args.min_prompt <= args.max_prompt and 1 <= args.min_output <= args.max_output
            and 1 <= args.latency_min_output <= args.latency_max_output):
        parser.error("length ranges must be positive with min <= max")
    if args.max_prompt + max(args.max_output, args.latency_max_output) > MAX_MODEL_LEN:
        parser.error(f"prompt + output must fit max_model_len {MAX_MODEL_LEN}")
    if args.requests < 1 or args.latency_requests < 1 or args.max_num_seqs < 1 or args.max_num_batched_tokens < 1:
        parser.error("--requests, --latency-requests, --max-num-seqs and --max-num-batched-tokens must be positive")
    apply_threads(parser, args)

    started = time.perf_counter()
    path = resolve_model_path(args.model)
    work = make_lengths(args.requests, (args.min_prompt, args.max_prompt), (args.min_output, args.max_output),
                        args.seed)
    # One workload per rate, each with its own prompts: a rate run after another would otherwise
    # find the earlier run's prompts in the prefix cache and report cached TTFTs.
    lat_works = [make_lengths(args.latency_requests, (args.min_prompt, args.max_prompt),
                              (args.latency_min_output, args.latency_max_output), args.seed + 1 + i)
                 for i in range(len(args.rates))]
    lat_work = lat_works[0] if lat_works else make_lengths(1, (1, 1), (1, 1), 0)
    est = estimate_s(work, lat_work, args, dtypes)
    log(f"model {path}, {args.threads} threads; {args.requests} requests, {work.total_output} output tokens, "
        f"{sum(work.prompt_lens)} prompt tokens")
    est_total = sum(v for k, v in est.items() if not k.startswith("latency")) + len(lat_dtypes) * sum(
        v for k, v in est.items() if k.startswith("latency"))
    log(f"estimated time (rough, 2-core numbers): ~{est_total / 60:.1f} min: "
        + ", ".join(f"{k} ~{v:.0f} s" for k, v in est.items()))

    import transformers

    log("machine limits")
    limits: dict[str, Any] = {"matmul_n": matmul_size(args.device), "read_gbs": read_bandwidth_gbs(args.device),
                              "matmul_gflops": matmul_rates(dtypes, args.device)}
    rows: list[Row] = []
    lat_rows: list[LatencyRow] = []
    engine_info: dict[str, Any] = {}
    hf_fp32 = hf_how = None
    pad_id = None
    for dtype in dtypes:
        ex = make_executor(dtype, args)
        try:
            if not work.prompts:
                vocab = ex.engine.loaded.spec.vocab_size
                special = special_ids(ex)
                fill_prompts(work, vocab, special, args.seed)
                for i, lw in enumerate(lat_works):
                    fill_prompts(lw, vocab, special, args.seed + 1 + i)
                pad_id = ex.engine.eos_token_ids[0]
                engine_info["special_ids_excluded"] = sorted(special)
            engine_info[dtype] = {"kv_cache_tokens": ex.engine.kv_size.num_tokens,
                                  "attention_backend": type(ex.engine.runner.attention).__name__}
            choral_warmup(ex, work.prompts[0])
            row, choral_out = choral_throughput(ex, work, dtype)
            log(f"{dtype}: choral {row.tok_s:.1f} tok/s ({row.wall_s:.1f} s)")
            row.extra["useful_flops"] = offline_flops(model_cost(ex.engine), work)
            rate, rate_dtype = floor_gflops(limits["matmul_gflops"], dtype)
            row.extra["floor_s"] = row.extra["useful_flops"] / (rate * 1e9)
            row.extra["floor_rate_dtype"] = rate_dtype
            rows.append(row)
            if dtype in lat_dtypes:
                for i, rate in enumerate(args.rates):
                    lr = choral_latency(ex, lat_works[i], rate, dtype, args.seed + 100 + i)
                    log(f"{dtype}: {rate:g} req/s: TTFT p50 {lr.ttft_p50 * 1e3:.0f} ms, TPOT p50 "
                        f"{lr.tpot_p50 * 1e3:.1f} ms, {lr.tok_s:.1f} tok/s")
                    lat_rows.append(lr)
            pool = ex.kv.pool
            if pool.num_used_blocks:
                log(f"WARNING: {pool.num_used_blocks} KV blocks still in use after the run")
        finally:
            ex.shutdown(wait=False)
        del ex
        gc.collect()

        if args.no_hf:
            continue
        if hf_fp32 is None:
            log("loading HF transformers model")
            hf_fp32, hf_how = load_hf(path, args.device)
        hf = hf_fp32 if dtype == "float32" else copy.deepcopy(hf_fp32).to(TORCH_DTYPES[dtype])
        assert pad_id is not None
        if not args.no_hf_static:
            srow, s_out = hf_static(hf, work, pad_id, dtype)
            log(f"{dtype}: HF static {srow.tok_s:.1f} useful tok/s ({srow.wall_s:.1f} s)")
            rows.append(srow)
            row.extra["agree_with_hf_static"] = agree_prefix(choral_out, s_out)
        if not args.no_hf_cb:
            crow, c_out = hf_cb(hf, work, pad_id, dtype, args.hf_cb_mode, args.hf_cb_budget_s)
            bound = "< " if crow.extra.get("bound") else ""
            log(f"{dtype}: HF CB {bound}{crow.tok_s:.1f} useful tok/s ({crow.wall_s:.1f} s)")
            rows.append(crow)
            if c_out is not None:
                row.extra["agree_with_hf_cb"] = agree_prefix(choral_out, c_out)
        del hf
        gc.collect()

    meta = {"model_file": path.name, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device_name(args.device), "hf_load": hf_how,
            "requests": args.requests, "seed": args.seed, "prompt_range": [args.min_prompt, args.max_prompt],
            "output_range": [args.min_output, args.max_output], "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "hf_cb_mode": None if args.no_hf or args.no_hf_cb else args.hf_cb_mode,
            "latency_requests": args.latency_requests,
            "latency_output_range": [args.latency_min_output, args.latency_max_output], "limits": limits}
    print(render(rows, lat_rows, meta))
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed:.0f} s (estimated {est_total:.0f} s)")
    if args.json:
        doc = {"meta": {**meta, "dtypes": dtypes, "rates": args.rates, "elapsed_s": elapsed,
                        "estimate_s": est, "engine": engine_info},
               "rows": [{**asdict(r), "tok_s": r.tok_s} for r in rows],
               "ratios": ratios(rows), "targets": targets(rows),
               "latency": [{**asdict(x), "tok_s": x.tok_s} for x in lat_rows]}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2, default=str)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
