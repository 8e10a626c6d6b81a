"""Mistral: Llama layout plus a sliding attention window."""

from __future__ import annotations

from choral.models.llama_family import hf_layer_windows, spec_from_gguf, spec_from_hf
from choral.models.registry import Architecture, register

MISTRAL = register(
    Architecture(
        name="mistral",
        hf_architectures=("MistralForCausalLM",),
        hf_model_types=("mistral",),
        # llama.cpp writes Mistral 7B as "llama"; newer converters may say "mistral".
        gguf_names=("mistral",),
        spec_from_hf=lambda c: spec_from_hf(
            c, "mistral", qkv_bias=False, layer_windows=hf_layer_windows(c, default_on=True)
        ),
        spec_from_gguf=lambda m: spec_from_gguf(m, "mistral", qkv_bias=False),
        gguf_qk_permuted=True,
    )
)
