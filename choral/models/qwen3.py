"""Qwen3: RMSNorm on each head of q and k before rope, no qkv bias by default."""

from __future__ import annotations

from choral.models.llama_family import hf_layer_windows, spec_from_gguf, spec_from_hf
from choral.models.registry import Architecture, register

QWEN3 = register(
    Architecture(
        name="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        hf_model_types=("qwen3",),
        gguf_names=("qwen3",),
        spec_from_hf=lambda c: spec_from_hf(
            c,
            "qwen3",
            qkv_bias=bool(c.get("attention_bias", False)),
            o_bias=bool(c.get("attention_bias", False)),
            qk_norm=True,
            layer_windows=hf_layer_windows(c, default_on=False),
        ),
        spec_from_gguf=lambda m: spec_from_gguf(
            m, "qwen3", qkv_bias="blk.0.attn_q.bias" in m["_tensor_names"], qk_norm=True
        ),
    )
)
