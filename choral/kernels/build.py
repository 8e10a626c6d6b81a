"""Compile the C kernels (every ``*.c`` next to this file) once per machine and source version, and
load them with ctypes. Nothing here checks arguments: the typed wrappers (``rms_norm.py``,
``paged_attention.py``, ...) are the only callers of what these libraries export.

The first :func:`load_library` call builds every kernel that is not cached yet, all at once (one
compiler process per source, in parallel: the first run costs the slowest kernel, not the sum),
and says so in a progress line (``choral.progress``: on a terminal, or with ``CHORAL_PROGRESS=1``).
Whatever goes wrong ends in the torch fallback with one log line, never an exception:

- no compiler (``$CC`` when set, else ``gcc``, else ``cc``), or ``CHORAL_NO_KERNELS=1`` (silent);
- a compiler that fails, or runs past ``CHORAL_KERNEL_BUILD_TIMEOUT`` seconds (default 300): it
  is killed with its children;
- a cache directory (``$CHORAL_CACHE_DIR/kernels``, else ``~/.cache/choral/kernels``) that is a
  file or not writable: a private directory under the system temp dir is used instead (a
  read-only cache that already holds the libraries is still used as is);
- a cached library that is truncated or does not load: it is rebuilt;
- two processes building at once: a file lock makes one wait for the other, and every library
  appears by an atomic rename, so a loader never sees half a file (even without the lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from choral.errors import ConfigError
from choral.progress import step

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the atomic renames alone keep the cache consistent
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent
DEFAULT_TIMEOUT_S = 300.0
COMPILING = "compiling CPU kernels (first run only, ~1 min)"
# Reassociation lets gcc vectorize the dot-product reductions; no -ffast-math, so infinities (the
# softmax's running max starts at -inf) keep their meaning. -march=native ties the binary to this
# CPU, so the CPU's flags are part of the cache key.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math"]


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$CHORAL_CACHE_DIR/kernels``, else under
    ``$XDG_CACHE_HOME`` or ``~/.cache``. (:func:`build` falls back to a temp dir when this one
    cannot be written.)"""
    root = os.environ.get("CHORAL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "choral"
    )
    return Path(root) / "kernels"


_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] | None = None


def load_library(name: str) -> ctypes.CDLL | None:
    """The compiled ``choral/kernels/<name>.c``, or None when the torch fallback applies. The
    first call in a process builds every kernel (see the module docstring); later calls are a
    dict lookup."""
    global _libraries
    if os.environ.get("CHORAL_NO_KERNELS") == "1":
        return None
    with _lock:
        if _libraries is None:
            names = sorted(p.stem for p in KERNEL_DIR.glob("*.c"))
            _libraries = build(KERNEL_DIR, names, timeout=build_timeout())
    return _libraries.get(name)


def build_timeout() -> float:
    """``CHORAL_KERNEL_BUILD_TIMEOUT`` in seconds (default 300)."""
    raw = os.environ.get("CHORAL_KERNEL_BUILD_TIMEOUT")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"CHORAL_KERNEL_BUILD_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


