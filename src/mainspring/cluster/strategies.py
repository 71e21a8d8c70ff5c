"""Where children run: distribution (which nodes) and redundancy (how many copies).

A distribution strategy maps child ids to an ordered list of live nodes; the
first is the owner (the active replica). `deterministic` strategies give the
same answer for the same node set, so the hub reuses their answer while the
topology signature (a hash of the live node set) is unchanged.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mainspring.errors import ConfigError


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def topology_signature(nodes: Sequence[str]) -> str:
    """A short hash of the live node set: equal sets, equal signatures."""
    return hashlib.blake2b("\n".join(sorted(nodes)).encode(), digest_size=8).hexdigest()


class Distribution(Protocol):
    deterministic: bool

    def belongs_to(
        self,
        children: Mapping[str, Sequence[str] | None],
        nodes: Sequence[str],
        factor: int,
    ) -> dict[str, list[str]]:
        """{child id: up to `factor` nodes, owner first} for children {id: guided nodes}."""
        ...


@dataclass
class ConsistentHashing:
    """A hash ring over the live nodes with `vnodes` points per node: adding a node to N
    moves about 1/(N+1) of the children (only those the new node now owns), never more."""

    vnodes: int = 128
    deterministic: bool = True
    _ring: tuple[str, list[int], list[str]] = field(default=("", [], []), repr=False)

    def __post_init__(self) -> None:
        if self.vnodes < 1:
            raise ConfigError(f"ConsistentHashing(vnodes=...) must be >= 1, got {self.vnodes}")

    def _points(self, nodes: Sequence[str]) -> tuple[list[int], list[str]]:
        signature = topology_signature(nodes)
        if self._ring[0] != signature:
            points = sorted((_hash(f"{n}#{i}"), n) for n in nodes for i in range(self.vnodes))
            self._ring = (signature, [p[0] for p in points], [p[1] for p in points])
        return self._ring[1], self._ring[2]

    def belongs_to(
        self,
        children: Mapping[str, Sequence[str] | None],
        nodes: Sequence[str],
        factor: int,
    ) -> dict[str, list[str]]:
        if not nodes:
            return {c: [] for c in children}
        hashes, owners = self._points(nodes)
        want = min(factor, len(set(nodes)))
        result: dict[str, list[str]] = {}
        size = len(hashes)
        for child in children:
            i = bisect.bisect(hashes, _hash(child)) % size
            picked: list[str] = []
            while len(picked) < want:
                node = owners[i]
                if node not in picked:
                    picked.append(node)
                i = (i + 1) % size
            result[child] = picked
        return result


@dataclass
class Guided:
    """The caller names the node(s) of each child in `ChildSpec(nodes=[...])`; a child
    runs on the first of them that is live (no migration to other nodes)."""

    deterministic: bool = True

    def belongs_to(
        self,
        children: Mapping[str, Sequence[str] | None],
        nodes: Sequence[str],
        factor: int,
    ) -> dict[str, list[str]]:
        live = set(nodes)
        return {c: [n for n in (g or ()) if n in live][:factor] for c, g in children.items()}


@dataclass(frozen=True)
class Singularity:
    """One instance of each child (the default)."""

    factor: int = 1
    mode: str = "single"


@dataclass(frozen=True)
class Replication:
    """Children run on `factor` nodes; the active replica handles the durable mailbox.
    active_active: every replica runs and answers calls made on its own node (reads
    close to the caller); active_passive: the others stand by and one takes over, from
    the last checkpoint, when the active one's node goes. `self.role` says which."""

    factor: int = 2
    mode: Literal["active_active", "active_passive"] = "active_passive"

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ConfigError(f"Replication(factor=...) must be >= 1, got {self.factor}")
        if self.mode not in ("active_active", "active_passive"):
            raise ConfigError(
                f"Replication(mode=...) is 'active_active' or 'active_passive', got {self.mode!r}"
            )


Redundancy = Singularity | Replication
