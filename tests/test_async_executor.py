"""asyncio: streaming, generate, task cancellation cancels the request, gather batches together."""

from __future__ import annotations

import asyncio

from choral import SamplingParams
from choral.executor import AsyncExecutor, Executor, FinishReason, Request

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make(tiny_models) -> AsyncExecutor:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    return AsyncExecutor(Executor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512,
                                  max_model_len=128))


def test_stream_and_generate_agree(tiny_models) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with make(tiny_models) as ax:
            full = await ax.generate(Request([5, 6, 7], GREEDY))
            streamed: list[int] = []
            finals = 0
            async for result in ax.stream(Request([5, 6, 7], GREEDY)):
                streamed.extend(result.output_token_ids)
                finals += result.is_final
            assert streamed == full.token_ids and finals == 1
            assert full.finish_reason is FinishReason.LENGTH

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_request(tiny_models) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with make(tiny_models) as ax:
            long = Request([5], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
            seen = asyncio.Event()

            async def consume() -> None:
                async for _ in ax.stream(long):
                    seen.set()

            task = asyncio.create_task(consume())
            await seen.wait()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            ex = ax.executor
            for _ in range(1000):  # the loop thread ends it before its next step
                if ex.aggregate.cancelled == 1:
                    break
                await asyncio.sleep(0.01)
            assert ex.aggregate.cancelled == 1
            gen_task = asyncio.create_task(ax.generate(long))
            await asyncio.sleep(0.01)
            gen_task.cancel()
            try:
                await gen_task
            except asyncio.CancelledError:
                pass
        assert ex.kv.pool.num_used_blocks == 0

    asyncio.run(main())


def test_gather_runs_requests_in_the_same_batches(tiny_models) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with make(tiny_models) as ax:
            reqs = [Request([5 + i, 6], GREEDY, max_tokens=12) for i in range(4)]
            done = await asyncio.gather(*(ax.generate(r) for r in reqs))
            assert all(len(c.token_ids) == 12 for c in done)
            assert max(s.num_scheduled_sequences for s in ax.executor.iteration_stats) >= 2

    asyncio.run(main())


def test_logprobs_and_callback(tiny_models) -> None:  # type: ignore[no-untyped-def]
    seen = []
    async def main() -> None:
        async with make(tiny_models) as ax:
            params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, ignore_eos=True)
            done = await ax.generate(Request([5, 6], params, callback=seen.append, client_id="abc"))
            lps = done.outputs[0].logprobs
            assert lps is not None and len(lps) == 4
            for token, (lp, top) in zip(done.token_ids, lps, strict=True):
                assert top[0][0] == token and abs(top[0][1] - lp) < 1e-6

    asyncio.run(main())
    assert len(seen) == 1 and seen[0].client_id == "abc" and seen[0].result.is_final
