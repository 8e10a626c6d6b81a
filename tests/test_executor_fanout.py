"""best_of and beam search in the Executor: the n most likely of best_of samples, beams equal to
transformers', final-only (streaming refused), and no KV block left behind by cancels, timeouts
and preemptions of forked requests."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import pytest
import torch

from choral import SamplingParams
from choral.errors import InvalidRequestError
from choral.executor import AsyncExecutor, Executor, ExecutorConfig, FinishReason, Request
from tests.test_executor import assert_no_leak, make

PROMPT = [5, 6, 7, 8, 9, 10, 11]  # 7 tokens: the last KV block (size 4) is partly filled and shared
NO_CACHE = ExecutorConfig(enable_prefix_cache=False)


def test_best_of_returns_the_n_most_likely_samples(tiny_models) -> None:  # type: ignore[no-untyped-def]
    common = dict(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    with make(tiny_models, NO_CACHE) as ex:
        every = ex.submit(Request(PROMPT, SamplingParams(n=5, logprobs=0, **common)))  # type: ignore[arg-type]
        ex.get_latest_iteration_stats()
        best = ex.submit(Request(PROMPT, SamplingParams(n=2, best_of=5, **common)))  # type: ignore[arg-type]
        steps = ex.get_latest_iteration_stats()
    assert sum(s.num_prefill_tokens for s in steps) == len(PROMPT)  # five samples, one prompt computed
    # Sample i draws from seed + i in both requests: best_of returns the two with the highest
    # cumulative logprob among the five, best first, numbered 0 and 1.
    ranked = sorted(every.outputs, key=lambda o: -(o.cumulative_logprob or 0.0))[:2]
    assert [o.index for o in best.outputs] == [0, 1]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked]
    for got, want in zip(best.outputs, ranked, strict=True):
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-5)
        assert got.finish_reason is FinishReason.LENGTH and got.logprobs is None
    assert_no_leak(ex)


def test_best_of_responses_come_once_at_the_end(tiny_models) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=1.0, n=2, best_of=3, seed=4, max_tokens=5, ignore_eos=True)
    with make(tiny_models) as ex:
        rid = ex.enqueue(Request(PROMPT, params))
        responses: list = []  # type: ignore[type-arg]
        while not (responses and responses[-1].result.is_final):
            responses.extend(ex.await_responses(rid, timeout=30))
        done = ex.submit(Request(PROMPT, params))
    results = [r.result for r in responses]
    assert [r.sequence_index for r in results] == [0, 1] and [r.is_final for r in results] == [False, True]
    assert [r.output_token_ids for r in results] == [o.token_ids for o in done.outputs]
    assert results[0].cumulative_logprob >= results[1].cumulative_logprob
    assert_no_leak(ex)


def hf_beams(hf_model, width: int, n: int, max_tokens: int, end: int):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return hf_model.generate(torch.tensor([PROMPT]), num_beams=width, num_return_sequences=n,
                                 max_new_tokens=max_tokens, do_sample=False, eos_token_id=end, pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True, top_k=None, top_p=None,
                                 temperature=None)


# ``end`` is a token this random model produces, so some beams end on it and others on the length.
@pytest.mark.parametrize(("width", "n", "end"), [(2, 2, 24), (3, 3, 1), (4, 2, 24)])
def test_beam_search_through_the_executor_equals_transformers(tiny_models, width: int, n: int,  # type: ignore[no-untyped-def]
                                                              end: int) -> None:
    _, hf_model = tiny_models["llama"]
    params = SamplingParams(beam_width=width, n=n, max_tokens=10, stop_token_ids=[end], ignore_eos=True)
    with make(tiny_models) as ex:
        # Batched with a streaming greedy request and sampled forks: the beams must not notice.
        others = [Request([3, 4, 5], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), streaming=True),
                  Request(list(range(20, 33)), SamplingParams(temperature=1.0, n=2, seed=1, max_tokens=9))]
        ids = ex.enqueue_many(others)
        done = ex.submit(Request(PROMPT, params))
        for rid in ids:
            while not any(r.result.is_final for r in ex.await_responses(rid, timeout=30)):
                pass
    ref = hf_beams(hf_model, width, n, 10, end)
    assert [o.index for o in done.outputs] == list(range(n))
    for i, out in enumerate(done.outputs):
        length = int((ref.beam_indices[i] >= 0).sum())
        assert out.token_ids == ref.sequences[i, len(PROMPT) : len(PROMPT) + length].tolist()
        assert out.cumulative_logprob == pytest.approx(float(ref.sequences_scores[i]), abs=1e-4)
        ended_on_end = out.token_ids[-1] == end
        assert out.finish_reason is (FinishReason.STOP_WORDS if ended_on_end else FinishReason.LENGTH)
    assert_no_leak(ex)


def test_beam_search_restarts_after_preemption_with_the_same_result(tiny_models) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(beam_width=3, n=3, max_tokens=16, ignore_eos=True)
    with make(tiny_models) as big:
        ref = big.submit(Request(PROMPT, params))
    # 16 blocks: the two older requests crowd the beams out; the newest request (the beams) yields.
    with make(tiny_models, kv_cache_tokens=64, max_model_len=64) as ex:
        greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        sampled = SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=24, ignore_eos=True)
        ids = ex.submit_many([Request(list(range(20, 35)), greedy), Request([3, 4, 5], sampled),
                              Request(PROMPT, params)])
        done = [ex.poll(rid, timeout=60) for rid in ids]
        assert ex.aggregate.total_preemptions > 0
    assert done[2] is not None and done[2].num_preemptions > 0  # the beam request restarted
    assert [o.token_ids for o in done[2].outputs] == [o.token_ids for o in ref.outputs]
    assert_no_leak(ex)


def test_streaming_and_impossible_fanout_are_refused_up_front(tiny_models) -> None:  # type: ignore[no-untyped-def]
    with make(tiny_models, kv_cache_tokens=64, max_model_len=64, max_num_seqs=4) as ex:
        with pytest.raises(InvalidRequestError, match="streaming: beam search"):
            ex.enqueue(Request(PROMPT, SamplingParams(beam_width=2), streaming=True))
        with pytest.raises(InvalidRequestError, match="streaming: best_of"):
            ex.enqueue(Request(PROMPT, SamplingParams(n=1, best_of=3), streaming=True))

        async def stream_beams() -> None:  # AsyncExecutor streams: refused the same way
            AsyncExecutor(ex).start_stream(Request(PROMPT, SamplingParams(beam_width=2)))

        with pytest.raises(InvalidRequestError, match="streaming: beam search"):
            asyncio.run(stream_beams())
        with pytest.raises(InvalidRequestError, match="best_of: greedy"):
            ex.enqueue(Request(PROMPT, SamplingParams(temperature=0, best_of=2)))
        with pytest.raises(InvalidRequestError, match="best_of: 5 sequences exceed max_num_seqs 4"):
            ex.enqueue(Request(PROMPT, SamplingParams(best_of=5)))
        with pytest.raises(InvalidRequestError, match="stop_words: beam search"):
            ex.enqueue(Request(PROMPT, SamplingParams(beam_width=2), stop_words=((9, 9),)))
        with pytest.raises(InvalidRequestError, match="beam_width: 4 beams of up to 57 tokens may need"):
            ex.enqueue(Request(PROMPT, SamplingParams(beam_width=4, max_tokens=50)))  # 16 blocks cannot hold them
        with pytest.raises(InvalidRequestError, match="best_of: 2 is smaller than n 3"):
            ex.enqueue(Request(PROMPT, SamplingParams(best_of=2), n=3))
        # A batch with one refused request queues none of them.
        with pytest.raises(InvalidRequestError, match="streaming"):
            ex.enqueue_many([Request(PROMPT), Request(PROMPT, SamplingParams(beam_width=2), streaming=True)])
        assert not ex.iteration_stats and ex.num_responses_ready() == 0
        # best_of == n is plain sampling: it streams.
        rid = ex.enqueue(Request(PROMPT, SamplingParams(n=2, best_of=2, seed=1, max_tokens=3), streaming=True))
        finals = 0
        while finals < 2:
            finals += sum(r.result.is_sequence_final for r in ex.await_responses(rid, timeout=30))
    assert_no_leak(ex)


def _wait_for_steps(ex: Executor, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(ex.iteration_stats) < count and time.monotonic() < deadline:
        time.sleep(0.001)


def test_cancel_and_timeout_end_beams_and_best_of_with_n_outputs(tiny_models) -> None:  # type: ignore[no-untyped-def]
    long = dict(max_tokens=100, ignore_eos=True)
    with make(tiny_models) as ex:
        beam = ex.submit_async(Request(PROMPT, SamplingParams(beam_width=3, n=2, **long)))  # type: ignore[arg-type]
        best = ex.submit_async(Request(PROMPT, SamplingParams(temperature=1.0, n=2, best_of=4, **long)))  # type: ignore[arg-type]
        _wait_for_steps(ex, 6)
        ex.cancel(beam)
        ex.cancel(best)
        cancelled = [ex.poll(rid, timeout=30) for rid in (beam, best)]
        timed_out = ex.submit(Request(PROMPT, SamplingParams(beam_width=2, **long), allotted_time=0.02))  # type: ignore[arg-type]
    for done in cancelled:
        assert done is not None and [o.index for o in done.outputs] == [0, 1]
        assert all(o.finish_reason is FinishReason.CANCELLED and len(o.token_ids) < 100 for o in done.outputs)
    assert cancelled[0] is not None and len(cancelled[0].outputs[0].token_ids) > 0  # the best beam so far
    assert timed_out.finish_reason is FinishReason.TIMED_OUT
    assert ex.aggregate.cancelled == 2 and ex.aggregate.timed_out == 1
    assert_no_leak(ex)


def _random_request(rng: random.Random, i: int, callback) -> Request:  # type: ignore[no-untyped-def]
    prompt = [rng.randrange(3, 128) for _ in range(rng.randrange(1, 20))]
    common = dict(max_tokens=rng.randrange(1, 12), ignore_eos=True)
    kind = rng.choice(["greedy", "seeded", "n", "best_of", "beam"])
    if kind == "greedy":
        params = SamplingParams(temperature=0, **common)  # type: ignore[arg-type]
    elif kind == "seeded":
        params = SamplingParams(temperature=0.8, seed=i, **common)  # type: ignore[arg-type]
    elif kind == "n":
        params = SamplingParams(temperature=1.0, n=rng.randrange(2, 4), seed=i, **common)  # type: ignore[arg-type]
    elif kind == "best_of":
        params = SamplingParams(temperature=1.0, n=rng.randrange(1, 3), best_of=3, seed=i, **common)  # type: ignore[arg-type]
    else:
        width = rng.randrange(2, 4)
        params = SamplingParams(beam_width=width, n=rng.randrange(1, width + 1), **common)  # type: ignore[arg-type]
    streaming = kind in ("greedy", "seeded", "n") and rng.random() < 0.5
    return Request(prompt, params, streaming=streaming, priority=rng.randrange(3), callback=callback)


def test_random_forked_requests_with_cancels_leak_nothing(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """Beams, best_of, n, greedy and seeded requests on a 32-block pool with random cancels: the
    pool's books balance after every step, every request ends once with n outputs, nothing leaks,
    and the requests that were not cancelled equal a run on a large pool."""
    rng = random.Random(6)
    finals: Counter[int] = Counter()
    lock = threading.Lock()

    def on_response(response) -> None:  # type: ignore[no-untyped-def]
        if response.result.is_final:
            with lock:
                finals[response.request_id] += 1

    requests = [_random_request(rng, i, on_response) for i in range(600)]
    cfg = ExecutorConfig(max_queue_size=4096)
    with make(tiny_models, cfg, kv_cache_tokens=128, max_model_len=64, max_num_seqs=16) as ex:
        run = ex.step_runner.run
        running = ex.scheduler.running
        steps: list[int] = []
        preempted: Counter[str] = Counter()

        def checked(step) -> None:  # type: ignore[no-untyped-def]
            preempted.update("beam" if s.job.beam is not None else "other" for s in step.preempted)
            run(step)
            ex.kv.pool.check_invariants(dict(Counter(b for s in running for b in s.block_table)))
            steps.append(len(running))

        ex.step_runner.run = checked  # type: ignore[method-assign]
        ids = []
        for request in requests:
            ids.append(ex.submit_async(request))
            if rng.random() < 0.15:
                ex.cancel(rng.choice(ids))
            if rng.random() < 0.1:
                time.sleep(0.002)
        done = [ex.poll(rid, timeout=120) for rid in ids]
    assert steps and preempted["beam"] > 0 and preempted["other"] > 0
    assert all(c is not None for c in done)
    assert sorted(finals) == ids and set(finals.values()) == {1}
    assert ex.aggregate.cancelled > 0 and ex.aggregate.total_requests == len(ids)
    assert_no_leak(ex)
    kept = []
    cancelled: Counter[str] = Counter()
    for request, completion in zip(requests, done, strict=True):
        assert completion is not None
        assert [o.index for o in completion.outputs] == list(range(request.sampling.n))
        if any(o.finish_reason is FinishReason.CANCELLED for o in completion.outputs):
            cancelled["beam" if request.sampling.beam_width > 1 else "other"] += 1
        else:
            kept.append((request, completion))
    assert cancelled["beam"] > 0 and cancelled["other"] > 0
    with make(tiny_models, cfg, max_model_len=64) as big:
        refs = [big.poll(rid, timeout=120) for rid in big.submit_many([r for r, _ in kept])]
    for (request, completion), ref in zip(kept, refs, strict=True):
        assert ref is not None
        assert [o.token_ids for o in completion.outputs] == [o.token_ids for o in ref.outputs], request
