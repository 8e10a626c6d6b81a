"""Scheduler edges: nothing accepted waits forever, batches keep their members, priorities
preempt, pins are counted, and the step stats count what ran."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from choral import SamplingParams
from choral.errors import InvalidRequestError, KvCacheExhaustedError
from choral.executor import BatchingStrategy, Executor, ExecutorConfig, FinishReason, KvPolicy, Request
from choral.executor.completion import Completion
from choral.executor.request import Result

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
T = TypeVar("T")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def make(tiny_models, config: ExecutorConfig | None = None, **options) -> Executor:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    opts = dict(dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=128)
    opts.update(options)
    return Executor(str(directory), config, **opts)


def within(call: Callable[[], T], seconds: float = 60) -> T:
    """``call()`` on another thread: a regression that hangs fails here instead of hanging the suite."""
    out: list[T] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert out, f"the call did not return within {seconds} s"
    return out[0]


def submit_within(ex: Executor, request: Request, seconds: float = 60) -> Completion:
    return within(lambda: ex.submit(request), seconds)


def final_result(ex: Executor, rid: int) -> Result:
    """Read a streaming request's responses up to its final one."""
    while True:
        responses = ex.await_responses(rid, timeout=60)
        assert responses, f"request {rid} gave no response within 60 s"
        last = responses[-1].result
        assert last is not None
        if last.is_final:
            return last


def assert_no_leak(ex: Executor) -> None:
    pool = ex.kv.pool
    pool.check_invariants()
    assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} blocks still held"


def test_adaptive_admits_a_request_wider_than_its_cap_when_idle(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.ADAPTIVE, batch_size=2)  # the cap starts at 2
    with make(tiny_models, cfg, max_num_seqs=8) as ex:
        assert ex.scheduler.seq_cap == 2
        done = submit_within(ex, Request([5, 6, 7], SamplingParams(temperature=1.0, max_tokens=4, seed=1,
                                                                   ignore_eos=True), n=4))
        assert [len(o.token_ids) for o in done.outputs] == [4, 4, 4, 4]
        behind = submit_within(ex, Request([9], GREEDY))  # and nothing queued behind it is stuck
        assert behind.finish_reason is FinishReason.LENGTH
    assert_no_leak(ex)


def test_adaptive_cap_stays_within_max_num_seqs(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.ADAPTIVE, adaptive_min_batch=6, latency_target_ms=1e-6)
    with make(tiny_models, cfg, max_num_seqs=2) as ex:
        ids = ex.submit_many([Request([5, i + 3], GREEDY) for i in range(6)])
        for rid in ids:
            assert ex.poll(rid, timeout=60) is not None
        stats = list(ex.iteration_stats)
        assert max(s.seq_cap for s in stats) == 2
        assert max(s.num_running for s in stats) <= 2
    assert_no_leak(ex)


def test_fixed_size_batch_readmits_its_own_members(tiny_models) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    cfg = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=2)
    # 32 blocks of 4; each request grows to 80 tokens = 20 blocks, so one is preempted mid-batch.
    with make(tiny_models, cfg, kv_cache_tokens=128) as ex:
        requests = [Request([rng.randrange(3, 128) for _ in range(20)], greedy(60)) for _ in range(2)]
        ids = ex.submit_many(requests)
        outs = [ex.poll(rid, timeout=60) for rid in ids]
        assert all(o is not None and len(o.token_ids) == 60 for o in outs)
        assert ex.aggregate.total_preemptions >= 1
    assert_no_leak(ex)


def test_fixed_size_batch_larger_than_the_sequence_cap(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=4)
    with make(tiny_models, cfg, max_num_seqs=2) as ex:
        ids = ex.submit_many([Request([5, i + 3], greedy(3)) for i in range(4)])
        assert all(ex.poll(rid, timeout=60) is not None for rid in ids)
        later = ex.submit_async(Request([9], greedy(3)))  # a new batch needs 4 again
        assert ex.poll(later, timeout=0.3) is None
        more = ex.submit_many([Request([10 + i], greedy(3)) for i in range(3)])
        assert all(ex.poll(rid, timeout=60) is not None for rid in [later, *more])
        # Batch one ran to completion before batch two was admitted.
        admitted = [s.num_admitted for s in ex.iteration_stats if s.num_admitted]
        assert sum(admitted) == 8
    assert_no_leak(ex)


