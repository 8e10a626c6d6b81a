"""Will it fit? An estimate checked against the memory available before anything big is allocated.

A config with absurd sizes (10**9 layers, 10**12 positions) used to fail deep inside torch after
allocating gigabytes, or take the machine down; now loading refuses it with a ModelLoadError that
names the parts and the memory there is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from choral.errors import ModelLoadError


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device`` (None when it cannot be known)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(parts: dict[str, int], device: torch.device, hint: str) -> None:
    """Raise ModelLoadError when the ``parts`` (name -> bytes) together exceed what ``device`` has."""
    need = sum(parts.values())
    have = available_bytes(device)
    if have is None or need <= have:
        return
    detail = ", ".join(f"{name} {_gib(size)}" for name, size in parts.items())
    raise ModelLoadError(f"loading needs about {_gib(need)} ({detail}) but {device} has {_gib(have)} available; "
                         f"{hint}")


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
