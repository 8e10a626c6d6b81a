"""Progress lines for slow start-up steps (loading, compiling kernels, building caches).

``with step("loading weights"):`` prints nothing when the step ends within a second; a slower step
gets one line on stderr when it passes the second (``choral: loading weights ...``) and one when it
ends (``choral: loading weights: done in 3.2 s``), so a first run never sits on a blank screen and
a warm start stays quiet.

Lines go to stderr when it is a terminal, or always with ``CHORAL_PROGRESS=1``; ``CHORAL_PROGRESS=0``
silences them. The command line turns them on with :func:`set_enabled`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

THRESHOLD_S = 1.0
_enabled: bool | None = None  # None: decided by CHORAL_PROGRESS / whether stderr is a terminal
_lock = threading.Lock()


def set_enabled(enabled: bool | None) -> bool | None:
    """Force progress lines on or off (None: back to the environment's choice); returns the
    previous setting, to restore."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    env = os.environ.get("CHORAL_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _write(stream: TextIO, line: str) -> None:
    with _lock:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must never fail a load
            pass


@contextmanager
def step(what: str, threshold_s: float = THRESHOLD_S) -> Iterator[None]:
    """Announce ``what`` if it is still running after ``threshold_s`` seconds, and its end then."""
    if not enabled():
        yield
        return
    stream = sys.stderr
    start = time.perf_counter()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        _write(stream, f"choral: {what} ...")

    timer = threading.Timer(threshold_s, announce)
    timer.daemon = True
    timer.start()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        timer.cancel()
        if announced.is_set():
            outcome = "failed" if failed else "done"
            _write(stream, f"choral: {what}: {outcome} in {time.perf_counter() - start:.1f} s")
