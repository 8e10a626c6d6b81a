"""LoraSlots: the resident adapters' weights on the model's device, stacked for batched use.

The model runner owns one LoraSlots. It holds ``max_loras`` slots; each adapter a step uses sits
in one, and a step may use at most that many distinct adapters (the scheduler keeps to it). When
a step needs an adapter that is not resident, the least recently used slot that the step does
not use is overwritten (LRU eviction); adapters stay loaded in the registry (host memory), so an
evicted one is simply copied in again when next used.

Layout, per layer and per *site* (the fused projections the forward runs: ``qkv``, ``o``,
``gate_up``, ``down``):

- ``a[layer][site]``: [max_loras, in, parts * R], the site's parts' ``A^T`` side by side
  (R = max_lora_rank; an adapter of smaller rank leaves zero columns, a module it does not adapt
  leaves zeros);
- ``b[layer][site][p]``: [max_loras, R, out_p], part p's ``B^T * scale`` (its output columns of
  the fused projection: q | k | v, gate | up).

So one shrink matmul per site serves a fused projection, and one expand per part writes its own
columns. (A block-diagonal B for the whole site would take one call less but stream zeros: at 16
adapters the slots are read in full every step, and memory traffic is what they cost.)
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from choral.errors import LoraError
from choral.lora.adapter import LoraAdapter, module_shape
from choral.models.spec import ModelSpec

SITES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class LoraSlots:
    """``max_loras`` device slots of stacked adapter weights, filled and evicted LRU."""

    def __init__(self, spec: ModelSpec, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.spec = spec
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, list[torch.Tensor]]] = []
        for _ in range(spec.num_layers):
            a_layer: dict[str, torch.Tensor] = {}
            b_layer: dict[str, list[torch.Tensor]] = {}
            for site, parts in SITES.items():
                fan_in = module_shape(spec, parts[0])[0]
                a_layer[site] = torch.zeros(max_loras, fan_in, len(parts) * max_rank, dtype=dtype, device=device)
                b_layer[site] = [torch.zeros(max_loras, max_rank, module_shape(spec, p)[1], dtype=dtype, device=device)
                                 for p in parts]
            self.a.append(a_layer)
            self.b.append(b_layer)
        self._resident: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recent first
        self._free = list(range(max_loras))
        self.num_loads = 0
        self.num_evictions = 0

    @property
    def resident_ids(self) -> list[int]:
        """Adapter ids in the slots, least recently used first."""
        return list(self._resident)

    def assign(self, adapters: list[LoraAdapter]) -> dict[int, int]:
        """A slot for each distinct adapter of a step (adapter id -> slot), loading the missing
        ones into free or least recently used slots the step does not need."""
        wanted = {a.adapter_id: a for a in adapters}
        if len(wanted) > self.max_loras:
            raise LoraError(f"a step uses {len(wanted)} adapters, more than max_loras {self.max_loras}")
        out: dict[int, int] = {}
        for adapter_id in wanted:
            if adapter_id in self._resident:
                self._resident.move_to_end(adapter_id)
                out[adapter_id] = self._resident[adapter_id]
        for adapter_id, adapter in wanted.items():
            if adapter_id in out:
                continue
            if self._free:
                slot = self._free.pop(0)
            else:
                victim = next(i for i in self._resident if i not in wanted)
                slot = self._resident.pop(victim)
                self.num_evictions += 1
            self._write(slot, adapter)
            self._resident[adapter_id] = slot
            out[adapter_id] = slot
        return out

    def drop(self, adapter_id: int) -> None:
        """Free the slot of an unloaded adapter (a request still running with it reloads it)."""
        slot = self._resident.pop(adapter_id, None)
        if slot is not None:
            self._free.append(slot)

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        spec, rank = self.spec, self.max_rank
        for layer in range(spec.num_layers):
            for site, parts in SITES.items():
                a = self.a[layer][site][slot]  # [in, P*R]
                a.zero_()
                for p, module in enumerate(parts):
                    b = self.b[layer][site][p][slot]  # [R, out_p]
                    b.zero_()
                    w = adapter.weights.get((layer, module))
                    if w is not None:
                        r = w.rank
                        a[:, p * rank : p * rank + r] = w.a.t().to(self.dtype)
                        b[:r] = (w.b.t() * w.scale).to(self.dtype)
        self.num_loads += 1
