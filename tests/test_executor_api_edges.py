"""The Executor's public API at its edges: failures reaching asyncio callers and the server,
blocking calls from callbacks, concurrent callers, odd ids and arguments, stats snapshots.

Every call that used to hang runs under a timeout, so a regression fails instead of hanging."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from choral import SamplingParams
from choral.errors import (
    ExecutorLoopError,
    ExecutorUsageError,
    InvalidRequestError,
    ProcessorStopped,
    RequestFailedError,
    UnknownRequestError,
)
from choral.executor import AsyncExecutor, Executor, FinishReason, Request, Response
from choral.executor.scheduler import ScheduledStep

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BROKEN = SamplingParams(temperature=0, max_tokens=4, logits_processors=("broken",))
HANG_S = 20.0  # only ever reached when a call hangs (a regression)


def make(tiny_models) -> Executor:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    ex = Executor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=128)

    def broken(request_id: str, logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        raise ValueError("broken processor")

    ex.engine.register_logits_processor("broken", broken)
    return ex


def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result (or exception), failing the test if it does not return in HANG_S."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # handed to the test thread
            out.append(("raised", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    assert out, "the call hung"
    kind, value = out[0]
    if kind == "raised":
        raise value
    return value


def kill_loop_at_next_step(ex: Executor, go: threading.Event) -> None:
    """The loop thread's next step waits for ``go``, then raises: a bug that kills the loop."""

    def run(step: ScheduledStep) -> None:
        go.wait(HANG_S)
        raise RuntimeError("injected loop bug")

    ex.step_runner.run = run  # type: ignore[method-assign]


def hold_processor(ex: Executor) -> threading.Event:
    """A logits processor ("hold") that keeps its request from sampling until the event is set."""
    gate = threading.Event()

    def hold(request_id: str, logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        gate.wait(HANG_S)
        return logits

    ex.engine.register_logits_processor("hold", hold)
    return gate


def assert_no_leak(ex: Executor) -> None:
    pool = ex.kv.pool
    pool.check_invariants()
    assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} blocks still held"


