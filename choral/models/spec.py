"""ModelSpec: the normalized shape of a Llama-family decoder, whatever file it came from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from choral.errors import ModelLoadError

# Bounds no real checkpoint comes near, so a value past one is a broken or hostile config, refused
# with the field's name before anything is allocated (zero heads used to be a ZeroDivisionError,
# 10**9 layers a MemoryError, max_position 10**12 a 4 TB allocation).
_INT_BOUNDS = {
    "vocab_size": 2**24, "hidden_size": 2**17, "intermediate_size": 2**20, "num_layers": 2**10,
    "num_heads": 2**10, "num_kv_heads": 2**10, "head_dim": 2**11, "max_position_embeddings": 2**24,
}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters (HF ``rope_parameters`` / ``rope_scaling`` normalized)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors (GGUF rope_freqs.weight), [head_dim // 2] values, or None.
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("theta", "factor", "low_freq_factor", "high_freq_factor"):
            _positive_float(f"rope.{name}", getattr(self, name))
        _int_in("rope.original_max_position_embeddings", self.original_max_position_embeddings, 2**24)
        if self.kind not in ("default", "linear", "llama3"):
            raise ModelLoadError(f"model config: rope.kind {self.kind!r} is not default, linear or llama3")
        if self.freq_factors is not None:
            for value in self.freq_factors:
                _positive_float("rope.freq_factors", value)


HIDDEN_ACTS = ("silu", "gelu_tanh", "gelu")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the forward needs to know about a model's shape and options."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    o_bias: bool = False
    # One entry per layer: the sliding window in tokens, or None for full attention.
    layer_windows: tuple[int | None, ...] = field(default=())
    # Rope of the sliding-window layers when it differs from ``rope`` (Gemma 3's local base).
    local_rope: RopeSpec | None = None
    # The MLP's activation on the gate: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU).
    hidden_act: str = "silu"
    # Gemma's RMSNorm scales by (1 + weight): checkpoints store weight, the forward folds the 1 in.
    norm_unit_offset: bool = False
    # Gemma 2/3 "sandwich" norms: the attention and MLP outputs are normed before the residual add.
    sandwich_norms: bool = False
    # Embeddings multiplied by this (Gemma: sqrt(hidden_size), rounded to the activation dtype).
    embed_scale: float | None = None
    # q.k is scaled by query_pre_attn_scalar ** -0.5 (Gemma) instead of head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # logits -> cap * tanh(logits / cap) when set (Gemma 2's final_logit_softcapping).
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        """Every field checked; ModelLoadError names the first one out of range."""
        for name, high in _INT_BOUNDS.items():
            _int_in(name, getattr(self, name), high)
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"model config: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                                 f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim {self.head_dim} must be even (rotary embedding)")
        eps = _positive_float("rms_norm_eps", self.rms_norm_eps)
        if eps >= 1.0:
            raise ModelLoadError(f"model config: rms_norm_eps {eps} must be below 1")
        if not isinstance(self.rope, RopeSpec):
            raise ModelLoadError(f"model config: rope must be a RopeSpec, got {type(self.rope).__name__}")
        if self.rope.freq_factors is not None and len(self.rope.freq_factors) != self.head_dim // 2:
            raise ModelLoadError(f"model config: rope.freq_factors has {len(self.rope.freq_factors)} values, "
                                 f"head_dim // 2 is {self.head_dim // 2}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ModelLoadError(f"model config: {len(self.layer_windows)} sliding windows (layer_types) for "
                                 f"{self.num_layers} layers")
        for window in self.layer_windows:
            if window is not None:
                _int_in("sliding_window", window, 2**31 - 1)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ModelLoadError(f"hidden_act: {self.hidden_act!r} is not one of {', '.join(HIDDEN_ACTS)}")

    @property
    def attention_scale(self) -> float:
        """The softmax scale of q.k."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_rope(self, layer: int) -> RopeSpec:
        """The rope of ``layer``: ``local_rope`` on sliding-window layers when set, else ``rope``."""
        if self.local_rope is not None and self.layer_windows[layer] is not None:
            return self.local_rope
        return self.rope

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per cached token per element byte (multiply by dtype size)."""
        return 2 * self.num_layers * self.kv_size

    def weight_bytes(self, element_size: int) -> int:
        """The dense weights' size at ``element_size`` bytes per value (embeddings, lm_head unless
        tied, attention, MLP, norms): what loading them unpacked takes."""
        h, layers = self.hidden_size, self.num_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return element_size * (embeddings + layers * per_layer + h)

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able description used to tell models apart (saved states, caches)."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope.theta,
            "rope_kind": self.rope.kind,
        }
        # Options beyond the Llama family's, only where set: fingerprints of models without them
        # stay what they were, so their saved states still load.
        extras: dict[str, Any] = {
            "local_rope_theta": self.local_rope.theta if self.local_rope else None,
            "hidden_act": self.hidden_act if self.hidden_act != "silu" else None,
            "norm_unit_offset": self.norm_unit_offset or None,
            "sandwich_norms": self.sandwich_norms or None,
            "embed_scale": self.embed_scale,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "final_logit_softcap": self.final_logit_softcap,
        }
        out.update({k: v for k, v in extras.items() if v is not None})
        return out


def _int_in(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ModelLoadError(f"model config: {name} is {value!r}; it must be an int in [1, {high}]")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"model config: {name} is {value!r}; it must be a finite number > 0")
    return float(value)


def spec_or_error(source: Path, build: Callable[[], ModelSpec]) -> ModelSpec:
    """``build()``, with a config value of the wrong type or shape (a str where a number goes, zero
    heads dividing the hidden size) reported as the ModelLoadError it is, naming ``source``."""
    try:
        return build()
    except ModelLoadError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    except (ArithmeticError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"{source}: invalid model config ({type(e).__name__}: {e})") from None
