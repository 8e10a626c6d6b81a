"""The Llama-family decoder forward over a packed batch and a paged KV cache.

One forward runs T tokens from many sequences at once (prompt chunks and single decode
tokens mixed). q/k/v and gate/up are fused into one matmul each, which halves the number of
weight reads and kernel launches per layer. Weights are plain tensors, or with ``native=True``
GGUF's quantized tensors kept packed (``choral/quant``: integer-dot projections, an embedding
that dequantizes only the rows a step needs, and the tied lm_head on the same bytes).

Gemma 3's differences are options of the same forward, read from the ModelSpec: a second rope
table for its sliding-window layers, norms of the attention and MLP outputs ("sandwich" norms),
GeGLU, scaled embeddings, its query scale and (1 + weight) norms (folded into the weights at load).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from choral.errors import ModelLoadError
from choral.kernels.rms_norm import RmsNorm
from choral.kernels.rope_kv import RopeKv
from choral.kernels.silu_mul import SiluMul
from choral.models.attention import AttentionBatch, write_kv
from choral.models.linear import Projection, choose_layout
from choral.models.rope import RotaryTable, apply_rotary
from choral.models.spec import ModelSpec
from choral.quant.kernels import dequantize_rows
from choral.quant.linear import QuantEmbedding, QuantProjection
from choral.quant.repack import PackedRows

logger = logging.getLogger(__name__)

AnyProjection = Projection | QuantProjection
Weight = torch.Tensor | PackedRows  # what the loaders hand over: a tensor, or packed GGUF blocks


class ProjectionDeltas(Protocol):
    """Per-row additions to the projections' outputs (LoRA adapters: choral/lora/apply.py's
    LoraBatch). The forward calls ``add`` after each projection; the models package knows no
    more of adapters than this."""

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> None:
        """``y`` [T, out] += the rows' updates computed from the projection's input ``x`` [T, in];
        ``site`` is ``qkv``, ``o``, ``gate_up`` or ``down``."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: AnyProjection  # hidden -> q_size + 2 * kv_size
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None
    o: AnyProjection  # q_size -> hidden
    post_norm: torch.Tensor  # [hidden], the norm before the MLP
    gate_up: AnyProjection  # hidden -> 2 * intermediate
    down: AnyProjection  # intermediate -> hidden
    attn_out_norm: torch.Tensor | None = None  # [hidden] sandwich norms (Gemma): the attention's
    mlp_out_norm: torch.Tensor | None = None  # and the MLP's outputs, before the residual add


