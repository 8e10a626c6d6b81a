"""The saved form of a conversation: a safetensors container with a checked header.

Layout (one safetensors file, or the same bytes in memory as a :class:`State`):

- metadata ``format`` = ``choral-conversation``, ``version`` (an int; newer than
  :data:`FORMAT_VERSION` is refused), ``fingerprint`` (JSON: architecture, shapes, rope, dtype and
  a hash of sampled weights), ``num_tokens``, ``checksum`` (sha256 over the other metadata and
  every tensor's bytes), and ``hmac`` (HMAC-SHA256 of the checksum) when saved with a key;
- ``lora`` (version 2, only for a conversation that runs with a LoRA adapter): JSON
  ``{"name": ..., "sha256": ...}``, the adapter's name and :attr:`LoraAdapter.digest`; loading
  needs the same adapter (same weights) loaded under that name. States without an adapter are
  written as version 1, so older readers still take them;
- tensors ``tokens`` [n] int64, ``k.{layer}`` / ``v.{layer}`` [n, kv_heads, head_dim] in the
  model's dtype (token-major, so the file does not depend on the block size), and ``logits``
  [rows, vocab] fp32 when the conversation was waiting to be sampled.

The checksum detects corruption, not tampering (anyone can recompute a sha256); a key given to
save and load adds and demands an HMAC. Loading checks everything regardless: header types, the
exact tensor names, dtypes and shapes, token ids inside the vocabulary, finite K/V and logits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from choral.errors import CorruptStateError, IncompatibleStateError, InvalidRequestError, UnsupportedStateVersionError
from choral.sampling.params import show

FORMAT = "choral-conversation"
FORMAT_VERSION = 2


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
    lora: SavedAdapter | None = None


@dataclass(frozen=True)
class SavedAdapter:
    """The LoRA adapter a saved conversation ran with: its name and weights' digest."""

    name: str
    sha256: str


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (but the checksum and HMAC) and every tensor: detects damage only."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_state(saved: SavedConversation, fingerprint: dict[str, Any], key: bytes | None = None) -> State:
    """The state of ``saved``; signed with an HMAC-SHA256 under ``key`` when one is given."""
    _check_key(key)
    tensors: dict[str, torch.Tensor] = {"tokens": torch.tensor(saved.tokens, dtype=torch.int64)}
    for i, (k, v) in enumerate(zip(saved.keys, saved.values, strict=True)):
        tensors[f"k.{i}"] = k.detach().cpu().contiguous()
        tensors[f"v.{i}"] = v.detach().cpu().contiguous()
    if saved.logits is not None:
        tensors["logits"] = saved.logits.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "version": "2" if saved.lora is not None else "1",
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "num_tokens": str(len(saved.tokens)),
    }
    if saved.lora is not None:
        meta["lora"] = json.dumps({"name": saved.lora.name, "sha256": saved.lora.sha256}, sort_keys=True)
    meta["checksum"] = _checksum(meta, tensors)
    if key is not None:
        meta["hmac"] = _mac(key, meta["checksum"])
    return State(st_save(tensors, metadata=meta))


