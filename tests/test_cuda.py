"""The same engine on a CUDA device: skipped where torch sees no GPU.

CUDA runs the one forward with the torch attention backend (the C kernel is CPU-only). These
tests check on the GPU what the CPU suite checks on the CPU: logits equal to transformers' for
every architecture in fp32 (TF32 off, so fp32 means fp32) and close in bf16, batched generation
equal to one request at a time through the Executor, conversations (fork, rewind, save on the
GPU and load on the CPU), seeded sampling independent of the batch, and preemption.

``CHORAL_TEST_DEVICE=cpu`` runs this file on the CPU instead (to check the tests themselves).
"""

from __future__ import annotations

import os

import pytest
import torch

from choral import BatchedExecutor, SamplingParams
from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.errors import ConfigError
from choral.executor import Executor, ExecutorConfig, FinishReason, Request
from choral.models.attention import TorchPagedAttention
from tests.test_conversations import greedy, run
from tests.test_hf_parity import ARCHS, hf_logits, run_schedule

DEVICE = os.environ.get("CHORAL_TEST_DEVICE", "cuda")

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():  # type: ignore[no-untyped-def]
    """TF32 would round fp32 matmuls to 10 mantissa bits; the fp32 tolerances assume real fp32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def engine_on(directory, dtype: str = "float32", **options: object) -> LLMEngine:  # type: ignore[no-untyped-def]
    settings: dict[str, object] = dict(block_size=4, kv_cache_tokens=512)
    settings.update(options)
    return LLMEngine(EngineConfig.from_kwargs(model=str(directory), dtype=dtype, device=DEVICE, **settings))


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_transformers(tiny_models, arch: str) -> None:  # type: ignore[no-untyped-def]
    directory, hf = tiny_models[arch]
    engine = engine_on(directory, block_size=16 if arch.endswith("hd64") else 4)
    assert engine.runner.device.type == torch.device(DEVICE).type
    if torch.device(DEVICE).type == "cuda":  # 'auto' picks the torch backend there
        assert isinstance(engine.runner.attention, TorchPagedAttention)
    g = torch.Generator().manual_seed(11)
    lengths = [23, 5, 14, 3]
    seqs = [torch.randint(3, 128, (n + 5,), generator=g).tolist() for n in lengths]
    schedule = [[(0, 9), (1, 5), (2, 6), (3, 3)], [(0, 14), (1, 1), (2, 8), (3, 1)]]
    schedule += [[(0, 1), (1, 1), (2, 1), (3, 1)] for _ in range(4)]
    got = run_schedule(engine, seqs, schedule)
    worst = 0.0
    for i, tokens in enumerate(seqs):
        ref = hf_logits(hf, tokens)
        for pos, row in got[i].items():
            assert row.device.type == torch.device(DEVICE).type
            worst = max(worst, (row.cpu() - ref[pos]).abs().max().item())
    assert worst <= 1e-4, f"{arch}: max |diff| {worst:.2e}"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_fp32(tiny_models, dtype: str) -> None:  # type: ignore[no-untyped-def]
    directory, hf = tiny_models["mistral-hd64"]
    engine = engine_on(directory, dtype=dtype, block_size=16)
    assert engine.loaded.model.dtype == getattr(torch, dtype)
    tokens = list(range(3, 40))
    table = engine.pool.allocate(3)
    (logits,) = engine.runner.execute([Chunk(tokens, 0, table, logits="all")])
    ref = hf_logits(hf, tokens)
    assert (logits.float().cpu() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    engine.pool.free(table)


def test_auto_dtype_is_bf16_and_kernel_backend_refused(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    if torch.device(DEVICE).type == "cuda":
        assert engine_on(directory, dtype="auto").loaded.model.dtype == torch.bfloat16
        with pytest.raises(ConfigError, match="kernel"):
            engine_on(directory, attention_backend="kernel")


def test_executor_batched_equals_alone(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """20 greedy requests of mixed lengths in one executor equal each run alone, and equal the
    CPU engine's tokens (fp32 on both devices)."""
    directory, _ = tiny_models["llama3"]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 60, (20,), generator=g)]
    lens = [int(n) for n in torch.randint(1, 24, (20,), generator=g)]
    reqs = [Request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, lens, strict=True)]
    with Executor(engine_on(directory, max_model_len=128)) as ex:
        batched = [r.result.output_token_ids for r in ex.await_responses(ex.enqueue_many(reqs), timeout=600)]
        alone = [ex.submit(r, timeout=600).outputs[0].token_ids for r in reqs]
        assert ex.kv.pool.num_used_blocks == 0
    assert batched == alone
    assert [len(b) for b in batched] == lens
    cpu = LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, kv_cache_tokens=512,
                                 max_model_len=128))
    with Executor(cpu) as ex:
        on_cpu = [r.result.output_token_ids for r in ex.await_responses(ex.enqueue_many(reqs), timeout=600)]
    assert on_cpu == batched


