"""LLM.generate runs on an Executor: one per LLM, kept across calls, closed with the LLM; the
progress bar still counts requests and tok/s; a failure in the loop is raised, not hung on."""

from __future__ import annotations

import pytest
import torch

from choral import LLM, SamplingParams
from choral.errors import RequestFailedError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def make(tiny_models, **options) -> LLM:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    return LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=64, **options)


def test_one_executor_across_calls_closed_with_the_llm(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models) as llm:
        first = llm.generate([5, 6, 7], GREEDY)
        executor = llm.executor
        again = llm.generate([[5, 6, 7], [8, 9]], GREEDY)
        assert llm.executor is executor and executor.is_running
        assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
        assert [o.request_id for o in again] == ["1", "2"]  # the executor's request ids
    assert not executor.is_running  # the with block closed it
    out = llm.generate([5, 6, 7], GREEDY)  # a new one starts on demand
    assert out[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    new = llm.executor
    del llm  # garbage collection shuts it down too
    import gc

    gc.collect()
    assert not new.is_running


def test_progress_bar_counts_requests_and_speed(tiny_models, capsys) -> None:  # type: ignore[no-untyped-def]
    llm = make(tiny_models)
    outs = llm.generate([[5, 6, 7], [8, 9], [10]], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert len(outs) == 3 and "3/3" in err and "tok/s" in err
    llm.close()


def test_prefix_caching_is_opt_in(tiny_models) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(3, 40))
    plain, cached = make(tiny_models), make(tiny_models, enable_prefix_caching=True)
    for llm in (plain, cached):
        first = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
        llm.executor.get_latest_iteration_stats()
        assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == first
        prefill = sum(s.num_prefill_tokens for s in llm.executor.get_latest_iteration_stats())
        assert prefill == (1 if llm is cached else len(prompt))  # 36 of 37 tokens from the cache
        llm.close()


def test_a_failing_logits_processor_fails_its_request_only(tiny_models) -> None:  # type: ignore[no-untyped-def]
    llm = make(tiny_models)

    def broken(request_id: str, logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        raise ValueError("broken processor")

    llm.register_logits_processor("broken", broken)
    executor = llm.executor
    with pytest.raises(RequestFailedError, match="ValueError: broken processor"):
        llm.generate([[5, 6, 7], [8, 9]], [GREEDY, SamplingParams(max_tokens=4, logits_processors=["broken"])])
    assert llm.executor is executor and executor.is_running  # the loop lives on
    assert len(llm.generate([5, 6, 7], GREEDY)[0].outputs[0].token_ids) == 6
    pool = llm.engine.pool
    assert pool.num_used_blocks == 0  # the failed request's blocks, and the cancelled one's, are back
    pool.check_invariants({})
    assert executor.aggregate.failed == 1
    llm.close()
