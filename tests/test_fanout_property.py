"""Property test: random mixes of n > 1, best_of, greedy and seeded sampling on a
tiny KV pool (forks, copy-on-write, preemption) give the same tokens as on a large pool, and the
block pool's books balance after every step."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from choral import LLM, SamplingParams


@pytest.fixture(scope="module")
def pools(tiny_models):  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    small = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=64, max_model_len=48,
                max_num_batched_tokens=24)
    big = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=4096, max_model_len=48)
    return small, big


def check_books_after_each_step(llm: LLM) -> list[int]:
    executor = llm.executor
    running = executor.scheduler.running
    steps: list[int] = []
    run = executor.step_runner.run

    def checked(step):  # type: ignore[no-untyped-def]
        run(step)
        owners = Counter(b for seq in running for b in seq.block_table)
        llm.engine.pool.check_invariants(dict(owners))
        steps.append(len(running))
        if len(steps) > 2000:  # these requests need a few hundred steps at most
            raise RuntimeError("the engine makes no progress")

    executor.step_runner.run = checked  # type: ignore[method-assign]
    return steps


request = st.fixed_dictionaries({
    "prompt_len": st.integers(1, 13),
    "kind": st.sampled_from(["greedy", "seeded", "n", "best_of", "beam"]),
    "width": st.integers(2, 3),
    "max_tokens": st.integers(1, 10),
    "seed": st.integers(0, 1000),
})


def params_for(r: dict) -> SamplingParams:  # type: ignore[type-arg]
    common = dict(max_tokens=r["max_tokens"], ignore_eos=True)
    if r["kind"] == "greedy":
        return SamplingParams(temperature=0, **common)  # type: ignore[arg-type]
    if r["kind"] == "seeded":
        return SamplingParams(temperature=1.0, top_k=20, seed=r["seed"], **common)  # type: ignore[arg-type]
    if r["kind"] == "n":
        return SamplingParams(temperature=1.0, n=r["width"], seed=r["seed"], **common)  # type: ignore[arg-type]
    if r["kind"] == "best_of":
        return SamplingParams(temperature=1.0, n=1, best_of=r["width"], seed=r["seed"],
                              **common)  # type: ignore[arg-type]
    return SamplingParams(beam_width=r["width"], n=r["width"], **common)  # type: ignore[arg-type]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request, min_size=1, max_size=5))
def test_forks_on_a_tiny_pool_match_a_large_pool(pools, requests) -> None:  # type: ignore[no-untyped-def]
    small, big = pools
    prompts = [[(3 + 7 * i + j) % 120 + 3 for j in range(r["prompt_len"])] for i, r in enumerate(requests)]
    params = [params_for(r) for r in requests]
    steps = check_books_after_each_step(small)
    try:
        got = small.generate(prompts, params)
    finally:
        del small.executor.step_runner.run
    want = big.generate(prompts, params)
    assert steps
    for out, ref, p in zip(got, want, params, strict=True):
        assert len(out.outputs) == p.n
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in ref.outputs]
    for llm in (small, big):
        assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
        llm.engine.pool.check_invariants({})
