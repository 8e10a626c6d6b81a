"""A sequence of the executor: a SequenceState (tokens, computed count, block table) plus its
prompt, sampling parameters and sampling state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from choral.engine.soft_prompt import SoftTokens
from choral.kv.sequence_state import SequenceState
from choral.lora.adapter import LoraAdapter
from choral.sampling.params import SamplingParams
from choral.sampling.structured import GrammarMatcher


@dataclass(eq=False)  # identity: two sequences with equal tokens are still two sequences
class Sequence(SequenceState):
    """One generation stream. Owns its tokens and block table; the pool owns the blocks."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    num_preemptions: int = 0
    request_id: str = ""
    bad_words: list[tuple[int, ...]] = field(default_factory=list)  # token-id form of params.bad_words
    grammar: GrammarMatcher | None = None  # structured output: this sequence's parser state
    cumulative_logprob: float = 0.0  # sum of the chosen tokens' logprobs, when computed
    lora: LoraAdapter | None = None  # the adapter it runs with (kept across preemption and forks)
    soft: SoftTokens | None = None  # prompt positions embedded from a soft prompt's vectors

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
