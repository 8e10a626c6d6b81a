"""The Executor: continuous batching, priorities, preemption, prefix cache, strategies, stats."""

from __future__ import annotations

import random
import threading
import time

import pytest

from choral import SamplingParams
from choral.errors import InvalidRequestError, ProcessorStopped, QueueFull, UnknownRequestError
from choral.executor import BatchingStrategy, Executor, ExecutorConfig, FinishReason, KvPolicy, Request

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make(tiny_models, config: ExecutorConfig | None = None, **options) -> Executor:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    opts = dict(dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=128)
    opts.update(options)
    return Executor(str(directory), config, **opts)


def assert_no_leak(ex: Executor) -> None:
    pool = ex.kv.pool
    pool.check_invariants()
    assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} blocks still held"


def final_tokens(ex: Executor, rid: int) -> list[int]:
    responses = ex.await_responses(rid, timeout=60)
    assert len(responses) == 1 and responses[0].result is not None and responses[0].result.is_final
    return responses[0].result.output_token_ids


def test_fifty_mixed_requests_equal_running_alone(tiny_models) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(1, 60))] for _ in range(50)]
    lengths = [rng.randrange(1, 24) for _ in range(50)]
    requests = [Request(p, GREEDY, max_tokens=n) for p, n in zip(prompts, lengths, strict=True)]
    with make(tiny_models, max_num_batched_tokens=64, max_num_seqs=16) as ex:
        alone = [ex.submit(r).token_ids for r in requests]
        ids = ex.enqueue_many(requests)
        together = [final_tokens(ex, rid) for rid in ids]
        assert together == alone
        assert [len(t) for t in together] == lengths
        stats = ex.iteration_stats
        assert max(s.num_scheduled_sequences for s in stats) > 1  # they really were batched
        assert any(s.num_prefill_tokens and s.num_decode_tokens for s in stats)  # mixed steps
    assert_no_leak(ex)


def test_streaming_deltas_add_up(smollm_executor) -> None:  # type: ignore[no-untyped-def]
    ex = smollm_executor
    prompt = [{"role": "user", "content": "Write a short sentence in French with accents."}]
    request = Request(prompt, SamplingParams(temperature=0, max_tokens=24))
    full = ex.submit(request)
    rid = ex.enqueue(Request(prompt, SamplingParams(temperature=0, max_tokens=24), streaming=True))
    deltas, texts, timings = [], [], []
    while True:
        for r in ex.await_responses(rid, timeout=60):
            assert r.result is not None
            deltas.extend(r.result.output_token_ids)
            texts.append(r.result.text)
            timings.append(r.result.timing)
            if r.result.is_final:
                break
        else:
            continue
        break
    assert deltas == full.token_ids
    assert "".join(texts) == full.text
    assert "\ufffd" not in full.text
    # Each response's timing is as of that response: only the final one is finished.
    assert [t.finished is not None for t in timings] == [False] * (len(timings) - 1) + [True]


def test_stop_string_split_over_tokens(smollm_executor) -> None:  # type: ignore[no-untyped-def]
    ex = smollm_executor
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    free = ex.submit(Request(prompt, SamplingParams(temperature=0, max_tokens=16))).text
    assert "Paris" in free
    stop = "of Fr"  # spans tokens: " of", " France"
    done = ex.submit(Request(prompt, SamplingParams(temperature=0, max_tokens=16, stop=[stop]), streaming=True))
    assert done.finish_reason is FinishReason.STOP_WORDS
    assert done.text == free[: free.index(stop)]


def test_cancel_mid_stream_returns_partial_and_frees(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models) as ex:
        rid = ex.enqueue(Request([5, 6, 7], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                                 streaming=True))
        got: list[int] = []
        while len(got) < 3:
            for r in ex.await_responses(rid, timeout=30):
                got.extend(r.result.output_token_ids)
        ex.cancel(rid)
        final = None
        while final is None:
            for r in ex.await_responses(rid, timeout=30):
                got.extend(r.result.output_token_ids)
                if r.result.is_final:
                    final = r.result
        assert final.finish_reason is FinishReason.CANCELLED
        assert 3 <= final.num_output_tokens < 100 and len(got) == final.num_output_tokens
        ex.cancel(rid)  # cancelling a finished request is a no-op
    assert_no_leak(ex)


