"""The architecture registry: one file per architecture registers itself here.

An architecture entry knows how to turn an HF ``config.json`` dict and a GGUF metadata dict
into a :class:`ModelSpec`, and how GGUF tensor names map to ours. Adding an architecture is
one file in ``choral/models/`` that calls :func:`register` and is imported by
``choral/models/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from choral.errors import UnsupportedArchitectureError
from choral.models.spec import ModelSpec


@dataclass(frozen=True)
class Architecture:
    """How one architecture is read from HF configs and GGUF metadata."""

    name: str  # our name, e.g. "llama"
    hf_architectures: tuple[str, ...]  # config.json "architectures" values, e.g. "LlamaForCausalLM"
    hf_model_types: tuple[str, ...]  # config.json "model_type" values
    gguf_names: tuple[str, ...]  # GGUF general.architecture values
    spec_from_hf: Callable[[Mapping[str, Any]], ModelSpec]
    spec_from_gguf: Callable[[Mapping[str, Any]], ModelSpec]
    # llama.cpp permutes Q/K rows of llama-style models for its rope kernel; we undo it.
    gguf_qk_permuted: bool = False
    # GGUF per-layer tensor names whose HF name differs from the Llama table's (gguf_file.py).
    gguf_layer_names: Mapping[str, str] = field(default_factory=dict)
    # llama.cpp stores Gemma's norm weights with the 1 of ``1 + weight`` added; HF does not.
    gguf_norms_hold_unit_offset: bool = False
    # Tokens that end a turn besides the tokenizer's EOS, looked up by text in the vocabulary.
    stop_tokens: tuple[str, ...] = ()
    # The chat template for GGUF files that carry none (Jinja, as in tokenizer_config.json).
    default_chat_template: str | None = None


_REGISTRY: dict[str, Architecture] = {}


def _architectures() -> dict[str, Architecture]:
    """The registry, with every architecture file imported (they register themselves on import)."""
    import choral.models  # noqa: F401

    return _REGISTRY


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise RuntimeError(f"architecture {arch.name!r} registered twice")
    _REGISTRY[arch.name] = arch
    return arch


def supported() -> list[str]:
    """Names a user can load, e.g. ``LlamaForCausalLM (llama)``."""
    return sorted(f"{a.hf_architectures[0]} ({a.name})" for a in _architectures().values())


def for_hf_config(config: Mapping[str, Any]) -> Architecture:
    names = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    for arch in _architectures().values():
        if any(n in arch.hf_architectures for n in names) or model_type in arch.hf_model_types:
            return arch
    raise UnsupportedArchitectureError(
        f"architecture {names or model_type!r} is not supported; supported: {', '.join(supported())}"
    )


def by_name(name: str) -> Architecture:
    """The architecture a ModelSpec names (``spec.architecture``, e.g. ``"llama"``)."""
    arch = _architectures().get(name)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(supported())}")
    return arch


def for_gguf(name: str) -> Architecture:
    for arch in _architectures().values():
        if name in arch.gguf_names:
            return arch
    raise UnsupportedArchitectureError(
        f"GGUF architecture {name!r} is not supported; supported: {', '.join(supported())}"
    )