class DecoderModel:
    """Weights and forward of one Llama-family model. Owns no KV state.

    ``native=True`` keeps quantized weights packed (CPU, fp32 activations); the loader then hands
    PackedRows for them. Otherwise every weight is a tensor of ``dtype``."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, max_positions: int,
                 native: bool = False):
        if native and (device.type != "cpu" or dtype != torch.float32):
            raise ValueError("native quantized weights run on the CPU with float32 activations")
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.native = native
        self.rotary = RotaryTable(spec.rope, spec.head_dim, max_positions, device)
        # Sliding-window layers may rotate with their own base (Gemma 3's rope_local_base_freq).
        self.local_rotary = (RotaryTable(spec.local_rope, spec.head_dim, max_positions, device)
                             if spec.local_rope is not None else None)
        self._layer_uses_local = [self.local_rotary is not None and w is not None for w in spec.layer_windows]
        self.scale = spec.attention_scale
        # HF multiplies by the scale cast to the weights' dtype (sqrt(640) in bf16 is 25.25, not 25.30).
        self.embed_scale = (torch.tensor(spec.embed_scale, dtype=dtype, device=device)
                            if spec.embed_scale is not None else None)
        self.embed: torch.Tensor | QuantEmbedding
        self.final_norm: torch.Tensor
        self.lm_head: AnyProjection
        self.layers: list[LayerWeights] = []
        self.projection_layout = choose_layout(dtype, device)
        # fp32 and bf16 on the CPU: RMSNorm in one C pass (torch runs it as ~6 ops; see
        # rms_norm.c), RoPE fused with the K/V cache store (rope_kv.c), and SiLU(gate) * up in
        # one pass over the gate/up output (silu_mul.c; torch: two ops, two [T, I] tensors).
        cpu = device.type == "cpu"
        self._norm_kernel = RmsNorm.load(dtype) if cpu else None
        self._rope_kv_kernel = RopeKv.load(dtype) if cpu and RopeKv.supports(spec.head_dim) else None
        self._act_kernel = SiluMul.load(dtype) if cpu and spec.hidden_act == "silu" else None
        # Tensor parallelism (choral/distributed/shard.py): this model holds one rank's heads and MLP
        # columns, so o_proj's and down's outputs are partial sums; this sums them over the ranks,
        # in place. None: the whole model, nothing to sum.
        self.all_reduce: Callable[[torch.Tensor], None] | None = None

    # ---- loading -------------------------------------------------------------------------
    def load_weights(self, tensors: Iterable[tuple[str, Weight]]) -> None:
        """Take HF-named tensors (``model.layers.0.self_attn.q_proj.weight``...) and fuse them."""
        spec = self.spec
        named: dict[str, Weight] = {}
        for name, tensor in tensors:
            if isinstance(tensor, PackedRows):
                if not self.native:
                    raise ModelLoadError(f"weights: {name} is packed but the model dequantizes its weights")
                named[name] = tensor
            else:
                if spec.norm_unit_offset and name.endswith("norm.weight"):
                    tensor = tensor.float() + 1.0  # Gemma's x_normed * (1 + w), in fp32 before the cast
                named[name] = tensor.to(device=self.device, dtype=self.dtype)

        def take_any(name: str, shape: tuple[int, ...]) -> Weight:
            if name not in named:
                raise ModelLoadError(f"weights: missing tensor {name!r}")
            t = named.pop(name)
            t_shape = (t.rows, t.cols) if isinstance(t, PackedRows) else tuple(t.shape)
            if t_shape != shape:
                raise ModelLoadError(f"weights: {name} has shape {t_shape}, expected {shape}")
            return t if isinstance(t, PackedRows) else t.contiguous()

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            """A weight used as a plain tensor (norms, biases): packed ones are dequantized."""
            return self._dense(take_any(name, shape))

        def maybe(name: str, shape: tuple[int, ...], present: bool) -> torch.Tensor | None:
            return take(name, shape) if present else None

        h, q, kv, inter, d = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size, spec.head_dim
        embed = take_any("model.embed_tokens.weight", (spec.vocab_size, h))
        self.embed = QuantEmbedding(embed) if isinstance(embed, PackedRows) else embed
        self.final_norm = take("model.norm.weight", (h,))
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = [
                take_any(p + "self_attn.q_proj.weight", (q, h)),
                take_any(p + "self_attn.k_proj.weight", (kv, h)),
                take_any(p + "self_attn.v_proj.weight", (kv, h)),
            ]
            bias = None
            if spec.qkv_bias:
                bias = torch.cat([
                    take(p + "self_attn.q_proj.bias", (q,)),
                    take(p + "self_attn.k_proj.bias", (kv,)),
                    take(p + "self_attn.v_proj.bias", (kv,)),
                ])
            gate_up = [
                take_any(p + "mlp.gate_proj.weight", (inter, h)),
                take_any(p + "mlp.up_proj.weight", (inter, h)),
            ]
            o_weight = take_any(p + "self_attn.o_proj.weight", (h, q))
            sandwich = spec.sandwich_norms
            # HF's names: Llama's "post_attention_layernorm" is the norm before the MLP; Gemma's
            # is the norm of the attention output, and "pre_feedforward_layernorm" the former.
            mlp_norm_name = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (h,)),
                qkv=self._projection(qkv, bias),
                q_norm=maybe(p + "self_attn.q_norm.weight", (d,), spec.qk_norm),
                k_norm=maybe(p + "self_attn.k_norm.weight", (d,), spec.qk_norm),
                o=self._projection([o_weight], maybe(p + "self_attn.o_proj.bias", (h,), spec.o_bias)),
                post_norm=take(p + mlp_norm_name + ".weight", (h,)),
                gate_up=self._projection(gate_up, None),
                down=self._projection([take_any(p + "mlp.down_proj.weight", (h, inter))], None),
                attn_out_norm=maybe(p + "post_attention_layernorm.weight", (h,), sandwich),
                mlp_out_norm=maybe(p + "post_feedforward_layernorm.weight", (h,), sandwich),
            ))
        if spec.tie_word_embeddings or "lm_head.weight" not in named:
            named.pop("lm_head.weight", None)
            # Tied: the lm_head reads the embedding's own bytes (packed or not), no second copy.
            self.lm_head = (self.embed.as_projection() if isinstance(self.embed, QuantEmbedding)
                            else self._projection([self.embed], None))
            self.tied = True
        else:
            self.lm_head = self._projection([take_any("lm_head.weight", (spec.vocab_size, h))], None)
            self.tied = False
        # Rotary tables some exporters save as buffers are recomputed, not loaded.
        leftovers = [n for n in named if not n.endswith("rotary_emb.inv_freq")]
        if leftovers:
            raise ModelLoadError(f"weights: unexpected tensors {sorted(leftovers)[:5]}")

    def _dense(self, weight: Weight) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):
            return weight
        full = dequantize_rows(weight.kind, torch.from_numpy(weight.data), weight.cols, range(weight.rows))
        return full.to(device=self.device, dtype=self.dtype)

    def _projection(self, parts: Sequence[Weight], bias: torch.Tensor | None) -> AnyProjection:
        """One projection over row groups stacked along the outputs (fused q/k/v, gate/up)."""
        if all(isinstance(p, PackedRows) for p in parts):
            return QuantProjection(_merge_packed([p for p in parts if isinstance(p, PackedRows)]), bias)
        if any(isinstance(p, PackedRows) for p in parts):
            # A fused group of packed and float tensors (rare: e.g. one F16 tensor in a Q4 file)
            # runs dequantized, as one float projection.
            logger.info("a fused projection mixes packed and float weights; it runs dequantized")
        weights = [self._dense(p) for p in parts]
        return Projection(weights[0] if len(weights) == 1 else torch.cat(weights), bias, self.projection_layout)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] in the model's dtype (times Gemma's embedding scale, as
        HF's scaled word embedding)."""
        if isinstance(self.embed, QuantEmbedding):
            rows = self.embed.lookup(input_ids)
        else:
            rows = self.embed.index_select(0, input_ids)
        return rows * self.embed_scale if self.embed_scale is not None else rows

    @property
    def num_parameters(self) -> int:
        """Parameters as the checkpoint counts them (a tied lm_head counts once)."""
        embed = self.embed
        total = (embed.num_embeddings * embed.embedding_dim if isinstance(embed, QuantEmbedding)
                 else embed.numel()) + self.final_norm.numel()
        if not self.tied:
            total += self.lm_head.num_parameters
        for layer in self.layers:
            for value in vars(layer).values():
                if isinstance(value, Projection | QuantProjection):
                    total += value.num_parameters
                elif value is not None:
                    total += value.numel()
        return total

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight as held in memory (packed ones at their packed size; a tied
        lm_head counts once)."""
        if not self.native:
            return self.num_parameters * self.final_norm.element_size()

        def nbytes(value: object) -> int:
            if isinstance(value, QuantProjection | QuantEmbedding):
                return value.weight_bytes
            if isinstance(value, Projection):
                return value.num_parameters * value.dtype.itemsize
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            return 0

        total = nbytes(self.embed) + nbytes(self.final_norm) + (0 if self.tied else nbytes(self.lm_head))
        return total + sum(nbytes(v) for layer in self.layers for v in vars(layer).values())

    @property
    def weight_formats(self) -> dict[str, int]:
        """How the projections hold their weights: GGUF type (packed) or torch dtype -> count."""
        counts: dict[str, int] = {}
        projections = [v for layer in self.layers for v in vars(layer).values()
                       if isinstance(v, Projection | QuantProjection)]
        for proj in [*projections, self.lm_head]:
            names = proj.formats if isinstance(proj, QuantProjection) else [str(proj.dtype).removeprefix("torch.")]
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def layer_rotary(self, layer: int) -> RotaryTable:
        """The rope table ``layer`` rotates its keys with (context shifts re-rotate through it)."""
        return self.local_rotary if self._layer_uses_local[layer] and self.local_rotary is not None else self.rotary

    # ---- forward -------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._norm_kernel is not None and x.ndim == 2:
            return self._norm_kernel(x, weight, self.spec.rms_norm_eps)
        # torch's RMSNorm reduces in fp32 like HF's; in fp32 it is the same math, in bf16/fp16 it
        # differs from HF only by where the last rounding falls.
        return F.rms_norm(x, weight.shape, weight, self.spec.rms_norm_eps)

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 * inter] (gate, then up) -> act(gate) * up, [T, inter]."""
        if self._act_kernel is not None:
            return self._act_kernel(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = self.spec.hidden_act
        if act == "silu":
            return F.silu(gate) * up
        # GeGLU: HF's gelu_pytorch_tanh is torch's tanh approximation.
        return F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none") * up

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, rope positions
        kv_index: tuple[torch.Tensor, torch.Tensor],  # ([T] block id, [T] offset) of each token's K/V
        attention: AttentionBatch,  # already prepared for this batch
        k_caches: list[torch.Tensor],  # per layer [num_blocks, KVH, D, block_size]
        v_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, KVH, D]
        logits_indices: torch.Tensor,  # [L] rows of the batch whose logits are wanted
        lora: ProjectionDeltas | None = None,  # the rows' adapters (choral/lora/apply.py), if any
        input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([R] rows, [R, hidden]) soft prompts
    ) -> torch.Tensor:  # [L, vocab] fp32
        hidden = self.hidden_states(input_ids, positions, kv_index, attention, k_caches, v_caches, lora,
                                    input_embeds)
        return self.logits(hidden, logits_indices)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[L, vocab] fp32 next-token logits of ``rows`` of ``hidden`` ([T, hidden])."""
        logits = self.lm_head(self.final_hidden(hidden, rows)).float()  # [L, vocab]
        cap = self.spec.final_logit_softcap
        if cap is not None:  # Gemma 2's final_logit_softcapping: cap * tanh(logits / cap)
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        attention: AttentionBatch,  # already prepared for this batch
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        lora: ProjectionDeltas | None = None,
        input_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, hidden], the residual stream after the last layer (before the final norm)
        spec = self.spec
        num_tokens = input_ids.shape[0]
        hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        cos_sin = self.rotary.lookup(positions, self.dtype)  # [T, 1, D] each
        local_cos_sin = self.local_rotary.lookup(positions, self.dtype) if self.local_rotary else cos_sin
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        if input_embeds is not None:  # soft-prompt rows take their vectors instead
            hidden = hidden.index_copy(0, input_embeds[0], input_embeds[1])
        for i, w in enumerate(self.layers):
            cos, sin = local_cos_sin if self._layer_uses_local[i] else cos_sin
            x = self._norm(hidden, w.input_norm)
            qkv = w.qkv(x)  # [T, q + 2kv]
            if lora is not None:  # LoRA adds to the projections' outputs, before q/k norm and rope
                lora.add(qkv, x, i, "qkv")
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
            attn = attn.view(num_tokens, nh * hd)
            out = w.o(attn)  # [T, hidden]
            if lora is not None:
                lora.add(out, attn, i, "o")
            if self.all_reduce is not None:
                self.all_reduce(out)  # [T, hidden]: the ranks' partial o_proj sums -> the full output
            if w.attn_out_norm is not None:
                out = self._norm(out, w.attn_out_norm)
            hidden = hidden + out
            x = self._norm(hidden, w.post_norm)
            gate_up = w.gate_up(x)  # [T, 2 * inter]
            if lora is not None:
                lora.add(gate_up, x, i, "gate_up")
            act = self._act(gate_up)  # [T, inter]
            out = w.down(act)
            if lora is not None:
                lora.add(out, act, i, "down")
            if self.all_reduce is not None:
                self.all_reduce(out)  # the ranks' partial down sums
            if w.mlp_out_norm is not None:
                out = self._norm(out, w.mlp_out_norm)
            hidden = hidden + out
        return hidden



def _merge_packed(parts: list[PackedRows]) -> list[PackedRows]:
    """Adjacent row groups of the same block kind joined into one (one kernel call for them)."""
    merged: list[PackedRows] = []
    for p in parts:
        last = merged[-1] if merged else None
        if last is not None and last.kind == p.kind and last.cols == p.cols:
            source = last.source if last.source == p.source else f"{last.source}+{p.source}"
            merged[-1] = PackedRows(p.kind, np.concatenate([last.data, p.data]), last.rows + p.rows, p.cols, source)
        else:
            merged.append(p)
    return merged