# ---- asyncio: loop death, failed requests, raising callbacks ----------------------------------
def test_async_waiters_get_the_loop_failure(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    ax = AsyncExecutor(ex)
    go = threading.Event()
    kill_loop_at_next_step(ex, go)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def consume() -> None:
        async for _ in ax.stream(Request([5, 6, 7], long)):
            pass

    async def main() -> None:
        streaming = asyncio.create_task(consume())
        generating = asyncio.create_task(ax.generate(Request([5, 6, 7], long)))
        await asyncio.sleep(0)  # both tasks run up to their first await: both requests are queued
        go.set()
        for task in (streaming, generating):
            with pytest.raises(ExecutorLoopError, match="injected loop bug"):
                await asyncio.wait_for(task, HANG_S)

    asyncio.run(main())
    assert not ex.is_running
    with pytest.raises(ProcessorStopped, match="loop failed"):  # not "has been shut down"
        ex.enqueue(Request([5], GREEDY))
    with pytest.raises(ProcessorStopped, match="loop failed"):
        ex.unpin_prefix([5, 6, 7])
    ex.shutdown()


def test_async_failed_request_raises_and_others_go_on(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    ax = AsyncExecutor(ex)

    async def consume(request: Request) -> list[int]:
        tokens: list[int] = []
        async for result in ax.stream(request):
            tokens.extend(result.output_token_ids)
        return tokens

    async def main() -> None:
        with pytest.raises(RequestFailedError, match="ValueError: broken processor"):
            await asyncio.wait_for(ax.generate(Request([5, 6, 7], BROKEN)), HANG_S)
        with pytest.raises(RequestFailedError, match="ValueError: broken processor"):
            await asyncio.wait_for(consume(Request([5, 6, 7], BROKEN)), HANG_S)
        full = await asyncio.wait_for(ax.generate(Request([5, 6, 7], GREEDY)), HANG_S)
        assert await asyncio.wait_for(consume(Request([5, 6, 7], GREEDY)), HANG_S) == full.token_ids

    asyncio.run(main())
    assert ex.is_running and ex.aggregate.failed == 2
    ex.shutdown()
    assert_no_leak(ex)
    assert not ex._queue.jobs  # the failed requests were forgotten once their error was raised


def test_async_raising_callback_still_delivers(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    ax = AsyncExecutor(ex)
    calls: list[Response] = []

    def bad(response: Response) -> None:
        calls.append(response)
        raise RuntimeError("user callback bug")

    async def consume(request: Request) -> int:
        chunks = 0
        async for _ in ax.stream(request):
            chunks += 1
        return chunks

    async def main() -> None:
        request = Request([5, 6, 7], GREEDY, callback=bad)
        completion = await asyncio.wait_for(ax.generate(request), HANG_S)
        assert completion.finish_reason is FinishReason.LENGTH
        assert await asyncio.wait_for(consume(request), HANG_S) == 8

    asyncio.run(main())
    assert len(calls) == 1 + 8  # the callback saw every response anyway
    ex.shutdown()
    assert_no_leak(ex)


def test_an_unread_stream_cancels_its_request_when_dropped(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    ax = AsyncExecutor(ex)
    gate = hold_processor(ex)
    held = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True, logits_processors=("hold",))

    async def main() -> None:
        stream = ax.start_stream(Request([5, 6, 7], held))  # queued, never iterated
        del stream
        await asyncio.sleep(0)

    try:
        asyncio.run(main())
    finally:
        gate.set()
    ex.shutdown()  # would run all 100 tokens if the request were not cancelled
    assert ex.aggregate.cancelled == 1 and not ex._queue.jobs
    assert_no_leak(ex)


# ---- callbacks run on the loop thread: blocking calls raise, the others work --------------------
def test_blocking_calls_from_a_callback_raise(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    blocking: dict[str, Callable[[], Any]] = {
        "submit": lambda: ex.submit(Request([8, 9], GREEDY)),
        "poll(timeout=None)": lambda: ex.poll(other_ids["submitted"], timeout=None),
        "poll(timeout=1)": lambda: ex.poll(other_ids["submitted"], timeout=1),
        "await_responses()": lambda: ex.await_responses(),
        "await_responses(id, timeout=1)": lambda: ex.await_responses(other_ids["enqueued"], timeout=1),
        "pin_prefix": lambda: ex.pin_prefix([5, 6, 7, 8]),
        "unpin_prefix": lambda: ex.unpin_prefix([5, 6, 7, 8]),
        "shutdown(wait=True)": lambda: ex.shutdown(wait=True),
    }
    raised: dict[str, BaseException | None] = {}
    other_ids: dict[str, int] = {}
    non_blocking: dict[str, Any] = {}
    done = threading.Event()

    def callback(response: Response) -> None:
        try:
            # Non-blocking calls work from here (the loop is busy in this callback, so nothing new
            # has run yet).
            other_ids["enqueued"] = ex.enqueue(Request([8, 9], GREEDY))
            other_ids["submitted"] = ex.submit_async(Request([8, 9], GREEDY))
            doomed = ex.enqueue(Request([8, 9], GREEDY))
            ex.cancel(doomed)
            other_ids["cancelled"] = doomed
            non_blocking["poll"] = ex.poll(other_ids["submitted"], timeout=0)
            non_blocking["await"] = ex.await_responses(other_ids["enqueued"], timeout=0)
            non_blocking["ready"] = ex.num_responses_ready(other_ids["enqueued"])
            for name, call in blocking.items():
                try:
                    call()
                    raised[name] = None
                except ExecutorUsageError as e:
                    raised[name] = e
        finally:
            done.set()

    rid = ex.enqueue(Request([5, 6, 7], GREEDY, callback=callback))
    assert done.wait(HANG_S)
    assert [name for name, e in raised.items() if e is None] == []
    assert all("callback" in str(e) and "loop thread" in str(e) for e in raised.values())
    assert non_blocking == {"poll": None, "await": [], "ready": 0}
    # The loop lives on: every request made from the callback ends, none from the refused calls.
    assert in_thread(lambda: ex.await_responses(rid, timeout=HANG_S))[0].result.is_final
    (final,) = in_thread(lambda: ex.await_responses(other_ids["enqueued"], timeout=HANG_S))
    assert final.result is not None and final.result.finish_reason is FinishReason.LENGTH
    completion = in_thread(lambda: ex.poll(other_ids["submitted"], timeout=HANG_S))
    assert completion is not None and len(completion.token_ids) == 8
    (cancelled,) = in_thread(lambda: ex.await_responses(other_ids["cancelled"], timeout=HANG_S))
    assert cancelled.result is not None and cancelled.result.finish_reason is FinishReason.CANCELLED
    assert ex.is_running and in_thread(lambda: ex.submit(Request([5], GREEDY))).finish_reason is FinishReason.LENGTH
    ex.shutdown()
    assert ex.aggregate.total_requests == 5  # the refused submit and pin_prefix queued nothing
    assert_no_leak(ex)


def test_shutdown_without_waiting_from_a_callback(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    returned = threading.Event()

    def callback(response: Response) -> None:
        if not returned.is_set():  # at the first token of 120
            ex.shutdown(wait=False)
            returned.set()

    long = ex.enqueue(Request([8, 9], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True),
                              streaming=True, callback=callback))
    assert returned.wait(HANG_S)
    in_thread(ex.shutdown)  # the loop ends on its own: this only joins it
    assert not ex.is_running
    responses = in_thread(lambda: ex.await_responses(long, timeout=0))
    assert responses[-1].result is not None and responses[-1].result.finish_reason is FinishReason.CANCELLED
    assert_no_leak(ex)


# ---- concurrent callers -------------------------------------------------------------------------
def test_a_waiter_whose_request_another_caller_took_raises(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    gate = hold_processor(ex)
    try:
        x_done = threading.Event()
        x = ex.enqueue(Request([5, 6, 7], GREEDY, callback=lambda r: x_done.set()))
        assert x_done.wait(HANG_S)
        y = ex.enqueue(Request([8, 9], dataclasses.replace(GREEDY, logits_processors=("hold",))))
        outcome: list[BaseException | list[Response]] = []

        def waiter() -> None:  # X has its response, Y (held) none yet: this waits
            try:
                outcome.append(ex.await_responses([x, y]))
            except UnknownRequestError as e:
                outcome.append(e)

        a = threading.Thread(target=waiter, daemon=True)
        a.start()
        time.sleep(0.05)  # lets A reach its wait; the outcome is the same if it has not
        assert len(ex.await_responses(x, timeout=0)) == 1  # another caller takes X's final response
        gate.set()  # Y answers, waking A
        a.join(HANG_S)
        assert not a.is_alive(), "the waiter never noticed X was gone"
        assert isinstance(outcome[0], UnknownRequestError) and str(x) in str(outcome[0])
        assert len(in_thread(lambda: ex.await_responses(y, timeout=HANG_S))) == 1  # Y's is still there
    finally:
        gate.set()
    ex.shutdown()
    assert_no_leak(ex)


def test_two_pollers_one_gets_the_completion(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    gate = hold_processor(ex)
    try:
        rid = ex.submit_async(Request([5, 6, 7], dataclasses.replace(GREEDY, logits_processors=("hold",))))
        outcomes: list[Any] = []

        def poller() -> None:
            try:
                outcomes.append(ex.poll(rid, timeout=HANG_S))
            except Exception as e:  # the loser's, checked below
                outcomes.append(e)

        threads = [threading.Thread(target=poller, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.05)  # lets both reach their wait; the outcome is the same if they have not
        gate.set()
        for t in threads:
            t.join(HANG_S)
        assert len(outcomes) == 2
        completions = [o for o in outcomes if not isinstance(o, BaseException)]
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(completions) == 1 and len(completions[0].token_ids) == 8
        assert len(errors) == 1 and type(errors[0]) is UnknownRequestError  # not a raw KeyError
    finally:
        gate.set()
    ex.shutdown()


# ---- await_responses' ids -------------------------------------------------------------------------
def test_await_responses_edge_ids(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    assert in_thread(lambda: ex.await_responses([])) == []  # no ids: nothing to wait for
    assert in_thread(lambda: ex.await_responses((), timeout=5)) == []
    a_done = threading.Event()
    a = ex.enqueue(Request([5, 6, 7], GREEDY, callback=lambda r: a_done.set()))
    assert a_done.wait(HANG_S)
    (final,) = in_thread(lambda: ex.await_responses([a, a], timeout=HANG_S))  # a repeated id counts once
    assert final.request_id == a and final.result is not None and final.result.is_final
    with pytest.raises(UnknownRequestError):
        ex.await_responses(a, timeout=0)
    b = ex.enqueue(Request([5, 6, 7], GREEDY))
    (final,) = in_thread(lambda: ex.await_responses(np.int64(b), timeout=HANG_S))  # type: ignore[arg-type]  # numpy ints
    assert final.request_id == b
    ex.shutdown()


def test_bad_arguments_raise_invalid_request(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    calls: list[Callable[[], Any]] = [
        lambda: ex.enqueue_many(5),  # type: ignore[arg-type]
        lambda: ex.submit_many(None),  # type: ignore[arg-type]
        lambda: ex.enqueue_many("hi"),  # type: ignore[arg-type]
        lambda: ex.await_responses(0.0, timeout=0),  # type: ignore[arg-type]
        lambda: ex.await_responses(True, timeout=0),
        lambda: ex.await_responses([0, "1"], timeout=0),  # type: ignore[list-item]
        lambda: ex.await_responses("0", timeout=0),  # type: ignore[arg-type]
        lambda: ex.cancel([1]),  # type: ignore[arg-type]
        lambda: ex.poll([1]),  # type: ignore[arg-type]
        lambda: ex.release(1.5),  # type: ignore[arg-type]
        lambda: ex.num_responses_ready("0"),  # type: ignore[arg-type]
    ]
    for i, call in enumerate(calls):
        with pytest.raises(InvalidRequestError, match="got"):
            call()
        assert not ex._queue.jobs, f"call {i} queued something"
    ex.shutdown()


# ---- stats ----------------------------------------------------------------------------------------
def test_iteration_stats_is_a_snapshot(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    before = ex.iteration_stats
    assert before == []
    ex.submit(Request([5, 6, 7], GREEDY))
    after = ex.iteration_stats
    assert before == [] and len(after) >= 8  # the copy taken before did not grow
    assert [s.iteration for s in after] == sorted(s.iteration for s in after)
    after.clear()  # a copy: the executor's own stats are untouched
    assert len(ex.iteration_stats) >= 8
    ex.shutdown()


# ---- the server ------------------------------------------------------------------------------------
def _serve(ex: Executor, main: Callable[[httpx.AsyncClient], Any]) -> None:
    from choral.server.app import create_app

    app = create_app(ex, "tiny")

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await asyncio.wait_for(main(client), HANG_S)

    asyncio.run(run())


def _events(body: str) -> list[Any]:
    return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):])
            for line in body.split("\n\n") if line]


def test_server_answers_a_failed_request_with_an_error(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    submit_many = ex.submit_many

    def with_broken_processor(requests: Sequence[Request]) -> list[int]:  # no HTTP body can ask for it
        return submit_many([dataclasses.replace(r, sampling=dataclasses.replace(
            r.sampling, logits_processors=("broken",))) for r in requests])

    ex.submit_many = with_broken_processor  # type: ignore[method-assign]

    async def main(client: httpx.AsyncClient) -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 4}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "InternalServerError" and "broken processor" in error["message"]
        r = await client.post("/v1/completions", json={**body, "prompt": [[5, 6, 7], [8, 9]], "stream": True})
        assert r.status_code == 200  # sent before the request failed
        *_, error_event, done = _events(r.text)
        assert done == "[DONE]"
        assert error_event["error"]["type"] == "InternalServerError"
        assert "broken processor" in error_event["error"]["message"]

    _serve(ex, main)
    gc.collect()  # the unread stream of the second prompt is gone: its request was released
    ex.shutdown()
    assert not ex._queue.jobs
    assert_no_leak(ex)


def test_server_answers_when_the_loop_dies(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = make(tiny_models)
    go = threading.Event()
    go.set()
    kill_loop_at_next_step(ex, go)

    async def main(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4})
        assert r.status_code == 500 and "injected loop bug" in r.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 503
        r = await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4})
        assert r.status_code == 503 and "loop failed" in r.json()["error"]["message"]

    _serve(ex, main)
    ex.shutdown()
