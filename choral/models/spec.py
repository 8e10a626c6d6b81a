"""ModelSpec: the normalized shape of a Llama-family decoder, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

    def __post_init__(self) -> None:
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)

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

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able description used to tell models apart (saved states, caches)."""
        return {
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
