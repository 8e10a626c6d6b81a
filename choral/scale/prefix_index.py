"""What a router believes each replica caches: the replica's last report, plus the prompts the
router sent it since (assumed cached for a while, since the report lags behind).

The router asks one thing of it: for each replica, how many leading blocks of a prompt's hash
chain it holds. Chained hashes make that a walk: block i's hash covers every token before it, so
the walk stops at the first block the replica lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class _Replica:
    reported: frozenset[int] = frozenset()  # the hashes of the replica's last report
    report_version: int = -1
    pending: dict[int, float] = field(default_factory=dict)  # hash -> when the router routed it there


class PrefixIndex:
    """Per replica: reported cached hashes and recently routed (pending) ones."""

    def __init__(self, pending_ttl_s: float, clock: Callable[[], float]):
        self.pending_ttl_s = pending_ttl_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget replicas that are gone (a restarted replica starts with an empty cache)."""
        live = set(keys)
        for key in [k for k in self._replicas if k not in live]:
            del self._replicas[key]

    def report(self, key: str, version: int, hashes: Iterable[int]) -> None:
        """The replica's own account of what it caches (a newer ``version`` replaces the last)."""
        replica = self._replicas.setdefault(key, _Replica())
        if version <= replica.report_version:
            return
        replica.reported = frozenset(hashes)
        replica.report_version = version
        # What the report now confirms need not be remembered as pending.
        for h in [h for h in replica.pending if h in replica.reported]:
            del replica.pending[h]

    def routed(self, key: str, hashes: Sequence[int]) -> None:
        """A prompt with ``hashes`` was sent to ``key``: assume its blocks cached there for now."""
        replica = self._replicas.setdefault(key, _Replica())
        now = self._clock()
        for h in hashes:
            if h not in replica.reported:
                replica.pending[h] = now

    def matched_blocks(self, key: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` ``key`` is believed to cache."""
        replica = self._replicas.get(key)
        if replica is None:
            return 0
        oldest = self._clock() - self.pending_ttl_s
        count = 0
        for h in hashes:
            if h in replica.reported or replica.pending.get(h, -1.0) >= oldest:
                count += 1
            else:
                break
        return count

    def num_blocks(self, key: str) -> int:
        """Blocks ``key`` is believed to cache (reported plus live pending)."""
        replica = self._replicas.get(key)
        if replica is None:
            return 0
        self._expire(replica)
        return len(replica.reported) + len(replica.pending)

    def _expire(self, replica: _Replica) -> None:
        oldest = self._clock() - self.pending_ttl_s
        for h in [h for h, t in replica.pending.items() if t < oldest]:
            del replica.pending[h]
