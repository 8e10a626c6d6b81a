"""HF model directories: sharded safetensors, generation_config EOS ids, tokenizer and chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.errors import ModelLoadError
from tests.conftest import make_tiny_model


@pytest.mark.model
def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    hf = make_tiny_model("qwen2", tmp_path / "ref")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "sharded"), dtype="float32", block_size=4,
                                    kv_cache_tokens=256))
    tokens = list(range(3, 20))
    table = engine.pool.allocate(5)
    (logits,) = engine.runner.execute([Chunk(tokens, 0, table, logits="all")])
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    # A missing shard is named.
    shards[0].unlink()
    with pytest.raises(ModelLoadError, match="shard"):
        LLMEngine(EngineConfig(model=str(tmp_path / "sharded"), dtype="float32"))


@pytest.mark.model
def test_generation_config_eos_ids(tmp_path: Path) -> None:
    make_tiny_model("llama", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_tokens=256))
    assert engine.eos_token_ids == (2, 7)


@pytest.mark.model
def test_missing_weight_is_named(tmp_path: Path) -> None:
    make_tiny_model("llama", tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.down_proj.weight"):
        LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", kv_cache_tokens=256))


def test_tokenizer_and_chat_template_from_hf_files(smollm_path: Path, tmp_path: Path) -> None:
    """The GGUF's tokenizer saved as HF files loads from a directory with the same ids."""
    from transformers import AutoTokenizer

    from choral.tokenizer import Tokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    hf_tok.save_pretrained(str(tmp_path))
    from_dir = Tokenizer.from_model_path(tmp_path, [2])
    from_gguf = Tokenizer.from_model_path(smollm_path, [2])
    assert from_dir is not None and from_gguf is not None
    chat = [{"role": "user", "content": "Bonjour, ça va ?"}]
    assert from_dir.apply_chat_template(chat) == from_gguf.apply_chat_template(chat)
    assert from_dir.encode("héllo wörld") == from_gguf.encode("héllo wörld")
    shutil.rmtree(tmp_path)
