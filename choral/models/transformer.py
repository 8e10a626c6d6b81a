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
from choral.kernels.rms_norm import RmsNorm
from choral.kernels.rope_kv import RopeKv
from choral.kernels.silu_mul import SiluMul
from choral.models.linear import Projection, choose_layout
from choral.models.rope import RotaryTable, apply_rotary
from choral.models.spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Projection  # hidden -> q_size + 2 * kv_size
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None
    o: Projection  # q_size -> hidden
    post_norm: torch.Tensor  # [hidden]
    gate_up: Projection  # hidden -> 2 * intermediate
    down: Projection  # intermediate -> hidden


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
        self.lm_head: Projection
        self.layers: list[LayerWeights] = []
        self.projection_layout = choose_layout(dtype, device)
        # fp32 and bf16 on the CPU: RMSNorm in one C pass (torch runs it as ~6 ops; see
        # rms_norm.c), RoPE fused with the K/V cache store (rope_kv.c), and SiLU(gate) * up in
        # one pass over the gate/up output (silu_mul.c; torch: two ops, two [T, I] tensors).
        cpu = device.type == "cpu"
        self._norm_kernel = RmsNorm.load(dtype) if cpu else None
        self._rope_kv_kernel = RopeKv.load(dtype) if cpu and RopeKv.supports(spec.head_dim) else None
        self._act_kernel = SiluMul.load(dtype) if cpu else None

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
            o_weight = take(p + "self_attn.o_proj.weight", (h, q))
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=self._projection(qkv, bias),
                q_norm=maybe(p + "self_attn.q_norm.weight", (d,), spec.qk_norm),
                k_norm=maybe(p + "self_attn.k_norm.weight", (d,), spec.qk_norm),
                o=self._projection(o_weight, maybe(p + "self_attn.o_proj.bias", (h,), spec.o_bias)),
                post_norm=take(p + "post_attention_layernorm.weight", (h,)),
                gate_up=self._projection(gate_up, None),
                down=self._projection(take(p + "mlp.down_proj.weight", (h, inter)), None),
            ))
        if spec.tie_word_embeddings or "lm_head.weight" not in named:
            named.pop("lm_head.weight", None)
            self.lm_head = self._projection(self.embed, None)
            self.tied = True
        else:
            self.lm_head = self._projection(take("lm_head.weight", (spec.vocab_size, h)), None)
            self.tied = False
        # Rotary tables some exporters save as buffers are recomputed, not loaded.
        leftovers = [n for n in named if not n.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise ModelLoadError(f"weights: unexpected tensors {sorted(leftovers)[:5]}")

    def _projection(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Projection:
        return Projection(weight, bias, self.projection_layout)

    @property
    def num_parameters(self) -> int:
        """Parameters as the checkpoint counts them (a tied lm_head counts once)."""
        total = self.embed.numel() + self.final_norm.numel()
        if not self.tied:
            total += self.lm_head.num_parameters
        for layer in self.layers:
            for value in vars(layer).values():
                if isinstance(value, Projection):
                    total += value.num_parameters
                elif value is not None:
                    total += value.numel()
        return total

    @property
    def weight_bytes(self) -> int:
        return self.num_parameters * self.embed.element_size()

    # ---- forward -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._norm_kernel is not None and x.ndim == 2:
            return self._norm_kernel(x, weight, self.spec.rms_norm_eps)
        # torch's RMSNorm reduces in fp32 like HF's; in fp32 it is the same math, in bf16/fp16 it
        # differs from HF only by where the last rounding falls.
        return F.rms_norm(x, weight.shape, weight, self.spec.rms_norm_eps)

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 * inter] (gate, then up) -> silu(gate) * up, [T, inter]."""
        if self._act_kernel is not None:
            return self._act_kernel(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

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
        hidden = self.hidden_states(input_ids, positions, kv_index, attention, k_caches, v_caches)
        return self.logits(hidden, logits_indices)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[L, vocab] fp32 next-token logits of ``rows`` of ``hidden`` ([T, hidden])."""
        return self.lm_head(self.final_hidden(hidden, rows)).float()

    def final_hidden(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[L, hidden] the final norm's output at ``rows``: what the lm_head reads, and the
        tokens' embeddings (pooled by the caller)."""
        return self._norm(hidden.index_select(0, rows), self.final_norm)

    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_index: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionBackend,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
    ) -> torch.Tensor:  # [T, hidden], the residual stream after the last layer (before the final norm)
        spec = self.spec
        num_tokens = input_ids.shape[0]
        hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        cos, sin = self.rotary.lookup(positions, self.dtype)  # [T, 1, D]
        hidden = self.embed.index_select(0, input_ids)  # [T, hidden]
        for i, w in enumerate(self.layers):
            x = self._norm(hidden, w.input_norm)
            qkv = w.qkv(x)  # [T, q + 2kv]
            # q and k sit side by side in qkv: view them as H + KVH heads and rotate them in one go.
            qk = qkv[:, : spec.q_size + spec.kv_size].view(num_tokens, nh + nkv, hd)
            v = qkv[:, spec.q_size + spec.kv_size :].view(num_tokens, nkv, hd)
            if w.q_norm is not None and w.k_norm is not None:
                qk = torch.cat([self._norm(qk[:, :nh], w.q_norm), self._norm(qk[:, nh:], w.k_norm)], dim=1)
            k_cache, v_cache = k_caches[i], v_caches[i]
            # Rotate q and k, and write this step's K/V first: queries then read themselves
            # through the cache.
            if self._rope_kv_kernel is not None:
                q = self._rope_kv_kernel(qk, v, cos, sin, kv_index[0], kv_index[1], k_cache, v_cache)  # [T, H, D]
            else:
                qk = apply_rotary(qk, cos, sin)  # [T, H + KVH, D]
                q = qk[:, :nh]
                write_kv(k_cache, v_cache, kv_index[0], kv_index[1], qk[:, nh:], v)
            attn = attention.attend(q, k_cache, v_cache, spec.layer_windows[i], self.scale)
            hidden = hidden + w.o(attn.view(num_tokens, nh * hd))
            x = self._norm(hidden, w.post_norm)
            hidden = hidden + w.down(self._act(w.gate_up(x)))  # gate_up: [T, 2 * inter]
        return hidden

