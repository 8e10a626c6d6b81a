"""One LLM, two drivers, two threads: ``LLM.generate`` (the executor's loop thread) and
``BatchedExecutor.infer()`` rounds share one EngineCore. Each gives exactly what it gives alone,
nothing crashes, no block leaks. (Before the engine core, the C attention kernel aborted the
process here and the torch backend died of a shape mismatch.)"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from choral import LLM, BatchedExecutor, DecodeResult, SamplingParams

ROUNDS = 50


def generate_all(llm: LLM) -> list[list[int]]:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(2, 40))] for _ in range(16)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(4, 24), ignore_eos=True) for _ in prompts]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def conversation_rounds(llm: LLM) -> list[list[int]]:
    with BatchedExecutor(llm) as executor:  # shares the LLM's core: its lock, pool, runner
        conversations = [executor.create() for _ in range(3)]
        for i, c in enumerate(conversations):
            c.prompt(list(range(5 + i, 20 + 3 * i)))
        out: list[list[int]] = [[] for _ in conversations]
        for _ in range(ROUNDS):
            while executor.batched_token_count:
                assert executor.infer() is DecodeResult.OK
            for i, c in enumerate(conversations):
                token = c.sample()
                out[i].append(token)
                c.prompt(token)
        return out


@pytest.fixture(scope="module", params=["auto", "torch"])
def llm(request: Any, tiny_models: Any) -> Any:
    directory, _ = tiny_models["mistral-hd64"]
    model = LLM(str(directory), dtype="float32", block_size=16, kv_cache_tokens=4096, max_model_len=256,
                attention_backend=request.param)
    yield model
    model.close()


def test_generate_and_conversation_rounds_on_two_threads(llm: LLM) -> None:
    alone_generate = generate_all(llm)
    alone_rounds = conversation_rounds(llm)
    results: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        try:
            results[name] = fn(llm)
        except BaseException as e:  # reported below
            results[name] = e

    threads = [threading.Thread(target=run, args=("generate", generate_all)),
               threading.Thread(target=run, args=("rounds", conversation_rounds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a driver hung"
    assert results["generate"] == alone_generate
    assert results["rounds"] == alone_rounds
    pool = llm.engine.pool
    pool.check_invariants()
    assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} blocks leaked"
