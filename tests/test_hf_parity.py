"""choral's logits vs transformers' on the same weights (fp32, tiny random models).

Batches mix sequences of different lengths, prompts split into chunks, and decode steps, all
through the paged KV cache, for every architecture and both attention backends.
"""

from __future__ import annotations

import pytest
import torch

from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.kernels.paged_attention import PagedAttention
from choral.models.attention import CpuKernelAttention, TorchPagedAttention

ARCHS = ["llama", "llama3", "mistral", "mistral-hd64", "qwen2", "qwen3", "gemma3", "gemma3-hd256"]
TOL = 1e-4


def hf_logits(model, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()  # [L, V]


def make_engine(directory, backend: str, block_size: int = 4) -> LLMEngine:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(directory), dtype="float32", block_size=block_size,
                       kv_cache_tokens=512, attention_backend=backend)
    return LLMEngine(cfg)


def run_schedule(engine: LLMEngine, seqs: list[list[int]], schedule: list[list[tuple[int, int]]]):  # type: ignore[no-untyped-def]
    """Run steps; each step lists (sequence index, number of tokens). Returns per sequence a
    dict cache-index -> logits row (all rows are requested)."""
    tables: list[list[int]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    got: list[dict[int, torch.Tensor]] = [{} for _ in seqs]
    bs = engine.pool.block_size
    for step in schedule:
        chunks = []
        for i, n in step:
            need = -(-(done[i] + n) // bs) - len(tables[i])
            tables[i].extend(engine.pool.allocate(need))
            chunks.append(Chunk(seqs[i][done[i] : done[i] + n], done[i], tables[i], logits="all"))
        results = engine.runner.execute(chunks)
        for (i, n), logits in zip(step, results, strict=True):
            for j in range(n):
                got[i][done[i] + j] = logits[j]
            done[i] += n
    for t in tables:
        engine.pool.free(t)
    return got


@pytest.mark.parametrize("backend", ["torch", "kernel"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_transformers(tiny_models, arch: str, backend: str) -> None:  # type: ignore[no-untyped-def]
    if backend == "kernel" and PagedAttention.load() is None:
        pytest.skip("no C compiler: the kernel backend is unavailable")
    directory, hf = tiny_models[arch]
    engine = make_engine(directory, backend, block_size=16 if arch.endswith(("hd64", "hd256")) else 4)
    expected = CpuKernelAttention if backend == "kernel" else TorchPagedAttention
    assert isinstance(engine.runner.attention, expected)
    g = torch.Generator().manual_seed(7)
    lengths = [29, 6, 17, 1 + 3]
    seqs = [torch.randint(3, 128, (n + 5,), generator=g).tolist() for n in lengths]
    # Step 1: seq0 first chunk, seq1 whole prompt, seq2 first chunk, seq3 whole prompt.
    # Step 2: seq0 second chunk, seq1 decode, seq2 rest, seq3 decode. Then decodes for all.
    schedule = [
        [(0, 11), (1, 6), (2, 5), (3, 4)],
        [(0, 18), (1, 1), (2, 12), (3, 1)],
    ]
    for _ in range(4):
        schedule.append([(0, 1), (1, 1), (2, 1), (3, 1)])
    got = run_schedule(engine, seqs, schedule)
    worst = 0.0
    for i, tokens in enumerate(seqs):
        ref = hf_logits(hf, tokens)
        for pos, row in got[i].items():
            worst = max(worst, (row - ref[pos]).abs().max().item())
    assert worst <= TOL, f"{arch}/{backend}: max |diff| {worst:.2e}"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_greedy_matches_transformers(tiny_models, arch: str) -> None:  # type: ignore[no-untyped-def]
    from choral import LLM, SamplingParams

    directory, hf = tiny_models[arch]
    llm = LLM(str(directory), dtype="float32", block_size=4, kv_cache_tokens=256)
    prompts = [[5, 9, 33, 71, 100, 4], [8, 8, 8], list(range(10, 40))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          min_new_tokens=12, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_sliding_window_is_applied(tiny_models) -> None:  # type: ignore[no-untyped-def]
    directory, _ = tiny_models["mistral"]
    engine = make_engine(directory, "torch")
    assert engine.loaded.spec.layer_windows == (12, 12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_stays_close_to_fp32(tiny_models, dtype: str) -> None:  # type: ignore[no-untyped-def]
    directory, hf = tiny_models["mistral-hd64"]
    engine = LLMEngine(EngineConfig(model=str(directory), dtype=dtype, block_size=16, kv_cache_tokens=512))
    tokens = list(range(3, 40))
    table = engine.pool.allocate(3)
    (logits,) = engine.runner.execute([Chunk(tokens, 0, table, logits="all")])
    ref = hf_logits(hf, tokens)
    scale = ref.abs().max().item()
    assert (logits - ref).abs().max().item() <= 0.05 * scale
    engine.pool.free(table)