_META_KEYS = {"format", "version", "fingerprint", "num_tokens", "checksum"}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64"}
_MAX_HEADER = 100 * 2**20  # safetensors' own bound on the JSON header
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StateSpec:
    """What a state must match to be loaded into a model: every tensor's dtype and shape, token
    ids below the vocabulary, at most ``max_tokens`` tokens."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: torch.dtype
    max_tokens: int


def _mac(key: bytes, checksum: str) -> str:
    # The checksum is a sha256 over every other byte of the state, so a MAC of it covers them all.
    return hmac.new(key, checksum.encode(), hashlib.sha256).hexdigest()


def _check_key(key: bytes | None) -> None:
    if key is not None and (not isinstance(key, bytes) or not key):
        raise InvalidRequestError(f"key: must be non-empty bytes, got {type(key).__name__}")


def _read_header(data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, checked to be an object of objects; CorruptStateError if not."""
    if len(data) < 8:
        raise CorruptStateError("saved conversation is truncated (no header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, _MAX_HEADER):
        raise CorruptStateError("saved conversation is truncated (header runs past the end)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as e:
        raise CorruptStateError(f"saved conversation has a malformed header ({show(e)})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise CorruptStateError("saved conversation has a malformed header (not an object of objects)")
    return header


def _read_metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptStateError("saved conversation has no valid metadata (an object of strings)")
    if meta.get("format") != FORMAT:
        raise CorruptStateError(f"not a saved choral conversation (format {show(meta.get('format'))})")
    unknown = sorted(set(meta) - _META_KEYS - {"hmac", "lora"})
    missing = sorted(_META_KEYS - set(meta))
    if unknown or missing:
        raise CorruptStateError(f"saved conversation metadata: missing {missing}, unknown {show(unknown)}")
    for name in ("version", "num_tokens"):
        if not (meta[name].isascii() and meta[name].isdigit() and len(meta[name]) <= 12):
            raise CorruptStateError(f"saved conversation metadata: {name} is not a count ({show(meta[name])})")
    for name in ("checksum", "hmac"):
        if name in meta and not _HEX64.fullmatch(meta[name]):
            raise CorruptStateError(f"saved conversation metadata: {name} is not a sha256 hex digest")
    return dict(meta)


def _check_fingerprint(meta: dict[str, str], fingerprint: dict[str, Any]) -> None:
    try:
        saved = json.loads(meta["fingerprint"])
    except (ValueError, RecursionError):
        raise CorruptStateError("saved conversation metadata: fingerprint is not JSON") from None
    if not isinstance(saved, dict):
        raise CorruptStateError("saved conversation metadata: fingerprint is not a JSON object")
    diffs = [f"{k}: saved {show(saved.get(k))}, this model {show(fingerprint.get(k))}"
             for k in sorted(set(saved) | set(fingerprint), key=str) if saved.get(k) != fingerprint.get(k)]
    if diffs:
        raise IncompatibleStateError("saved conversation was made by a different model: " + "; ".join(diffs[:8]))


def _check_tensor_headers(header: dict[str, Any], spec: StateSpec, num_tokens: int) -> None:
    """Every tensor the header declares: exactly the expected names, dtypes and shapes (before
    safetensors reads any of them)."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    kv_shape = [num_tokens, spec.num_kv_heads, spec.head_dim]
    expected: dict[str, tuple[str, list[int] | None]] = {"tokens": ("I64", [num_tokens])}
    kv_dtype = _ST_DTYPES.get(spec.kv_dtype, str(spec.kv_dtype))
    for i in range(spec.num_layers):
        expected[f"k.{i}"] = expected[f"v.{i}"] = (kv_dtype, kv_shape)
    if "logits" in entries:
        expected["logits"] = ("F32", None)  # [rows, vocab], rows checked below
    names = set(entries)
    if names != set(expected):
        extra, lacking = sorted(names - set(expected)), sorted(set(expected) - names)
        raise CorruptStateError(f"saved conversation tensors: missing {show(lacking)}, unexpected {show(extra)}")
    for name, (dtype, shape) in expected.items():
        entry = entries[name]
        if entry.get("dtype") != dtype:
            what = "K/V" if name[0] in "kv" else name
            raise IncompatibleStateError(f"saved conversation: {what} tensor {name} is {show(entry.get('dtype'))}, "
                                         f"this model needs {dtype}")
        got = entry.get("shape")
        if not isinstance(got, list) or not all(type(d) is int for d in got):
            raise CorruptStateError(f"saved conversation: tensor {name} has a malformed shape")
        if shape is None:  # logits
            if len(got) != 2 or got[1] != spec.vocab_size or not 1 <= got[0] <= max(num_tokens, 0):
                raise CorruptStateError(f"saved conversation: logits shape {show(got)} is not [1..{num_tokens}, "
                                        f"{spec.vocab_size}]")
        elif got != shape:
            raise IncompatibleStateError(f"saved conversation: tensor {name} has shape {show(got)}, this model "
                                         f"needs {shape}")


def decode_state(state: State, fingerprint: dict[str, Any], spec: StateSpec,
                 key: bytes | None = None) -> SavedConversation:
    """Check and unpack ``state`` for a model with ``fingerprint`` and ``spec``. Raises a
    StateLoadError (CorruptStateError, IncompatibleStateError, UnsupportedStateVersionError) for
    anything it would not load exactly as saved, before the caller allocates anything.

    The checksum detects corruption (a damaged or truncated file), not tampering: anyone can
    recompute a sha256. Tampering is detected with ``key``: then the state must carry an HMAC made
    with the same key (``Conversation.save(key=...)``). Either way every value is checked (token
    ids in the vocabulary, finite K/V and logits), so even a forged state cannot break the engine."""
    if not isinstance(state, State):
        raise CorruptStateError(f"expected a State or a path, got {type(state).__name__}")
    _check_key(key)
    header = _read_header(state.data)
    meta = _read_metadata(header)
    version = int(meta["version"])
    if version > FORMAT_VERSION:
        raise UnsupportedStateVersionError(
            f"saved conversation uses format version {version}; this choral reads up to {FORMAT_VERSION}"
        )
    if version < 1:
        raise CorruptStateError(f"saved conversation metadata: version {version} does not exist")
    _check_fingerprint(meta, fingerprint)
    lora = _read_lora(meta, version)
    num_tokens = int(meta["num_tokens"])
    if num_tokens > spec.max_tokens:
        raise IncompatibleStateError(f"saved conversation holds {num_tokens} tokens, more than the context "
                                     f"{spec.max_tokens}")
    _check_tensor_headers(header, spec, num_tokens)
    if key is not None and "hmac" not in meta:
        raise CorruptStateError("saved conversation is not signed, and a key was given: it cannot be trusted")
    try:
        tensors = st_load(state.data)
    except Exception as e:  # safetensors raises its own error type for every malformed input
        raise CorruptStateError(f"saved conversation is truncated or malformed ({show(e, 200)})") from None
    expected = meta.pop("checksum")
    mac = meta.pop("hmac", None)
    checksum = _checksum(meta, tensors)
    if not hmac.compare_digest(expected, checksum):
        raise CorruptStateError("saved conversation fails its checksum (the data was changed or damaged)")
    if key is not None and (mac is None or not hmac.compare_digest(mac, _mac(key, checksum))):
        raise CorruptStateError("saved conversation fails its HMAC: it was changed, or signed with another key")
    return _checked_values(tensors, spec, lora)


def _read_lora(meta: dict[str, str], version: int) -> SavedAdapter | None:
    if "lora" not in meta:
        return None
    if version < 2:
        raise CorruptStateError("saved conversation metadata: lora appears in a version 1 state")
    try:
        value = json.loads(meta["lora"])
    except (ValueError, RecursionError):
        raise CorruptStateError("saved conversation metadata: lora is not JSON") from None
    if not isinstance(value, dict) or set(value) != {"name", "sha256"} or not isinstance(value["name"], str) \
            or not value["name"] or not isinstance(value["sha256"], str) or not re.fullmatch(r"[0-9a-f]{32}",
                                                                                            value["sha256"]):
        raise CorruptStateError("saved conversation metadata: lora is not {\"name\": str, \"sha256\": 32 hex digits}")
    return SavedAdapter(value["name"], value["sha256"])


def _checked_values(tensors: dict[str, torch.Tensor], spec: StateSpec,
                    lora: SavedAdapter | None = None) -> SavedConversation:
    tokens = tensors["tokens"]
    if tokens.numel() and not bool(((tokens >= 0) & (tokens < spec.vocab_size)).all()):
        bad = tokens[(tokens < 0) | (tokens >= spec.vocab_size)][0].item()
        raise CorruptStateError(f"saved conversation: token id {bad} is outside the vocabulary [0, {spec.vocab_size})")
    for name, t in tensors.items():
        if name != "tokens" and t.numel() and not bool(torch.isfinite(t).all()):
            raise CorruptStateError(f"saved conversation: tensor {name} holds NaN or infinite values")
    return SavedConversation(
        tokens=tokens.tolist(),
        keys=[tensors[f"k.{i}"] for i in range(spec.num_layers)],
        values=[tensors[f"v.{i}"] for i in range(spec.num_layers)],
        logits=tensors.get("logits"),
        lora=lora,
    )


def model_fingerprint(spec_fingerprint: dict[str, Any], dtype: torch.dtype,
                      sample: list[torch.Tensor], weights: str = "dequantize") -> dict[str, Any]:
    """The model identity a state is checked against: shapes and rope from the spec, the K/V
    dtype, how the weights run (``native`` packed or ``dequantize``d: their K/V differ) and a
    sha256 over a few weight tensors (cast to fp32, so it names the checkpoint)."""
    h = hashlib.sha256()
    for t in sample:
        h.update(t.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {**spec_fingerprint, "dtype": str(dtype).removeprefix("torch."), "weights": weights,
            "weights_sha256": h.hexdigest()[:32]}
