"""How many CPU threads the forward uses when the caller does not say.

torch's default is one thread per core. On a machine where other processes keep the cores busy,
that collapses: libgomp's workers spin at every barrier waiting for a thread that the kernel has
descheduled, and a 2-core VM with two busy neighbours served 8.6 tok/s at 2 threads against 71.6 at
1. So the default leaves out the cores the 1-minute load average says are taken (never below 1,
never above torch's default). ``OMP_NUM_THREADS`` or an explicit ``num_threads`` always win.
benchmarks/bench_threads.py measures the settings against each other under competing load.
"""

from __future__ import annotations

import os

import torch


def default_num_threads() -> int:
    """torch's thread count, less the cores other processes are using now."""
    base = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return base
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return base
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or base)
    free = int(cores - load + 0.5)
    return max(1, min(base, free))
