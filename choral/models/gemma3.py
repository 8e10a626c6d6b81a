"""Gemma 3 (text): a Llama-shaped decoder with Gemma's own choices, all stated in the ModelSpec.

What differs from Llama, and where the forward (``transformer.py``) handles it:
- sliding-window layers interleaved with global ones (``layer_types``, or every
  ``sliding_window_pattern``-th layer global), each kind with its own rope base:
  ``rope_local_base_freq`` (10k) on local layers, ``rope_theta`` (1M, plus ``rope_scaling``) on
  global ones;
- RMSNorm on each head of q and k, and Gemma's RMSNorm scale ``1 + weight``;
- "sandwich" norms: the attention and MLP outputs are normed before each residual add;
- GeGLU (``gelu_pytorch_tanh``) instead of SwiGLU;
- embeddings scaled by sqrt(hidden_size) in the activation dtype;
- q.k scaled by ``query_pre_attn_scalar ** -0.5``;
- optional final logit soft-capping (Gemma 3 ships none). Attention-logit soft-capping (Gemma 2)
  is refused: the attention kernels do not apply it.

GGUF (llama.cpp's ``gemma3``): the norms are stored with the 1 already added, the local rope
base is ``rope.freq_base_swa`` (10k when absent), the pattern ``attention.sliding_window_pattern``
(6 when absent), and the query scale is 1/sqrt(head_dim) except on the 62-layer 27B model, whose
checkpoints use 1/sqrt(hidden / heads), as llama.cpp reads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from choral.errors import ModelLoadError
from choral.models.llama_family import rope_from_params, spec_from_gguf, spec_from_hf
from choral.models.registry import Architecture, register
from choral.models.spec import ModelSpec, RopeSpec

# HF hidden_activation -> our activation name.
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
_DEFAULT_PATTERN = 6  # every 6th layer is global, when a config does not list layer_types
_GLOBAL_THETA, _LOCAL_THETA = 1_000_000.0, 10_000.0  # HF's and llama.cpp's defaults

# Gemma's chat format, for GGUF files that carry no template (llama.cpp, too, knows it by name):
# <bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n...
# A system message is folded into the first user turn; "assistant" is called "model"; turns must
# alternate starting with the user; text is trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set turns = messages -%}{%- set prefix = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma conversations alternate user/assistant turns, starting with the user') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

GGUF_LAYER_NAMES = {
    # GGUF per-layer name -> HF name where Gemma differs from the Llama table.
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


def _refuse_unsupported(config: Mapping[str, Any], src: str) -> None:
    if config.get("attn_logit_softcapping") is not None:
        raise ModelLoadError(f"{src}: attn_logit_softcapping={config['attn_logit_softcapping']} is not supported "
                             "(the attention kernels apply no soft-cap)")
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{src}: use_bidirectional_attention=true is not supported (causal decoders only)")


def _windows(num_layers: int, window: int | None, types: list[str] | None, pattern: int) -> tuple[int | None, ...]:
    if not window:
        return (None,) * num_layers
    if types:
        if len(types) != num_layers:
            raise ModelLoadError(f"config.json: layer_types lists {len(types)} layers, the model has {num_layers}")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ModelLoadError(f"config.json: layer_types {unknown} are not supported")
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if pattern < 1:
        raise ModelLoadError(f"sliding_window_pattern must be >= 1, got {pattern}")
    return tuple(int(window) if (i + 1) % pattern else None for i in range(num_layers))


def _hf_ropes(config: Mapping[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    """(global, local) ropes from transformers >= 5's per-layer-type ``rope_parameters`` or the
    older ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` keys."""
    max_pos = int(config.get("max_position_embeddings", 131072))
    params = config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
    else:
        full = dict(params or config.get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", config.get("rope_theta", _GLOBAL_THETA))
    local.setdefault("rope_theta", config.get("rope_local_base_freq", _LOCAL_THETA))
    return rope_from_params(full, _GLOBAL_THETA, max_pos), rope_from_params(local, _LOCAL_THETA, max_pos)


def _spec_from_hf(config: Mapping[str, Any]) -> ModelSpec:
    src = "config.json"
    _refuse_unsupported(config, src)
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTS:
        raise ModelLoadError(f"{src}: hidden_activation {act!r} is not supported ({', '.join(_ACTS)})")
    # The shared reader knows the Llama keys; Gemma's activation and ropes are read here.
    plain = {k: v for k, v in config.items()
             if k not in ("hidden_act", "rope_parameters", "rope_scaling", "rope_theta")}
    bias = bool(config.get("attention_bias", False))
    base = spec_from_hf(plain, "gemma3", qkv_bias=bias, o_bias=bias, qk_norm=True)
    rope, local_rope = _hf_ropes(config)
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or _DEFAULT_PATTERN)
    windows = _windows(base.num_layers, config.get("sliding_window"), config.get("layer_types"), pattern)
    cap = config.get("final_logit_softcapping")
    return dataclasses.replace(
        base,
        # HF's default when the key is absent (Gemma3TextConfig): tied embeddings.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        rope=rope,
        local_rope=local_rope,
        layer_windows=windows,
        hidden_act=_ACTS[act],
        norm_unit_offset=True,
        sandwich_norms=True,
        embed_scale=math.sqrt(base.hidden_size),
        query_pre_attn_scalar=float(config.get("query_pre_attn_scalar", 256)),
        final_logit_softcap=float(cap) if cap is not None else None,
    )


def _spec_from_gguf(meta: Mapping[str, Any]) -> ModelSpec:
    arch = meta["general.architecture"]
    _refuse_unsupported({"attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping")}, "GGUF")
    base = spec_from_gguf(meta, "gemma3", qkv_bias=False, qk_norm=True)
    layers = base.num_layers
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _DEFAULT_PATTERN)
    window = meta.get(f"{arch}.attention.sliding_window")
    if isinstance(pattern, list):  # one flag per layer: true = sliding
        if len(pattern) != layers:
            raise ModelLoadError(f"GGUF: sliding_window_pattern lists {len(pattern)} layers, the model has {layers}")
        windows = tuple(int(window) if window and flag else None for flag in pattern)
    else:
        windows = _windows(layers, window, None, int(pattern))
    scalar = meta.get(f"{arch}.attention.query_pre_attn_scalar")
    if scalar is None:
        scalar = base.hidden_size / base.num_heads if layers == 62 else base.head_dim
    cap = meta.get(f"{arch}.final_logit_softcapping")
    return dataclasses.replace(
        base,
        local_rope=RopeSpec(theta=float(meta.get(f"{arch}.rope.freq_base_swa", _LOCAL_THETA))),
        layer_windows=windows,
        hidden_act="gelu_tanh",
        norm_unit_offset=True,
        sandwich_norms=True,
        embed_scale=math.sqrt(base.hidden_size),
        query_pre_attn_scalar=float(scalar),
        final_logit_softcap=float(cap) if cap else None,
    )


GEMMA3 = register(
    Architecture(
        name="gemma3",
        hf_architectures=("Gemma3ForCausalLM",),
        hf_model_types=("gemma3_text",),
        gguf_names=("gemma3",),
        spec_from_hf=_spec_from_hf,
        spec_from_gguf=_spec_from_gguf,
        gguf_layer_names=GGUF_LAYER_NAMES,
        gguf_norms_hold_unit_offset=True,
        stop_tokens=("<end_of_turn>",),
        default_chat_template=CHAT_TEMPLATE,
    )
)
