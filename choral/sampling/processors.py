"""Named logits processors registered on the engine and chosen per request by name.

Two shapes, after TensorRT-LLM's ``logitsPostProcessor`` / ``logitsPostProcessorBatched``:

- per request: ``fn(request_id, logits, token_ids) -> logits`` with ``logits`` [V] and
  ``token_ids`` the row's prompt + output tokens;
- batched: ``fn(request_ids, logits, token_ids) -> logits`` with ``logits`` [R, V] for every
  row that asked for it this step (one call per step: the fast path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from choral.errors import InvalidRequestError

LogitsProcessorFn = Callable[[str, torch.Tensor, list[int]], torch.Tensor]
BatchedLogitsProcessorFn = Callable[[list[str], torch.Tensor, list[list[int]]], torch.Tensor]


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., torch.Tensor]
    batched: bool


class LogitsProcessorRegistry:
    """name -> processor. Unknown names in a request are an error before anything runs."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, fn: LogitsProcessorFn) -> None:
        """Add a per-request processor ``fn(request_id, logits[V], token_ids) -> logits[V]``."""
        self._add(name, _Entry(fn, batched=False))

    def register_batched(self, name: str, fn: BatchedLogitsProcessorFn) -> None:
        """Add a batched processor ``fn(request_ids, logits[R, V], token_ids) -> logits[R, V]``."""
        self._add(name, _Entry(fn, batched=True))

    def _add(self, name: str, entry: _Entry) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"logits_processors: name must be a non-empty str, got {name!r}")
        if not callable(entry.fn):
            raise InvalidRequestError(f"logits_processors: {name!r} is not callable")
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def check(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self._entries:
                known = ", ".join(self.names()) or "none registered"
                raise InvalidRequestError(f"logits_processors: unknown processor {name!r} (known: {known})")

    def apply(
        self,
        logits: torch.Tensor,  # [B, V], changed in place and returned
        names_per_row: Sequence[Sequence[str]],
        request_ids: Sequence[str],
        token_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Run each named processor over the rows that ask for it, in order of first appearance."""
        order: dict[str, list[int]] = {}
        for row, names in enumerate(names_per_row):
            for name in names:
                order.setdefault(name, []).append(row)
        for name, rows in order.items():
            entry = self._entries[name]
            if entry.batched:
                index = torch.tensor(rows, device=logits.device)
                out = entry.fn([request_ids[r] for r in rows], logits.index_select(0, index),
                               [list(token_ids[r]) for r in rows])
                logits.index_copy_(0, index, out.to(logits.dtype))
            else:
                for r in rows:
                    logits[r] = entry.fn(request_ids[r], logits[r], list(token_ids[r]))
        return logits
