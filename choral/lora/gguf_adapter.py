"""A LoRA adapter in llama.cpp's GGUF format, read and checked against the base model.

llama.cpp's ``convert_lora_to_gguf.py`` writes one file with ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` and ``general.architecture`` naming the base
model's architecture. Each adapted projection is two tensors named after the base tensor:
``blk.{i}.attn_q.weight.lora_a`` [r, in] and ``...lora_b`` [out, r] (numpy order, GGML's dims
reversed), in F32, F16, BF16 or Q8_0. The scale is ``alpha / r``, or 1 when alpha is 0 (as
llama.cpp applies it).

For architectures whose q/k rows llama.cpp permutes (Llama, Mistral), the converter applies the
same row permutation to the q/k ``lora_b`` matrices (their rows are the projection's outputs); we
undo it exactly as for the base weights, so the adapter meets our HF-ordered projections.

Refused, naming the problem: a file that is not a GGUF adapter, an adapter type other than
``lora`` (control vectors, activated LoRA), an adapter of another architecture, embedding or
output-layer adapters, and any tensor or shape that does not fit the base model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from choral.errors import LoraLoadError, ModelLoadError, UnsupportedArchitectureError
from choral.gguf_reader import GGUFReader
from choral.loader.dequant import dequantize
from choral.loader.gguf_file import unpermute_qk_rows
from choral.lora.adapter import LoraAdapter, LoraWeights, check_pair, check_rank
from choral.models.registry import by_name, for_gguf
from choral.models.spec import ModelSpec

# GGUF projection tensor names -> ours.
GGUF_MODULES = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: Path) -> bool:
    """A regular file that starts with GGUF's magic bytes."""
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def load_gguf_adapter(name: str, path: str | Path, spec: ModelSpec, max_rank: int) -> LoraAdapter:
    """Read a GGUF LoRA file and check it against ``spec``; raises LoraLoadError."""
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, ModelLoadError) as e:
        raise LoraLoadError(f"lora {name!r}: cannot read {str(path)!r} as GGUF ({type(e).__name__}: {e})") from e
    try:
        return _read(name, reader, Path(path), spec, max_rank)
    finally:
        reader.close()


def _read(name: str, reader: GGUFReader, path: Path, spec: ModelSpec, max_rank: int) -> LoraAdapter:
    meta = reader.metadata
    kind = meta.get("general.type", "model")
    if kind != "adapter":
        raise LoraLoadError(f"lora {name!r}: {str(path)!r} is a GGUF {kind!s} file, not an adapter "
                            "(general.type must be 'adapter')")
    adapter_type = meta.get("adapter.type")
    if adapter_type != "lora":
        raise LoraLoadError(f"lora {name!r}: GGUF adapter.type {adapter_type!r} is not supported (only 'lora')")
    if any(key.startswith("adapter.alora.") for key in meta):
        raise LoraLoadError(f"lora {name!r}: activated LoRA (adapter.alora.*) is not supported")
    arch_name = str(meta.get("general.architecture", ""))
    try:
        arch = for_gguf(arch_name)
    except UnsupportedArchitectureError as e:
        raise LoraLoadError(f"lora {name!r}: {e}") from e
    if arch.name != spec.architecture:
        raise LoraLoadError(f"lora {name!r}: the adapter is for a {arch_name!r} model, the base model is "
                            f"{spec.architecture!r}")
    permuted = by_name(spec.architecture).gguf_qk_permuted
    alpha = float(meta.get("adapter.lora.alpha", 0.0))

    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for tensor_name, info in reader.tensors.items():
        layer, module, half = _parse_name(name, tensor_name, spec)
        try:
            array = dequantize(reader.raw(tensor_name), info, path)
        except ModelLoadError as e:  # an unsupported tensor type names itself
            raise LoraLoadError(f"lora {name!r}: tensor {tensor_name!r}: {e}") from e
        halves.setdefault((layer, module), {})[half] = np.array(array, dtype=np.float32, copy=True)
    if not halves:
        raise LoraLoadError(f"lora {name!r}: the GGUF adapter has no LoRA tensors")

    weights: dict[tuple[int, str], LoraWeights] = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"a", "b"}:
            raise LoraLoadError(f"lora {name!r}: {where} has lora_{''.join(pair)} without its other half")
        a, b = torch.from_numpy(pair["a"]), torch.from_numpy(pair["b"])
        check_pair(name, where, a, b, spec, module)
        rank = int(a.shape[0])
        check_rank(name, where, rank, max_rank)
        if permuted and module in ("q_proj", "k_proj"):
            heads = spec.num_heads if module == "q_proj" else spec.num_kv_heads
            b = torch.from_numpy(np.ascontiguousarray(unpermute_qk_rows(pair["b"], heads)))
        scale = alpha / rank if alpha else 1.0
        weights[(layer, module)] = LoraWeights(a.contiguous(), b.contiguous(), scale)
    base = meta.get("general.base_model.0.name")  # informational, when the converter knew it
    return LoraAdapter(name, weights, path=str(path), base_model=str(base) if base else None)


def _parse_name(name: str, tensor_name: str, spec: ModelSpec) -> tuple[int, str, str]:
    """``blk.3.attn_q.weight.lora_a`` -> (3, "q_proj", "a"); anything else is refused."""
    parts = tensor_name.split(".")
    if len(parts) != 5 or parts[0] != "blk" or parts[3] != "weight" or parts[4] not in ("lora_a", "lora_b") \
            or parts[2] not in GGUF_MODULES or not parts[1].isdigit():
        raise LoraLoadError(f"lora {name!r}: tensor {tensor_name!r} is not a LoRA weight of an attention or MLP "
                            f"projection (choral adapts {', '.join(GGUF_MODULES)}; embedding and output-layer "
                            "adapters are not supported)")
    layer = int(parts[1])
    if layer >= spec.num_layers:
        raise LoraLoadError(f"lora {name!r}: tensor {tensor_name!r} is for layer {layer}, but the base model has "
                            f"{spec.num_layers} layers (an adapter of another model?)")
    return layer, GGUF_MODULES[parts[2]], parts[4][-1]
