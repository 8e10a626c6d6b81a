"""A GGUF model file: metadata -> ModelSpec, tensors dequantized -> HF-named torch tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from choral.errors import ModelLoadError
from choral.gguf_reader import GGUFReader
from choral.loader.dequant import dequantize
from choral.models.registry import Architecture, for_gguf
from choral.models.spec import ModelSpec, spec_or_error
from choral.quant.packed_cache import PackedCache
from choral.quant.repack import GGUF_TYPES, PackedRows, repack

# GGUF tensor name pieces -> HF names (per layer ones get "model.layers.N." in front).
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


class GGUFModelFile:
    """An opened GGUF file: its metadata, its architecture and a ModelSpec."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = GGUFReader(path)
        self.metadata: dict[str, Any] = self.reader.metadata
        self.tensors = self.reader.tensors
        arch_name = str(self.metadata.get("general.architecture", ""))
        self.architecture: Architecture = for_gguf(arch_name)
        meta = dict(self.metadata)
        meta["_tensor_names"] = set(self.tensors)
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError(f"{path}: no token_embd.weight tensor")
        meta["_vocab_size"] = int(embd.shape[0])  # numpy order: [vocab, hidden]
        if "rope_freqs.weight" in self.tensors:
            factors = self.dequantize("rope_freqs.weight")
            meta["_rope_freq_factors"] = tuple(float(x) for x in factors.reshape(-1))
        self.spec: ModelSpec = spec_or_error(path, lambda: self.architecture.spec_from_gguf(meta))

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in numpy order (GGML's dims reversed)."""
        return dequantize(self.reader.raw(name), self.tensors[name], self.path)

    def iter_tensors(self, keep_packed: bool = False) -> Iterator[tuple[str, torch.Tensor | PackedRows]]:
        """HF-named tensors, with llama.cpp's q/k row permutation undone: fp32, or with
        ``keep_packed`` the 2-d tensors of a type in ``repack.GGUF_TYPES`` as PackedRows."""
        spec = self.spec
        cache = PackedCache.for_file(self.path, self.reader.kv_digest) if keep_packed else None
        for name in self.tensors:
            if name == "rope_freqs.weight":
                continue
            hf_name = self._hf_name(name)
            permute_heads = None
            if self.architecture.gguf_qk_permuted and name.endswith(_PERMUTED):
                permute_heads = spec.num_heads if "attn_q" in name else spec.num_kv_heads
            info = self.tensors[name]
            if cache is not None and info.type_name in GGUF_TYPES and len(info.shape) == 2:
                rows, cols = info.shape
                packed = cache.get(name, GGUF_TYPES[info.type_name][2], rows, cols, info.type_name)
                if packed is None:  # first load of this file: repack, and keep it for the next
                    packed = repack(self.reader.raw(name), info.type_name, rows, cols)
                    if permute_heads is not None:  # whole rows move: the same permutation on packed rows
                        order = unpermute_qk_rows(np.arange(rows), permute_heads)
                        packed = replace(packed, data=np.ascontiguousarray(packed.data[order]))
                    cache.put(name, packed)
                yield hf_name, packed
                continue
            array = self.dequantize(name)
            if permute_heads is not None:
                array = unpermute_qk_rows(array, permute_heads)
            if self.architecture.gguf_norms_hold_unit_offset and name.endswith("norm.weight"):
                array = array - 1.0  # back to HF's convention (the forward scales by 1 + weight)
            # Dequantized arrays are fresh; F32 tensors are views of the read-only mapping: copy.
            owned = array if array.flags.writeable and array.flags.c_contiguous else np.array(array, copy=True)
            yield hf_name, torch.from_numpy(owned)

    def quantized_types(self) -> dict[str, int]:
        """GGUF type name -> number of tensors of that type (e.g. ``{"Q4_1": 210, "Q8_0": 1, "F32": 61}``)."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.type_name] = counts.get(info.type_name, 0) + 1
        return counts

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL:
            return _GLOBAL[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk":
            layer_name = self.architecture.gguf_layer_names.get(parts[2]) or _LAYER.get(parts[2])
            if layer_name is not None:
                return f"model.layers.{parts[1]}.{layer_name}"
        raise ModelLoadError(f"{self.path}: unexpected tensor {name!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if key in self.metadata:
                ids.append(int(self.metadata[key]))
        return sorted(set(ids))


def unpermute_qk_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a llama-style q or k projection as HF orders them. llama.cpp's converter
    interleaves each head's two rotary halves; this restores HF's [half0 | half1] order
    (``w``: [heads * head_dim, ...]; LoRA B matrices get the same treatment)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