def find_compiler() -> tuple[list[str] | None, str]:
    """(the compiler command, or None; what was looked for). ``$CC`` wins when set (it may carry
    arguments, ``ccache gcc``); a CC that does not resolve is not replaced by another compiler."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        words = shlex.split(cc)
        path = shutil.which(words[0])
        return ([path, *words[1:]] if path else None), f"CC={cc}"
    for candidate in ("gcc", "cc"):
        path = shutil.which(candidate)
        if path:
            return [path], candidate
    return None, "gcc or cc on PATH"


def build(source_dir: Path, names: list[str], timeout: float) -> dict[str, ctypes.CDLL | None]:
    """Each ``<source_dir>/<name>.c`` loaded from the cache, compiling the missing or damaged ones
    first (in parallel, under the cache's lock). None for a kernel that could not be built."""
    headers = b"".join(p.read_bytes() for p in sorted(source_dir.glob("*.h")))
    salt = headers + Path(__file__).read_bytes() + _cpu_flags()
    files = {name: f"{name}-{_key(source_dir / f'{name}.c', salt)}.so" for name in names}
    dirs = _cache_dirs()
    libs = {name: _load_cached(dirs, file) for name, file in files.items()}
    missing = [name for name, lib in libs.items() if lib is None]
    if not missing:
        return libs
    compiler, looked_for = find_compiler()
    if compiler is None:
        logger.warning("choral: no C compiler (%s); the CPU kernels fall back to torch ops", looked_for)
        return libs
    directory = _writable_dir(dirs)
    failures: dict[str, str] = {}
    with step(COMPILING), _build_lock(directory, timeout):  # waiting on another process's build included
        # Another process may have built them while this one waited for the lock.
        for name in missing:
            libs[name] = _load(directory / files[name])
        todo = {name: (source_dir / f"{name}.c", directory / files[name]) for name in missing if libs[name] is None}
        failures = _compile_all(compiler, todo, directory, timeout)
        for name in todo:
            if name not in failures:
                libs[name] = _load(directory / files[name])
                if libs[name] is None:
                    failures[name] = "the built library does not load"
    if failures:
        detail = "; ".join(f"{name}.c: {why}" for name, why in sorted(failures.items()))
        logger.warning("choral: compiling CPU kernels with %s failed (%s); those kernels fall back to torch ops",
                       compiler[0], detail)
    return libs


def _compile_all(compiler: list[str], todo: dict[str, tuple[Path, Path]], directory: Path,
                 timeout: float) -> dict[str, str]:
    """Run one compiler per source at once; move each library into place by an atomic rename.
    Returns why each failed kernel failed."""
    failures: dict[str, str] = {}
    if not todo:
        return failures
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        running: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
        for name, (source, _) in todo.items():
            out, log = Path(tmp) / f"{name}.so", Path(tmp) / f"{name}.log"
            with open(log, "wb") as err:  # a file, not a pipe: a chatty compiler never blocks
                try:
                    proc = subprocess.Popen([*compiler, *FLAGS, "-o", str(out), str(source), "-lm"],
                                            stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # its own group: killed with cc1 & co
                except OSError as e:
                    failures[name] = f"cannot run it ({e.strerror})"
                    continue
            running[name] = (proc, out, log)
        for name, (proc, out, log) in running.items():
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(proc)
                failures[name] = f"timed out after {timeout:g} s"
                continue
            if code != 0:
                first = next((line for line in log.read_text(errors="replace").splitlines() if "error" in line),
                             f"exit status {code}")
                failures[name] = first.strip()[:300]
                continue
            os.replace(out, todo[name][1])  # atomic: a concurrent loader sees no file or a whole one
    return failures


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, AttributeError):  # already gone, or no process groups here
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def _build_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold ``directory/.build.lock`` while building. A holder stuck past the build timeout is
    not waited for: building without the lock is still safe (renames are atomic), only wasteful."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout + 10.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _cache_dirs() -> list[Path]:
    """Where to look for libraries, in order: the configured cache, then the private temp one."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return [cache_dir(), Path(tempfile.gettempdir()) / f"choral-{uid}" / "kernels"]


def _writable_dir(dirs: list[Path]) -> Path:
    """The first of ``dirs`` that is (or can be made) a directory this process may write, the
    temp one only when no one else controls it (a library loaded from a directory another user
    can write would run their code); else a fresh private directory."""
    configured, fallback = dirs
    if _can_write(configured):
        return configured
    with contextlib.suppress(OSError):
        fallback.parent.mkdir(mode=0o700, exist_ok=True)
    if _private(fallback.parent) and _can_write(fallback):
        chosen = fallback
    else:
        chosen = Path(tempfile.mkdtemp(prefix="choral-kernels-"))
    logger.warning("choral: kernel cache %s is not a writable directory; using %s", configured, chosen)
    return chosen


def _can_write(path: Path) -> bool:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a real write: access() says yes on a read-only mount
            pass
        return True
    except OSError:
        return False


def _private(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


def _load_cached(dirs: list[Path], file: str) -> ctypes.CDLL | None:
    for directory in dirs:
        lib = _load(directory / file)
        if lib is not None:
            return lib
    return None


def _load(path: Path) -> ctypes.CDLL | None:
    """The library at ``path``, or None when it is missing, truncated or does not load (the next
    build replaces it)."""
    if not path.is_file() or not _complete_elf(path):
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        logger.info("cached kernel %s does not load (%s); rebuilding it", path, e)
        return None


def _complete_elf(path: Path) -> bool:
    """False for a file cut short: an ELF's section header table is its tail, so a truncated
    library ends before the table does (dlopen can map such a file and crash on first use).
    Other formats (not Linux) are left to the loader."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # 64-bit: e_shoff at 0x28, e_shentsize and e_shnum at 0x3A
        if len(head) < 64:
            return False
        (shoff,) = struct.unpack_from(order + "Q", head, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", head, 0x3A)
    else:  # 32-bit: e_shoff at 0x20, e_shentsize and e_shnum at 0x2E
        (shoff,) = struct.unpack_from(order + "I", head, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", head, 0x2E)
    return shoff + shentsize * shnum <= size


def _key(source: Path, salt: bytes) -> str:
    return hashlib.sha256(source.read_bytes() + salt).hexdigest()[:16]


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith(b"flags"):
                    return line
    except OSError:
        pass
    return b""
