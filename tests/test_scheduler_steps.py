"""The executor's step driven synchronously (Stepper.step: schedule -> core.step -> update), no
thread, no sleeps: exact on tiny configs — which sequences ran, with how many tokens, in which
blocks — for chunked prefill, preemption, priorities, the prefix cache, n / best_of, beams and
the batching strategies."""

from __future__ import annotations

from typing import Any

import pytest

from choral import SamplingParams
from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.executor import BatchingStrategy, ExecutorConfig, KvPolicy, Request
from choral.executor.job import Job
from choral.executor.scheduler import ScheduledStep
from choral.executor.stepper import Stepper


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def loaded(tiny_models: Any) -> Any:
    directory, _ = tiny_models["llama"]
    return LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, kv_cache_tokens=64,
                                  max_model_len=32)).loaded


def stepper(loaded: Any, config: ExecutorConfig | None = None, **options: Any) -> Stepper:
    opts: dict[str, Any] = dict(model="tiny", dtype="float32", block_size=4, kv_cache_tokens=64, max_model_len=32)
    opts.update(options)
    return Stepper(LLMEngine(EngineConfig(**opts), loaded=loaded), config or ExecutorConfig(), Clock())


def ran(step: ScheduledStep) -> list[tuple[int, int]]:
    """(request id, tokens) per scheduled sequence, in step order."""
    return [(int(seq.request_id), n) for seq, n in step.items]


def table(job: Job, index: int = 0) -> list[int]:
    return list(job.sequences[index].block_table)


def run_out(s: Stepper, limit: int = 200) -> None:
    for _ in range(limit):
        if not s.has_work:
            return
        s.step()
    raise AssertionError("still running")


def test_chunked_prefill_then_admission_then_decodes(loaded: Any) -> None:
    s = stepper(loaded, max_num_batched_tokens=8)
    a = s.add(Request(list(range(3, 13)), greedy(2)))  # 10 prompt tokens
    b = s.add(Request(list(range(20, 25)), greedy(2)))  # 5
    step = s.step()
    assert ran(step) == [(0, 8)] and [q.seq_id for q in step.admitted] == [a.root.seq_id]
    assert table(a) == [0, 1, 2]  # the whole prompt is allocated on admission
    step = s.step()
    assert ran(step) == [(0, 2), (1, 5)]  # a's last chunk, then b's admission fills the budget
    assert table(b) == [3, 4]
    assert len(a.root.output_token_ids) == 1 and len(b.root.output_token_ids) == 1
    step = s.step()
    assert ran(step) == [(0, 1), (1, 1)] and step.num_decode_tokens == 2
    assert a.returned and b.returned  # max_tokens 2: both ended
    assert s.kv.usage().num_used_blocks == 0
    s.check_integrity()


def test_decode_without_a_block_preempts_the_newest(loaded: Any) -> None:
    s = stepper(loaded, kv_cache_tokens=16, max_model_len=16)  # 4 blocks
    a = s.add(Request(list(range(3, 10)), greedy(6)))  # 7 tokens: 2 blocks
    b = s.add(Request(list(range(30, 37)), greedy(6)))
    assert ran(s.step()) == [(0, 7), (1, 7)]
    assert (table(a), table(b)) == ([0, 1], [2, 3])
    step = s.step()  # each writes its 8th token into its second block: no block needed
    assert ran(step) == [(0, 1), (1, 1)] and not step.preempted
    step = s.step()  # token 9 needs a third block each; none free: b (newer) goes
    assert [q.seq_id for q in step.preempted] == [b.root.seq_id]
    assert ran(step) == [(0, 1)]
    assert table(a) == [0, 1, 3] and table(b) == []
    assert b.root.num_preemptions == 1 and b.root.num_computed_tokens == 0
    run_out(s)
    assert [len(j.returned[0].output_token_ids) for j in (a, b)] == [6, 6]
    s.check_integrity()


def test_higher_priority_preempts_lower_running(loaded: Any) -> None:
    s = stepper(loaded, kv_cache_tokens=16, max_model_len=16)
    low = s.add(Request(list(range(3, 15)), greedy(4), priority=0))  # 12 tokens: 3 blocks
    assert ran(s.step()) == [(0, 12)]
    high = s.add(Request(list(range(40, 48)), greedy(2), priority=5))  # 8 tokens: 2 blocks
    step = s.step()
    assert [q.seq_id for q in step.preempted] == [low.root.seq_id]
    assert ran(step) == [(1, 8)]
    assert table(high) == [3, 2] and table(low) == []  # low freed its blocks tail first: free list 3, 2, 1, 0
    run_out(s)
    assert low.returned and high.returned
    s.check_integrity()


