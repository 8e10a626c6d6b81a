"""Compile ``paged_attention.c`` once per machine and source version, load it with ctypes."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")


def cache_dir() -> Path:
    root = os.environ.get("CHORAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "choral"
    )
    return Path(root) / "kernels"


@lru_cache(maxsize=1)
def load_paged_attention() -> ctypes.CDLL | None:
    """The compiled library, or None when no compiler is available (or CHORAL_NO_KERNELS=1)."""
    if os.environ.get("CHORAL_NO_KERNELS") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    source = SOURCE.read_bytes()
    # -march=native ties the binary to this CPU, so the machine is part of the key.
    key = hashlib.sha256(source + Path(__file__).read_bytes() + _cpu_flags()).hexdigest()[:16]
    target = cache_dir() / f"paged_attention-{key}.so"
    if not target.exists():
        if compiler is None:
            logger.warning("choral: no C compiler found; using the slower torch attention path")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / "lib.so"
            # Reassociation lets gcc vectorize the dot-product reductions; no -ffast-math, so
            # infinities (the softmax's running max starts at -inf) keep their meaning.
            cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                   "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
                   "-o", str(out), str(SOURCE), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                logger.warning("choral: compiling the attention kernel failed (%s); "
                               "using the torch path", result.stderr.strip()[:500])
                return None
            os.replace(out, target)  # atomic: concurrent builders never see half a file
    lib = ctypes.CDLL(str(target))
    for name in ("paged_attention_f32", "paged_attention_bf16", "paged_attention_f16"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [
            ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return lib


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith(b"flags"):
                    return line
    except OSError:
        pass
    return b""
