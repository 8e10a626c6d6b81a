"""Golden cases: greedy (or seeded) outputs of every driver, recorded from the code before the
engine-core redesign and compared token for token after it (tests/test_golden.py).

Each case is a function ``(ctx) -> JSON-able value``. ``ctx`` holds the bundled SmolLM2 in fp32
(``ctx.llm``) and tiny random HF models (``ctx.tiny[arch]`` -> directory), built by conftest's
seeded ``make_tiny_model``. Record again with ``python -m tests.golden.record`` only when a
change of outputs is deliberate (and say why in the commit).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from choral import LLM, BatchedExecutor, ChatSession, ContextShift, DecodeResult, SamplingParams
from choral.executor import Executor, ExecutorConfig, Request
from choral.executor.completion import Completion


@dataclass
class Context:
    llm: LLM  # SmolLM2, dtype float32, weights dequantize, kv_cache_tokens 8192, max_model_len 2048
    tiny: dict[str, Path]


Case = Callable[[Context], Any]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def outs(results: list[Any]) -> list[dict[str, Any]]:
    """LLM.generate's RequestOutputs as plain data."""
    return [{"prompt_token_ids": list(r.prompt_token_ids),
             "outputs": [{"token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason,
                          "stop_reason": o.stop_reason} for o in r.outputs]} for r in results]


