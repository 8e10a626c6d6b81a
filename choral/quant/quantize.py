"""Quantize a float model's weights at load (``quantization="q8_0" | "q4_0"``), in llama.cpp's
formats (the gguf package's quantizers), then keep them packed like a GGUF file's."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from choral.quant.repack import PackedRows, repack

# The 2-d weights that become packed: projections, the embedding and an untied lm_head. Norms
# and biases stay float, as llama.cpp's quantizer leaves them.
_QUANTIZED_SUFFIXES = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")
_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0"}


def quantize_tensors(tensors: Iterable[tuple[str, torch.Tensor | PackedRows]],
                     quantization: str) -> Iterator[tuple[str, torch.Tensor | PackedRows]]:
    """HF-named float tensors -> the same, with the projection/embedding weights quantized to
    ``quantization`` and repacked. A weight whose rows are not whole 32-weight blocks stays float."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    type_name = _TYPES[quantization]
    qtype = GGMLQuantizationType[type_name]
    for name, tensor in tensors:
        if (isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and name.endswith(_QUANTIZED_SUFFIXES)
                and tensor.shape[1] % 32 == 0):
            rows, cols = (int(x) for x in tensor.shape)
            array = np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())
            yield name, repack(quantize(array, qtype), type_name, rows, cols)
        else:
            yield name, tensor
