"""Qwen2 / Qwen2.5: biases on q, k and v projections."""

from __future__ import annotations

from choral.models.llama_family import hf_layer_windows, spec_from_gguf, spec_from_hf
from choral.models.registry import Architecture, register

QWEN2 = register(
    Architecture(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        hf_model_types=("qwen2",),
        gguf_names=("qwen2",),
        spec_from_hf=lambda c: spec_from_hf(
            c, "qwen2", qkv_bias=True, layer_windows=hf_layer_windows(c, default_on=False)
        ),
        spec_from_gguf=lambda m: spec_from_gguf(m, "qwen2", qkv_bias=True),
    )
)
