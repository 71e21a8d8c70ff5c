"""Partition tolerance: when a node sees too few live nodes, the hub is partitioned.

A partitioned node stops its children (the majority side restarts them) and
starts none until the quorum is back; `hub.is_partitioned()` and the
`hub.partitioned` telemetry event say so. A node that cannot keep its own
heartbeat in the database counts only itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mainspring.errors import ConfigError


@dataclass
class StaticQuorum:
    """Partitioned while fewer than `size` nodes are live."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"StaticQuorum(size) must be >= 1, got {self.size}")

    def partitioned(self, live: int) -> bool:
        return live < self.size


@dataclass
class MajorityQuorum:
    """Partitioned while at most half of the largest cluster seen is live
    (quorum floor(max/2) + 1). Call `reset_cluster_size(n)` after shrinking on purpose."""

    initial_cluster_size: int = 1
    _max_seen: int = field(default=0, repr=False)

    def partitioned(self, live: int) -> bool:
        self._max_seen = max(self._max_seen, self.initial_cluster_size, live)
        return live < self._max_seen // 2 + 1

    def reset_cluster_size(self, size: int) -> None:
        self._max_seen = size


Quorum = StaticQuorum | MajorityQuorum
