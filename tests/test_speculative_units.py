"""Speculative decoding's plain-Python parts, exact: the config's validation, the n-gram
proposer against a brute-force reference, the adaptive proposal length step by step."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from choral import SamplingParams
from choral.errors import ConfigError, InvalidRequestError
from choral.executor import ExecutorConfig
from choral.speculative import SpeculativeConfig
from choral.speculative.adaptive import AdaptiveLength
from choral.speculative.ngram import MAX_CANDIDATES, NgramProposer


def test_config_accepts_ours_and_vllms_names() -> None:
    assert SamplingParams(speculative={"method": "ngram", "k": 3}).speculative == SpeculativeConfig(k=3)
    assert SpeculativeConfig.coerce({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 6,
                                     "prompt_lookup_min": 3}) == SpeculativeConfig(k=5, ngram_min=3, ngram_max=6)
    assert SpeculativeConfig.coerce("off").enabled is False
    assert SpeculativeConfig.coerce({"model": "d.gguf", "num_speculative_tokens": 3}) == \
        SpeculativeConfig(method="draft", model="d.gguf", k=3)  # vLLM's draft form
    assert ExecutorConfig(speculative={"k": 2}).speculative == SpeculativeConfig(k=2)


@pytest.mark.parametrize(("value", "message"), [
    ({"method": "ngram", "model": "x.gguf"}, "a draft model goes with method 'draft', not 'ngram'"),
    ({"model": ""}, "speculative.model: must be a model name or path"),
    ({"method": "draft", "p_min": 1.0}, "speculative.p_min: must be a number in [0, 1)"),
    ({"method": "draft", "p_min": "x"}, "speculative.p_min"),
    ({"method": "medusa"}, "speculative.method: must be one of ngram, draft, off"),
    ({"k": 0}, "speculative.k: must be an int in [1, 16]"),
    ({"k": 17}, "speculative.k"),
    ({"k": True}, "speculative.k"),
    ({"k": 2.0}, "speculative.k"),
    ({"ngram_min": 3, "ngram_max": 2}, "ngram_min: 3 is larger than ngram_max 2"),
    ({"kk": 2}, "unknown option 'kk'"),
    ({"k": 2, "num_speculative_tokens": 3}, "k given twice"),
    ({"adaptive": 1}, "speculative.adaptive: must be a bool"),
    (4, "must be a dict"),
])
def test_config_refuses_with_the_field_named(value: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(speculative=value)  # type: ignore[arg-type]


def test_beams_and_bad_defaults_refused() -> None:
    with pytest.raises(InvalidRequestError, match="beam search"):
        SamplingParams(temperature=0, beam_width=2, speculative={"method": "ngram"})
    SamplingParams(temperature=0, beam_width=2, speculative={"method": "off"})  # off combines with anything
    with pytest.raises(ConfigError, match="speculative.k"):
        ExecutorConfig(speculative={"method": "draft", "k": 0})
    from choral.speculative.speculator import Speculator

    with pytest.raises(ConfigError, match="method 'draft' needs a draft model"):
        Speculator(SpeculativeConfig(method="draft"))  # an executor's default, over an engine without one


def test_ngram_prefers_the_longest_then_the_latest_match() -> None:
    p = NgramProposer(1, 3)
    #            0  1  2  3  4  5  6  7  8  9 10
    tokens = [1, 2, 3, 9, 5, 2, 3, 7, 8, 2, 3]
    # Tail (2, 3): matches end at 2 (1,2,3: only 2 long vs tail 8,2,3) and 6 (5,2,3: 2 long). Equal
    # lengths: the latest (6) wins, proposing what followed it.
    assert p.propose(tokens, 3) == [7, 8, 2]
    tokens2 = [4, 2, 3, 1, 8, 2, 3, 6, 4, 2, 3]
    assert NgramProposer(1, 3).propose(tokens2, 2) == [1, 8]  # 4,2,3 (3 long) beats the later 8,2,3
    assert NgramProposer(1, 3).propose([1, 2, 3, 4], 4) == []  # the tail never occurred before
    assert NgramProposer(2, 3).propose([5, 1, 6, 1], 4) == []  # only a 1-gram matches: below ngram_min
    assert NgramProposer(1, 4).propose([7, 7], 4) == [7]  # the proposal stops at the sequence's end
    assert NgramProposer(1, 4).propose([7, 8, 7], 0) == []


def reference(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Brute force: the MAX_CANDIDATES latest earlier ends of the tail's n_min-gram, longest
    match (up to n_max) then latest."""
    best, best_len = -1, 0
    length = len(tokens)
    tail = tokens[length - n_min :]
    ends = [e for e in range(n_min - 1, length - 1) if tokens[e - n_min + 1 : e + 1] == tail][-MAX_CANDIDATES:]
    for end in reversed(ends):
        m = 0
        while m < n_max and end - m >= 0 and tokens[end - m] == tokens[length - 1 - m]:
            m += 1
        if m >= n_min and m > best_len:
            best, best_len = end, m
    return [] if best < 0 else tokens[best + 1 : best + 1 + k]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=120), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 5), st.randoms())
