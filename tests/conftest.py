"""Shared fixtures: tiny random HF models (made here, never downloaded) and the bundled SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# ---- test tiers ----------------------------------------------------------------------------------
# `pytest --fast` (make test-fast) runs the tests that load no model; `pytest` runs everything.
# A test loads a model when it uses one of these fixtures (module ones included) or is marked
# @pytest.mark.model; in the fast tier loading one anyway fails, so an unmarked model test cannot
# slip in. Errors raised before any weights are read (a missing file, an unknown architecture) stay fast.
MODEL_FIXTURES = {"tiny_models", "smollm_path", "smollm_fp32", "smollm_executor",
                  "tokenizer", "chat_ex", "long_context_dir"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="the fast tier: only tests that load no model (see tests/conftest.py)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fast"):
        _forbid_model_loads()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
    if config.getoption("--fast"):
        slow = [item for item in items if item.get_closest_marker("model") is not None]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if item.get_closest_marker("model") is None]


def _forbid_model_loads() -> None:
    """Every way the tests run a model (an engine's model runner, a tokenizer read from a model
    file, a transformers model) raises in the fast tier: the test must be marked @pytest.mark.model."""
    import transformers

    import choral.engine.model_runner
    import choral.tokenizer

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the fast tier loads no model: mark this test @pytest.mark.model")

    choral.engine.model_runner.ModelRunner.__init__ = refuse  # type: ignore[method-assign,assignment]
    choral.tokenizer.Tokenizer.from_model_path = classmethod(refuse)  # type: ignore[assignment,method-assign,arg-type]
    transformers.PreTrainedModel.__init__ = refuse  # type: ignore[method-assign,assignment]

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str):  # type: ignore[no-untyped-def]
    """A transformers config for one of our architectures, small enough for CPU tests."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**TINY, rope_theta=10000.0)
    if arch == "llama3":  # llama3 rope scaling, tied embeddings
        return LlamaConfig(
            **TINY,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
        )
    if arch == "mistral":  # a small window so the tests cross it
        return MistralConfig(**TINY, sliding_window=12)
    if arch == "mistral-hd64":  # head_dim 64: the C kernel's fast path (with block_size 16)
        return MistralConfig(**TINY, sliding_window=21, head_dim=64)
    if arch == "qwen2":
        return Qwen2Config(**TINY)
    if arch == "qwen3":
        return Qwen3Config(**TINY, head_dim=32)
    if arch == "gemma3":  # local/global layers with their own rope bases, linear scaling on global
        return Gemma3TextConfig(
            **{**TINY, "num_hidden_layers": 3}, head_dim=32, sliding_window=12, sliding_window_pattern=2,
            rope_theta=5000.0, rope_local_base_freq=300.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
            query_pre_attn_scalar=24, pad_token_id=0)
    if arch == "gemma3-hd256":  # Gemma 3 270M's attention shape: head_dim 256, 4 query heads, 1 KV head
        return Gemma3TextConfig(
            **{**TINY, "num_hidden_layers": 3, "num_key_value_heads": 1}, head_dim=256, sliding_window=21,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0)
    raise ValueError(arch)


def hf_class(arch: str):  # type: ignore[no-untyped-def]
    from transformers import (
        Gemma3ForCausalLM,
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    return {"llama": LlamaForCausalLM, "llama3": LlamaForCausalLM, "mistral": MistralForCausalLM,
            "mistral-hd64": MistralForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM,
            "gemma3": Gemma3ForCausalLM, "gemma3-hd256": Gemma3ForCausalLM}[arch]


def make_tiny_model(arch: str, directory: Path):  # type: ignore[no-untyped-def]
    """Random weights (seeded), saved with save_pretrained as safetensors. Returns the HF model."""
    torch.manual_seed(1234)
    model = hf_class(arch)(tiny_config(arch)).eval()
    # Random init leaves the norms at 1 and biases at 0; perturb them so they are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """arch -> (directory, HF model). Built once per session."""
    built = {}
    for arch in ("llama", "llama3", "mistral", "mistral-hd64", "qwen2", "qwen3", "gemma3", "gemma3-hd256"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        built[arch] = (d, make_tiny_model(arch, d))
    return built


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from choral.loader.resolve import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_fp32():  # type: ignore[no-untyped-def]
    """The bundled model in fp32, loaded once for the whole session."""
    from choral import LLM

    # The dequantized fp32 reference (what transformers computes from the same file).
    return LLM("smollm2-135m-instruct", dtype="float32", weights="dequantize", kv_cache_tokens=8192,
               max_model_len=2048)


@pytest.fixture(scope="session")
def smollm_executor(smollm_fp32):  # type: ignore[no-untyped-def]
    """An Executor over the session's SmolLM2 engine (fp32)."""
    from choral.executor import Executor

    ex = Executor(smollm_fp32.engine)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama carrying SmolLM2's vocabulary, tokenizer and chat template: text and
    chat requests without SmolLM2's weights."""
    from choral.loader.resolve import resolve_model_path
    from choral.tokenizer import Tokenizer

    tok = Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"), [])
    assert tok is not None and tok.has_chat_template
    config = tiny_config("llama")
    config.vocab_size = tok.vocab_size
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_ids[0]
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    hf_class("llama")(config).save_pretrained(str(directory), safe_serialization=True)
    tok.hf_tokenizer.save_pretrained(str(directory))
    return directory