def completion(c: Completion) -> dict[str, Any]:
    return {"outputs": [{"token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason.value}
                        for o in c.outputs],
            "num_cached_tokens": c.num_cached_tokens}


CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colors."}]


# ---- LLM.generate on the bundled model -----------------------------------------------------------
@case
def generate_text(ctx: Context) -> Any:
    return outs(ctx.llm.generate("The capital of France is", greedy(8)))


@case
def generate_chat(ctx: Context) -> Any:
    return outs(ctx.llm.chat(CHAT, greedy(10)))


@case
def generate_token_ids(ctx: Context) -> Any:
    ids = ctx.llm.tokenizer.encode("Once upon a time, in a small village,")
    return outs(ctx.llm.generate([ids], greedy(6)))


@case
def generate_batch_lengths(ctx: Context) -> Any:
    prompts = ["Water boils at", "The quick brown fox", "def fibonacci(n):"]
    params = [greedy(n) for n in (2, 5, 9)]
    return outs(ctx.llm.generate(prompts, params))


@case
def generate_stop_string(ctx: Context) -> Any:
    return outs(ctx.llm.generate("List of fruits: apple, banana,", greedy(12, stop=(",",))))


@case
def generate_stop_token_ids(ctx: Context) -> Any:
    ids = ctx.llm.tokenizer.encode(",")
    return outs(ctx.llm.generate("List of fruits: apple, banana,", greedy(12, stop_token_ids=tuple(ids))))


@case
def generate_min_tokens_stop(ctx: Context) -> Any:
    return outs(ctx.llm.generate("One, two, three,", greedy(12, stop=(",",), min_tokens=4)))


@case
def generate_ignore_eos(ctx: Context) -> Any:
    return outs(ctx.llm.chat([{"role": "user", "content": "Say hi."}], greedy(8, ignore_eos=True)))


@case
def generate_eos(ctx: Context) -> Any:
    return outs(ctx.llm.chat([{"role": "user", "content": "Reply with one word: yes or no?"}], greedy(12)))


@case
def generate_seeded(ctx: Context) -> Any:
    return outs(ctx.llm.generate("A poem about the sea:", SamplingParams(temperature=0.8, seed=5, max_tokens=6)))


@case
def generate_penalties(ctx: Context) -> Any:
    params = greedy(8, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
    return outs(ctx.llm.generate("la la la la la la", params))


@case
def generate_n_seeded(ctx: Context) -> Any:
    return outs(ctx.llm.generate("My dog likes", SamplingParams(temperature=0.9, seed=11, n=2, max_tokens=4)))


@case
def generate_best_of(ctx: Context) -> Any:
    params = SamplingParams(temperature=0.9, seed=3, n=2, best_of=3, max_tokens=4)
    return outs(ctx.llm.generate("The weather today", params))


@case
def generate_beam_search(ctx: Context) -> Any:
    params = SamplingParams(temperature=0, beam_width=2, n=2, max_tokens=4)
    return outs(ctx.llm.generate("The best way to learn is", params))


# ---- Executor on the bundled model ----------------------------------------------------------------
def smol_executor(ctx: Context, config: ExecutorConfig | None = None, **options: Any) -> Executor:
    """An executor over the session's weights with its own KV cache and budgets."""
    from choral.engine.llm_engine import LLMEngine

    engine = ctx.llm.engine
    return Executor(LLMEngine(dataclasses.replace(engine.config, **options), loaded=engine.loaded), config)


@case
def executor_prefix_cache(ctx: Context) -> Any:
    prefix = ctx.llm.tokenizer.encode("Here is a long shared preamble about the history of Rome. " * 3)
    with smol_executor(ctx, ExecutorConfig(enable_prefix_cache=True), kv_cache_tokens=2048) as ex:
        first = ex.submit(Request(prefix + [1000], greedy(8)))
        again = ex.submit(Request(prefix + [1000], greedy(8)))
        other = ex.submit(Request(prefix + [2000, 3000], greedy(8)))
        return [completion(c) for c in (first, again, other)]


@case
def executor_chunked_prefill(ctx: Context) -> Any:
    tok = ctx.llm.tokenizer
    prompts = [tok.encode(t) for t in ("In the beginning of the twentieth century, the city grew quickly " * 2,
                                        "Photosynthesis is the process by which green plants " * 2,
                                        "The rules of chess are simple to learn but ")]
    with smol_executor(ctx, max_num_batched_tokens=16, kv_cache_tokens=2048) as ex:
        ids = ex.submit_many([Request(p, greedy(4)) for p in prompts])
        return [completion(ex.poll(i, timeout=300)) for i in ids]  # type: ignore[arg-type]


@case
def executor_preemption(ctx: Context) -> Any:
    tok = ctx.llm.tokenizer
    prompts = [tok.encode(f"Story number {i}: a traveller walked into the old town and") for i in range(3)]
    with smol_executor(ctx, kv_cache_tokens=96, max_model_len=64, block_size=16) as ex:
        ids = ex.submit_many([Request(p, greedy(20, ignore_eos=True)) for p in prompts])
        done = [ex.poll(i, timeout=300) for i in ids]
        return {"outputs": [completion(c) for c in done],  # type: ignore[arg-type]
                "preempted": sum(c.num_preemptions for c in done) > 0}  # type: ignore[union-attr]


@case
def executor_stop_words_end_id(ctx: Context) -> Any:
    ids = ctx.llm.tokenizer.encode("Count: 1, 2, 3,")
    comma = ctx.llm.tokenizer.encode(",")
    out = []
    with smol_executor(ctx) as ex:
        out.append(completion(ex.submit(Request(ids, greedy(8), stop_words=(tuple(comma),)))))
        out.append(completion(ex.submit(Request(ids, greedy(8), end_id=comma[0]))))
        out.append(completion(ex.submit(Request(ids, greedy(8), max_tokens=3, exclude_input_from_output=False))))
    return out


@case
def executor_streaming(ctx: Context) -> Any:
    ex = ctx.llm.executor
    rid = ex.enqueue(Request("Tell me about owls.", greedy(5), streaming=True))
    deltas: list[list[int]] = []
    while True:
        responses = ex.await_responses(rid, timeout=300)
        for r in responses:
            assert r.result is not None
            deltas.append(list(r.result.output_token_ids))
        if any(r.result is not None and r.result.is_final for r in responses):
            return deltas


# ---- Executor on tiny random models ----------------------------------------------------------------
def tiny_executor(ctx: Context, arch: str, config: ExecutorConfig | None = None, **options: Any) -> Executor:
    opts: dict[str, Any] = dict(dtype="float32", block_size=4, kv_cache_tokens=1024, max_model_len=128)
    opts.update(options)
    return Executor(str(ctx.tiny[arch]), config, **opts)


def tiny_prompts(count: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


def tiny_batch(ctx: Context, arch: str, params: list[SamplingParams], config: ExecutorConfig | None = None,
               **options: Any) -> Any:
    prompts = tiny_prompts(len(params), seed=len(params))
    with tiny_executor(ctx, arch, config, **options) as ex:
        ids = ex.submit_many([Request(p, sp) for p, sp in zip(prompts, params, strict=True)])
        return [completion(ex.poll(i, timeout=300)) for i in ids]  # type: ignore[arg-type]


@case
def tiny_llama_batch(ctx: Context) -> Any:
    return tiny_batch(ctx, "llama", [greedy(n, ignore_eos=True) for n in (1, 5, 12, 20, 7, 16, 3, 9)],
                      max_num_batched_tokens=32, max_num_seqs=4)


@case
def tiny_qwen2_batch(ctx: Context) -> Any:
    return tiny_batch(ctx, "qwen2", [greedy(n, ignore_eos=True) for n in (4, 11, 6, 15)])


@case
def tiny_mistral_window(ctx: Context) -> Any:
    return tiny_batch(ctx, "mistral", [greedy(30, ignore_eos=True), greedy(25, ignore_eos=True)])


@case
def tiny_qwen3_preemption(ctx: Context) -> Any:
    params = [greedy(40, ignore_eos=True) for _ in range(6)]
    return tiny_batch(ctx, "qwen3", params, kv_cache_tokens=128, max_model_len=96)


@case
def tiny_llama3_fanout(ctx: Context) -> Any:
    params = [SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=9, n=1, best_of=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0, beam_width=4, n=2, max_tokens=6, ignore_eos=True)]
    return tiny_batch(ctx, "llama3", params)


# ---- BatchedExecutor and conversations ------------------------------------------------------------
def run(executor: BatchedExecutor) -> None:
    while executor.batched_token_count:
        assert executor.infer() is DecodeResult.OK


def decode(executor: BatchedExecutor, conversation: Any, steps: int, params: SamplingParams | None = None) -> list[int]:
    out = []
    for _ in range(steps):
        token = conversation.sample(params)
        out.append(token)
        conversation.prompt(token)
        run(executor)
    return out


@case
def conversation_smol_fork_rewind(ctx: Context) -> Any:
    with BatchedExecutor(ctx.llm) as ex:
        a = ex.create()
        a.prompt("The three primary colors are")
        b = ex.create()
        b.prompt("Python is a programming language that")
        run(ex)
        result: dict[str, Any] = {"a": decode(ex, a, 3), "b": decode(ex, b, 3)}
        child = a.fork()
        child.prompt(ctx.llm.tokenizer.encode(" Also", add_special_tokens=False))
        run(ex)
        result["child"] = decode(ex, child, 3)
        result["a_more"] = decode(ex, a, 2)
        a.rewind(4)
        a.prompt(ctx.llm.tokenizer.encode(" and", add_special_tokens=False))
        run(ex)
        result["a_rewound"] = decode(ex, a, 3)
        result["seeded"] = decode(ex, b, 3, SamplingParams(temperature=0.8, seed=4))
        return result


@case
def conversation_smol_save_load(ctx: Context) -> Any:
    with BatchedExecutor(ctx.llm) as ex:
        c = ex.create()
        c.prompt("A recipe for pancakes:")
        run(ex)
        first = decode(ex, c, 3)
        state = c.save()
        continued = decode(ex, c, 3)
        loaded = ex.load(state)
        return {"first": first, "continued": continued, "loaded": decode(ex, loaded, 3)}


@case
def conversation_tiny_edits(ctx: Context) -> Any:
    with BatchedExecutor(str(ctx.tiny["llama"]), dtype="float32", block_size=4, kv_cache_tokens=512,
                         max_model_len=64) as ex:
        c = ex.create()
        c.prompt([5, 17, 33, 8, 91, 64, 12, 7, 100, 3])
        run(ex)
        result: dict[str, Any] = {"start": decode(ex, c, 6)}
        c.remove(2, 5)
        run(ex)
        result["removed"] = decode(ex, c, 6)
        c.shift_left(keep=2, discard=4)
        c.prompt(9)
        run(ex)
        result["shifted"] = decode(ex, c, 6)
        fork = c.fork()
        fork.remove(1, 3, recompute=False)
        fork.prompt(11)
        run(ex)
        result["fork_fast_remove"] = decode(ex, fork, 5)
        result["parent"] = decode(ex, c, 5)
        return result


@case
def conversation_tiny_context_shift(ctx: Context) -> Any:
    with BatchedExecutor(str(ctx.tiny["qwen2"]), dtype="float32", block_size=4, kv_cache_tokens=512,
                         max_model_len=32) as ex:
        c = ex.create(context_shift=ContextShift(keep=4))
        c.prompt([7, 8, 9, 10, 11, 12, 13, 14])
        run(ex)
        return decode(ex, c, 60)


@case
def conversation_tiny_batched_budget(ctx: Context) -> Any:
    with BatchedExecutor(str(ctx.tiny["mistral"]), dtype="float32", block_size=4, kv_cache_tokens=512,
                         max_model_len=128, max_num_batched_tokens=8) as ex:
        convs = [ex.create() for _ in range(3)]
        for i, c in enumerate(convs):
            c.prompt(list(range(3 + i, 20 + 2 * i)))
        run(ex)
        out = [[] for _ in convs]  # type: list[list[int]]
        for _ in range(8):
            for i, c in enumerate(convs):
                t = c.sample()
                out[i].append(t)
                c.prompt(t)
            run(ex)
        return out


# ---- ChatSession and the server -------------------------------------------------------------------
@case
def chat_session_two_turns(ctx: Context) -> Any:
    with BatchedExecutor(ctx.llm) as ex:
        session = ChatSession(ex.create(), system_prompt="You are a helpful assistant.")
        first = session.prompt("What is the capital of France?", max_tokens=6)
        second = session.prompt("And of Italy?", max_tokens=5)
        stop = session.prompt("Count to five.", max_tokens=12, params=greedy(12, stop=("3",)))
        assert session.last_response is not None
        # Recorded as the old ChatResponse.stop_reason "eos": the one FinishReason calls it END_ID.
        return [first, second, stop, session.last_response.finish_reason.value]


@case
def server_endpoints(ctx: Context) -> Any:
    import httpx

    from choral.server.app import create_app

    app = create_app(ctx.llm.executor, "smol")

    async def main() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            a = await client.post("/v1/completions", json={"model": "smol", "prompt": "The moon is",
                                                           "max_tokens": 5, "temperature": 0})
            b = await client.post("/v1/chat/completions", json={
                "model": "smol", "messages": [{"role": "user", "content": "Name a fruit."}],
                "max_tokens": 6, "temperature": 0})
            c = await client.post("/v1/completions", json={"model": "smol", "prompt": ["Red,", "Blue,"],
                                                           "max_tokens": 4, "temperature": 0, "stop": [","]})
        result = []
        for r in (a, b, c):
            body = r.json()
            result.append({"status": r.status_code,
                           "choices": [{k: ch.get(k) for k in ("text", "message", "finish_reason", "index")}
                                       for ch in body["choices"]],
                           "usage": {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens")}})
        return result

    return asyncio.run(main())


def run_case(name: str, ctx: Context) -> Any:
    """A case's value as it would be stored (JSON round trip: tuples become lists)."""
    import json

    return json.loads(json.dumps(CASES[name](ctx)))
