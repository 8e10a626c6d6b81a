"""Compile the C kernels (``paged_attention.c``, ``small_gemm.c``, ``rms_norm.c``, ``rope_kv.c``,
``silu_mul.c``) once per machine and source version, and load them with ctypes."""

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

KERNEL_DIR = Path(__file__).parent


def cache_dir() -> Path:
    root = os.environ.get("CHORAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "choral"
    )
    return Path(root) / "kernels"


@lru_cache(maxsize=1)
def load_paged_attention() -> ctypes.CDLL | None:
    """The compiled attention kernel, or None when no compiler is available (or CHORAL_NO_KERNELS=1)."""
    lib = _compile("paged_attention")
    if lib is None:
        return None
    for name in ("paged_attention_f32", "paged_attention_bf16", "paged_attention_f16"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [
            ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return lib


@lru_cache(maxsize=1)
def load_small_gemm() -> ctypes.CDLL | None:
    """The compiled packed-weight GEMM (``small_gemm.c``, fp32 and bf16 weights), or None like the
    attention kernel."""
    lib = _compile("small_gemm")
    if lib is None:
        return None
    for suffix in ("f32", "bf16"):
        pack, gemm = getattr(lib, f"small_gemm_pack_{suffix}"), getattr(lib, f"small_gemm_{suffix}")
        pack.restype = None
        pack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
        gemm.restype = None
        gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    return lib


@lru_cache(maxsize=1)
def load_rms_norm() -> ctypes.CDLL | None:
    """The compiled RMSNorm (``rms_norm.c``, fp32 and bf16), or None like the attention kernel."""
    lib = _compile("rms_norm")
    if lib is None:
        return None
    for fn in (lib.rms_norm_f32, lib.rms_norm_bf16):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                       ctypes.c_float, ctypes.c_int]
    return lib


@lru_cache(maxsize=1)
def load_rope_kv() -> ctypes.CDLL | None:
    """The compiled RoPE + KV-cache store (``rope_kv.c``, fp32 and bf16), or None like the attention
    kernel."""
    lib = _compile("rope_kv")
    if lib is None:
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.rope_kv_f32, lib.rope_kv_bf16):
        fn.restype = None
        fn.argtypes = [pointer, integer, pointer, integer, pointer, pointer, pointer, pointer, pointer, pointer,
                       pointer, integer, integer, integer, integer, integer, integer]
    return lib


@lru_cache(maxsize=1)
def load_silu_mul() -> ctypes.CDLL | None:
    """The compiled SwiGLU activation (``silu_mul.c``, fp32 and bf16), or None like the attention
    kernel."""
    lib = _compile("silu_mul")
    if lib is None:
        return None
    for fn in (lib.silu_mul_f32, lib.silu_mul_bf16):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def _compile(name: str) -> ctypes.CDLL | None:
    """``<name>.c`` compiled once per machine and source version into the cache, then loaded."""
    if os.environ.get("CHORAL_NO_KERNELS") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    source_path = KERNEL_DIR / f"{name}.c"
    source = source_path.read_bytes()
    # -march=native ties the binary to this CPU, so the machine is part of the key.
    headers = b"".join(p.read_bytes() for p in sorted(KERNEL_DIR.glob("*.h")))
    key = hashlib.sha256(source + headers + Path(__file__).read_bytes() + _cpu_flags()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        if compiler is None:
            logger.warning("choral: no C compiler found; %s falls back to torch", name)
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / "lib.so"
            # Reassociation lets gcc vectorize the dot-product reductions; no -ffast-math, so
            # infinities (the softmax's running max starts at -inf) keep their meaning.
            cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                   "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
                   "-o", str(out), str(source_path), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                logger.warning("choral: compiling %s failed (%s); falling back to torch",
                               source_path.name, result.stderr.strip()[:500])
                return None
            os.replace(out, target)  # atomic: concurrent builders never see half a file
    return ctypes.CDLL(str(target))


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith(b"flags"):
                    return line
    except OSError:
        pass
    return b""
