"""Read a GGUF file: metadata -> ModelSpec, tensors dequantized -> HF-named torch tensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from choral.errors import ModelLoadError, UnsupportedTensorTypeError
from choral.models.registry import Architecture, for_gguf
from choral.models.spec import ModelSpec

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
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # the reader raises bare ValueError/OSError on bad files
            raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e
        self.metadata = self._scalar_metadata()
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch_name = str(self.metadata.get("general.architecture", ""))
        self.architecture: Architecture = for_gguf(arch_name)
        meta = dict(self.metadata)
        meta["_tensor_names"] = set(self.tensors)
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise ModelLoadError(f"{path}: no token_embd.weight tensor")
        meta["_vocab_size"] = int(embd.shape[-1])  # GGML order: [hidden, vocab]
        if "rope_freqs.weight" in self.tensors:
            factors = self._dequantize(self.tensors["rope_freqs.weight"])
            meta["_rope_freq_factors"] = tuple(float(x) for x in factors.reshape(-1))
        self.spec: ModelSpec = self.architecture.spec_from_gguf(meta)

    def _scalar_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            # Skip the vocabulary arrays: the tokenizer reads them itself.
            if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "scores", "token_type", "merges")):
                continue
            try:
                out[key] = field.contents()
            except Exception:  # exotic field types the reader cannot decode are not needed here
                continue
        return out

    def _dequantize(self, tensor: Any) -> np.ndarray:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        try:
            if tensor.tensor_type in (Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
                array = np.asarray(tensor.data).astype(np.float32)  # plain numbers, no blocks
            else:
                array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedTensorTypeError(
                f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                f"which the gguf package cannot dequantize ({e})"
            ) from e
        shape = tuple(int(x) for x in reversed(tensor.shape))  # GGML lists dims fastest-first
        return np.asarray(array, dtype=np.float32).reshape(shape)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named fp32 tensors, with llama.cpp's q/k row permutation undone."""
        spec = self.spec
        for name, tensor in self.tensors.items():
            if name == "rope_freqs.weight":
                continue
            hf_name = self._hf_name(name)
            array = self._dequantize(tensor)
            if self.architecture.gguf_qk_permuted and name.endswith(_PERMUTED):
                heads = spec.num_heads if "attn_q" in name else spec.num_kv_heads
                array = _unpermute(array, heads)
            yield hf_name, torch.from_numpy(np.array(array, copy=True))

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL:
            return _GLOBAL[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
            return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
        raise ModelLoadError(f"{self.path}: unexpected tensor {name!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if key in self.metadata:
                ids.append(int(self.metadata[key]))
        return sorted(set(ids))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's two rotary halves; restore HF's [half0 | half1] order.
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
