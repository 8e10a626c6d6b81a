"""Hostile sampling settings (issue: "200 OK with garbage"): a row without a finite positive mass
is a SamplingError naming the knob, for that request alone; integer fields have bounds the loop
can use (top_k = 2**63 used to overflow inside the loop)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from choral import BatchedExecutor, InvalidRequestError, SamplingParams
from choral.errors import RequestFailedError, SamplingError
from choral.executor import Executor, Request
from choral.sampling.params import MAX_INT
from choral.sampling.sampler import Row, Sampler

VOCAB = 32


def logits(rows: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(rows, VOCAB)


@pytest.mark.parametrize("params, knob", [
    (SamplingParams(temperature=5e-324), "temperature"),
    (SamplingParams(logit_bias={1: 1e308}), "logit_bias"),
    (SamplingParams(temperature=0, logit_bias={1: 1e308}), "logit_bias"),
    (SamplingParams(logit_bias={t: float("-inf") for t in range(VOCAB)}), "logit_bias"),
    (SamplingParams(repetition_penalty=1e-308), "repetition_penalty"),
    (SamplingParams(temperature=0, bad_words=tuple((t,) for t in range(VOCAB))), "bans"),
    (SamplingParams(min_tokens=1, stop_token_ids=tuple(range(2, VOCAB))), "bans"),
])
def test_a_row_without_mass_names_its_knob(params: SamplingParams, knob: str) -> None:
    sampler = Sampler(torch.device("cpu"), eos_token_ids=(0, 1))
    history = [3, 4, 5]
    words = [w for w in params.bad_words if isinstance(w, tuple)]
    row = Row(params, token_ids=history, num_prompt_tokens=len(history), request_id="7", bad_words=words)
    with pytest.raises(SamplingError, match=f"^{knob}") as info:
        sampler.sample(logits(), [row])
    assert isinstance(info.value, InvalidRequestError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_model_logits_are_refused_not_drawn(bad: float) -> None:
    sampler = Sampler(torch.device("cpu"))
    rows = logits(2)
    if bad == float("-inf"):
        rows[1] = bad  # a whole row of -inf: nothing to draw
    else:
        rows[1, 5] = bad
    for params in (SamplingParams(), SamplingParams(temperature=0)):
        with pytest.raises(SamplingError, match="^the model's own logits"):
            sampler.sample(rows, [Row(params), Row(params)])
        # The healthy row alone draws as usual.
        assert 0 <= sampler.sample(rows[:1], [Row(params)]).token_ids[0] < VOCAB


def test_a_top_k_larger_than_the_vocabulary_keeps_every_token() -> None:
    sampler = Sampler(torch.device("cpu"))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full = sampler.sample(logits(), [Row(SamplingParams(top_k=MAX_INT), generator=g1)]).token_ids
    none = sampler.sample(logits(), [Row(SamplingParams(top_k=0), generator=g2)]).token_ids
    assert full == none


@pytest.mark.parametrize("field, value", [
    ("top_k", 2**63), ("max_tokens", 2**63), ("min_tokens", 2**40), ("no_repeat_ngram_size", 2**62),
    ("n", 2**40), ("best_of", 2**40), ("beam_width", 2**33), ("stop_token_ids", [2**63]),
    ("logit_bias", {2**63: 1.0}), ("logit_bias", {"9" * 5000: 1.0}), ("logit_bias", {"²": 1.0}),
    ("logit_bias", {1: 10**400}), ("bad_words", [[2**64]]), ("max_tokens", 10**5000), ("seed", 2**64),
], ids=lambda v: v if isinstance(v, str) else "v")
def test_integer_fields_have_bounds_the_loop_can_use(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{field}") as info:
        SamplingParams(**{field: value})
    assert len(str(info.value)) < 300  # a hostile value is never echoed whole


@pytest.fixture(scope="module")
def tiny(tiny_models: Any) -> Iterator[Executor]:
    directory, _ = tiny_models["llama"]
    ex = Executor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=128)
    yield ex
    ex.shutdown()


def test_top_k_2_63_is_refused_by_the_python_api(tiny: Executor) -> None:
    with pytest.raises(InvalidRequestError, match="^top_k"):
        tiny.enqueue(Request([5, 6, 7], SamplingParams(top_k=2**63)))


@pytest.mark.parametrize("bad", [
    SamplingParams(temperature=5e-324, max_tokens=4),
    SamplingParams(logit_bias={1: 1e308}, max_tokens=4),
    SamplingParams(repetition_penalty=1e-308, max_tokens=4),
])
def test_a_request_without_mass_fails_alone(tiny: Executor, bad: SamplingParams) -> None:
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = tiny.submit(Request([5, 6, 7], good), timeout=60).outputs[0].token_ids
    ids = tiny.submit_many([Request([5, 6, 7], good), Request([9, 10], bad), Request([5, 6, 7], good)])
    assert tiny.poll(ids[0], timeout=60) is not None  # type: ignore[union-attr]
    with pytest.raises(RequestFailedError) as info:
        tiny.poll(ids[1], timeout=60)
    assert isinstance(info.value.__cause__, SamplingError)
    completion = tiny.poll(ids[2], timeout=60)
    assert completion is not None and completion.outputs[0].token_ids == alone
    assert tiny.kv.pool.num_used_blocks == 0  # the failed request's blocks went back


def test_conversation_sample_refuses_and_the_conversation_goes_on(tiny_models: Any) -> None:
    directory, _ = tiny_models["llama"]
    with BatchedExecutor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=256,
                         max_model_len=64) as bx:
        conv = bx.create()
        conv.prompt([5, 6, 7])
        bx.infer()
        with pytest.raises(SamplingError, match="temperature"):
            conv.sample(SamplingParams(temperature=5e-324))
        token = conv.sample(SamplingParams(temperature=0))
        conv.prompt(token)
        bx.infer()
        assert conv.token_count == 4
