"""LoraBatch: one step's rows grouped by adapter, and the batched low-rank update.

Rows (tokens) of a packed batch that use an adapter are grouped by slot, and each group is cut
into segments of at most L rows, L the mean group length: a 500-token prompt chunk next to
one-token decodes of other adapters becomes a few segments, not every group padded to 500 (the
padding is then at most as many rows as there are adapted rows). Each adapted projection runs,
for the whole batch, batched matmuls over the G segments (Punica's shrink and expand, S-LoRA's
segmented update):

    h = x[rows] @ A[slot]                      # [G, L, in] x [G, in, P*R] -> [G, L, P*R]
    y[rows, part p] += h_p @ (B_p[slot] * s)   # [G, L, R] x [G, R, out_p] -> [G, L, out_p]

(P parts: q, k, v of the fused qkv projection, gate and up of gate_up; one elsewhere.)

Rows with no adapter are in no group and cost nothing; padding rows point at row 0 and are
zeroed in ``h``, so they add exactly zero. The number of kernel calls per projection does not
grow with the number of adapters, and the flops grow only with the adapted rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from choral.lora.slots import LoraSlots


class LoraBatch:
    """The per-step segments (slot and padded rows of each) for :meth:`add`, built by the model runner."""

    def __init__(self, slots: LoraSlots, row_slots: Sequence[int | None], device: torch.device):
        """``row_slots``: per row of the packed batch, its adapter's slot or None."""
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if slot is not None:
                by_slot.setdefault(slot, []).append(row)
        cut = -(-sum(len(rows) for rows in by_slot.values()) // max(1, len(by_slot)))  # mean group length
        segments = [(slot, rows[i : i + cut]) for slot, rows in by_slot.items() for i in range(0, len(rows), cut)]
        groups = [rows for _, rows in segments]
        self.stacks = slots
        self.num_groups = len(segments)
        self.length = max((len(rows) for rows in groups), default=0)
        order = [slot for slot, _ in segments]
        # Every slot, in slot order: the stacks are used as they are, with no gather of weights.
        self._whole = order == list(range(slots.max_loras))
        self._slots = torch.tensor(order, dtype=torch.long, device=device)
        padded = [rows + [0] * (self.length - len(rows)) for rows in groups]
        self._rows = torch.tensor([r for rows in padded for r in rows], dtype=torch.long, device=device)  # [G*L]
        # One adapter for every row, in order: x and y are used as they are (no gather, no scatter).
        self._identity = len(groups) == 1 and self.length == len(row_slots)
        self._mask: torch.Tensor | None = None
        if any(len(rows) < self.length for rows in groups):
            mask = [[1.0] * len(rows) + [0.0] * (self.length - len(rows)) for rows in groups]
            self._mask = torch.tensor(mask, dtype=slots.dtype, device=device).unsqueeze(-1)  # [G, L, 1]

    @property
    def empty(self) -> bool:
        return self.num_groups == 0

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> None:
        """``y`` [T, out] += each adapted row's low-rank update from ``x`` [T, in], in place."""
        if self.num_groups == 0:
            return
        a, parts = self.stacks.a[layer][site], self.stacks.b[layer][site]  # [S, in, P*R], P x [S, R, out_p]
        if not self._whole:
            a = a.index_select(0, self._slots)
        g, n, rank = self.num_groups, self.length, self.stacks.max_rank
        xs = (x if self._identity else x.index_select(0, self._rows)).to(a.dtype).view(g, n, -1)  # [G, L, in]
        h = torch.bmm(xs, a)  # [G, L, P*R]
        if self._mask is not None:
            h.mul_(self._mask)
        col = 0
        for p, b in enumerate(parts):
            if not self._whole:
                b = b.index_select(0, self._slots)
            out = b.shape[2]
            delta = torch.bmm(h[:, :, p * rank : (p + 1) * rank], b).view(g * n, out)  # [G*L, out_p]
            target = y if len(parts) == 1 else y[:, col : col + out]
            if self._identity:
                target.add_(delta.to(y.dtype))
            else:
                target.index_add_(0, self._rows, delta.to(y.dtype))
            col += out
