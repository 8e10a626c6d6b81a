"""LoRA adapters vs transformers + PEFT on tiny random models (fp32, 1e-4).

Adapters of ranks 4 / 8 / 16 over different modules (rsLoRA included); one packed batch mixing
three adapters and the base model gives every row what it gives alone, through the fused qkv
and gate_up projections.
"""

from __future__ import annotations

import pytest
import torch

from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from tests.conftest import hf_class
from tests.lora_helpers import ADAPTER_SPECS, make_peft_adapter

TOL = 1e-4
PROMPTS = [[5, 9, 17, 33, 2, 60, 71, 8, 99, 100, 3], [7, 7, 21, 90], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def adapted(request, tiny_models, tmp_path_factory):  # type: ignore[no-untyped-def]
    """(arch, base dir, [(adapter dir, PeftModel)], base HF model)."""
    arch = request.param
    directory, base = tiny_models[arch]
    adapters = []
    for i, spec in enumerate(ADAPTER_SPECS):
        fresh = hf_class(arch).from_pretrained(str(directory), dtype=torch.float32).eval()
        d = tmp_path_factory.mktemp(f"lora-{arch}-{i}")
        adapters.append((d, make_peft_adapter(fresh, d, seed=100 + i, **spec)))
    return arch, directory, adapters, base


def reference(model, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()  # [L, V]


def engine_for(directory, max_loras: int = 4, backend: str = "torch") -> LLMEngine:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(directory), dtype="float32", block_size=4, kv_cache_tokens=512,
                       attention_backend=backend, enable_lora=True, max_loras=max_loras)
    return LLMEngine(cfg)


def run_alone(engine: LLMEngine, tokens: list[int], lora) -> torch.Tensor:  # type: ignore[no-untyped-def]
    table = engine.pool.allocate(-(-len(tokens) // engine.pool.block_size))
    try:
        out = engine.runner.execute([Chunk(tokens, 0, table, logits="all", lora=lora)])[0]
    finally:
        engine.pool.free(table)
    assert out is not None
    return out


@pytest.mark.model
def test_each_adapter_matches_peft(adapted) -> None:  # type: ignore[no-untyped-def]
    arch, directory, adapters, base = adapted
    engine = engine_for(directory)
    for i, (d, peft_model) in enumerate(adapters):
        adapter = engine.core.load_lora(f"a{i}", str(d))
        assert adapter.rank == ADAPTER_SPECS[i]["r"]
        for tokens in PROMPTS:
            got = run_alone(engine, tokens, adapter)
            want = reference(peft_model, tokens)
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=f"{arch} adapter {i}")
            # and the adapter really changes the output
            assert (want - reference(base, tokens)).abs().max() > 1e-3


@pytest.mark.model
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_mixed_batch_rows_equal_alone(adapted, backend: str) -> None:  # type: ignore[no-untyped-def]
    """Three adapters and no adapter in one forward, prompts chunked and decode rows mixed."""
    arch, directory, adapters, base = adapted
    engine = engine_for(directory, backend=backend)
    loaded = [engine.core.load_lora(f"a{i}", str(d)) for i, (d, _) in enumerate(adapters)]
    models = [m for _, m in adapters] + [base]
    loras = [*loaded, None]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    bs = engine.pool.block_size
    tables = [engine.pool.allocate(-(-len(p) // bs)) for p in prompts]
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    # step sizes per sequence: prompts split unevenly so chunk and single-token rows interleave
    schedule = [[3, 1, 4, 2], [5, 2, 3, 1], [3, 1, 0, 1], [20, 20, 20, 20]]
    for sizes in schedule:
        chunks, who = [], []
        for i, n in enumerate(sizes):
            n = min(n, len(prompts[i]) - done[i])
            if n == 0:
                continue
            chunks.append(Chunk(prompts[i][done[i] : done[i] + n], done[i], tables[i], logits="all", lora=loras[i]))
            who.append(i)
            done[i] += n
        for i, out in zip(who, engine.runner.execute(chunks), strict=True):
            assert out is not None
            got[i].extend(out)
    for i, p in enumerate(prompts):
        assert done[i] == len(p)
        torch.testing.assert_close(torch.stack(got[i]), reference(models[i], p), atol=TOL, rtol=TOL,
                                   msg=f"{arch} row {i}")
    for t in tables:
        engine.pool.free(t)


@pytest.mark.model
def test_quantized_base_weights(adapted) -> None:  # type: ignore[no-untyped-def]
    """Adapters over packed q8_0 base weights (the integer-dot projections): the adapter adds no
    error beyond what quantizing the base already gives."""
    arch, directory, adapters, base = adapted
    cfg = EngineConfig(model=str(directory), dtype="float32", block_size=4, kv_cache_tokens=512,
                       quantization="q8_0", enable_lora=True)
    engine = LLMEngine(cfg)
    assert any(k.startswith("q8") or k.startswith("Q8") for k in engine.loaded.model.weight_formats)
    d, peft_model = adapters[1]  # all seven projections
    adapter = engine.core.load_lora("all", str(d))
    for tokens in PROMPTS:
        base_error = (run_alone(engine, tokens, None) - reference(base, tokens)).abs().max().item()
        lora_error = (run_alone(engine, tokens, adapter) - reference(peft_model, tokens)).abs().max().item()
        assert base_error > 0  # really quantized
        effect = (reference(peft_model, tokens) - reference(base, tokens)).abs().max().item()
        assert effect > 4 * base_error + 1e-3  # the check below would see a dropped adapter
        assert lora_error < 2 * base_error + 1e-3, (arch, base_error, lora_error)
