"""Speculator: which sequences speculate, their proposals, and the verdicts' bookkeeping.

Each sequence that speculates owns a :class:`SpecState` (its proposer, adaptive length and
counters), created from the request's ``SamplingParams.speculative`` or the executor's default.
The scheduler asks :meth:`Speculator.plan` for the decodes' proposals (those worth verifying) when it budgets
the step; the step runner reports how much of it the target accepted with :meth:`record`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Tokens
from dataclasses import dataclass
from typing import Any, Protocol

from choral.errors import ConfigError, InvalidRequestError
from choral.speculative.adaptive import AdaptiveLength
from choral.speculative.config import SpeculativeConfig
from choral.speculative.cost import StepCost
from choral.speculative.ngram import NgramProposer
from choral.speculative.proposer import DraftSource, Proposer


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

    def close(self) -> None:
        """The sequence is gone: a draft-model proposer gives its draft KV blocks back."""
        close = getattr(self.proposer, "close", None)
        if close is not None:
            close()


ACCEPTANCE_EMA = 0.2  # weight of the newest verification in a sequence's acceptance average
PROBE_EVERY = 16  # a proposal the cost model refused this many times in a row is verified anyway


def expected_accepted(rate: float, length: int) -> float:
    """Tokens expected to be accepted of a proposal of ``length`` when each is accepted with
    probability ``rate`` given the ones before it: rate + rate**2 + ... + rate**length."""
    return sum(rate**i for i in range(1, length + 1))


class Speculator:
    """Resolves each request's speculation and turns sequences' tails into proposals."""

    def __init__(self, default: SpeculativeConfig | None = None, draft: DraftSource | None = None):
        if default is not None and default.method == "draft" and draft is None:
            raise ConfigError("speculative: method 'draft' needs a draft model loaded with the engine "
                              "(EngineConfig.draft_model, LLM(speculative_config={'model': PATH}), "
                              "choral serve --draft-model PATH)")
        self.default = default
        self.draft = draft  # the engine core's draft model, when it has one
        self.num_proposed = 0  # totals since start (``/metrics``, benchmarks)
        self.num_accepted = 0
        self.num_verifications = 0  # sequence-steps that verified a proposal
        self.cost = StepCost()  # measured step latency by size (the executor's steps)
        self.draft_cost = StepCost()  # measured draft-model proposal latency by tokens asked for
        self.num_draft_skips = 0  # steps whose draft proposals the cost gate left undrafted

    def config_for(self, requested: SpeculativeConfig | None, beam: bool) -> SpeculativeConfig | None:
        """The config a request speculates with: its own, else the default (never beams, whose
        steps advance every beam together)."""
        config = requested if requested is not None else self.default
        if config is None or not config.enabled or beam:
            return None
        if config.method == "draft":
            if self.draft is None:
                raise InvalidRequestError("speculative: method 'draft' needs a draft model loaded with the engine "
                                          "(EngineConfig.draft_model, LLM(speculative_config={'model': PATH}), "
                                          "choral serve --draft-model PATH)")
            if config.model is not None and config.model != self.draft.name:
                raise InvalidRequestError(f"speculative.model: {config.model!r} is not this engine's draft model "
                                          f"({self.draft.name!r}); the draft model is chosen when the engine starts")
        return config

    def new_state(self, config: SpeculativeConfig) -> SpecState:
        """A fresh SpecState for a sequence speculating with ``config`` (from :meth:`config_for`)."""
        proposer: Proposer
        if config.method == "draft":
            assert self.draft is not None  # config_for refused it otherwise
            proposer = self.draft.proposer(config.p_min)
        else:
            proposer = NgramProposer(config.ngram_min, config.ngram_max)
        return SpecState(config, proposer, AdaptiveLength(config.k, config.adaptive))

    def plan(self, candidates: list[tuple[Sequence, SpecState, int]], num_decodes: int,
             budget: int) -> dict[int, list[int]]:
        """This step's proposals: ``candidates`` are the speculating decodes with the most tokens
        each may propose, ``num_decodes`` the step's decodes, ``budget`` the tokens proposals may
        take in all. Returns seq_id -> proposal, the most promising first; with ``adaptive``
        only those whose expected accepted tokens pay for their share of the step (StepCost)."""
        proposals = self.propose_all([(seq, state, min(limit, budget)) for seq, state, limit in candidates],
                                     num_decodes)
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

    def propose_all(self, asks: list[tuple[Sequence, SpecState, int]],
                    num_decodes: int | None = None) -> list[tuple[Sequence, SpecState, list[int]]]:
        """Each sequence's proposal of at most ``limit`` tokens (and its adaptive length), the
        empty ones left out. The draft model proposes for all its sequences in one batch, when
        that pays for itself (:meth:`_worth_drafting`, with the step's ``num_decodes``)."""
        wanted = [(seq, state, k) for seq, state, limit in asks if (k := min(limit, state.length.limit())) > 0]
        proposals: dict[int, list[int]] = {}
        drafted = [(seq, state, k) for seq, state, k in wanted if getattr(state.proposer, "batched", False)]
        if drafted and num_decodes is not None and not self._worth_drafting(drafted, num_decodes):
            self.num_draft_skips += 1
            for seq, state, _ in drafted:
                state.num_gated += 1
                proposals[seq.seq_id] = []
            drafted = []
        if drafted:
            assert self.draft is not None
            batch: list[tuple[Any, Tokens[int], int]] = [(state.proposer, seq.token_ids, k)
                                                           for seq, state, k in drafted]
            started = time.perf_counter()
            found = self.draft.propose(batch)
            self.draft_cost.observe(sum(k for _, _, k in drafted), time.perf_counter() - started)
            for (seq, _, _), proposal in zip(drafted, found, strict=True):
                proposals[seq.seq_id] = proposal
        for seq, state, k in wanted:
            if seq.seq_id not in proposals:
                proposals[seq.seq_id] = state.proposer.propose(seq.token_ids, k)
        return [(seq, state, proposals[seq.seq_id]) for seq, state, _ in wanted if proposals[seq.seq_id]]

    def _worth_drafting(self, drafted: list[tuple[Sequence, SpecState, int]], num_decodes: int) -> bool:
        """Whether running the draft model for these sequences is expected to raise the step's
        output tokens per second, its own cost included: ``(decodes + expected accepted) /
        (step(tokens + proposed) + draft(proposed))`` against ``decodes / step(tokens)``. Unmeasured
        sizes are explored; a gate that held for PROBE_EVERY steps lets one through (its
        acceptance averages would never be refreshed otherwise)."""
        if not all(state.config.adaptive for _, state, _ in drafted):
            return True
        if all(state.num_gated >= PROBE_EVERY for _, state, _ in drafted):
            return True
        asked = sum(k for _, _, k in drafted)
        expected = sum(expected_accepted(state.acceptance, k) for _, state, k in drafted)
        if not self.cost.measured(num_decodes) and self.cost.measured(num_decodes + asked):
            return False  # the plain step is what is unknown here: explore it (drafting was measured)
        now, after = self.cost.estimate(num_decodes), self.cost.estimate(num_decodes + asked)
        drafting = self.draft_cost.estimate(asked)
        if now is None or after is None or drafting is None:
            return True
        return (num_decodes + expected) / (after + drafting) > num_decodes / now

    def propose(self, seq: Sequence, state: SpecState | None, limit: int) -> list[int]:
        """Up to ``limit`` tokens to verify after ``seq``'s last token ([] : a plain decode)."""
        if state is None:
            return []
        found = self.propose_all([(seq, state, limit)])
        return found[0][2] if found else []

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
