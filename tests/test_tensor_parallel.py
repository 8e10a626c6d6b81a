"""Tensor parallelism (docs/scale-out.md): TP=N against TP=1 on tiny random Llama, Qwen3 and
Mistral models and on the bundled SmolLM2 (9 query heads, 3 KV heads: uneven query runs padded
per KV group, a KV head replicated on two ranks), through the runner (logits within 1e-4 in
fp32), LLM.generate (the executor) and conversations (fork, save / load: K/V gathered from and
scattered to the ranks); a killed worker fails the engine with TensorParallelError and no hang;
bad sizes are refused with ConfigError. Each TP engine is started once per module (a worker
process costs a few seconds to start on 2 cores)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from choral import LLM, BatchedExecutor, ConfigError, DecodeResult, SamplingParams
from choral.config import EngineConfig
from choral.distributed.shard import plan_shards
from choral.engine.model_runner import Chunk
from choral.errors import InvalidRequestError, TensorParallelError
from choral.models.spec import ModelSpec, RopeSpec

pytestmark = pytest.mark.model

TOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 17, 33, 8, 91, 64, 12, 7, 100, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 44, 45, 46, 47, 48, 49, 50, 51, 52]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by us) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _spec(heads: int, kv_heads: int, inter: int = 96) -> ModelSpec:
    return ModelSpec(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=inter, num_layers=1,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=8, max_position_embeddings=64,
                     rms_norm_eps=1e-5, rope=RopeSpec(theta=10000.0), tie_word_embeddings=True)


# ---- the split (no model) -------------------------------------------------------------------------
def test_shard_plan_of_smollm2_shape_pads_uneven_groups_and_replicates_kv_heads() -> None:
    a, b = plan_shards(_spec(9, 3, 1536), 2)
    # rank 0: queries 0-3 -> KV 0 (0, 1, 2) and KV 1 (3 + two zero heads)
    assert (a.q_slots, a.kv_heads, a.inter) == ((0, 1, 2, 3, None, None), (0, 1), (0, 768))
    # rank 1: queries 4-8 -> KV 1 (4, 5 + one zero head) and KV 2 (6, 7, 8); KV head 1 on both ranks
    assert (b.q_slots, b.kv_heads, b.inter) == ((4, 5, None, 6, 7, 8), (1, 2), (768, 1536))
    assert a.local_spec(_spec(9, 3)).num_heads == 6 and a.local_spec(_spec(9, 3)).num_kv_heads == 2


def test_shard_plan_without_padding_when_heads_divide() -> None:
    shards = plan_shards(_spec(9, 3), 3)  # one KV head and its three queries per rank
    assert [(s.q_slots, s.kv_heads) for s in shards] == [((0, 1, 2), (0,)), ((3, 4, 5), (1,)), ((6, 7, 8), (2,))]
    shards = plan_shards(_spec(8, 2), 4)  # vLLM's replication: 2 KV heads over 4 ranks
    assert [(s.q_slots, s.kv_heads) for s in shards] == [((0, 1), (0,)), ((2, 3), (0,)), ((4, 5), (1,)),
                                                         ((6, 7), (1,))]
    every = [h for s in plan_shards(_spec(9, 3), 4) for h in s.q_slots if h is not None]
    assert every == list(range(9))  # each query head computed exactly once


@pytest.mark.parametrize(("size", "message"), [
    (0, "tensor_parallel_size: must be a positive int, got 0"),
    (-2, "tensor_parallel_size: must be a positive int, got -2"),
    (True, "tensor_parallel_size: must be a positive int, got True"),
    (2.0, "tensor_parallel_size: must be a positive int, got 2.0"),
])
def test_bad_tensor_parallel_size_is_refused_by_the_config(size: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig(tensor_parallel_size=size)


@pytest.mark.parametrize(("options", "message"), [
    ({"weights": "native"}, "tensor_parallel_size=2: quantized weights kept packed cannot be split"),
    ({"quantization": "q8_0"}, "tensor_parallel_size=2: quantized weights kept packed cannot be split"),
    ({"enable_lora": True}, "tensor_parallel_size=2: LoRA adapters are not supported"),
    ({"draft_model": "smollm2-135m-instruct"}, "tensor_parallel_size=2: a draft model is not supported"),
    ({"device": "cuda:1"}, "pass device='cuda'"),
])
def test_options_tensor_parallelism_cannot_honour_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig(tensor_parallel_size=2, **options)


def test_more_ranks_than_heads_is_refused_before_any_process_starts(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]  # 4 query heads
    with pytest.raises(ConfigError, match="tensor_parallel_size: 5 ranks for 4 attention heads"):
        LLM(str(directory), dtype="float32", max_model_len=64, tensor_parallel_size=5)


# ---- tiny random models: TP=N against TP=1 ------------------------------------------------------------
CASES = {"llama": 2, "qwen3": 2, "mistral": 3}  # mistral: 3 ranks over 4 heads / 2 KV heads (replicated)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_models) -> Iterator[dict[str, tuple[LLM, LLM]]]:  # type: ignore[no-untyped-def]
    pairs = {}
    try:
        for arch, tp in CASES.items():
            directory = str(tiny_models[arch][0])
            options: dict[str, Any] = dict(dtype="float32", kv_cache_tokens=512, max_model_len=128, block_size=4)
            pairs[arch] = (LLM(directory, **options), LLM(directory, tensor_parallel_size=tp, **options))
        yield pairs
    finally:
        for _, llm in pairs.values():
            llm.close()


def _logits(llm: LLM) -> torch.Tensor:
    """A prompt chunk (all rows) and a decode step against it, on blocks 0..9."""
    runner = llm.engine.runner
    with llm.engine.core.lock:
        (prefill,) = runner.execute([Chunk(PROMPTS[1], 0, list(range(10)), logits="all")])
        decode = runner.execute([Chunk([77], len(PROMPTS[1]), list(range(10))),
                                 Chunk(PROMPTS[0][:5], 0, list(range(10, 20)), logits="all")])
    assert prefill is not None
    return torch.cat([prefill, *[d for d in decode if d is not None]])


@pytest.mark.parametrize("arch", list(CASES))
def test_tp_logits_match_tp1(tiny_pairs, arch: str) -> None:  # type: ignore[no-untyped-def]
    one, many = tiny_pairs[arch]
    assert many.engine.runner.world == CASES[arch]
    assert (_logits(one) - _logits(many)).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", list(CASES))
def test_tp_greedy_tokens_match_tp1(tiny_pairs, arch: str) -> None:  # type: ignore[no-untyped-def]
    one, many = tiny_pairs[arch]
    expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY)]
    assert [o.outputs[0].token_ids for o in many.generate(PROMPTS, GREEDY)] == expected
    beams = SamplingParams(n=2, best_of=3, temperature=0.8, seed=5, max_tokens=6)  # forks: block copies
    assert ([[c.token_ids for c in o.outputs] for o in many.generate(PROMPTS, beams)]
            == [[c.token_ids for c in o.outputs] for o in one.generate(PROMPTS, beams)])


def test_batched_executor_with_options_over_a_tp_engine_is_refused(tiny_pairs) -> None:  # type: ignore[no-untyped-def]
    _, many = tiny_pairs["llama"]
    with pytest.raises(ConfigError, match="tensor-parallel engine shares its KV cache"):
        BatchedExecutor(many, kv_cache_tokens=256)


# ---- the bundled model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_tp2() -> Iterator[LLM]:
    llm = LLM("smollm2-135m-instruct", dtype="float32", weights="dequantize", kv_cache_tokens=2048,
              max_model_len=1024, tensor_parallel_size=2)
    yield llm
    llm.close()


def test_bundled_model_tp2_matches_tp1(smollm_fp32, smollm_tp2) -> None:  # type: ignore[no-untyped-def]
    prompts = ["The capital of France is", [{"role": "user", "content": "Name three colours."}]]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = [o.outputs[0].token_ids for o in smollm_fp32.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in smollm_tp2.generate(prompts, params)] == expected
    ids = smollm_tp2.get_tokenizer().encode("Tensor parallelism splits every layer over the ranks.")
    got = []
    for llm in (smollm_fp32, smollm_tp2):
        with llm.engine.core.lock:  # blocks the executors do not hold (both are idle)
            (logits,) = llm.engine.runner.execute([Chunk(ids, 0, list(range(100, 100 + len(ids) // 16 + 1)),
                                                         logits="all")])
        assert logits is not None
        got.append(logits)
    # 30 layers of split sums (each rank adds its share of o_proj's and down's inputs, then the
    # all-reduce adds the shares): measured 1.1e-4 on logits of magnitude ~20 (relative 6e-6).
    assert (got[0] - got[1]).abs().max().item() <= 5 * TOL


def _conversation_tokens(executor: BatchedExecutor, prompt: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Greedy tokens of a conversation, of its fork, and of a copy saved and loaded back (then
    shifted left: the context shift)."""
    def run() -> None:
        while executor.batched_token_count:
            assert executor.infer() is DecodeResult.OK

    def greedy(conversation: Any, steps: int) -> list[int]:
        out = []
        for _ in range(steps):
            out.append(conversation.sample())
            conversation.prompt(out[-1])
            run()
        return out

    c = executor.create()
    c.prompt(prompt)
    run()
    fork = c.fork()
    first = greedy(c, 6)
    forked = greedy(fork, 3)
    state = c.save()  # K/V read from every rank
    loaded = executor.load(state)  # and written back to each rank's heads
    after_load = greedy(loaded, 4)
    loaded.shift_left(2, 5)  # K/V moved and re-rotated on every rank
    loaded.prompt(after_load[-1])
    run()
    after_shift = greedy(loaded, 3)
    for conv in (c, fork, loaded):
        conv.close()
    return first, forked, after_load + after_shift


