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
from typing import Any

from choral.progress import step

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent


def cache_dir() -> Path:
    root = os.environ.get("CHORAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "choral"
    )
    return Path(root) / "kernels"


_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float  # pointer, int, float arguments


def _load(name: str, signatures: dict[str, list[Any]]) -> ctypes.CDLL | None:
    """``<name>.c`` compiled and loaded, with each listed function's argument types set (all
    return void), or None when no compiler is available (or CHORAL_NO_KERNELS=1)."""
    lib = _compile(name)
    if lib is None:
        return None
    for function, argtypes in signatures.items():
        fn = getattr(lib, function)
        fn.restype = None
        fn.argtypes = argtypes
    return lib


@lru_cache(maxsize=1)
def load_paged_attention() -> ctypes.CDLL | None:
    """The compiled attention kernel (fp32, bf16, fp16), or None."""
    args = [_P] * 4 + [_I, _P, _P] + [_I] * 6 + [_F, _P, _I]
    return _load("paged_attention", {f"paged_attention_{s}": args for s in ("f32", "bf16", "f16")})


@lru_cache(maxsize=1)
def load_small_gemm() -> ctypes.CDLL | None:
    """The compiled packed-weight GEMM (``small_gemm.c``, fp32 and bf16 weights), or None."""
    signatures: dict[str, list[Any]] = {}
    for suffix in ("f32", "bf16"):
        signatures[f"small_gemm_pack_{suffix}"] = [_P] * 2 + [_I] * 2
        signatures[f"small_gemm_{suffix}"] = [_P] * 4 + [_I] * 5
    return _load("small_gemm", signatures)


@lru_cache(maxsize=1)
def load_rms_norm() -> ctypes.CDLL | None:
    """The compiled RMSNorm (``rms_norm.c``, fp32 and bf16), or None."""
    args = [_P, _I, _P, _P, _I, _I, _F, _I]
    return _load("rms_norm", {f"rms_norm_{s}": args for s in ("f32", "bf16")})


@lru_cache(maxsize=1)
def load_rope_kv() -> ctypes.CDLL | None:
    """The compiled RoPE + KV-cache store (``rope_kv.c``, fp32 and bf16), or None."""
    args = [_P, _I, _P, _I] + [_P] * 7 + [_I] * 6
    return _load("rope_kv", {f"rope_kv_{s}": args for s in ("f32", "bf16")})


@lru_cache(maxsize=1)
def load_silu_mul() -> ctypes.CDLL | None:
    """The compiled SwiGLU activation (``silu_mul.c``, fp32 and bf16), or None."""
    args = [_P, _I, _P, _I, _I, _I]
    return _load("silu_mul", {f"silu_mul_{s}": args for s in ("f32", "bf16")})


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
            with step(f"compiling the {name} kernel (once per machine and version)"):
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
