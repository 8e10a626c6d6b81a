"""The on-disk cache of repacked GGUF weights: a warm load maps what the first one repacked, gets
the same weights, and passes over anything in the cache that is not what it should be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from choral.quant.packed_cache import PackedCache
from choral.quant.repack import KIND_U4, PackedRows, repack


def _packed(rows: int = 8, cols: int = 64, seed: int = 0) -> PackedRows:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=rows * cols // 32 * 20, dtype=np.uint8)  # Q4_1: 20 bytes per 32
    raw.reshape(-1, 20)[:, :4] = np.frombuffer(np.array([0.01, 0.0], np.float16).tobytes(), np.uint8)
    return repack(raw, "Q4_1", rows, cols)


def test_put_then_get_maps_the_same_rows(tmp_path: Path) -> None:
    cache = PackedCache(tmp_path / "packed")
    packed = _packed()
    assert cache.get("blk.0.attn_q.weight", KIND_U4, 8, 64, "Q4_1") is None  # empty: repack
    cache.put("blk.0.attn_q.weight", packed)
    got = cache.get("blk.0.attn_q.weight", KIND_U4, 8, 64, "Q4_1")
    assert got is not None and isinstance(got.data, np.memmap)
    assert (got.kind, got.rows, got.cols, got.source) == (KIND_U4, 8, 64, "Q4_1")
    assert np.array_equal(got.data, packed.data)
    torch.from_numpy(got.data)  # copy-on-write mapping: writable, so torch takes it without a warning
    assert cache.get("blk.0.attn_k.weight", KIND_U4, 8, 64, "Q4_1") is None  # another tensor


def test_a_bad_entry_is_passed_over(tmp_path: Path) -> None:
    cache = PackedCache(tmp_path / "packed")
    cache.put("w", _packed())
    assert cache.get("w", KIND_U4, 16, 64, "Q4_1") is None  # another shape than the file's tensor
    file = next((tmp_path / "packed").glob("*.npy"))
    file.write_bytes(file.read_bytes()[:100])  # truncated
    assert cache.get("w", KIND_U4, 8, 64, "Q4_1") is None


def test_an_unwritable_cache_only_costs_the_repack(tmp_path: Path) -> None:
    blocker = tmp_path / "packed"
    blocker.write_text("a file where the directory should be")
    cache = PackedCache(blocker / "key")
    cache.put("w", _packed())  # no error
    assert cache.get("w", KIND_U4, 8, 64, "Q4_1") is None


@pytest.mark.model
def test_a_warm_load_maps_the_cache_and_computes_the_same_logits(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import choral.loader.gguf_file as gguf_file
    from choral.config import EngineConfig
    from choral.engine.llm_engine import LLMEngine
    from choral.engine.model_runner import Chunk

    monkeypatch.setattr(PackedCache, "for_file", classmethod(lambda cls, path, digest: cls(tmp_path / "packed")))
    repacked: list[str] = []

    def counting_repack(raw, type_name, rows, cols):  # type: ignore[no-untyped-def]
        repacked.append(type_name)
        return repack(raw, type_name, rows, cols)

    monkeypatch.setattr(gguf_file, "repack", counting_repack)
    logits = []
    for load in ("cold", "warm"):
        repacked.clear()
        engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", kv_cache_tokens=256, max_model_len=128))
        assert engine.loaded.weights_mode == "native"
        if load == "cold":
            assert len(repacked) == 211  # every quantized tensor of the bundled Q4_1 file
        else:
            assert repacked == []  # all mapped from the cache
        assert len(list((tmp_path / "packed").glob("*.npy"))) == 211
        table = engine.pool.allocate(2)
        (out,) = engine.runner.execute([Chunk(list(range(5, 30)), 0, table, logits="all")])
        engine.pool.free(table)
        logits.append(out)
    assert torch.equal(logits[0], logits[1])