def test_allotted_time_times_out(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models) as ex:
        slow = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
        done = ex.submit(Request([5, 6, 7], slow, allotted_time=0.001))
        assert done.finish_reason is FinishReason.TIMED_OUT
        assert len(done.token_ids) < 120
    assert_no_leak(ex)


def test_errors(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=50, max_queue_size=3)
    ex = make(tiny_models, cfg)
    ids = ex.enqueue_many([Request([5], GREEDY)] * 3)  # FIXED_SIZE(50) holds them queued
    with pytest.raises(QueueFull, match="max_queue_size 3"):
        ex.enqueue(Request([5], GREEDY))
    with pytest.raises(InvalidRequestError, match="token id 999"):
        ex.enqueue(Request([5, 999], GREEDY))
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        ex.enqueue(Request("text needs a tokenizer", GREEDY))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        Request([5], GREEDY, max_tokens=0)
    with pytest.raises(InvalidRequestError, match="n:"):
        Request([5], GREEDY, n=0)
    with pytest.raises(InvalidRequestError, match="identical"):
        ex.enqueue(Request([5], GREEDY, n=2))
    with pytest.raises(UnknownRequestError):
        ex.await_responses(12345, timeout=0)
    ex.shutdown(wait=True)  # shutdown flushes the partial FIXED_SIZE batch
    assert all(len(ex.await_responses(rid, timeout=10)) == 1 for rid in ids)
    with pytest.raises(ProcessorStopped):
        ex.enqueue(Request([5], GREEDY))
    assert_no_leak(ex)