def test_bundled_model_conversations_match_tp1(smollm_fp32, smollm_tp2) -> None:  # type: ignore[no-untyped-def]
    prompt = smollm_tp2.get_tokenizer().encode("Once upon a time, in a quiet village,")
    one = BatchedExecutor(smollm_fp32)
    many = BatchedExecutor(smollm_tp2)
    try:
        assert _conversation_tokens(many, prompt) == _conversation_tokens(one, prompt)
        c = many.create()  # the saved K/V itself: every KV head from the rank that holds it
        c.prompt(prompt)
        while many.batched_token_count:
            many.infer()
        reference = one.create()
        reference.prompt(prompt)
        while one.batched_token_count:
            one.infer()
        tp_keys, tp_values = smollm_tp2.engine.core.read_tokens(c.block_table, len(prompt))
        keys, values = smollm_fp32.engine.core.read_tokens(reference.block_table, len(prompt))
        assert tp_keys[3].shape == keys[3].shape == (len(prompt), 3, 64)
        assert max((a - b).abs().max().item() for a, b in zip(tp_keys + tp_values, keys + values, strict=True)) <= TOL
        c.close()
        reference.close()
    finally:
        one.close()
        many.close()


def test_server_over_a_tp_engine(smollm_fp32, smollm_tp2) -> None:  # type: ignore[no-untyped-def]
    """The OpenAI server over the TP engine answers as over TP=1; embeddings are refused clearly."""
    import asyncio

    import httpx

    from choral.executor import Executor
    from choral.server.app import create_app

    body = {"prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0}

    async def ask(llm: LLM) -> dict[str, Any]:
        ex = Executor(llm.engine)  # over the LLM's engine: its own loop, the same workers and cache
        transport = httpx.ASGITransport(app=create_app(ex, "smol"))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                if llm.engine.config.tensor_parallel_size > 1:
                    embed = await client.post("/v1/embeddings", json={"model": "smol", "input": "hi"})
                    assert embed.status_code == 400 and "tensor parallelism" in embed.text
                return dict(r.json()["choices"][0])
        finally:
            ex.shutdown(wait=False)

    ref, got = asyncio.run(ask(smollm_fp32)), asyncio.run(ask(smollm_tp2))
    assert got["text"] == ref["text"] and got["text"].strip()


def test_embeddings_are_refused_under_tensor_parallelism(smollm_tp2) -> None:  # type: ignore[no-untyped-def]
    from choral.engine.embedder import Embedder

    embedder = Embedder(smollm_tp2.engine.loaded, 64)
    with pytest.raises(InvalidRequestError, match="embeddings: not available under tensor parallelism"):
        embedder.embed([[1, 2, 3]])


# ---- failure and cleanup ------------------------------------------------------------------------------
def test_killed_worker_fails_the_engine_clearly_without_hanging(tiny_models) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(tiny_models["llama"][0]), dtype="float32", kv_cache_tokens=512, max_model_len=128,
              tensor_parallel_size=2)
    runner = llm.engine.runner
    (pid,) = runner.worker_pids
    assert llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids
    os.kill(pid, signal.SIGKILL)
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate(PROMPTS, GREEDY)
        except BaseException as e:  # noqa: BLE001 - inspected below
            errors.append(e)

    thread = threading.Thread(target=generate, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "generate hung after a worker died"
    assert time.monotonic() - started < 30
    (error,) = errors
    chain = []
    cause: BaseException | None = error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    tp_error = next(e for e in chain if isinstance(e, TensorParallelError))
    assert f"rank 1 (pid {pid}) was killed by signal 9" in str(tp_error)
    with pytest.raises(TensorParallelError, match="was killed by signal 9"):  # broken for good, at once
        with llm.engine.core.lock:
            runner.execute([Chunk([1, 2], 0, [0])])
    llm.close()
    assert not _alive(pid)


def test_close_stops_every_worker(tiny_models) -> None:  # type: ignore[no-untyped-def]
    ex = BatchedExecutor(str(tiny_models["qwen3"][0]), dtype="float32", kv_cache_tokens=256, max_model_len=64,
                         tensor_parallel_size=2)
    pids = ex.engine.runner.worker_pids
    assert len(pids) == 1 and all(_alive(p) for p in pids)
    c = ex.create()
    c.prompt(PROMPTS[0])
    assert ex.infer() is DecodeResult.OK
    ex.close()  # the executor built the engine: it stops the workers
    assert not any(_alive(p) for p in pids)
    with pytest.raises(TensorParallelError, match="closed"):
        with ex.engine.core.lock:
            ex.engine.runner.execute([Chunk([1], 0, [0])])


# ---- the shared-memory all-reduce (CHORAL_TP_ALLREDUCE=shm) --------------------------------------------
def test_shm_all_reduce_sums_bitwise_alike_on_every_rank() -> None:
    from choral.distributed.shm_all_reduce import ShmAllReduce, create_segment

    world, slot = 3, 4096
    path = create_segment(world, slot)
    ranks = [ShmAllReduce(path, r, world, slot, timeout_s=30) for r in range(world)]
    os.unlink(path)
    g = torch.Generator().manual_seed(0)
    rounds = [[torch.randn(5, 7, generator=g).to(dtype) for _ in range(world)]
              for dtype in (torch.float32, torch.bfloat16, torch.float32)]
    results: list[list[torch.Tensor]] = [[] for _ in range(world)]

    def run(rank: int) -> None:
        for inputs in rounds:  # several rounds: the slots are reused only after every rank read them
            t = inputs[rank].clone()
            ranks[rank].all_reduce(t)
            results[rank].append(t)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, inputs in enumerate(rounds):
        expected = inputs[0] + inputs[1] + inputs[2]  # rank order, as every rank sums
        for rank in range(world):
            assert torch.equal(results[rank][i], expected)
    assert ranks[0].fits(torch.empty(1024)) and not ranks[0].fits(torch.empty(1025))
    for r in ranks:
        r.close()


def test_shm_all_reduce_wait_runs_the_liveness_check() -> None:
    from choral.distributed.shm_all_reduce import ShmAllReduce, create_segment

    path = create_segment(2, 256)
    calls = []

    def peer_is_gone() -> None:
        calls.append(1)
        raise RuntimeError("peer gone")

    alone = ShmAllReduce(path, 0, 2, 256, timeout_s=30, check=peer_is_gone)
    os.unlink(path)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="peer gone"):
        alone.all_reduce(torch.ones(4))
    assert calls and time.monotonic() - started < 5
    alone.close()


