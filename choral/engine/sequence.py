"""A sequence: its tokens, how many are in the KV cache, and its block table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from choral.kv.block_pool import blocks_for_tokens
from choral.sampling.params import SamplingParams
from choral.sampling.structured import GrammarMatcher

if TYPE_CHECKING:
    from choral.engine.fanout import BeamGroup


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: two sequences with equal tokens are still two sequences
class Sequence:
    """One generation stream. Owns its tokens and block table; the pool owns the blocks."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    num_preemptions: int = 0
    request_id: str = ""
    bad_words: list[tuple[int, ...]] = field(default_factory=list)  # token-id form of params.bad_words
    grammar: GrammarMatcher | None = None  # structured output: this sequence's parser state
    # n > 1 / best_of / beams: the first sequence of a request is its root; the others fork from it.
    root: Sequence | None = None  # None on the root itself
    index: int = 0  # position among the request's samples
    forks: list[Sequence] = field(default_factory=list)  # on the root: every other sample
    num_pending_forks: int = 0  # on the root: samples to fork off once the prompt is computed
    cumulative_logprob: float = 0.0  # sum of the chosen tokens' logprobs, when computed
    beam: BeamGroup | None = None  # on the root of a beam-search request

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def request_finished(self) -> bool:
        """On a root: every sample of the request is done (beam search: the search is done)."""
        if self.beam is not None:
            return self.beam.search.done
        return self.is_finished and self.num_pending_forks == 0 and all(f.is_finished for f in self.forks)

    def blocks_needed(self, num_new_tokens: int, block_size: int) -> int:
        """Blocks to add so ``num_new_tokens`` more fit after the computed ones."""
        total = blocks_for_tokens(self.num_computed_tokens + num_new_tokens, block_size)
        return max(0, total - len(self.block_table))
