"""The saved form of a conversation: a safetensors container with a checked header.

Layout (one safetensors file, or the same bytes in memory as a :class:`State`):

- metadata ``format`` = ``choral-conversation``, ``version`` (an int; newer than
  :data:`FORMAT_VERSION` is refused), ``fingerprint`` (JSON: architecture, shapes, rope, dtype and
  a hash of sampled weights), ``num_tokens``, ``checksum`` (sha256 over the other metadata and
  every tensor's bytes);
- tensors ``tokens`` [n] int64, ``k.{layer}`` / ``v.{layer}`` [n, kv_heads, head_dim] in the
  model's dtype (token-major, so the file does not depend on the block size), and ``logits``
  [rows, vocab] fp32 when the conversation was waiting to be sampled.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from choral.errors import CorruptStateError, IncompatibleStateError, UnsupportedStateVersionError

FORMAT = "choral-conversation"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class State:
    """A conversation saved in memory (the exact bytes :meth:`save` writes to a file)."""

    data: bytes

    @property
    def size(self) -> int:
        """Bytes held."""
        return len(self.data)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (through a temporary file, so a crash never leaves half a file)."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(self.data)
        tmp.replace(target)

    @classmethod
    def from_file(cls, path: str | Path) -> State:
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise CorruptStateError(f"{path}: cannot read the saved conversation ({e})") from e


@dataclass
class SavedConversation:
    """What a state holds, decoded."""

    tokens: list[int]
    keys: list[torch.Tensor]  # per layer [n, KVH, D]
    values: list[torch.Tensor]
    logits: torch.Tensor | None  # [rows, vocab] fp32


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_state(saved: SavedConversation, fingerprint: dict[str, Any]) -> State:
    tensors: dict[str, torch.Tensor] = {"tokens": torch.tensor(saved.tokens, dtype=torch.int64)}
    for i, (k, v) in enumerate(zip(saved.keys, saved.values, strict=True)):
        tensors[f"k.{i}"] = k.detach().cpu().contiguous()
        tensors[f"v.{i}"] = v.detach().cpu().contiguous()
    if saved.logits is not None:
        tensors["logits"] = saved.logits.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "num_tokens": str(len(saved.tokens)),
    }
    meta["checksum"] = _checksum(meta, tensors)
    return State(st_save(tensors, metadata=meta))


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptStateError("saved conversation is truncated (no header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptStateError("saved conversation is truncated (header runs past the end)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptStateError(f"saved conversation has a malformed header ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptStateError(f"not a saved choral conversation (format {meta.get('format')!r})")
    return {str(k): str(v) for k, v in meta.items()}


def decode_state(state: State, fingerprint: dict[str, Any], num_layers: int) -> SavedConversation:
    """Check and unpack ``state`` for a model with ``fingerprint``. Raises a StateLoadError."""
    if not isinstance(state, State):
        raise CorruptStateError(f"expected a State or a path, got {type(state).__name__}")
    meta = _read_metadata(state.data)
    try:
        version = int(meta["version"])
    except (KeyError, ValueError) as e:
        raise CorruptStateError("saved conversation has no valid version") from e
    if version > FORMAT_VERSION:
        raise UnsupportedStateVersionError(
            f"saved conversation uses format version {version}; this choral reads up to {FORMAT_VERSION}"
        )
    saved_fp = json.loads(meta.get("fingerprint", "{}"))
    diffs = [f"{k}: saved {saved_fp.get(k)!r}, this model {fingerprint.get(k)!r}"
             for k in sorted(set(saved_fp) | set(fingerprint)) if saved_fp.get(k) != fingerprint.get(k)]
    if diffs:
        raise IncompatibleStateError("saved conversation was made by a different model: " + "; ".join(diffs))
    try:
        tensors = st_load(state.data)
    except Exception as e:  # safetensors raises its own error type for every malformed input
        raise CorruptStateError(f"saved conversation is truncated or malformed ({e})") from e
    expected = meta.pop("checksum", None)
    if expected != _checksum(meta, tensors):
        raise CorruptStateError("saved conversation fails its checksum (the data was changed or damaged)")
    names = ["tokens", *(f"{kv}.{i}" for i in range(num_layers) for kv in "kv")]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CorruptStateError(f"saved conversation lacks tensors {missing[:4]}")
    tokens = tensors["tokens"].tolist()
    if len(tokens) != int(meta["num_tokens"]) or any(tensors[n].shape[0] != len(tokens) for n in names[1:]):
        raise CorruptStateError("saved conversation: token count and K/V lengths disagree")
    return SavedConversation(
        tokens=tokens,
        keys=[tensors[f"k.{i}"] for i in range(num_layers)],
        values=[tensors[f"v.{i}"] for i in range(num_layers)],
        logits=tensors.get("logits"),
    )


def model_fingerprint(spec_fingerprint: dict[str, Any], dtype: torch.dtype,
                      sample: list[torch.Tensor]) -> dict[str, Any]:
    """The model identity a state is checked against: shapes and rope from the spec, the K/V
    dtype, and a sha256 over a few weight tensors (cast to fp32, so it names the checkpoint)."""
    h = hashlib.sha256()
    for t in sample:
        h.update(t.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {**spec_fingerprint, "dtype": str(dtype).removeprefix("torch."), "weights_sha256": h.hexdigest()[:32]}
