"""Release the calling thread's OpenMP thread pool before another thread takes over the forwards.

Why: libgomp (torch's OpenMP runtime on Linux, which the C kernels share) gives every thread that
starts a parallel region a pool of worker threads of its own. While more threads are pooled than
there are CPUs, it stops spinning between parallel regions (its throttled spin count), so every
region of a forward wakes its workers through the kernel. The Executor loads the model on the
caller's thread and runs every forward on its loop thread: the loader's idle pool alone put it
over the limit on 2 cores. Measured on an AMD Zen 3 VM (2 cores, fp32, batch-32 decode steps at
context 350, medians of 4 interleaved runs): same thread throughout ~116 ms, loop thread next to
the loader's pool ~150 ms, with that pool released ~125 ms.

OpenMP 5's ``omp_pause_resource_all(omp_pause_hard)`` frees the calling thread's pool in libgomp;
a later parallel region on that thread builds a new one. Runtimes without it (another OpenMP,
or none) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2


def loaded_libgomp() -> ctypes.CDLL | None:
    """The libgomp already in this process (torch's), or None; never loads a second runtime."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:  # no libgomp in this process: nothing pooled by it
        return None


def release_thread_pool() -> bool:
    """Free this thread's libgomp worker pool. True when a loaded libgomp did it."""
    gomp = loaded_libgomp()
    pause = getattr(gomp, "omp_pause_resource_all", None) if gomp is not None else None
    if pause is None:
        return False
    pause.restype = ctypes.c_int
    pause.argtypes = [ctypes.c_int]
    released = pause(_OMP_PAUSE_HARD) == 0
    logger.debug("OpenMP pool of this thread released: %s", released)
    return released
