"""Model configs with absurd values (issue case 6): refused at load with a ModelLoadError naming the
field, before anything large is allocated; a model that cannot fit in memory is refused from an
estimate, not by running out of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from choral import LLM
from choral.errors import ModelLoadError
from choral.loader.memory import available_bytes


def with_config(tiny_models: Any, tmp_path: Path, **changes: Any) -> Path:
    source, _ = tiny_models["llama"]
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_attention_heads=0, head_dim=None), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_kv_heads"),
    (dict(num_hidden_layers=10**9), "num_layers"),
    (dict(num_hidden_layers=-1), "num_layers"),
    (dict(max_position_embeddings=10**12), "max_position_embeddings"),
    (dict(head_dim=10**6), "head_dim"),
    (dict(head_dim=15), "head_dim"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), "rope.theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope.theta"),
    (dict(rope_parameters=None, rope_scaling=None, rope_theta=0.0), "rope.theta"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(sliding_window=-4, model_type="mistral", architectures=["MistralForCausalLM"]), "sliding_window"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size="wide"), "hidden_size"),
    (dict(intermediate_size=[96]), "intermediate_size"),
])
def test_absurd_config_values_are_model_load_errors_naming_the_field(tiny_models: Any, tmp_path: Path,
                                                                     changes: dict[str, Any], field: str) -> None:
    directory = with_config(tiny_models, tmp_path, **changes)
    with pytest.raises(ModelLoadError) as info:
        LLM(str(directory), dtype="float32", kv_cache_tokens=256, max_model_len=64)
    message = str(info.value)
    assert "config" in message and (field in message or field.split(".")[-1] in message), message


def test_a_model_too_large_for_memory_is_refused_from_an_estimate(tiny_models: Any, tmp_path: Path) -> None:
    have = available_bytes(__import__("torch").device("cpu"))
    if have is None:
        pytest.skip("this platform does not say how much memory is available")
    # Within every per-field bound, but the weights alone are far beyond any machine's memory.
    directory = with_config(tiny_models, tmp_path, hidden_size=2**16, intermediate_size=2**19,
                            num_hidden_layers=1000, num_attention_heads=1024, num_key_value_heads=1024,
                            head_dim=64)
    with pytest.raises(ModelLoadError, match="loading needs about .* available"):
        LLM(str(directory), dtype="float32", kv_cache_tokens=256, max_model_len=64)


def test_a_rotary_table_too_large_for_memory_is_refused(tiny_models: Any, tmp_path: Path) -> None:
    directory = with_config(tiny_models, tmp_path, max_position_embeddings=2**24, head_dim=2**11,
                            hidden_size=64, num_attention_heads=4)
    with pytest.raises(ModelLoadError, match="rotary table for 16777216 positions"):
        LLM(str(directory), dtype="float32", kv_cache_tokens=256)