def test_ngram_index_matches_brute_force_as_the_sequence_grows(tokens: list[int], n_min: int, extra: int,
                                                              k: int, rnd: random.Random) -> None:
    n_max = n_min + extra
    proposer = NgramProposer(n_min, n_max)
    cut = 1
    while cut <= len(tokens):  # grow in uneven steps: the index extends incrementally
        seq = tokens[:cut]
        assert proposer.propose(seq, k) == reference(seq, k, n_min, n_max)
        cut += rnd.randint(1, 4)


def test_adaptive_length_backs_off_and_recovers() -> None:
    a = AdaptiveLength(k=4, adaptive=True)
    assert a.limit() == 4
    a.record(4, 4)
    assert a.limit() == 4  # doubled, capped at k
    a.record(4, 1)
    assert a.limit() == 2  # what was accepted plus one
    a.record(2, 0)
    assert a.limit() == 1  # halved
    a.record(1, 0)  # off: a back-off of 2 decode steps, then a probe of one token
    assert [a.limit() for _ in range(3)] == [0, 0, 1]
    a.record(1, 0)  # a failed probe: the back-off doubles
    assert [a.limit() for _ in range(5)] == [0, 0, 0, 0, 1]
    a.record(1, 1)
    assert a.limit() == 2
    for _ in range(10):  # the back-off never exceeds 64 steps
        a.record(a.limit() or 1, 0)
    fixed = AdaptiveLength(k=3, adaptive=False)
    fixed.record(3, 0)
    assert fixed.limit() == 3


def test_step_cost_interpolates_measured_buckets_and_forgets_stale_ones() -> None:
    from choral.speculative.cost import STALE_STEPS, StepCost

    cost = StepCost()
    assert cost.estimate(4) is None  # nothing measured: explore
    cost.observe(1, 0.010)
    cost.observe(16, 0.050)
    assert cost.estimate(1) == pytest.approx(0.010)
    assert cost.estimate(6) == pytest.approx(0.010 + 0.040 * 5 / 15)
    assert cost.estimate(17) is None  # beyond the largest measured
    for _ in range(STALE_STEPS + 1):
        cost.observe(1, 0.010)
    assert cost.estimate(16) is None  # the 16-token bucket went stale


