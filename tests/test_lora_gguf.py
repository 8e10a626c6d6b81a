"""GGUF LoRA files (llama.cpp's adapter format) vs the same adapter in PEFT's format.

The GGUF files are written here the way llama.cpp's convert_lora_to_gguf.py writes them
(tests/lora_helpers.write_gguf_lora: q/k lora_b rows permuted for llama-style models), and, when
llama.cpp's sources are on this machine, by that converter itself. Logits with the GGUF adapter
equal transformers + PEFT (fp32, 1e-4) on HF and GGUF base models; every malformed or foreign
file is refused with a LoraLoadError and leaves the registry as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from choral.errors import LoraLoadError
from tests.conftest import hf_class
from tests.lora_helpers import ALL_MODULES, make_peft_adapter, write_gguf_lora
from tests.test_gguf_loading import write_llama_gguf
from tests.test_lora_parity import engine_for, reference, run_alone

TOL = 1e-4
TOKENS = [5, 9, 17, 33, 2, 60, 71, 8, 99, 100, 3]
CONVERTER = Path(os.environ.get("PEERS_DIR", Path.home() / ".cache/choral-peers")) / "llama.cpp-0.3.36" \
    / "convert_lora_to_gguf.py"


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def adapted(request, tiny_models, tmp_path_factory):  # type: ignore[no-untyped-def]
    """(arch, base dir, adapter dir, PeftModel, HF config) with a rank-8 adapter on every projection."""
    arch = request.param
    directory, _ = tiny_models[arch]
    fresh = hf_class(arch).from_pretrained(str(directory), dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp(f"gguf-lora-{arch}")
    peft = make_peft_adapter(fresh, d / "peft", seed=41, r=8, lora_alpha=16, target_modules=ALL_MODULES)
    return arch, directory, d / "peft", peft, fresh.config


def _heads(config) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return config.num_attention_heads, config.num_key_value_heads


@pytest.mark.model
def test_gguf_lora_matches_peft(adapted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    arch, directory, peft_dir, peft, config = adapted
    path = tmp_path / "lora.gguf"
    write_gguf_lora(peft_dir, path, arch, *_heads(config), permute_qk=arch == "llama")
    engine = engine_for(directory)
    adapter = engine.core.loras.load("g", str(path))
    assert adapter.rank == 8 and adapter.modules == tuple(ALL_MODULES)
    got = run_alone(engine, TOKENS, adapter)
    want = reference(peft, TOKENS)
    assert (got - want).abs().max().item() < TOL
    base = run_alone(engine, TOKENS, None)
    assert (base - want).abs().max().item() > 100 * TOL  # the adapter changes the logits


@pytest.mark.model
@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_gguf_lora_lower_precision(adapted, tmp_path, qtype: str) -> None:  # type: ignore[no-untyped-def]
    """F16 / BF16 adapter tensors (the converter's other out types): logits near the fp32 adapter's."""
    arch, directory, peft_dir, peft, config = adapted
    path = tmp_path / f"lora-{qtype}.gguf"
    write_gguf_lora(peft_dir, path, arch, *_heads(config), qtype=qtype, permute_qk=arch == "llama")
    engine = engine_for(directory)
    got = run_alone(engine, TOKENS, engine.core.loras.load("g", str(path)))
    want = reference(peft, TOKENS)
    base = run_alone(engine, TOKENS, None)
    assert (got - want).abs().max().item() < 0.05 * (base - want).abs().max().item()


@pytest.mark.model
def test_gguf_lora_on_gguf_base(tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A GGUF base model (q/k rows permuted in the file) with a GGUF adapter (lora_b permuted
    likewise) gives the PEFT model's logits."""
    directory, _ = tiny_models["llama"]
    hf = hf_class("llama").from_pretrained(str(directory), dtype=torch.float32).eval()
    write_llama_gguf(hf, tmp_path / "base.gguf")
    peft = make_peft_adapter(hf, tmp_path / "peft", seed=5, r=4, lora_alpha=8, use_rslora=True,
                             target_modules=["q_proj", "k_proj", "down_proj"])
    write_gguf_lora(tmp_path / "peft", tmp_path / "lora.gguf", "llama", *_heads(hf.config))
    engine = engine_for(tmp_path / "base.gguf")
    got = run_alone(engine, TOKENS, engine.core.loras.load("g", str(tmp_path / "lora.gguf")))
    assert (got - reference(peft, TOKENS)).abs().max().item() < TOL


@pytest.mark.model
@pytest.mark.skipif(not CONVERTER.is_file(), reason="llama.cpp's sources are not on this machine "
                    "(bash ../shared/peers/build_llama_cpp.sh fetches them)")
def test_llama_cpp_converter_output(adapted, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The file llama.cpp's own convert_lora_to_gguf.py writes loads and matches PEFT."""
    arch, directory, peft_dir, peft, _ = adapted
    out = tmp_path / "converted.gguf"
    subprocess.run([sys.executable, str(CONVERTER), "--base", str(directory), "--outtype", "f32",
                    "--outfile", str(out), str(peft_dir)], check=True, capture_output=True, cwd=tmp_path)
    engine = engine_for(directory)
    got = run_alone(engine, TOKENS, engine.core.loras.load("c", str(out)))
    assert (got - reference(peft, TOKENS)).abs().max().item() < TOL


def _write(path: Path, arch: str = "llama", kind: str = "adapter", adapter_type: str = "lora",
           tensors: dict[str, np.ndarray] | None = None, extra: dict[str, str] | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", kind)
    w.add_string("adapter.type", adapter_type)
    w.add_float32("adapter.lora.alpha", 8.0)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, data in (tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.model
def test_refusals(tiny_models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory, base = tiny_models["llama"]
    h, kv = base.config.hidden_size, base.config.num_key_value_heads * base.config.head_dim
    a, b = np.ones((4, h), np.float32), np.ones((kv, 4), np.float32)
    good = {"blk.0.attn_k.weight.lora_a": a, "blk.0.attn_k.weight.lora_b": b}
    engine = engine_for(directory)
    loras = engine.core.loras
    cases = [
        (_write(tmp_path / "model.gguf", kind="model", tensors=good), "is a GGUF model file, not an adapter"),
        (_write(tmp_path / "cvec.gguf", adapter_type="cvec", tensors=good), "adapter.type 'cvec' is not supported"),
        (_write(tmp_path / "alora.gguf", tensors=good, extra={"adapter.alora.note": "x"}), "activated LoRA"),
        (_write(tmp_path / "qwen2.gguf", arch="qwen2", tensors=good), "for a 'qwen2' model, the base model is 'llama'"),
        (_write(tmp_path / "other.gguf", arch="mamba", tensors=good), "GGUF architecture 'mamba' is not supported"),
        (_write(tmp_path / "embd.gguf", tensors={"token_embd.weight.lora_a": a}), "embedding and output-layer"),
        (_write(tmp_path / "half.gguf", tensors={"blk.0.attn_k.weight.lora_a": a}), "lora_a without its other half"),
        (_write(tmp_path / "layer.gguf", tensors={"blk.9.attn_k.weight.lora_a": a}), "for layer 9"),
        (_write(tmp_path / "shape.gguf", tensors={"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b}),
         "q_proj maps"),
        (_write(tmp_path / "rank.gguf", tensors={"blk.0.attn_k.weight.lora_a": np.ones((32, h), np.float32),
                                                 "blk.0.attn_k.weight.lora_b": np.ones((kv, 32), np.float32)}),
         "exceeds max_lora_rank"),
        (_write(tmp_path / "empty.gguf"), "has no LoRA tensors"),
    ]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tmp_path / "model.gguf").read_bytes()[:40])
    cases.append((truncated, "cannot read"))
    for path, message in cases:
        with pytest.raises(LoraLoadError, match=message):
            loras.load("bad", str(path))
    assert loras.names() == []
    loras.load("ok", str(_write(tmp_path / "ok.gguf", tensors=good)))
    assert loras.names() == ["ok"]