def test_priority_order(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(priority_aging_per_s=0.0)
    with make(tiny_models, cfg, max_num_seqs=1) as ex:
        blocker = ex.enqueue(Request([5, 6], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                                     streaming=True))
        ex.await_responses(blocker, timeout=30)  # it is running
        ids = ex.enqueue_many([Request([7], GREEDY, priority=p) for p in (0, 1, 5, 1, 0)])
        starts = {}
        for rid in ids:
            (r,) = ex.await_responses(rid, timeout=60)
            starts[rid] = r.result.timing.first_scheduled
        order = sorted(ids, key=lambda rid: starts[rid])
        assert order == [ids[2], ids[1], ids[3], ids[0], ids[4]]  # priority, then FIFO
    assert_no_leak(ex)


def test_aging_prevents_starvation(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(priority_aging_per_s=20.0)
    with make(tiny_models, cfg, max_num_seqs=1) as ex:
        low = ex.enqueue(Request([9], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), priority=0))
        high_ids = []
        deadline = time.monotonic() + 30
        while not ex.num_responses_ready(low) and time.monotonic() < deadline:
            high_ids.append(ex.enqueue(Request([5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                               priority=1)))
            time.sleep(0.002)
        assert ex.num_responses_ready(low), "the low-priority request starved"
        for rid in high_ids:
            ex.await_responses(rid, timeout=60)
        ex.await_responses(low, timeout=1)
    assert_no_leak(ex)


def test_tiny_pool_preempts_and_outputs_stay_right(tiny_models) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    requests = [Request([rng.randrange(3, 128) for _ in range(rng.randrange(5, 30))], GREEDY, max_tokens=30)
                for _ in range(12)]
    with make(tiny_models) as big:
        ref = [big.submit(r).token_ids for r in requests]
    with make(tiny_models, kv_cache_tokens=128, max_model_len=128) as ex:
        ids = ex.enqueue_many(requests)
        outs = [final_tokens(ex, rid) for rid in ids]
        assert outs == ref
        assert ex.aggregate.total_preemptions > 0
        assert sum(s.num_preemptions for s in ex.iteration_stats) == ex.aggregate.total_preemptions
    assert_no_leak(ex)


def test_guaranteed_no_evict_never_preempts(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(kv_policy=KvPolicy.GUARANTEED_NO_EVICT)
    requests = [Request(list(range(3 + i, 25 + i)), GREEDY, max_tokens=30) for i in range(10)]  # no shared prefix
    with make(tiny_models, cfg, kv_cache_tokens=128, max_model_len=128) as ex:
        ids = ex.enqueue_many(requests)
        outs = [final_tokens(ex, rid) for rid in ids]
        assert all(len(o) == 30 for o in outs)
        assert ex.aggregate.total_preemptions == 0
        # 22 + 30 tokens = 13 blocks each, 32 blocks in all: at most 2 run at once.
        assert max(s.num_running for s in ex.iteration_stats) <= 2
    assert_no_leak(ex)


def test_prefix_cache_skips_shared_prefix(tiny_models) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(2)
    prefix = [rng.randrange(3, 128) for _ in range(200)]
    with make(tiny_models, max_model_len=256, kv_cache_tokens=1024) as ex:
        first = ex.submit(Request(prefix + [5, 6, 7], GREEDY, max_tokens=2))
        ex.get_latest_iteration_stats()
        second = ex.submit(Request(prefix + [9, 10, 11, 12], GREEDY, max_tokens=2))
        stats = ex.get_latest_iteration_stats()
        assert first.num_cached_tokens == 0
        assert second.num_cached_tokens == 200
        assert sum(s.num_prefill_tokens for s in stats) == 4  # only the new tokens
        assert sum(s.prefix_hit_blocks for s in stats) == 50
    assert_no_leak(ex)


def test_pinned_prefix_survives_eviction(tiny_models) -> None:  # type: ignore[no-untyped-def]
    prefix = list(range(3, 43))  # 40 tokens = 10 blocks
    with make(tiny_models, kv_cache_tokens=128, max_model_len=128) as ex:
        assert ex.pin_prefix(prefix) == 10
        rng = random.Random(3)
        for _ in range(6):  # churn through the rest of the cache
            ex.submit(Request([rng.randrange(3, 128) for _ in range(60)], GREEDY, max_tokens=4))
        again = ex.submit(Request(prefix + [50], GREEDY, max_tokens=1))
        assert again.num_cached_tokens == 40
        assert ex.unpin_prefix(prefix) == 10


def test_n_sequences_share_the_prompt(tiny_models) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=7, ignore_eos=True)
    with make(tiny_models) as ex:
        done = ex.submit(Request(list(range(3, 30)), params, n=4))
        assert [o.index for o in done.outputs] == [0, 1, 2, 3]
        assert len({tuple(o.token_ids) for o in done.outputs}) > 1
        assert all(len(o.token_ids) == 6 for o in done.outputs)
        prefill = sum(s.num_prefill_tokens for s in ex.iteration_stats)
        assert prefill == 27  # the prompt was computed once for all four
    assert_no_leak(ex)


def _admission_steps(ex: Executor) -> list[tuple[int, int]]:
    return [(s.num_admitted, s.num_running) for s in ex.iteration_stats if s.num_admitted]


def test_static_batches_run_to_completion(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.STATIC)
    with make(tiny_models, cfg) as ex:
        first = ex.enqueue_many([Request([5], GREEDY, max_tokens=n) for n in (3, 6, 9)])
        ex.await_responses(first[0], timeout=30)
        second = ex.enqueue_many([Request([6], GREEDY, max_tokens=2) for _ in range(2)])
        for rid in first[1:] + second:
            ex.await_responses(rid, timeout=30)
        stats = list(ex.iteration_stats)
        for prev, cur in zip(stats, stats[1:], strict=False):
            if cur.num_admitted:
                assert prev.num_running == 0, "admitted while a static batch was running"
        assert [a for a, _ in _admission_steps(ex)] == [3, 2]


def test_fixed_size_waits_for_n(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.FIXED_SIZE, batch_size=3)
    with make(tiny_models, cfg) as ex:
        ids = [ex.enqueue(Request([5], GREEDY)) for _ in range(2)]
        time.sleep(0.2)
        assert not ex.iteration_stats and ex.num_responses_ready() == 0
        ids.append(ex.enqueue(Request([6], GREEDY)))
        for rid in ids:
            ex.await_responses(rid, timeout=30)
        assert [a for a, _ in _admission_steps(ex)] == [3]


def test_dynamic_timeout_starts_when_full_or_late(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(strategy=BatchingStrategy.DYNAMIC_TIMEOUT, batch_size=4, timeout_ms=150)
    with make(tiny_models, cfg) as ex:
        lone = ex.submit(Request([5], GREEDY))
        assert lone.timing.queue_time is not None and lone.timing.queue_time >= 0.15
        ids = ex.enqueue_many([Request([6], GREEDY) for _ in range(4)])
        results = [ex.await_responses(rid, timeout=30)[0].result for rid in ids]
        assert all(r.timing.queue_time < 0.15 for r in results)
        assert [a for a, _ in _admission_steps(ex)] == [1, 4]


def test_adaptive_cap_follows_latency(tiny_models) -> None:  # type: ignore[no-untyped-def]
    slow = ExecutorConfig(strategy=BatchingStrategy.ADAPTIVE, latency_target_ms=1e-6, batch_size=8,
                          adaptive_min_batch=2)
    with make(tiny_models, slow) as ex:
        ids = ex.enqueue_many([Request([5, i + 3], GREEDY) for i in range(12)])
        for rid in ids:
            ex.await_responses(rid, timeout=30)
        stats = list(ex.iteration_stats)
        assert stats[-1].seq_cap == 2  # every step was slower than the target: shrunk to the floor
        later = [s for s in stats[1:] if s.num_admitted]
        assert later and all(s.num_running <= 2 for s in later)  # the cap now limits admission
    fast = ExecutorConfig(strategy=BatchingStrategy.ADAPTIVE, latency_target_ms=1e6, batch_size=2)
    with make(tiny_models, fast) as ex:
        ids = ex.enqueue_many([Request([5, i + 3], GREEDY, max_tokens=20) for i in range(12)])
        for rid in ids:
            ex.await_responses(rid, timeout=30)
        assert max(s.seq_cap for s in ex.iteration_stats) > 2  # grew under queue pressure


def test_continuous_admits_while_running(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models) as ex:
        long = ex.enqueue(Request([5], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True),
                                  streaming=True))
        ex.await_responses(long, timeout=30)
        short = ex.submit(Request([6], GREEDY, max_tokens=2))
        assert short.finish_reason is FinishReason.LENGTH
        assert any(cur.num_admitted and prev.num_running for prev, cur in
                   zip(ex.iteration_stats, list(ex.iteration_stats)[1:], strict=False))
        ex.cancel(long)


def test_many_threads(tiny_models) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []
    with make(tiny_models) as ex:
        def worker(k: int) -> None:
            try:
                for j in range(5):
                    rid = ex.enqueue(Request([3 + k, 3 + j], GREEDY, max_tokens=3))
                    (r,) = ex.await_responses(rid, timeout=60)
                    assert r.request_id == rid and len(r.result.output_token_ids) == 3
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert ex.aggregate.total_requests == 80
    assert_no_leak(ex)


@pytest.mark.slow
def test_two_thousand_random_requests_with_cancels(tiny_models) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(4)
    finals: dict[int, int] = {}
    lock = threading.Lock()

    def on_response(response) -> None:  # type: ignore[no-untyped-def]
        if response.result.is_final:
            with lock:
                finals[response.request_id] = finals.get(response.request_id, 0) + 1

    cfg = ExecutorConfig(max_queue_size=4096)
    with make(tiny_models, cfg, kv_cache_tokens=256, max_model_len=128, max_num_seqs=32) as ex:
        ids = []
        for i in range(2000):
            request = Request([rng.randrange(3, 128) for _ in range(rng.randrange(1, 40))],
                              SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randrange(1, 12),
                                             seed=i),
                              streaming=rng.random() < 0.5, priority=rng.randrange(3), callback=on_response)
            ids.append(ex.submit_async(request))
            if rng.random() < 0.15:
                ex.cancel(rng.choice(ids))
        completions = [ex.poll(rid, timeout=120) for rid in ids]
    assert all(c is not None for c in completions)
    assert sorted(finals) == ids and set(finals.values()) == {1}
    assert ex.aggregate.total_requests == 2000
    assert ex.aggregate.cancelled > 0
    assert_no_leak(ex)


def test_kv_events_and_input_in_output(tiny_models) -> None:  # type: ignore[no-untyped-def]
    cfg = ExecutorConfig(record_kv_events=True)
    with make(tiny_models, cfg, kv_cache_tokens=64, max_model_len=64) as ex:
        done = ex.submit(Request(list(range(3, 20)), GREEDY, max_tokens=3, exclude_input_from_output=False))
        assert done.token_ids[:17] == list(range(3, 20)) and len(done.token_ids) == 20
        events = ex.get_kv_cache_events()
        assert [k for k, _, _ in events] == ["stored"] * 4  # 17 + 3 tokens: 4 full blocks of 4 (+ 3 computed)
        ex.submit(Request(list(range(40, 100)), GREEDY, max_tokens=2))  # needs the whole pool
        kinds = [k for k, _, _ in ex.get_kv_cache_events()]
        assert "evicted" in kinds and "stored" in kinds
        assert ex.get_kv_cache_events() == []


def test_input_in_output_text_for_every_prompt_kind(smollm_executor) -> None:  # type: ignore[no-untyped-def]
    ex = smollm_executor
    tok = ex.engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for prompt in ("The sky is", tok.encode("The sky is"), [{"role": "user", "content": "Hi"}]):
        done = ex.submit(Request(prompt, params, exclude_input_from_output=False))
        assert done.text == tok.decode(done.token_ids), prompt  # the prompt's text, then the output's


def test_decoding_controls_through_the_executor(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models) as ex:
        free = ex.submit(Request([5, 6, 7], GREEDY)).token_ids
        # A named logits processor (TRT-LLM's shape) that bans the first greedy token.
        seen: list[str] = []

        def ban_first(request_id: str, logits, token_ids):  # type: ignore[no-untyped-def]
            seen.append(request_id)
            logits[free[0]] = float("-inf")
            return logits

        ex.engine.register_logits_processor("ban_first", ban_first)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logits_processors=("ban_first",))
        banned = ex.submit(Request([5, 6, 7], params))
        assert free[0] not in banned.token_ids and seen and seen[0] == str(banned.request_id)
        # Bad words (token sequences) and a repetition penalty, batched with a plain request.
        words = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, bad_words=((free[0],),),
                               repetition_penalty=1.5)
        a, b = ex.enqueue_many([Request([5, 6, 7], words), Request([5, 6, 7], GREEDY)])
        assert free[0] not in final_tokens(ex, a)
        assert final_tokens(ex, b) == free  # the neighbour's knobs do not leak into this row
        with pytest.raises(InvalidRequestError, match="unknown processor .nope."):
            ex.enqueue(Request([5], SamplingParams(logits_processors=("nope",))))
        with pytest.raises(InvalidRequestError, match="streaming: beam search"):
            ex.enqueue(Request([5], SamplingParams(beam_width=2, temperature=0), streaming=True))
    assert_no_leak(ex)


def test_json_schema_through_the_executor(smollm_executor) -> None:  # type: ignore[no-untyped-def]
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    params = SamplingParams(temperature=0.7, max_tokens=48, seed=3, json_schema=json.dumps(schema))
    prompt = [{"role": "user", "content": "Give the largest city of France as JSON."}]
    done = smollm_executor.submit(Request(prompt, params, n=2))
    for out in done.outputs:
        value = json.loads(out.text)
        assert set(value) == {"city", "population"} and isinstance(value["population"], int)


def test_prompt_logprobs_skip_the_prefix_cache(tiny_models) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(3, 30))
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    with make(tiny_models) as ex:
        ex.submit(Request(prompt, GREEDY))  # puts the prompt's full blocks in the prefix cache
        first = ex.submit(Request(prompt, params))
        second = ex.submit(Request(prompt, params))
        assert first.num_cached_tokens == 0  # every prompt position needs its logits
        assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(prompt)
        assert second.prompt_logprobs == first.prompt_logprobs
        assert ex.submit(Request(prompt, GREEDY)).num_cached_tokens == 24  # the cache is still there
    assert_no_leak(ex)
