"""A LoRA adapter in PEFT's format, read and checked against the base model.

A PEFT adapter directory holds ``adapter_config.json`` (rank ``r``, ``lora_alpha``,
``use_rslora``, ``target_modules``, optional ``rank_pattern`` / ``alpha_pattern``) and
``adapter_model.safetensors`` (or ``adapter_model.bin``) with, per adapted projection,
``...layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r].
The projection's output gains ``x @ A^T @ B^T * scale`` with ``scale = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``). Dropout only acts in training and is not read.

Everything that choral cannot apply exactly is refused here, naming it: DoRA, trained biases,
``modules_to_save``, embeddings or lm_head adapters, and any tensor or shape that does not
belong to the base model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from choral.errors import LoraLoadError
from choral.models.spec import ModelSpec

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_ids = itertools.count(1)


@dataclass(frozen=True)
class LoraWeights:
    """One adapted projection: ``a`` [r, in] and ``b`` [out, r] (fp32), and its scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded adapter. ``adapter_id`` is unique for the process's life: a name unloaded and
    loaded again is a new adapter (its KV blocks and slots are never mistaken for the old one's)."""

    name: str
    weights: dict[tuple[int, str], LoraWeights]  # (layer, module) -> weights
    path: str | None = None
    base_model: str | None = None  # adapter_config's base_model_name_or_path, informational
    adapter_id: int = field(default_factory=lambda: next(_ids))

    @property
    def cache_salt(self) -> int:
        """Where its sequences' prefix-cache hash chains start (see SequenceState.cache_salt)."""
        return hash(("lora", self.adapter_id))

    @cached_property
    def digest(self) -> str:
        """sha256 (32 hex digits) over every adapted projection's A, B and scale: names these
        weights, whatever name or path they were loaded under (saved conversations check it)."""
        h = hashlib.sha256()
        for (layer, module), w in sorted(self.weights.items()):
            h.update(f"{layer}.{module}:{w.scale!r}:{tuple(w.a.shape)}:{tuple(w.b.shape)}".encode())
            h.update(w.a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            h.update(w.b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    @property
    def rank(self) -> int:
        """The largest rank of any adapted projection."""
        return max(w.rank for w in self.weights.values())

    @property
    def modules(self) -> tuple[str, ...]:
        """The projection names this adapter changes, in the model's order."""
        present = {m for _, m in self.weights}
        return tuple(m for m in MODULES if m in present)


def module_shape(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(in, out) features of a base projection."""
    h, inter = spec.hidden_size, spec.intermediate_size
    return {"q_proj": (h, spec.q_size), "k_proj": (h, spec.kv_size), "v_proj": (h, spec.kv_size),
            "o_proj": (spec.q_size, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}[module]


def check_pair(name: str, where: str, a: torch.Tensor, b: torch.Tensor, spec: ModelSpec, module: str) -> None:
    """``a`` [r, in] and ``b`` [out, r] fit the base model's ``module``; raises LoraLoadError."""
    fan_in, fan_out = module_shape(spec, module)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LoraLoadError(f"lora {name!r}: {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                            "not [r, in] and [out, r]")
    if a.shape[1] != fan_in or b.shape[0] != fan_out:
        raise LoraLoadError(f"lora {name!r}: {where} maps {a.shape[1]} -> {b.shape[0]} features, the base "
                            f"model's {module} maps {fan_in} -> {fan_out} (an adapter of another model?)")


def check_rank(name: str, where: str, rank: int, max_rank: int) -> None:
    if rank > max_rank:
        raise LoraLoadError(f"lora {name!r}: rank {rank} ({where}) exceeds max_lora_rank {max_rank}")


def load_peft_adapter(name: str, path: str | Path, spec: ModelSpec, max_rank: int) -> LoraAdapter:
    """Read a PEFT adapter directory and check it against ``spec``; raises LoraLoadError."""
    root = Path(path)
    if not root.is_dir():
        raise LoraLoadError(f"lora {name!r}: {str(path)!r} is not a directory (a PEFT adapter directory "
                            "holds adapter_config.json and adapter_model.safetensors; a GGUF LoRA is one .gguf file)")
    config_file = root / "adapter_config.json"
    if not config_file.is_file():
        raise LoraLoadError(f"lora {name!r}: {str(path)!r} has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise LoraLoadError(f"lora {name!r}: adapter_config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise LoraLoadError(f"lora {name!r}: adapter_config.json is not a JSON object")
    tensors = _read_tensors(name, root)
    return adapter_from_tensors(name, config, tensors, spec, max_rank, path=str(root))


def _read_tensors(name: str, root: Path) -> dict[str, torch.Tensor]:
    st, binary = root / "adapter_model.safetensors", root / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file
            return load_file(str(st))
        if binary.is_file():
            loaded = torch.load(str(binary), map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise LoraLoadError(f"lora {name!r}: adapter_model.bin does not hold a state dict")
            return loaded
    except LoraLoadError:
        raise
    except Exception as e:  # a truncated or foreign file: safetensors / pickle errors vary
        raise LoraLoadError(f"lora {name!r}: cannot read the adapter weights ({type(e).__name__}: {e})") from e
    raise LoraLoadError(f"lora {name!r}: {str(root)!r} has neither adapter_model.safetensors nor adapter_model.bin")


def _check_config(name: str, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraLoadError(f"lora {name!r}: peft_type {peft_type!r} is not LORA")
    if config.get("use_dora"):
        raise LoraLoadError(f"lora {name!r}: DoRA adapters (use_dora) are not supported")
    if config.get("bias", "none") != "none":
        raise LoraLoadError(f"lora {name!r}: adapters that train biases (bias={config['bias']!r}) are not supported")
    if config.get("modules_to_save"):
        raise LoraLoadError(f"lora {name!r}: modules_to_save {config['modules_to_save']!r} are not supported "
                            "(choral adapts the attention and MLP projections only)")
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple):
        unknown = sorted(str(t) for t in targets if str(t).split(".")[-1] not in MODULES)
        if unknown:
            raise LoraLoadError(f"lora {name!r}: target_modules {unknown} cannot be adapted; choral adapts "
                                f"{', '.join(MODULES)}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise LoraLoadError(f"lora {name!r}: adapter_config.json {key} must be a positive number, got {value!r}")


def _pattern(patterns: dict[str, Any], module_name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the first key matching the module's full name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return float(value)
    return default


def adapter_from_tensors(name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], spec: ModelSpec,
                         max_rank: int, path: str | None = None) -> LoraAdapter:
    """An adapter from a PEFT config dict and its state dict, checked against ``spec``."""
    _check_config(name, config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoraLoadError(f"lora {name!r}: tensor {key!r} is not a LoRA weight of an attention or MLP "
                                "projection (embedding / lm_head adapters and DoRA are not supported)")
        layer = int(m.group(1))
        if layer >= spec.num_layers:
            raise LoraLoadError(f"lora {name!r}: tensor {key!r} is for layer {layer}, but the base model has "
                                f"{spec.num_layers} layers (an adapter of another model?)")
        halves.setdefault((layer, m.group(2)), {})[m.group(3)] = tensor
    if not halves:
        raise LoraLoadError(f"lora {name!r}: the adapter has no LoRA weights")
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    weights: dict[tuple[int, str], LoraWeights] = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise LoraLoadError(f"lora {name!r}: {where} has lora_{''.join(pair)} without its other half")
        a, b = pair["A"].float(), pair["B"].float()
        check_pair(name, where, a, b, spec, module)
        full = f"model.layers.{layer}.{'mlp' if module in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}" \
               f".{module}"
        rank = int(_pattern(rank_pattern, full, float(config["r"])))
        if a.shape[0] != rank:
            raise LoraLoadError(f"lora {name!r}: {where} has rank {a.shape[0]}, its adapter_config says {rank}")
        check_rank(name, where, rank, max_rank)
        alpha = _pattern(alpha_pattern, full, float(config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weights[(layer, module)] = LoraWeights(a.contiguous(), b.contiguous(), scale)
    base = config.get("base_model_name_or_path")
    return LoraAdapter(name, weights, path=path, base_model=str(base) if base else None)
