"""The machine's limits and the model's arithmetic, shared by the benchmarks: what a run could
do at best on this machine, measured in the same run, so tables can say how far from it they are."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from common import sync

from choral.engine.llm_engine import LLMEngine

# ---- machine limits -----------------------------------------------------------------------

def matmul_size(device: str) -> int:
    return 8192 if torch.device(device).type == "cuda" else 2048  # large enough to fill the device


def best_time(fn, reps: int, device: str | torch.device = "cpu",  # type: ignore[no-untyped-def]
              budget_s: float = 30.0) -> float:
    """The fastest of ``reps`` timed runs (after one warm-up): a machine's limit is what it can
    do, and a busy neighbour only ever makes a run slower. Runs stop early once ``budget_s`` is
    spent (at least one is timed): torch's bf16 matmul on a CPU without AVX-512 bf16 takes
    ~1 minute a call at n = 2048, and ten of them held a run up for 10 minutes."""
    start = time.perf_counter()
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", reps: int = 10) -> float:
    n = matmul_size(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), reps, device) / 1e9


def matmul_rates(dtypes: Iterable[str], device: str = "cpu") -> dict[str, float]:
    """``matmul_gflops`` per dtype name (``"float32"``, ``"bfloat16"``), fp32 always among them:
    ``floor_gflops`` may compute a bf16 floor at fp32's rate."""
    return {d: matmul_gflops(getattr(torch, d), device) for d in dict.fromkeys(["float32", *dtypes])}


def read_bandwidth_gbs(device: str = "cpu", num_bytes: int = 1 << 30, reps: int = 10) -> float:
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    return num_bytes / best_time(lambda: x.sum(), reps, device) / 1e9


def floor_gflops(rates: dict[str, float], dtype: str) -> tuple[float, str]:
    """The matmul rate a ``dtype`` floor is computed at, and whose measurement it is
    (``rates`` maps dtype names such as ``"float32"`` to GFLOP/s).

    Any engine may compute a bf16 model with fp32 arithmetic, widening weights as they load (choral's
    CPU projections do), so a floor uses the faster of the dtype's own rate and fp32's. Without
    native bf16 dot products torch's bf16 mm runs below 1 GFLOP/s (against ~150 in fp32), and a
    floor at that rate binds no one."""
    own, fp32 = rates[dtype], rates.get("float32", 0.0)
    return (own, dtype) if own >= fp32 else (fp32, "float32")


# ---- model arithmetic ---------------------------------------------------------------------

@dataclass
class ModelCost:
    layer_params: int  # weights of the per-layer matmuls (qkv, o, gate_up, down), all layers
    lm_head_params: int
    weight_bytes: int  # engine.loaded.model.weight_bytes: every weight the engine holds
    kv_bytes_per_token: int  # already multiplied by the element size
    num_layers: int
    num_heads: int
    head_dim: int

    def attention_flops(self, query_len: int, context: int) -> float:
        """QK^T and PV for ``query_len`` queries that see ``context`` keys each."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * context * query_len

    def decode_floor(self, batch: int, context: float, gflops: float, gbs: float) -> dict[str, float]:
        flops = 2.0 * (self.layer_params + self.lm_head_params) * batch
        flops += self.attention_flops(batch, context)  # type: ignore[arg-type]
        num_bytes = self.weight_bytes + batch * context * self.kv_bytes_per_token
        return _floor(flops, num_bytes, gflops, gbs)

    def prefill_floor(self, tokens: int, gflops: float, gbs: float) -> dict[str, float]:
        # Every token goes through the layers; only the last one through lm_head. Causal
        # attention: query i sees i + 1 keys.
        flops = 2.0 * self.layer_params * tokens + 2.0 * self.lm_head_params
        flops += 4.0 * self.num_layers * self.num_heads * self.head_dim * tokens * (tokens + 1) / 2
        return _floor(flops, self.weight_bytes, gflops, gbs)


def _floor(flops: float, num_bytes: float, gflops: float, gbs: float) -> dict[str, float]:
    compute_s = flops / (gflops * 1e9)
    memory_s = num_bytes / (gbs * 1e9)
    return {"flops": flops, "bytes": num_bytes, "compute_ms": compute_s * 1e3,
            "memory_ms": memory_s * 1e3, "floor_ms": max(compute_s, memory_s) * 1e3,
            "bound": "compute" if compute_s >= memory_s else "memory"}


def model_cost(engine: LLMEngine) -> ModelCost:
    model = engine.loaded.model
    spec = engine.loaded.spec
    layer_params = sum(w.qkv.num_parameters + w.o.num_parameters + w.gate_up.num_parameters
                       + w.down.num_parameters for w in model.layers)
    elem = model.final_norm.element_size()  # the KV cache holds the model dtype (packed weights or not)
    return ModelCost(
        layer_params=layer_params,
        lm_head_params=model.lm_head.num_parameters,
        weight_bytes=model.weight_bytes,
        kv_bytes_per_token=spec.kv_bytes_per_token * elem,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        head_dim=spec.head_dim,
    )