def test_plan_verifies_only_what_pays_for_its_tokens() -> None:
    from choral.speculative.speculator import Speculator

    class Seq:
        def __init__(self, seq_id: int, tokens: list[int]) -> None:
            self.seq_id, self.token_ids = seq_id, tokens

    sp = Speculator()
    seqs = [Seq(i, [1, 2, 3, 1, 2, 3, 1, 2]) for i in range(2)]
    states = [Speculator().new_state(SpeculativeConfig(k=3, ngram_min=1)) for _ in seqs]
    cands = [(s, st, 10) for s, st in zip(seqs, states, strict=True)]
    assert sp.plan(cands, 2, 100) == {0: [3, 1, 2], 1: [3, 1, 2]}  # no cost known: explore
    assert sp.plan(cands, 2, 4) == {0: [3, 1, 2], 1: [3]}  # the budget cuts the second
    # Flat cost (memory-bound): every proposal pays. Linear cost at 1 s per token: none does.
    sp.cost.observe(2, 1.0)
    sp.cost.observe(8, 1.0)
    assert sp.plan(cands, 2, 100) == {0: [3, 1, 2], 1: [3, 1, 2]}
    linear = Speculator()
    linear.cost.observe(2, 2.0)
    linear.cost.observe(8, 8.0)
    assert linear.plan(cands, 2, 100) == {}
    fixed = [(s, Speculator().new_state(SpeculativeConfig(k=3, ngram_min=1, adaptive=False)), 10) for s in seqs]
    assert linear.plan(fixed, 2, 100) == {0: [3, 1, 2], 1: [3, 1, 2]}  # adaptive off: always verified


def test_draft_model_runs_only_when_it_pays_for_itself() -> None:
    """The draft model proposes for all its sequences in one call, and only when its measured
    cost plus the verification's is expected to raise the step's output tokens per second."""
    from choral.engine.draft_model import DraftProposer
    from choral.speculative.speculator import Speculator

    class Seq:
        def __init__(self, seq_id: int) -> None:
            self.seq_id, self.token_ids = seq_id, [1, 2, 3]

    class FakeDraft:
        name = "fake"
        calls: list[int] = []

        def proposer(self, p_min: float) -> DraftProposer:
            return DraftProposer(self, p_min)  # type: ignore[arg-type]

        def propose(self, items):  # type: ignore[no-untyped-def]
            self.calls.append(len(items))
            return [[7] * k for _, _, k in items]

    draft = FakeDraft()
    sp = Speculator(draft=draft)  # type: ignore[arg-type]
    config = SpeculativeConfig(method="draft", k=2)
    seqs = [Seq(i) for i in range(4)]
    cands = [(s, sp.new_state(config), 10) for s in seqs]
    assert sp.plan(cands, 4, 100) == {i: [7, 7] for i in range(4)}  # nothing measured: explore
    assert draft.calls == [4]  # one batched call for the four
    # Flat step cost (verifying is free) and a cheap draft: it drafts.
    sp.cost.observe(4, 1.0)
    sp.cost.observe(12, 1.0)
    sp.draft_cost.observe(8, 0.1)
    assert len(sp.plan(cands, 4, 100)) == 4 and draft.calls == [4, 4]
    # A draft as slow as three steps: expected 4 * (1 + 1) = 8 tokens for 4 s > 4 tokens for 1 s? No:
    # (4 + 8) / (1 + 3) = 3 tokens/s < 4: skipped, the decodes go plain, nothing is drafted.
    sp.draft_cost.observe(8, 15.0)  # the EMA moves to ~3.1 s
    assert sp.plan(cands, 4, 100) == {} and draft.calls == [4, 4] and sp.num_draft_skips == 1
    # The plain step unmeasured while the speculating size is: explore the plain step.
    fresh = Speculator(draft=draft)  # type: ignore[arg-type]
    fresh.cost.observe(12, 1.0)
    fresh.draft_cost.observe(8, 0.1)
    assert fresh.plan([(s, fresh.new_state(config), 10) for s in seqs], 4, 100) == {}


def test_llm_refuses_a_bad_speculative_config_before_loading() -> None:
    from choral import LLM

    with pytest.raises(ConfigError, match="speculative_config: .*draft model"):
        LLM(speculative_config={"method": "ngram", "model": "draft.gguf"})
    with pytest.raises(ConfigError, match="speculative_config: .*unknown option 'n'"):
        LLM(speculative_config={"n": 3})

