"""``choral bench``: throughput and latency at several concurrency levels, against the in-process
executor or a running server's OpenAI API.

Each level runs ``num_prompts`` requests (random prompt token ids, fixed output lengths, EOS
ignored) with at most ``concurrency`` in flight, streaming, and records per request the time to
first token, the time per output token after the first, and end-to-end latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestSample:
    ttft_s: float
    latency_s: float
    output_tokens: int

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    concurrency: int
    num_requests: int
    wall_s: float
    output_tokens: int
    samples: list[RequestSample] = field(default_factory=list, repr=False)

    @property
    def throughput_tps(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def percentile(self, what: str, q: float) -> float:
        values = sorted(v for s in self.samples if (v := getattr(s, what)) is not None)
        if not values:
            return float("nan")
        index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
        return values[index]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": self.concurrency, "requests": self.num_requests,
                               "wall_s": self.wall_s, "output_tokens": self.output_tokens,
                               "throughput_tps": self.throughput_tps}
        for what in ("ttft_s", "tpot_s", "latency_s"):
            for q in (50, 99):
                out[f"{what[:-2]}_p{q}_ms"] = self.percentile(what, q) * 1000
        out["mean_latency_ms"] = statistics.fmean(s.latency_s for s in self.samples) * 1000 if self.samples else 0
        return out


def make_prompts(count: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(count)]


async def _run_level(send: Any, prompts: list[list[int]], output_len: int, concurrency: int, bar: Any) -> LevelResult:
    gate = asyncio.Semaphore(concurrency)
    samples: list[RequestSample] = []

    async def one(prompt: list[int]) -> None:
        async with gate:
            samples.append(await send(prompt, output_len))
            if bar is not None:
                bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    return LevelResult(concurrency, len(prompts), wall, sum(s.output_tokens for s in samples), samples)


def _in_process_sender(executor: Any) -> Any:
    from choral.executor import AsyncExecutor, Request
    from choral.sampling.params import SamplingParams

    ax = AsyncExecutor(executor)

    async def send(prompt: list[int], output_len: int) -> RequestSample:
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        start = time.perf_counter()
        first = None
        tokens = 0
        async for result in ax.stream(Request(prompt, params)):
            if first is None and result.output_token_ids:
                first = time.perf_counter()
            tokens += len(result.output_token_ids)
        end = time.perf_counter()
        return RequestSample((first or end) - start, end - start, tokens)

    return send


def _http_sender(client: Any, url: str, model: str | None) -> Any:
    async def send(prompt: list[int], output_len: int) -> RequestSample:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                                "stream": True}
        if model:
            body["model"] = model
        start = time.perf_counter()
        first = None
        tokens = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if payload["choices"] and payload["choices"][0]["text"]:
                    first = first or time.perf_counter()
                tokens += 1 if payload["choices"] else 0
        end = time.perf_counter()
        return RequestSample((first or end) - start, end - start, tokens)

    return send


def run_bench(levels: list[int], num_prompts: int, input_len: int, output_len: int, seed: int,
              executor: Any = None, url: str | None = None, model: str | None = None,
              vocab: int = 32000, progress: bool = True) -> list[LevelResult]:
    """Run every concurrency level; returns one LevelResult per level."""
    prompts = make_prompts(num_prompts, input_len, vocab, seed)

    async def main() -> list[LevelResult]:
        from tqdm import tqdm

        bar = tqdm(total=num_prompts * len(levels), desc="bench", unit="req") if progress else None
        results = []
        try:
            if url is not None:
                import httpx

                async with httpx.AsyncClient(timeout=600) as client:
                    send = _http_sender(client, url.rstrip("/"), model)
                    for c in levels:
                        results.append(await _run_level(send, prompts, output_len, c, bar))
            else:
                send = _in_process_sender(executor)
                for c in levels:
                    results.append(await _run_level(send, prompts, output_len, c, bar))
        finally:
            if bar is not None:
                bar.close()
        return results

    return asyncio.run(main())


def table(results: list[LevelResult]) -> str:
    head = ("| concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
            "| latency p50 ms | latency p99 ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for r in results:
        s = r.summary()
        rows.append(f"| {r.concurrency} | {r.num_requests} | {r.throughput_tps:.1f} | {s['ttft_p50_ms']:.0f} | "
                    f"{s['ttft_p99_ms']:.0f} | {s['tpot_p50_ms']:.1f} | {s['tpot_p99_ms']:.1f} | "
                    f"{s['latency_p50_ms']:.0f} | {s['latency_p99_ms']:.0f} |")
    return "\n".join([head, *rows])


def plot(results: list[LevelResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r.concurrency for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conc, [r.throughput_tps for r in results], marker="o")
    left.set_xlabel("concurrency")
    left.set_ylabel("output tokens / s")
    left.set_title("throughput")
    left.set_xscale("log", base=2)
    for what, marker in (("ttft_s", "o"), ("tpot_s", "s"), ("latency_s", "^")):
        for q, line in ((50, "-"), (99, "--")):
            right.plot(conc, [r.percentile(what, q) * 1000 for r in results], marker=marker, linestyle=line,
                       label=f"{what[:-2]} p{q}")
    right.set_xlabel("concurrency")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.set_xscale("log", base=2)
    right.set_title("latency percentiles")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_json(results: list[LevelResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "levels": [r.summary() for r in results],
            "samples": {r.concurrency: [asdict(s) for s in r.samples] for r in results}}
