"""LoraRegistry: the adapters loaded by name, owned by the engine core.

``load(name, path)`` reads and checks an adapter against the base model (host memory);
``get(name)`` resolves a request's adapter at enqueue (unknown names are refused there);
``unload(name)`` forgets the name: new requests for it are refused, while requests already
running keep the adapter they resolved and finish with it. Which adapters sit in the device
slots (at most ``max_loras``, least recently used evicted) is the model runner's
:class:`~choral.lora.slots.LoraSlots`.

The registry has its own small lock: intake resolves names on callers' threads, while loads and
unloads (server endpoints, user calls) may come from anywhere.
"""

from __future__ import annotations

import threading
from pathlib import Path

from choral.errors import ConfigError, LoraLoadError, UnknownLoraError
from choral.lora.adapter import LoraAdapter, load_peft_adapter
from choral.lora.gguf_adapter import is_gguf_file, load_gguf_adapter
from choral.models.spec import ModelSpec

MAX_NAME = 128


class LoraRegistry:
    """Loaded adapters by name (a name is unique; loading it again is an error until unloaded)."""

    def __init__(self, spec: ModelSpec, enabled: bool, max_rank: int):
        self.spec = spec
        self.enabled = enabled
        self.max_rank = max_rank
        self._adapters: dict[str, LoraAdapter] = {}
        self._lock = threading.Lock()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise ConfigError("enable_lora: the engine was built without LoRA support; "
                              "pass enable_lora=True (and max_loras / max_lora_rank) to use adapters")

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        """Read the adapter at ``path`` (a PEFT directory or a GGUF LoRA file) as ``name``.
        Raises LoraLoadError (nothing changed)."""
        self._check_enabled()
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or name != name.strip():
            raise LoraLoadError(f"lora name: must be a non-empty string of at most {MAX_NAME} characters "
                                f"without surrounding spaces, got {name!r}")
        with self._lock:
            if name in self._adapters:
                raise LoraLoadError(f"lora {name!r} is already loaded; unload it first")
        # Slow: outside the lock.
        if is_gguf_file(Path(path)):
            adapter = load_gguf_adapter(name, path, self.spec, self.max_rank)
        else:
            adapter = load_peft_adapter(name, path, self.spec, self.max_rank)
        return self.add(adapter)

    def add(self, adapter: LoraAdapter) -> LoraAdapter:
        """Register an adapter built in memory (already checked against the model)."""
        self._check_enabled()
        if adapter.rank > self.max_rank:
            raise LoraLoadError(f"lora {adapter.name!r}: rank {adapter.rank} exceeds max_lora_rank {self.max_rank}")
        with self._lock:
            if adapter.name in self._adapters:
                raise LoraLoadError(f"lora {adapter.name!r} is already loaded; unload it first")
            self._adapters[adapter.name] = adapter
        return adapter

    def unload(self, name: str) -> LoraAdapter:
        """Forget ``name``; returns the adapter (requests running with it finish with it)."""
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise UnknownLoraError(self._unknown(name))
        return adapter

    def get(self, name: str) -> LoraAdapter:
        """The adapter loaded as ``name``; raises UnknownLoraError naming those that are."""
        if not isinstance(name, str):
            raise UnknownLoraError(f"lora: must be an adapter name (a string), got {type(name).__name__}")
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            self._check_enabled()
            raise UnknownLoraError(self._unknown(name))
        return adapter

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def adapters(self) -> list[LoraAdapter]:
        with self._lock:
            return list(self._adapters.values())

    def _unknown(self, name: str) -> str:
        loaded = ", ".join(repr(n) for n in self.names()) or "none"
        return f"lora {name!r} is not loaded (loaded: {loaded})"
