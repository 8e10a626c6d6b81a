"""Speculator: which sequences speculate, their proposals, and the verdicts' bookkeeping.

Each sequence that speculates owns a :class:`SpecState` (its proposer, adaptive length and
counters), created from the request's ``SamplingParams.speculative`` or the executor's default.
The scheduler asks :meth:`Speculator.plan` for the decodes' proposals (those worth verifying) when it budgets
the step; the step runner reports how much of it the target accepted with :meth:`record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from choral.speculative.adaptive import AdaptiveLength
from choral.speculative.config import SpeculativeConfig
from choral.speculative.cost import StepCost
from choral.speculative.ngram import NgramProposer
from choral.speculative.proposer import Proposer


class Sequence(Protocol):
    """What the speculator reads of a sequence (an executor sequence satisfies it)."""

    @property
    def seq_id(self) -> int: ...
    @property
    def token_ids(self) -> list[int]: ...


@dataclass
class SpecState:
    """One sequence's speculation: its proposer, proposal length and counts."""

    config: SpeculativeConfig
    proposer: Proposer
    length: AdaptiveLength
    num_proposed: int = 0  # proposed tokens sent to the target for verification
    num_accepted: int = 0  # of which it accepted (counted as each is drawn, before a stop check)
    num_steps: int = 0  # verification steps (each also yields one token of the target's own)
    # Recent share of proposed tokens accepted (exponential average); optimistic at first, so
    # a sequence's first proposals are verified and measured.
    acceptance: float = 1.0
    num_gated: int = 0  # proposals in a row the cost model left unverified


def make_state(config: SpeculativeConfig) -> SpecState:
    """A fresh SpecState for a sequence speculating with ``config`` (which is enabled)."""
    assert config.method == "ngram", config.method  # the config refuses every other method
    return SpecState(config, NgramProposer(config.ngram_min, config.ngram_max),
                     AdaptiveLength(config.k, config.adaptive))


ACCEPTANCE_EMA = 0.2  # weight of the newest verification in a sequence's acceptance average
PROBE_EVERY = 16  # a proposal the cost model refused this many times in a row is verified anyway


def expected_accepted(rate: float, length: int) -> float:
    """Tokens expected to be accepted of a proposal of ``length`` when each is accepted with
    probability ``rate`` given the ones before it: rate + rate**2 + ... + rate**length."""
    return sum(rate**i for i in range(1, length + 1))


class Speculator:
    """Resolves each request's speculation and turns sequences' tails into proposals."""

    def __init__(self, default: SpeculativeConfig | None = None):
        self.default = default
        self.num_proposed = 0  # totals since start (``/metrics``, benchmarks)
        self.num_accepted = 0
        self.num_verifications = 0  # sequence-steps that verified a proposal
        self.cost = StepCost()  # measured step latency by size (the executor's steps)

    def config_for(self, requested: SpeculativeConfig | None, beam: bool) -> SpeculativeConfig | None:
        """The config a request speculates with: its own, else the default (never beams, whose
        steps advance every beam together)."""
        config = requested if requested is not None else self.default
        if config is None or not config.enabled or beam:
            return None
        return config

    def plan(self, candidates: list[tuple[Sequence, SpecState, int]], num_decodes: int,
             budget: int) -> dict[int, list[int]]:
        """This step's proposals: ``candidates`` are the speculating decodes with the most tokens
        each may propose, ``num_decodes`` the step's decodes, ``budget`` the tokens proposals may
        take in all. Returns seq_id -> proposal, the most promising first; with ``adaptive``
        only those whose expected accepted tokens pay for their share of the step (StepCost)."""
        proposals = [(seq, state, draft) for seq, state, limit in candidates
                     if (draft := self.propose(seq, state, min(limit, budget)))]
        chosen: dict[int, list[int]] = {}
        tokens, gained = num_decodes, 0.0
        for seq, state, draft in sorted(proposals, key=lambda p: -p[1].acceptance):
            draft = draft[:budget]
            if not draft:
                break
            expected = expected_accepted(state.acceptance, len(draft))
            now, after = self.cost.estimate(tokens), self.cost.estimate(tokens + len(draft))
            probe = state.num_gated >= PROBE_EVERY  # refresh an acceptance the gate keeps unmeasured
            if (state.config.adaptive and not probe and now is not None and after is not None
                    and (num_decodes + gained + expected) / after <= (num_decodes + gained) / now):
                state.num_gated += 1
                continue  # verifying it would lower the step's output tokens per second
            state.num_gated = 0
            chosen[seq.seq_id] = draft
            tokens += len(draft)
            gained += expected
            budget -= len(draft)
        return chosen

    def propose(self, seq: Sequence, state: SpecState | None, limit: int) -> list[int]:
        """Up to ``limit`` tokens to verify after ``seq``'s last token ([] : a plain decode)."""
        if state is None or limit <= 0:
            return []
        k = min(limit, state.length.limit())
        if k <= 0:
            return []
        return state.proposer.propose(seq.token_ids, k)

    def record(self, state: SpecState, proposed: int, accepted: int) -> None:
        """A verification step is over: the target accepted ``accepted`` of the ``proposed``
        tokens (the sequence's own counts were kept as they were drawn); adapt the length."""
        state.num_steps += 1
        if proposed:
            state.acceptance += ACCEPTANCE_EMA * (accepted / proposed - state.acceptance)
        state.length.record(proposed, accepted)
        self.num_proposed += proposed
        self.num_accepted += accepted
        self.num_verifications += 1
