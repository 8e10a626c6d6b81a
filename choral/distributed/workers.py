"""The tensor-parallel worker processes (ranks 1 .. N-1): started, watched, stopped.

Workers are fresh interpreters (``python -m <module> HOST PORT RANK``), not multiprocessing
children: a spawned multiprocessing child re-imports the user's ``__main__``, which runs a script
without an ``if __name__ == "__main__"`` guard a second time. Each worker reads its
instructions from the group's TCPStore.

No orphans: every worker holds the read end of a pipe from rank 0 (its stdin) and exits when it
reaches end of file, which happens when rank 0 closes it (``close``) or dies, however it dies.
``close`` also runs from a ``weakref.finalize`` (garbage collection, interpreter exit).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerExit:
    """A worker that is no longer running."""

    rank: int
    pid: int
    returncode: int

    def describe(self) -> str:
        code = self.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"tensor-parallel worker rank {self.rank} (pid {self.pid}) {how}"


class WorkerProcesses:
    """Ranks 1 .. world-1 as child processes of this one."""

    def __init__(self, module: str, host: str, port: int, world: int, env: dict[str, str] | None = None):
        # The workers import choral from where this process did, whatever sys.path the caller built.
        root = str(Path(__file__).resolve().parents[2])
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(1, world):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", module, host, str(port), str(rank)],
                    stdin=subprocess.PIPE, env=child_env))
        except BaseException:
            _stop(self.procs, 1.0)
            raise
        self._finalizer = weakref.finalize(self, _stop, self.procs, 10.0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def exited(self) -> list[WorkerExit]:
        """The workers that have stopped running (none while all are well)."""
        return [WorkerExit(rank, p.pid, p.returncode) for rank, p in enumerate(self.procs, start=1)
                if p.poll() is not None]

    def close(self, timeout_s: float = 10.0) -> None:
        """Let every worker go (end of its stdin), wait up to ``timeout_s``, then kill. Idempotent."""
        self._finalizer.detach()
        _stop(self.procs, timeout_s)


def _stop(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    for p in procs:
        if p.stdin is not None and not p.stdin.closed:
            try:
                p.stdin.close()
            except OSError:  # already broken: the worker is gone
                pass
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("tensor-parallel worker pid %d did not stop in %.0f s: killing it", p.pid, timeout_s)
            p.kill()
            p.wait()