def test_static_batch_admits_no_newcomer(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.STATIC)
    with make(tiny_models, cfg, max_num_seqs=8) as ex:
        first = ex.enqueue_many([Request([5, i + 3], greedy(30), streaming=True) for i in range(3)])
        ex.await_responses(first[0], timeout=30)  # the first batch runs
        late = ex.submit(Request([9], greedy(2)))
        finished = [final_result(ex, rid) for rid in first]
        assert late.timing.first_scheduled is not None
        # The late request was admitted only once every member of the first batch had ended.
        assert late.timing.first_scheduled >= max(r.timing.finished or 0.0 for r in finished)
    assert_no_leak(ex)


def test_guaranteed_no_evict_fanout_reserves_only_what_the_context_allows(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(kv_policy=KvPolicy.GUARANTEED_NO_EVICT)
    with make(tiny_models, cfg, kv_cache_tokens=128, max_model_len=32) as ex:
        params = SamplingParams(temperature=1.0, max_tokens=1000, seed=0, ignore_eos=True)
        done = submit_within(ex, Request([5, 6, 7, 8], params, n=2))  # needs 1 + 2 * 7 of 32 blocks
        assert [len(o.token_ids) for o in done.outputs] == [28, 28]
    with make(tiny_models, cfg, kv_cache_tokens=128, max_model_len=128) as ex:
        too_wide = Request(list(range(3, 13)), SamplingParams(temperature=1.0, max_tokens=100, ignore_eos=True), n=2)
        with pytest.raises(InvalidRequestError, match="n: 2 sequences of up to 110 tokens may need 54 KV blocks"):
            ex.enqueue(too_wide)
        assert submit_within(ex, Request([9, 10], greedy(2))).finish_reason is FinishReason.LENGTH
    assert_no_leak(ex)


def test_pins_leave_room_for_every_accepted_request(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models, kv_cache_tokens=128, max_model_len=128) as ex:  # 32 blocks
        assert ex.pin_prefix(list(range(3, 103))) == 25
        with pytest.raises(InvalidRequestError, match=r"the cache has 7 \(25 more are pinned\)"):
            ex.enqueue(Request(list(range(3, 43)), greedy(4)))  # 44 tokens: 11 blocks
        assert len(submit_within(ex, Request([5, 6], greedy(20))).token_ids) == 20  # 6 blocks still fit
        ex.unpin_prefix(list(range(3, 103)))
        waiting = ex.enqueue(Request(list(range(100, 120)), greedy(100)))  # 120 tokens: 30 blocks
        with pytest.raises(KvCacheExhaustedError, match="pin_prefix"):
            ex.pin_prefix(list(range(3, 103)))  # would strand the accepted request
        responses = ex.await_responses(waiting, timeout=60)
        assert responses and responses[-1].result is not None and responses[-1].result.is_final
    assert_no_leak(ex)


def test_pins_are_counted(tiny_models) -> None:  # type: ignore[no-untyped-def]
    shared = list(range(3, 35))  # 32 tokens: 8 blocks
    a, b = [*shared, 40, 41, 42, 43], [*shared, 50, 51, 52, 53]
    with make(tiny_models, kv_cache_tokens=256) as ex:
        ex.pin_prefix(a)
        ex.pin_prefix(b)
        ex.pin_prefix(b)
        ex.unpin_prefix(a)
        ex.unpin_prefix(b)
        pool = ex.kv.pool
        assert pool.num_pinned_blocks == 9  # b's blocks are still pinned once, the shared ones too
        rng = random.Random(5)
        for _ in range(8):  # churn through every unpinned block
            ex.submit(Request([rng.randrange(3, 128) for _ in range(100)], greedy(4)))
        assert ex.submit(Request([*b, 7], greedy(1))).num_cached_tokens == 36
        ex.unpin_prefix(b)
        assert pool.num_pinned_blocks == 0


def test_higher_priority_arrival_preempts_a_running_request(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(priority_aging_per_s=0.0)
    with make(tiny_models) as ref:
        expected = ref.submit(Request([5, 6], greedy(100))).token_ids
    with make(tiny_models, cfg, max_num_seqs=1) as ex:
        low = ex.enqueue(Request([5, 6], greedy(100), priority=0, streaming=True))
        first = ex.await_responses(low, timeout=30)  # it runs
        high = submit_within(ex, Request([7, 8], greedy(2), priority=10))
        tokens = [t for r in first if r.result is not None for t in r.result.output_token_ids]
        final = None
        while final is None:
            responses = ex.await_responses(low, timeout=60)
            assert responses
            for r in responses:
                assert r.result is not None
                tokens += r.result.output_token_ids
                if r.result.is_final:
                    final = r.result
        assert high.timing.finished is not None and final.timing.finished is not None
        assert high.timing.finished < final.timing.finished  # it did not wait for the low one
        assert ex.aggregate.total_preemptions >= 1
        assert tokens == expected  # the preempted request resumed where it was
        assert final.num_cached_tokens == 0  # its own recomputed blocks are not prefix-cache hits
    assert_no_leak(ex)


def test_equal_priority_never_preempts(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models, ExecutorConfig(priority_aging_per_s=0.0), max_num_seqs=1) as ex:
        first = ex.enqueue(Request([5, 6], greedy(40), priority=3, streaming=True))
        ex.await_responses(first, timeout=30)
        ex.submit(Request([7, 8], greedy(2), priority=3))
        assert ex.aggregate.total_preemptions == 0


def test_admission_needs_budget_left(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models, max_num_batched_tokens=2, max_num_seqs=8) as ex:
        running = ex.enqueue_many([Request([5 + i], greedy(30), streaming=True) for i in range(2)])
        for rid in running:
            ex.await_responses(rid, timeout=30)
        ids = ex.submit_many([Request(list(range(10 + 8 * i, 18 + 8 * i)), greedy(1)) for i in range(4)])
        assert all(ex.poll(rid, timeout=60) is not None for rid in ids)
        for rid in running:
            ex.cancel(rid)
        stats = list(ex.iteration_stats)
        assert all(s.num_prefill_tokens + s.num_decode_tokens <= 2 for s in stats)
        assert all(s.num_prefill_tokens >= s.num_admitted for s in stats)  # every admission got a token
    assert_no_leak(ex)


def test_step_stats_count_prompt_tokens_as_prefill(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models, max_num_batched_tokens=4) as ex:
        ex.get_latest_iteration_stats()
        ex.submit(Request([5, 6, 7, 8, 9], greedy(3)))
        stats = ex.get_latest_iteration_stats()
        assert [(s.num_prefill_tokens, s.num_decode_tokens) for s in stats] == [(4, 0), (1, 0), (0, 1), (0, 1)]


def test_prefix_hit_counters_count_each_admission_once(tiny_models) -> None:  # type: ignore[no-untyped-def]
    prefix = list(range(3, 35))  # 8 blocks of 4
    with make(tiny_models) as ex:
        ex.submit(Request([*prefix, 40], greedy(1)))
        stats = ex.kv.pool.stats
        stats.prefix_hits = stats.prefix_queries = 0
        again = ex.submit(Request([*prefix, 50, 51], greedy(1)))
        assert again.num_cached_tokens == 32
        assert (stats.prefix_hits, stats.prefix_queries) == (8, 8)


def test_pin_prefix_works_under_batch_strategies(tiny_models) -> None:  # type: ignore[no-untyped-def]
    for strategy in (BatchingStrategy.FIXED_SIZE, BatchingStrategy.DYNAMIC_TIMEOUT, BatchingStrategy.STATIC):
        cfg = ExecutorConfig(strategy=strategy, batch_size=4, timeout_ms=1e6)
        with make(tiny_models, cfg) as ex:
            assert within(lambda: ex.pin_prefix(list(range(3, 40)))) == 9, strategy  # no batch of 4 needed
            ex.unpin_prefix(list(range(3, 40)))


def test_a_request_that_expires_before_it_is_accepted_answers_once(tiny_models) -> None:  # type: ignore[no-untyped-def]
    finals: dict[int, int] = {}
    lock = threading.Lock()

    def count(response) -> None:  # type: ignore[no-untyped-def]
        if response.result is not None and response.result.is_final:
            with lock:
                finals[response.request_id] = finals.get(response.request_id, 0) + 1

    with make(tiny_models) as ex:
        real_accept = ex._loop._accept

        def slow_accept(job) -> None:  # type: ignore[no-untyped-def]
            time.sleep(0.002)  # widens the window between the loop's intake and its expiry check
            real_accept(job)

        ex._loop._accept = slow_accept  # type: ignore[method-assign]
        busy = [ex.enqueue(Request([5, 6, 7], greedy(40), callback=count)) for _ in range(3)]
        ids = []
        for _ in range(200):
            ids.append(ex.enqueue(Request([3, 4, 5, 6], greedy(3), allotted_time=0.0005, callback=count)))
            time.sleep(0.0003)
    assert all(finals.get(rid) == 1 for rid in [*busy, *ids]), "a request answered twice or never"
    assert ex.aggregate.total_requests == len(busy) + len(ids)
    assert_no_leak(ex)
