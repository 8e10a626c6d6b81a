"""Rotary position embeddings: inverse frequencies (with scaling) and a cos/sin table."""

from __future__ import annotations

import math

import torch

from choral.models.spec import RopeSpec


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, scaled as the model's rope type asks."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    if rope.freq_factors is not None:
        # GGUF stores llama3 scaling as explicit per-frequency divisors (rope_freqs.weight).
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for every position up to ``max_positions``, looked up per token.

    Tables are fp32 like HF's; they are cast to the activations' dtype at use.
    """

    def __init__(self, rope: RopeSpec, head_dim: int, max_positions: int, device: torch.device):
        self.head_dim = head_dim
        self.inv_freq = inverse_frequencies(rope, head_dim).to(device)
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` [T] -> two [T, 1, head_dim] tensors (broadcast over heads)."""
        return (
            self.cos.index_select(0, positions).to(dtype).unsqueeze(1),
            self.sin.index_select(0, positions).to(dtype).unsqueeze(1),
        )

    def shift(self, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin [1, 1, head_dim] that move a key rotated at position p to p + delta.

        RoPE rotations compose (R(a) R(b) = R(a + b) per frequency pair), so re-rotating a cached
        key by ``delta`` equals rotating the raw key at its new position. ``delta`` may be negative.
        """
        freqs = float(delta) * self.inv_freq  # [head_dim // 2]
        emb = torch.cat((freqs, freqs))[None, None, :]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout): x [T, heads, head_dim] -> same shape."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
