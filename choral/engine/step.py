"""The data that crosses the core's step boundary: plain Python in, logits rows out.

A :class:`StepPlan` is everything one forward needs: the block copies to make first
(copy-on-write) and, per sequence, a :class:`~choral.engine.model_runner.Chunk` (the token ids,
the cache index they start at, the block table, which logits rows to return). The same plan is
what a tensor-parallel worker would receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from choral.engine.model_runner import Chunk
from choral.kv.kv_cache import BlockCopy


@dataclass(frozen=True)
class StepPlan:
    """What one forward runs: ``copies`` first, then every chunk in one packed batch."""

    chunks: list[Chunk]
    copies: list[BlockCopy] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class StepOutput:
    """Per chunk of the plan, in order: its logits ([1, V] for ``last``, [n, V] for ``all``) or
    None (``none``), and its final hidden states as the chunk's ``hidden`` asks ([1, H] / [n, H]
    fp32) or None."""

    logits: list[torch.Tensor | None]
    hidden: list[torch.Tensor | None] = field(default_factory=list)