def test_seeded_sampling_independent_of_batch(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["qwen2"]
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=123, max_tokens=16, ignore_eos=True)
    others = [Request([7, 8, 9 + i], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))
              for i in range(6)]
    with Executor(engine_on(directory)) as ex:
        alone = ex.submit(Request([4, 5, 6, 7], params), timeout=600).outputs[0].token_ids
        ids = ex.enqueue_many([*others[:3], Request([4, 5, 6, 7], params), *others[3:]])
        batched = {r.request_id: r.result.output_token_ids for r in ex.await_responses(ids, timeout=600)}
    assert batched[ids[3]] == alone


def test_preemption_on_a_tiny_pool(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["qwen3"]
    reqs = [Request(list(range(3 + i, 23 + i)), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            for i in range(6)]
    with Executor(engine_on(directory, kv_cache_tokens=64, max_model_len=64)) as ex:
        alone = [ex.submit(r, timeout=600).outputs[0].token_ids for r in reqs]
        responses = ex.await_responses(ex.enqueue_many(reqs), timeout=600)
        preemptions = sum(s.num_preemptions for s in ex.get_latest_iteration_stats())
        assert ex.kv.pool.num_used_blocks == 0
    assert preemptions > 0
    assert [r.result.output_token_ids for r in responses] == alone
    assert all(r.result.finish_reason is FinishReason.LENGTH for r in responses)


def test_executor_config_accepts_device_engine(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["mistral"]
    with Executor(str(directory), ExecutorConfig(), dtype="float32", device=DEVICE, block_size=4,
                  kv_cache_tokens=256) as ex:
        out = ex.submit(Request([3, 4, 5], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)), timeout=600)
        assert len(out.outputs[0].token_ids) == 5
        assert ex.engine.runner.device.type == torch.device(DEVICE).type


def test_conversations_fork_rewind_and_save_to_cpu(tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["llama"]
    prompt = [5, 17, 33, 8, 91, 64, 12, 7, 100, 3]
    gpu = BatchedExecutor(str(directory), dtype="float32", device=DEVICE, block_size=4, kv_cache_tokens=512,
                          max_model_len=64)
    parent = gpu.create()
    parent.prompt(prompt)
    run(gpu)
    child = parent.fork()
    parent_out = greedy(gpu, parent, 6)
    child.prompt(42)
    run(gpu)
    child_out = greedy(gpu, child, 6)
    fresh = gpu.create()
    fresh.prompt([*prompt, 42])
    run(gpu)
    assert greedy(gpu, fresh, 6) == child_out

    parent.rewind(len(parent.tokens) - len(prompt) + 1)  # back to the prompt less its last token
    parent.prompt(prompt[-1])
    run(gpu)
    assert greedy(gpu, parent, 6) == parent_out  # the same tokens again after the rewind
    parent.save(tmp_path / "conv.state")
    gpu.check_invariants()

    cpu = BatchedExecutor(str(directory), dtype="float32", block_size=4, kv_cache_tokens=512, max_model_len=64)
    moved = cpu.load(tmp_path / "conv.state")
    assert moved.tokens == parent.tokens
    assert greedy(cpu, moved, 5) == greedy(gpu, parent, 5)
    for ex in (gpu, cpu):
        ex.close()
        assert ex.engine.pool.num_free_blocks == ex.engine.pool.num_blocks


def test_llm_generate_beam_search_and_best_of(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """LLM.generate on the device: beams equal transformers' (CPU, fp32); best_of returns the n
    most likely of its samples, which fork the prompt's KV on the device."""
    from choral import LLM
    from tests.test_executor_fanout import PROMPT, hf_beams

    directory, hf_model = tiny_models["llama"]
    with LLM(str(directory), dtype="float32", device=DEVICE, block_size=4, kv_cache_tokens=1024,
             max_model_len=128) as llm:
        (beams,) = llm.generate([PROMPT], SamplingParams(beam_width=3, n=3, max_tokens=10, stop_token_ids=[1],
                                                         ignore_eos=True))
        every, best = llm.generate([PROMPT, PROMPT], [
            SamplingParams(temperature=1.0, seed=11, n=5, logprobs=0, max_tokens=6, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=11, n=2, best_of=5, max_tokens=6, ignore_eos=True)])
        assert llm.engine.pool.num_used_blocks == 0
    ref = hf_beams(hf_model, 3, 3, 10, 1)
    for i, out in enumerate(beams.outputs):
        length = int((ref.beam_indices[i] >= 0).sum())
        assert out.token_ids == ref.sequences[i, len(PROMPT) : len(PROMPT) + length].tolist()
        assert out.cumulative_logprob == pytest.approx(float(ref.sequences_scores[i]), abs=1e-4)
    ranked = sorted(every.outputs, key=lambda o: -(o.cumulative_logprob or 0.0))[:2]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked]
