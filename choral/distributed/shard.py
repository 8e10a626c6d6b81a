"""Which part of each weight a tensor-parallel rank holds (Megatron-style column/row splits).

Per layer, rank r of N holds
- a contiguous run of the query heads, ``[r * H // N, (r + 1) * H // N)``, and every KV head those
  queries read: fused q/k/v is column-parallel, split by heads;
- the matching columns of o_proj (row-parallel: each rank's product is a partial sum, one
  all-reduce after attention);
- ``[r * I // N, (r + 1) * I // N)`` of the MLP's intermediate columns: gate/up column-parallel,
  down row-parallel (one all-reduce after the MLP).
Embedding, norms and lm_head are replicated (rank 0 alone computes logits and samples).

KV heads that do not divide by N are replicated: a KV head whose query group straddles two
ranks' runs is held (and its K/V cached) by both. Query heads need not divide either. Our
attention kernels want every KV head to serve the same number of query heads, so a rank whose
KV heads serve unequal counts pads the short groups with zero query heads: zero rows in q_proj
(q = 0, so the head's output is a finite average of V) and zero columns in o_proj (so it adds
exactly 0). Example, SmolLM2-135M (9 query heads, 3 KV heads, groups of 3) at N = 2: rank 0
holds queries 0-3 -> KV heads 0 and 1 (groups of 3 and 1: padded to 3 + 3); rank 1 holds
queries 4-8 -> KV heads 1 and 2 (2 + 3: padded to 3 + 3). KV head 1 is cached on both ranks,
and each rank computes 6 query-head slots for 4.5 real heads on average. When N divides the KV
heads (or the KV heads divide N and N divides the query heads) no head is padded: the split is
vLLM's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from choral.errors import ConfigError
from choral.models.spec import ModelSpec
from choral.models.transformer import Weight
from choral.quant.repack import PackedRows


def check_tensor_parallel_size(spec: ModelSpec, world: int) -> None:
    """ConfigError naming the problem when ``world`` ranks cannot split this model."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"tensor_parallel_size: must be a positive int, got {world!r}")
    if world > spec.num_heads:
        raise ConfigError(f"tensor_parallel_size: {world} ranks for {spec.num_heads} attention heads; every rank "
                          f"needs at least one head (use at most {spec.num_heads})")
    if world > spec.intermediate_size:
        raise ConfigError(f"tensor_parallel_size: {world} ranks for an MLP of {spec.intermediate_size} columns")


@dataclass(frozen=True)
class TensorShard:
    """Rank ``rank`` of ``world``'s part of every layer.

    ``q_slots``: the global query head computed in each local query slot (None: a zero padding
    head), grouped by local KV head (``group`` slots each); ``kv_heads``: the global KV heads held,
    in local order; ``inter``: the [start, stop) intermediate columns."""

    rank: int
    world: int
    q_slots: tuple[int | None, ...]
    kv_heads: tuple[int, ...]
    inter: tuple[int, int]

    @property
    def group(self) -> int:
        return len(self.q_slots) // len(self.kv_heads)

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shapes this rank's DecoderModel and KV cache are built with. Only rank 0 adds
        o_proj's bias (the all-reduce would add it N times)."""
        return dataclasses.replace(spec, num_heads=len(self.q_slots), num_kv_heads=len(self.kv_heads),
                                   intermediate_size=self.inter[1] - self.inter[0],
                                   o_bias=spec.o_bias and self.rank == 0)

    def select(self, spec: ModelSpec, tensors: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
        """The loader's HF-named tensors -> this rank's slices (same names, local shapes)."""
        hd = spec.head_dim
        for name, weight in tensors:
            if isinstance(weight, PackedRows):
                raise ConfigError("tensor_parallel_size: packed quantized weights cannot be split; "
                                  "load them with weights='dequantize'")
            kind = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
            module, param = kind if len(kind) == 2 else ("", "")
            if module == "q_proj":
                yield name, _heads(weight, self.q_slots, hd, dim=0)
            elif module in ("k_proj", "v_proj"):
                yield name, _heads(weight, self.kv_heads, hd, dim=0)
            elif module == "o_proj" and param == "weight":
                yield name, _heads(weight, self.q_slots, hd, dim=1)
            elif module == "o_proj":  # the bias: rank 0 only (local_spec)
                if self.rank == 0:
                    yield name, weight
            elif module in ("gate_proj", "up_proj"):
                yield name, weight[self.inter[0] : self.inter[1]]
            elif module == "down_proj":
                yield name, weight[:, self.inter[0] : self.inter[1]]
            elif name == "lm_head.weight" and self.rank != 0:
                continue  # only rank 0 computes logits; the others tie lm_head to the embedding (no copy)
            else:
                yield name, weight  # embedding, norms, q/k norms: replicated


def plan_shards(spec: ModelSpec, world: int) -> list[TensorShard]:
    """Every rank's shard (see the module docstring); ``world`` already checked."""
    check_tensor_parallel_size(spec, world)
    nh, nkv, inter = spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    group = nh // nkv
    plans = []
    for rank in range(world):
        heads = range(rank * nh // world, (rank + 1) * nh // world)
        kv_heads = sorted({h // group for h in heads})
        by_kv = [[h for h in heads if h // group == kv] for kv in kv_heads]
        width = max(len(g) for g in by_kv)
        slots = tuple(s for g in by_kv for s in [*g, *([None] * (width - len(g)))])
        plans.append(TensorShard(rank, world, slots, tuple(kv_heads),
                                 (rank * inter // world, (rank + 1) * inter // world)))
    return plans


def _heads(weight: torch.Tensor, heads: tuple[int | None, ...], head_dim: int, dim: int) -> torch.Tensor:
    """The listed heads' rows (dim 0) or columns (dim 1) of ``weight`` in order; None -> zeros."""
    parts = []
    for head in heads:
        if head is None:
            shape = list(weight.shape)
            shape[dim] = head_dim
            parts.append(weight.new_zeros(shape))
        else:
            parts.append(weight.narrow(dim, head * head_dim, head_dim))
    return torch.cat(parts, dim=dim).contiguous()
