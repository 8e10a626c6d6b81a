"""Projections and embeddings whose weights stay quantized (CPU, fp32 activations).

Two regimes, chosen per call by the number of rows (tokens) T:

- T <= ``INT8_MAX_TOKENS``: integer dot products (``quant_matmul.c``). x is quantized per block of
  32 to int8 in the same C call; each weight row is unpacked once into L1 and dotted with every
  token. The weights are read once per call, at 4-8 bits per weight: a decode step's floor.
- larger T (prompt chunks): each weight panel of ``PANEL_BYTES`` fp32 is dequantized into cache and
  multiplied by torch's fp32 GEMM; the dequantization is K * N work against T * K * N multiply-adds.

Measured (AMD Zen 3 VM, 1 thread, CPU time so the shared machine's load average of ~23 counts less;
SmolLM2's 120 Q4_1 projections + the Q8_0 lm_head; fp32 = the dequantized model's panel GEMM):

    T   integer dots   dequantized panels + mm   fp32
    1   22-23 ms       -                         53-59 ms
    8   79-81 ms       -                         65-73 ms
   32   278-315 ms     450 ms                    148-167 ms
   64   629 ms         721 ms                    327 ms
  128   ~1250 ms (est.) 1077 ms                  540 ms

So: integer dots up to 64 rows, panels above; decode (T = 1) moves 2.5x less CPU time than fp32,
while prompt chunks cost ~2x the fp32 model's (both native regimes are compute-bound there; a
multi-token integer micro-kernel is the next step).
"""

from __future__ import annotations

import torch

from choral.quant.kernels import dequantize_rows, packed_linear
from choral.quant.repack import KIND_NAMES, PackedRows

INT8_MAX_TOKENS = 64  # above: dequantized panels + fp32 GEMM (see the module docstring)
PANEL_BYTES = 1 << 20  # fp32 bytes of one dequantized weight panel: stays in L2 while the GEMM reads it


class _Part:
    """One packed row group of a (possibly fused) projection."""

    def __init__(self, rows: PackedRows, offset: int):
        self.kind = rows.kind
        self.weight = torch.from_numpy(rows.data)  # [rows, bytes] uint8, shares the numpy buffer
        self.rows = rows.rows
        self.offset = offset  # first output feature of this part
        self.source = rows.source


class QuantProjection:
    """A frozen linear layer over packed weights: ``proj(x)`` maps [T, in] fp32 -> [T, out] fp32.

    ``parts`` are row groups stacked along the output features (a fused q/k/v whose tensors have
    different GGUF types keeps one group per type); all have ``in_features`` columns."""

    layout = "quantized"
    dtype = torch.float32

    def __init__(self, parts: list[PackedRows], bias: torch.Tensor | None):
        if not parts:
            raise ValueError("a quantized projection needs at least one row group")
        self.in_features = parts[0].cols
        if any(p.cols != self.in_features for p in parts):
            raise ValueError("quantized row groups of one projection must have the same columns")
        self._parts: list[_Part] = []
        offset = 0
        for p in parts:
            self._parts.append(_Part(p, offset))
            offset += p.rows
        self.out_features = offset
        self.bias = bias.to(torch.float32).contiguous() if bias is not None else None
        self.num_parameters = self.out_features * self.in_features + (bias.numel() if bias is not None else 0)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the packed weights (and bias) as held in memory."""
        extra = self.bias.numel() * 4 if self.bias is not None else 0
        return sum(p.weight.numel() for p in self._parts) + extra

    @property
    def formats(self) -> list[str]:
        """The GGUF types of the row groups, e.g. ``["Q4_K", "Q6_K"]``."""
        return [p.source for p in self._parts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.in_features)
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            x = x.to(torch.float32).contiguous()
        num_tokens = x.shape[0]
        y = torch.empty(num_tokens, self.out_features, dtype=torch.float32)
        if num_tokens <= INT8_MAX_TOKENS:
            for p in self._parts:
                bias = self.bias[p.offset : p.offset + p.rows] if self.bias is not None else None
                packed_linear(p.kind, p.weight, self.in_features, x, y[:, p.offset : p.offset + p.rows], bias)
            return y
        panel_rows = max(16, PANEL_BYTES // (4 * self.in_features))
        for p in self._parts:
            for start in range(0, p.rows, panel_rows):
                stop = min(start + panel_rows, p.rows)
                panel = dequantize_rows(p.kind, p.weight, self.in_features, range(start, stop))  # [rows, in]
                y[:, p.offset + start : p.offset + stop] = torch.mm(x, panel.t())
        if self.bias is not None:
            y += self.bias
        return y

    def __repr__(self) -> str:
        kinds = "+".join(f"{p.source}:{KIND_NAMES[p.kind]}" for p in self._parts)
        return f"QuantProjection({self.in_features} -> {self.out_features}, {kinds})"


class QuantEmbedding:
    """A token embedding kept packed: ``lookup(ids)`` dequantizes only the rows a step needs."""

    def __init__(self, rows: PackedRows):
        self.packed = rows
        self.weight = torch.from_numpy(rows.data)
        self.num_embeddings, self.embedding_dim = rows.rows, rows.cols

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 token ids -> [T, dim] fp32."""
        return dequantize_rows(self.packed.kind, self.weight, self.embedding_dim, ids.to(torch.int64).contiguous())

    @property
    def weight_bytes(self) -> int:
        return int(self.weight.numel())

    def as_projection(self) -> QuantProjection:
        """The tied lm_head over the same packed bytes (no copy)."""
        return QuantProjection([self.packed], None)
