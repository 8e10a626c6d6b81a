"""The Llama-family decoder forward over a packed batch and a paged KV cache.

One forward runs T tokens from many sequences at once (prompt chunks and single decode
tokens mixed). Weights are plain tensors: q/k/v and gate/up are fused into one matmul each,
which halves the number of weight reads and kernel launches per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from choral.engine.attention import AttentionBackend, write_kv
from choral.errors import ModelLoadError
from choral.models.rope import RotaryTable, apply_rotary
from choral.models.spec import ModelSpec


@dataclass
class LayerWeights:
    # Projection weights are stored transposed, [in, out]: x @ w reads them row-major, which
    # MKL runs faster than F.linear's transposed-B GEMM for the small M of decode steps.
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [hidden, q_size + 2 * kv_size]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None
    o: torch.Tensor  # [q_size, hidden]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [hidden, 2 * intermediate]
    down: torch.Tensor  # [intermediate, hidden]


class DecoderModel:
    """Weights and forward of one Llama-family model. Owns no KV state."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, max_positions: int):
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.rotary = RotaryTable(spec.rope, spec.head_dim, max_positions, device)
        self.scale = spec.head_dim**-0.5
        self.embed: torch.Tensor
        self.final_norm: torch.Tensor
        self.lm_head: torch.Tensor
        self.layers: list[LayerWeights] = []

    # ---- loading -------------------------------------------------------------------------
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take HF-named tensors (``model.layers.0.self_attn.q_proj.weight``...) and fuse them."""
        spec = self.spec
        named: dict[str, torch.Tensor] = {}
        for name, tensor in tensors:
            named[name] = tensor.to(device=self.device, dtype=self.dtype)

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in named:
                raise ModelLoadError(f"weights: missing tensor {name!r}")
            t = named.pop(name)
            if tuple(t.shape) != shape:
                raise ModelLoadError(f"weights: {name} has shape {tuple(t.shape)}, expected {shape}")
            return t.contiguous()

        def maybe(name: str, shape: tuple[int, ...], present: bool) -> torch.Tensor | None:
            return take(name, shape) if present else None

        h, q, kv, inter, d = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size, spec.head_dim
        self.embed = take("model.embed_tokens.weight", (spec.vocab_size, h))
        self.final_norm = take("model.norm.weight", (h,))
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([
                take(p + "self_attn.q_proj.weight", (q, h)),
                take(p + "self_attn.k_proj.weight", (kv, h)),
                take(p + "self_attn.v_proj.weight", (kv, h)),
            ])
            bias = None
            if spec.qkv_bias:
                bias = torch.cat([
                    take(p + "self_attn.q_proj.bias", (q,)),
                    take(p + "self_attn.k_proj.bias", (kv,)),
                    take(p + "self_attn.v_proj.bias", (kv,)),
                ])
            gate_up = torch.cat([
                take(p + "mlp.gate_proj.weight", (inter, h)),
                take(p + "mlp.up_proj.weight", (inter, h)),
            ])
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=_t(qkv),
                qkv_bias=bias,
                q_norm=maybe(p + "self_attn.q_norm.weight", (d,), spec.qk_norm),
                k_norm=maybe(p + "self_attn.k_norm.weight", (d,), spec.qk_norm),
                o=_t(take(p + "self_attn.o_proj.weight", (h, q))),
                o_bias=maybe(p + "self_attn.o_proj.bias", (h,), spec.o_bias),
                post_norm=take(p + "post_attention_layernorm.weight", (h,)),
                gate_up=_t(gate_up),
                down=_t(take(p + "mlp.down_proj.weight", (h, inter))),
            ))
        if spec.tie_word_embeddings or "lm_head.weight" not in named:
            named.pop("lm_head.weight", None)
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight", (spec.vocab_size, h))
        # Rotary tables some exporters save as buffers are recomputed, not loaded.
        leftovers = [n for n in named if not n.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise ModelLoadError(f"weights: unexpected tensors {sorted(leftovers)[:5]}")

    @property
    def num_parameters(self) -> int:
        tensors = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors.extend(t for t in vars(layer).values() if t is not None)
        return sum(t.numel() for t in tensors)

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.embed.element_size()

    # ---- forward -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF's RMSNorm: statistics in fp32, scaled by the weight in the activations' dtype.
        # torch's fused rms_norm is one kernel instead of six; in fp32 it is the same math.
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.spec.rms_norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)
        return weight * xf.to(x.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, rope positions
        kv_index: tuple[torch.Tensor, torch.Tensor],  # ([T] block id, [T] offset) of each token's K/V
        attention: AttentionBackend,  # already prepared for this batch
        k_caches: list[torch.Tensor],  # per layer [num_blocks, KVH, D, block_size]
        v_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, KVH, D]
        logits_indices: torch.Tensor,  # [L] rows of the batch whose logits are wanted
    ) -> torch.Tensor:  # [L, vocab] fp32
        spec = self.spec
        num_tokens = input_ids.shape[0]
        hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        cos, sin = self.rotary.lookup(positions, self.dtype)  # [T, 1, D]
        hidden = self.embed.index_select(0, input_ids)  # [T, hidden]
        for i, w in enumerate(self.layers):
            x = self._norm(hidden, w.input_norm)
            qkv = _proj(x, w.qkv, w.qkv_bias)  # [T, q + 2kv]
            # q and k sit side by side in qkv: view them as H + KVH heads and rotate them in one go.
            qk = qkv[:, : spec.q_size + spec.kv_size].view(num_tokens, nh + nkv, hd)
            v = qkv[:, spec.q_size + spec.kv_size :].view(num_tokens, nkv, hd)
            if w.q_norm is not None and w.k_norm is not None:
                qk = torch.cat([self._norm(qk[:, :nh], w.q_norm), self._norm(qk[:, nh:], w.k_norm)], dim=1)
            qk = apply_rotary(qk, cos, sin)  # [T, H + KVH, D]
            q, k = qk[:, :nh], qk[:, nh:]
            k_cache, v_cache = k_caches[i], v_caches[i]
            # Write this step's K/V first: queries then read themselves through the cache.
            write_kv(k_cache, v_cache, kv_index[0], kv_index[1], k, v)
            attn = attention.attend(q, k_cache, v_cache, spec.layer_windows[i], self.scale)
            hidden = hidden + _proj(attn.view(num_tokens, nh * hd), w.o, w.o_bias)
            x = self._norm(hidden, w.post_norm)
            gate, up = torch.mm(x, w.gate_up).chunk(2, dim=-1)  # [T, inter] each
            hidden = hidden + torch.mm(F.silu(gate) * up, w.down)
        last = self._norm(hidden.index_select(0, logits_indices), self.final_norm)
        return F.linear(last, self.lm_head).float()


def _t(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> contiguous [in, out]."""
    return w.t().contiguous()


def _proj(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ w [in, out] (+ bias [out]) -> [T, out]."""
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
