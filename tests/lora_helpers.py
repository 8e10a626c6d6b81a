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