def test_unknown_all_reduce_is_refused(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CHORAL_TP_ALLREDUCE", "mpi")
    with pytest.raises(ConfigError, match="CHORAL_TP_ALLREDUCE: 'mpi' is not one of gloo, shm"):
        LLM(str(tiny_models["llama"][0]), dtype="float32", max_model_len=64, tensor_parallel_size=2)


def test_shm_engine_matches_tp1_and_fails_clearly_when_a_worker_dies(tiny_pairs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    one, _ = tiny_pairs["qwen3"]
    monkeypatch.setenv("CHORAL_TP_ALLREDUCE", "shm")
    many = LLM(str(tiny_pairs["qwen3"][0].engine.loaded.path), dtype="float32", kv_cache_tokens=512,
               max_model_len=128, block_size=4, tensor_parallel_size=2, max_num_batched_tokens=64)
    try:
        assert many.engine.runner._group.shm is not None
        assert (_logits(one) - _logits(many)).abs().max().item() <= TOL
        expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY)]
        assert [o.outputs[0].token_ids for o in many.generate(PROMPTS, GREEDY)] == expected
        (pid,) = many.engine.runner.worker_pids
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(TensorParallelError, match="was killed by signal 9"):
            with many.engine.core.lock:
                many.engine.runner.execute([Chunk([1, 2], 0, [0])])
        assert time.monotonic() - started < 10
    finally:
        many.close()


def _tp_children() -> list[int]:
    """Worker processes of this process still around (zombies included: not yet reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().split(") ", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"choral.engine.tp_worker" in cmd:
            found.append(int(entry))
    return found


def test_workers_that_do_not_start_in_time_fail_the_engine_and_are_stopped(tiny_models, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    before = set(_tp_children())  # the module's engines' workers
    monkeypatch.setenv("CHORAL_TP_TIMEOUT_S", "0.3")  # no interpreter imports torch that fast
    with pytest.raises(TensorParallelError, match=r"workers \[1\] did not load their shards in 0 s"):
        LLM(str(tiny_models["llama"][0]), dtype="float32", max_model_len=64, tensor_parallel_size=2)
    assert set(_tp_children()) - before == set()


def test_cli_takes_tensor_parallel_size() -> None:
    from choral.cli import build_parser, engine_options

    for command in (["serve"], ["generate", "hi"]):
        args = build_parser().parse_args([*command, "--tensor-parallel-size", "2"])
        assert engine_options(args)["tensor_parallel_size"] == 2
    assert engine_options(build_parser().parse_args(["serve"]))["tensor_parallel_size"] == 1
