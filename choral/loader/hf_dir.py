"""Read an HF model directory: config.json, safetensors (sharded too), generation_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from choral.errors import ModelLoadError
from choral.models.registry import Architecture, for_hf_config
from choral.models.spec import ModelSpec, spec_or_error


class HFModelDir:
    """An HF-format directory. Only ``*.safetensors`` weights are read (never pickle)."""

    def __init__(self, path: Path):
        self.path = path
        self.config = _read_json(path / "config.json", required=True)
        self.architecture: Architecture = for_hf_config(self.config)
        self.spec: ModelSpec = spec_or_error(path / "config.json", lambda: self.architecture.spec_from_hf(self.config))
        self.files = self._weight_files()
        self.generation_config = _read_json(path / "generation_config.json", required=False)

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index, required=True).get("weight_map", {})
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ModelLoadError(f"{index}: shard(s) missing: {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
            raise ModelLoadError(f"{self.path}: no *.safetensors weights{hint}")
        return files

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (OSError, ValueError, RuntimeError) as e:
                raise ModelLoadError(f"{file}: cannot read safetensors ({e})") from e

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (self.config, self.generation_config):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        return sorted(ids)


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path.parent}: no {path.name}")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data