def test_prefix_cache_hit_shares_full_blocks(loaded: Any) -> None:
    s = stepper(loaded, ExecutorConfig(enable_prefix_cache=True))
    prompt = list(range(3, 13))  # 10 tokens: 2 full blocks
    first = s.add(Request(prompt, greedy(1)))
    s.step()
    assert first.returned and table(first) == []
    second = s.add(Request([*prompt[:8], 99, 98, 97], greedy(1)))
    step = s.step()
    assert step.prefix_hit_blocks == 2
    assert ran(step) == [(1, 3)]  # only the tokens past the two cached blocks
    assert second.root.num_cached_tokens == 8
    assert s.kv.usage().prefix_hits == 2
    s.check_integrity()


def test_n_samples_fork_the_prompt_and_copy_the_partial_block(loaded: Any) -> None:
    s = stepper(loaded)
    job = s.add(Request(list(range(3, 9)), SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=3,
                                                            ignore_eos=True)))
    assert ran(s.step()) == [(0, 6)]
    assert [q.block_table for q in job.sequences] == [[0, 1]] * 3  # forked after the prompt: all shared
    step = s.step()
    assert [n for _, n in step.items] == [1, 1, 1]
    assert step.copies == [(1, 2), (1, 3)]  # the first two writers copy the shared partial block
    assert [q.block_table for q in job.sequences] == [[0, 2], [0, 3], [0, 1]]
    run_out(s)
    assert len(job.returned) == 3
    s.check_integrity()


def test_best_of_returns_n_and_frees_every_sample(loaded: Any) -> None:
    s = stepper(loaded)
    job = s.add(Request(list(range(3, 9)), SamplingParams(temperature=1.0, seed=2, n=1, best_of=3,
                                                            max_tokens=2, ignore_eos=True)))
    run_out(s)
    assert len(job.sequences) == 3 and len(job.returned) == 1
    best = max(job.sequences, key=lambda q: q.cumulative_logprob)
    assert job.returned[0] is best
    assert s.kv.usage().num_used_blocks == 0


def test_beams_run_in_step_and_end_freed(loaded: Any) -> None:
    s = stepper(loaded)
    job = s.add(Request(list(range(3, 9)), SamplingParams(temperature=0, beam_width=2, n=2, max_tokens=3,
                                                            ignore_eos=True)))
    assert ran(s.step()) == [(0, 6)]
    assert job.beam is not None and len(job.beam.live) == 2
    step = s.step()
    assert sorted(n for _, n in step.items) == [1, 1]
    run_out(s)
    assert len(job.returned) == 2 and s.kv.usage().num_used_blocks == 0


def test_static_batch_admits_no_newcomer_until_it_ends(loaded: Any) -> None:
    s = stepper(loaded, ExecutorConfig(strategy=BatchingStrategy.STATIC))
    a = s.add(Request([3, 4, 5], greedy(2)))
    b = s.add(Request([6, 7], greedy(3)))
    assert ran(s.step()) == [(0, 3), (1, 2)]
    c = s.add(Request([8, 9], greedy(1)))
    assert ran(s.step()) == [(0, 1), (1, 1)]  # a ends here
    assert ran(s.step()) == [(1, 1)]  # c still waits for b
    assert ran(s.step()) == [(2, 2)]
    assert a.returned and b.returned and c.returned


def test_guaranteed_no_evict_waits_for_room(loaded: Any) -> None:
    s = stepper(loaded, ExecutorConfig(kv_policy=KvPolicy.GUARANTEED_NO_EVICT), kv_cache_tokens=16, max_model_len=16)
    a = s.add(Request(list(range(3, 7)), greedy(8)))  # may grow to 12 tokens: 3 blocks reserved
    b = s.add(Request(list(range(10, 14)), greedy(8)))  # needs 3 more: only 1 left
    step = s.step()
    assert ran(step) == [(0, 4)]
    for _ in range(7):
        assert [r for r, _ in ran(s.step())] == [0]
    assert a.returned and not b.returned
    assert ran(s.step()) == [(1, 4)]
    run_out(s)
    s.check_integrity()
