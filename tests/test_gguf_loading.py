"""GGUF files we write ourselves: name mapping, llama.cpp's q/k permutation, quantized tensors,
and the errors for unsupported architectures and tensor types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from choral.config import EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.model_runner import Chunk
from choral.errors import UnsupportedArchitectureError, UnsupportedTensorTypeError

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # What llama.cpp's converter does to llama q/k rows.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_model, path: Path, quantize: dict[str, object] | None = None,
                     arch: str = "llama") -> None:  # type: ignore[no-untyped-def]
    """Write ``hf_model`` as a llama GGUF; ``quantize`` maps GGUF tensor names to a
    GGMLQuantizationType. The HF model's weights are replaced by the dequantized values so
    the two stay comparable."""
    import gguf
    from gguf.quants import dequantize
    from gguf.quants import quantize as q

    cfg = hf_model.config
    quantize = quantize or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    state = hf_model.state_dict()
    pairs = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")]
    if not cfg.tie_word_embeddings:
        pairs.append(("lm_head.weight", "output.weight"))
    for i in range(cfg.num_hidden_layers):
        for hf_name, g_name in _LAYER_NAMES.items():
            pairs.append((f"model.layers.{i}.{hf_name}", f"blk.{i}.{g_name}"))
    for hf_name, g_name in pairs:
        data = state[hf_name].float().numpy()
        qtype = quantize.get(g_name)
        if qtype is not None:
            data = dequantize(q(data, qtype), qtype).reshape(data.shape)
            state[hf_name].copy_(torch.from_numpy(data))
        stored = data
        if g_name.endswith("attn_q.weight"):
            stored = _permute(data, cfg.num_attention_heads)
        elif g_name.endswith("attn_k.weight"):
            stored = _permute(data, cfg.num_key_value_heads)
        if qtype is not None:
            w.add_tensor(g_name, q(stored, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g_name, np.ascontiguousarray(stored, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.model
def test_gguf_with_quantized_tensors_matches_transformers(tmp_path: Path) -> None:
    import gguf

    from tests.conftest import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf")
    T = gguf.GGMLQuantizationType
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(hf, path, {"blk.0.ffn_up.weight": T.Q8_0, "blk.1.attn_v.weight": T.Q4_1,
                                "blk.1.ffn_down.weight": T.Q6_K if hf.config.intermediate_size % 256 == 0 else T.Q5_0})
    # Dequantized: exact against transformers' own dequantization (native weights: test_quant_model).
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", weights="dequantize", block_size=4,
                                    kv_cache_tokens=256))
    assert engine.loaded.tokenizer is None
    tokens = list(range(3, 30))
    table = engine.pool.allocate(-(-len(tokens) // 4))
    (logits,) = engine.runner.execute([Chunk(tokens, 0, table, logits="all")])
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: .*LlamaForCausalLM"):
        LLMEngine(EngineConfig(model=str(path), dtype="float32"))


@pytest.mark.model
def test_unsupported_tensor_type(tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import gguf

    from tests.conftest import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf")
    path = tmp_path / "q8k.gguf"
    write_llama_gguf(hf, path)
    # Rewrite with one tensor stored as Q8_K, which the gguf package cannot dequantize.
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("llama."):
            value = field.contents()
            (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            # One Q8_K block (256 values) per row; the shape check would come after dequantizing.
            block_bytes = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]
            raw = np.zeros((96, block_bytes), dtype=np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
        else:
            w.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedTensorTypeError, match="blk.0.ffn_up.weight.*Q8_K"):
        LLMEngine(EngineConfig(model=str(tmp_path / "bad.gguf"), dtype="float32"))
