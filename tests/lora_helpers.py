"""Random PEFT LoRA adapters for tests (made here with peft, never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Ranks 4 / 8 / 16 over different modules, plain and rsLoRA scaling.
ADAPTER_SPECS: list[dict[str, Any]] = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=ALL_MODULES, use_rslora=True),
    dict(r=16, lora_alpha=32, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj", "k_proj"]),
]


def make_peft_adapter(base: torch.nn.Module, directory: Path, seed: int, scale: float = 0.05,
                      **lora_kwargs: Any) -> torch.nn.Module:
    """Wrap ``base`` (modified in place) in a random LoRA adapter, save it to ``directory`` and
    return the PeftModel. Both A and B are random (a fresh PEFT adapter has B = 0, a no-op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(lora_dropout=0.1, init_lora_weights=False, **lora_kwargs)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    model.save_pretrained(str(directory))
    return model


# PEFT module -> llama.cpp tensor name (blk.{i}.{name}.weight.lora_a / lora_b).
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf_lora(adapter_dir: Path, path: Path, arch: str, heads: int, kv_heads: int,
                    qtype: str = "F32", permute_qk: bool = True) -> None:
    """Write a PEFT adapter as llama.cpp's convert_lora_to_gguf.py does: general.type adapter,
    adapter.type lora, adapter.lora.alpha, lora_a [r, in] and lora_b [out, r] per projection, and
    for llama-style models the q/k lora_b rows permuted like the base q/k weights."""
    import json
    import re

    import gguf
    import numpy as np
    from gguf.quants import quantize
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):  # the file's scale is alpha / r: fold rsLoRA's sqrt(r) into alpha
        alpha *= float(config["r"]) ** 0.5
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    key = re.compile(r".*layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    for name, tensor in sorted(load_file(str(adapter_dir / "adapter_model.safetensors")).items()):
        m = key.match(name)
        assert m is not None, name
        layer, module, half = int(m.group(1)), m.group(2), m.group(3)
        data = tensor.float().numpy()
        if permute_qk and half == "B" and module in ("q_proj", "k_proj"):
            n = heads if module == "q_proj" else kv_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        g_name = f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_{half.lower()}"
        if qtype == "F32":
            writer.add_tensor(g_name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == "F16":
            writer.add_tensor(g_name, np.ascontiguousarray(data, dtype=np.float16))
        else:
            raw = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(g_name, quantize(data, raw), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
