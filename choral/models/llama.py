"""Llama (Llama 2/3 incl. llama3 rope scaling, SmolLM2, TinyLlama...)."""

from __future__ import annotations

from choral.models.llama_family import spec_from_gguf, spec_from_hf
from choral.models.registry import Architecture, register

LLAMA = register(
    Architecture(
        name="llama",
        hf_architectures=("LlamaForCausalLM",),
        hf_model_types=("llama",),
        gguf_names=("llama",),
        spec_from_hf=lambda c: spec_from_hf(
            c,
            "llama",
            qkv_bias=bool(c.get("attention_bias", False)),
            o_bias=bool(c.get("attention_bias", False)),
        ),
        spec_from_gguf=lambda m: spec_from_gguf(
            m, "llama", qkv_bias="blk.0.attn_q.bias" in m["_tensor_names"]
        ),
        gguf_qk_permuted=True,
    )
)
