"""Shared readers for Llama-family configs: HF ``config.json`` and GGUF metadata -> ModelSpec.

Each architecture file states only what differs (biases, q/k norms, sliding windows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from choral.errors import ModelLoadError
from choral.models.spec import ModelSpec, RopeSpec

_ROPE_KINDS = ("default", "linear", "llama3")


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ModelLoadError(f"{source}: missing required field {key!r}")
    return config[key]


_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_HF_FLOATS = ("rms_norm_eps", "rope_theta")


def check_hf_types(config: Mapping[str, Any], source: str = "config.json") -> None:
    """The numeric fields of an HF config have the right types (an int is never a float, str or
    bool; 64.7 heads is not 64), and the head count can divide: errors name the field."""
    for name in _HF_INTS:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelLoadError(f"{source}: {name} must be an int, got {value!r}"[:300])
    for name in _HF_FLOATS:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ModelLoadError(f"{source}: {name} must be a number, got {value!r}"[:300])
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads < 1:
        raise ModelLoadError(f"{source}: num_attention_heads is {heads}; it must be at least 1")


def rope_from_hf(config: Mapping[str, Any]) -> RopeSpec:
    # transformers >= 5 writes rope_parameters (theta inside); older files use rope_scaling.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    return rope_from_params(params, float(config.get("rope_theta", 10000.0)),
                            int(config.get("max_position_embeddings", 8192)))


def rope_from_params(params: Mapping[str, Any], default_theta: float, max_positions: int) -> RopeSpec:
    """One HF rope parameter dict (``rope_type``, ``rope_theta``, ``factor``...) -> RopeSpec."""
    theta = float(params.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in _ROPE_KINDS:
        raise ModelLoadError(
            f"config.json: rope type {kind!r} is not supported; supported: {', '.join(_ROPE_KINDS)}"
        )
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_positions)),
    )


def spec_from_hf(
    config: Mapping[str, Any],
    architecture: str,
    *,
    qkv_bias: bool,
    o_bias: bool = False,
    qk_norm: bool = False,
    layer_windows: tuple[int | None, ...] = (),
) -> ModelSpec:
    src = "config.json"
    check_hf_types(config, src)
    if config.get("mlp_bias"):
        raise ModelLoadError(f"{src}: mlp_bias=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{src}: hidden_act {config.get('hidden_act')!r} is not supported (silu only)")
    hidden = int(_require(config, "hidden_size", src))
    heads = int(_require(config, "num_attention_heads", src))
    return ModelSpec(
        architecture=architecture,
        vocab_size=int(_require(config, "vocab_size", src)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", src)),
        num_layers=int(_require(config, "num_hidden_layers", src)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        layer_windows=layer_windows,
    )


def hf_layer_windows(config: Mapping[str, Any], default_on: bool) -> tuple[int | None, ...]:
    """Per-layer sliding windows from ``sliding_window`` / ``layer_types`` (None = full)."""
    window = config.get("sliding_window")
    layers = int(config.get("num_hidden_layers", 0))
    if not window or not config.get("use_sliding_window", default_on):
        return (None,) * layers
    types = config.get("layer_types")
    if types:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (int(window),) * layers


def spec_from_gguf(
    meta: Mapping[str, Any],
    architecture: str,
    *,
    qkv_bias: bool,
    qk_norm: bool = False,
    sliding_window: int | None = None,
) -> ModelSpec:
    """Read ``<arch>.*`` GGUF keys. ``meta`` also carries ``_tensor_names`` and ``_vocab_size``."""
    arch = meta["general.architecture"]
    src = "GGUF"

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{src}: missing metadata {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    if heads < 1:
        raise ModelLoadError(f"{src}: {arch}.attention.head_count is {heads}; it must be at least 1")
    layers = int(key("block_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    kind = {"none": "default", "linear": "linear"}.get(scaling)
    if kind is None:
        raise ModelLoadError(f"{src}: rope scaling {scaling!r} is not supported")
    rope = RopeSpec(
        theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        kind=kind,
        factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)),
        freq_factors=meta.get("_rope_freq_factors"),
    )
    names = meta["_tensor_names"]
    return ModelSpec(
        architecture=architecture,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or meta["_vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope=rope,
        tie_word_embeddings="output.weight" not in names,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        layer_windows=(sliding_window,) * layers if sliding_window else (),
    )
