"""The batched sampler against references: transformers' logits processors/warpers on the same
logits, formulas for presence/frequency, a chi-square test of the draws, seeds and batch mixing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import logits_process as hf

from choral import InvalidRequestError, SamplingParams
from choral.sampling import logits_process as lp
from choral.sampling.processors import LogitsProcessorRegistry
from choral.sampling.sampler import Row, Sampler

CPU = torch.device("cpu")
V = 64


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def same_filter(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same tokens removed (-inf) and the kept ones unchanged."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "values", "ours", "warper"),
    [
        ("top_k", [1, 5, 20, V], lambda x, v: lp.apply_top_k_top_p(x, v, torch.ones(len(v))),
         lambda v: hf.TopKLogitsWarper(v)),
        ("top_p", [0.1, 0.5, 0.9, 0.99], lambda x, v: lp.apply_top_k_top_p(x, torch.full((len(v),), V), v),
         lambda v: hf.TopPLogitsWarper(v)),
        ("min_p", [0.01, 0.05, 0.2, 0.5], lp.apply_min_p, lambda v: hf.MinPLogitsWarper(v)),
        ("typical_p", [0.2, 0.5, 0.9, 0.99], lp.apply_typical_p, lambda v: hf.TypicalLogitsWarper(v)),
    ],
)
def test_warpers_match_transformers(name, values, ours, warper) -> None:  # type: ignore[no-untyped-def]
    # One batch with a different value per row: each row must equal HF applied to that row alone.
    logits = random_logits(len(values), seed=len(name))
    out = ours(logits.clone(), torch.tensor(values))
    ids = torch.zeros(1, 1, dtype=torch.long)
    for row, value in enumerate(values):
        same_filter(out[row : row + 1], warper(value)(ids, logits[row : row + 1].clone()))


def test_top_k_then_top_p_matches_transformers_chain() -> None:
    logits = random_logits(3, seed=7)
    k, p = torch.tensor([10, 30, 5]), torch.tensor([0.8, 0.6, 0.95])
    out = lp.apply_top_k_top_p(logits.clone(), k, p)
    ids = torch.zeros(1, 1, dtype=torch.long)
    for row in range(3):
        top_k = hf.TopKLogitsWarper(int(k[row]))(ids, logits[row : row + 1].clone())
        ref = hf.TopPLogitsWarper(float(p[row]))(ids, top_k)
        same_filter(out[row : row + 1], ref)


def test_knobs_off_are_identity() -> None:
    logits = random_logits(2)
    assert torch.equal(lp.apply_top_k_top_p(logits, torch.tensor([V, V]), torch.ones(2)), logits)
    assert torch.equal(lp.apply_typical_p(logits, torch.ones(2)), logits)
    assert torch.equal(lp.apply_min_p(logits, torch.zeros(2)), logits)


def test_repetition_penalty_matches_transformers() -> None:
    logits = random_logits(2, seed=3)
    history = [[3, 5, 5, 9, 60], [1, 2]]
    sampler = Sampler(CPU)
    rows = [Row(SamplingParams(repetition_penalty=1.3), history[0], 2),
            Row(SamplingParams(repetition_penalty=0.7), history[1], 1)]
    out = sampler.process(logits.clone(), rows)
    for row, (h, pen) in enumerate(zip(history, [1.3, 0.7], strict=True)):
        ref = hf.RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([h]), logits[row : row + 1].clone())
        torch.testing.assert_close(out[row : row + 1], ref, rtol=0, atol=1e-6)


def test_no_repeat_ngram_matches_transformers() -> None:
    history = [4, 7, 4, 7, 9, 4, 7, 4]
    logits = random_logits(1, seed=4)
    for n in (1, 2, 3, 4):
        out = Sampler(CPU).process(logits.clone(), [Row(SamplingParams(no_repeat_ngram_size=n), history, 3)])
        ref = hf.NoRepeatNGramLogitsProcessor(n)(torch.tensor([history]), logits.clone())
        same_filter(out, ref)


def test_presence_and_frequency_penalties_follow_the_formula() -> None:
    logits = random_logits(2, seed=5)
    prompt = [11, 12]  # prompt tokens are not penalized by presence/frequency (output only)
    outputs = [[3, 3, 3, 8], [8]]
    rows = [Row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt + outputs[0], 2),
            Row(SamplingParams(presence_penalty=-1.0, frequency_penalty=2.0), prompt + outputs[1], 2)]
    out = Sampler(CPU).process(logits.clone(), rows)
    expected = logits.clone()
    for row, (p, f) in enumerate([(0.5, 0.25), (-1.0, 2.0)]):
        for token in set(outputs[row]):
            expected[row, token] -= f * outputs[row].count(token) + p
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_logit_bias_bad_words_and_min_tokens() -> None:
    logits = random_logits(3, seed=6)
    sampler = Sampler(CPU, eos_token_ids=[2])
    rows = [
        Row(SamplingParams(logit_bias={5: 1.5, 6: -math.inf}), [1, 2, 3], 3),
        Row(SamplingParams(), [1, 9, 10], 1, bad_words=[(9, 10, 11), (40,), (1, 12)]),
        Row(SamplingParams(min_tokens=2, stop_token_ids=[7], max_tokens=4), [1, 3], 1),  # 1 output < 2
    ]
    out = sampler.process(logits.clone(), rows)
    expected = logits.clone()
    expected[0, 5] += 1.5
    expected[0, 6] = -math.inf
    expected[1, [11, 40]] = -math.inf  # (1, 12) is not banned: the row did not just emit 1
    expected[2, [2, 7]] = -math.inf
    assert torch.equal(out, expected)


def test_logits_processors_per_request_and_batched() -> None:
    registry = LogitsProcessorRegistry()
    seen: list[tuple[str, list[int]]] = []

    def ban_three(request_id: str, logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        seen.append((request_id, token_ids))
        logits[3] = -math.inf
        return logits

    def boost(request_ids: list[str], logits: torch.Tensor, token_ids: list[list[int]]) -> torch.Tensor:
        assert request_ids == ["a", "c"] and logits.shape == (2, V)
        return logits + torch.nn.functional.one_hot(torch.tensor(4), V) * 100

    registry.register("ban_three", ban_three)
    registry.register_batched("boost", boost)
    with pytest.raises(InvalidRequestError, match="nope"):
        registry.check(["nope"])
    sampler = Sampler(CPU, processors=registry)
    rows = [Row(SamplingParams(temperature=0, logits_processors=["boost"]), [1], 1, request_id="a"),
            Row(SamplingParams(temperature=0, logits_processors=["ban_three"]), [1, 8], 1, request_id="b"),
            Row(SamplingParams(temperature=0, logits_processors=["boost", "ban_three"]), [2], 1, request_id="c")]
    logits = random_logits(3, seed=8)
    logits[1, 3] = 50.0
    assert sampler.sample(logits, rows).token_ids[0] == 4
    assert sampler.sample(logits, rows).token_ids[1] != 3
    assert ("b", [1, 8]) in seen


# Chi-square critical values at p = 0.001 by degrees of freedom (standard tables).
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                       8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909}


@pytest.mark.parametrize(
    "knobs",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=6), dict(temperature=1.3, top_p=0.8),
     dict(temperature=1.0, min_p=0.1, top_k=10), dict(temperature=0.9, typical_p=0.7),
     dict(temperature=1.0, top_k=8, typical_p=0.8), dict(temperature=0.8, top_p=0.95, min_p=0.05)],
)
def test_draws_match_the_filtered_softmax(knobs: dict) -> None:  # type: ignore[type-arg]
    """40,000 draws (fixed seed) over a 12-token vocabulary; reject at p = 0.001."""
    draws = 40_000
    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -1.5, -2.0]])
    params = SamplingParams(**knobs)
    # The expected distribution: transformers' warpers in our order on the same logits.
    ids = torch.zeros(1, 1, dtype=torch.long)
    ref = logits / params.temperature
    if params.top_k:
        ref = hf.TopKLogitsWarper(params.top_k)(ids, ref)
    if params.top_p < 1:
        ref = hf.TopPLogitsWarper(params.top_p)(ids, ref)
    if params.min_p:
        ref = hf.MinPLogitsWarper(params.min_p)(ids, ref)
    if params.typical_p < 1:
        ref = hf.TypicalLogitsWarper(params.typical_p)(ids, ref)
    expected = ref.softmax(-1)[0] * draws
    sampler = Sampler(CPU, seed=1234)
    tokens = sampler.sample(logits.expand(draws, -1).contiguous(), [Row(params)] * draws).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=12).double()
    support = expected > 0
    assert observed[~support].sum() == 0, "a filtered-out token was drawn"
    chi2 = float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())
    dof = int(support.sum()) - 1
    assert dof >= 1
    assert chi2 < CHI2_CRITICAL_0_001[dof], f"chi2 {chi2:.2f} >= {CHI2_CRITICAL_0_001[dof]} (dof {dof})"


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = random_logits(4, seed=9)
    def seeded(seed: int) -> Row:
        return Row(SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=seed), [1, 5], 1,
                   torch.Generator().manual_seed(seed))
    alone = [Sampler(CPU).sample(logits[i : i + 1], [seeded(i)]).token_ids[0] for i in range(2)]
    others = [Row(SamplingParams(temperature=0.5, top_k=3)), Row(SamplingParams(temperature=0))]
    mixed = Sampler(CPU, seed=99).sample(logits[[2, 1, 3, 0]], [others[0], seeded(1), others[1], seeded(0)])
    assert [mixed.token_ids[3], mixed.token_ids[1]] == alone


def test_greedy_rows_ignore_the_other_rows_params() -> None:
    logits = random_logits(3, seed=10)
    alone = Sampler(CPU).sample(logits[:1], [Row(SamplingParams(temperature=0))]).token_ids[0]
    heavy = SamplingParams(temperature=1.5, top_k=4, top_p=0.5, min_p=0.2, typical_p=0.5, repetition_penalty=2.0,
                           presence_penalty=2.0, frequency_penalty=2.0, no_repeat_ngram_size=2)
    mixed = Sampler(CPU).sample(logits, [Row(SamplingParams(temperature=0)), Row(heavy, [1, 2, 1], 1),
                                         Row(heavy, [7], 1)])
    assert mixed.token_ids[0] == alone == int(logits[0].argmax())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"typical_p": 0}, "typical_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
     ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
     ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"), ({"logit_bias": {-3: 1.0}}, "logit_bias"),
     ({"logit_bias": {3: "x"}}, "logit_bias"), ({"bad_words": [[]]}, "bad_words"), ({"n": 0}, "n"),
     ({"n": 3, "best_of": 2}, "best_of"), ({"beam_width": 0}, "beam_width"),
     ({"beam_width": 2, "n": 3}, "n"), ({"json_schema": "{not json"}, "json_schema"),
     ({"regex": "a", "grammar": "root ::= \"a\""}, "grammar"), ({"logits_processors": [""]}, "logits_processors"),
     ({"early_stopping": "yes"}, "early_stopping")],
)
def test_new_params_name_the_bad_field(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_params_are_frozen_and_accept_json_shapes() -> None:
    p = SamplingParams(logit_bias={"17": -100}, json_schema={"type": "object"}, bad_words=["x", [1, 2]])
    assert dict(p.logit_bias) == {17: -100.0} and p.json_schema == '{"type": "object"}'
    assert p.bad_words == ("x", (1, 2))
    with pytest.raises(TypeError):
        p.logit_bias[3] = 1.0  # type: ignore[index]
    hash(p)
    with pytest.raises(InvalidRequestError, match="unknown sampling parameter"):
        SamplingParams.from_dict({"temprature": 1})


def test_seeded_draw_is_the_same_on_the_compact_and_full_vocabulary_paths() -> None:
    """A batch with an unfiltered row makes top-k/top-p run over the whole vocabulary; the seeded
    row's token must not change."""
    logits = random_logits(2, seed=11, vocab=2048)
    for seed in range(40):
        params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.01, seed=seed)
        alone = Sampler(CPU).sample(logits[:1], [Row(params, generator=torch.Generator().manual_seed(seed))])
        mixed = Sampler(CPU).sample(logits, [Row(params, generator=torch.Generator().manual_seed(seed)),
                                             Row(SamplingParams(temperature=1.0))])
        assert mixed.token_ids[0] == alone.token_ids[0]


def test_top_p_on_a_flat_distribution_and_unfiltered_rows() -> None:
    """A near-flat row's top-p set is larger than the 1024 candidates: it takes the sorted path,
    in the same batch as a peaky row, a top-k row and a row with no filter."""
    vocab = 4096
    logits = random_logits(4, seed=12, vocab=vocab)
    logits[1] = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 0.01
    top_k = torch.tensor([vocab, vocab, 7, vocab])
    top_p = torch.tensor([0.9, 0.9, 1.0, 1.0])
    out = lp.apply_top_k_top_p(logits, top_k, top_p)
    ids = torch.zeros(1, 1, dtype=torch.long)
    same_filter(out[0:1], hf.TopPLogitsWarper(0.9)(ids, logits[0:1].clone()))
    same_filter(out[1:2], hf.TopPLogitsWarper(0.9)(ids, logits[1:2].clone()))
    assert int((~torch.isinf(out[1])).sum()) > 1024
    same_filter(out[2:3], hf.TopKLogitsWarper(7)(ids, logits[2:3].clone()))
    assert torch.equal(out[3], logits[3])
