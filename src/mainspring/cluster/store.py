"""The cluster's persistence contract: every database interaction of mainspring.cluster.

One class per backend fulfils it (cluster/postgres.py, cluster/sqlite.py) on
top of that backend's open Store, with named SQL in store/sql/<backend>.sql.
Values cross this interface as JSON text; times are the database's.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mainspring.store.base import Store

CHANNEL = "mainspring_cluster"


@dataclass(frozen=True, slots=True)
class Claim:
    """An instance this node now runs: the child, its new incarnation and its last state."""

    child_id: str
    name: str
    args: str | None
    metadata: str | None
    state_data: str | None
    incarnation: int


@dataclass(frozen=True, slots=True)
class Mail:
    """One durable message taken from a child's mailbox."""

    seq: int
    child_id: str
    body: str
    reply_to: str | None
    stale: bool  # sent to a name whose holder changed since: never delivered


GroupRow = tuple[str, str, str, str, int]  # scope, group, pid, node, count or delta


def net_deltas(rows: Sequence[GroupRow]) -> list[GroupRow]:
    """One row per member with the sum of its deltas (an upsert touches each row once)."""
    sums: dict[tuple[str, str, str], list[Any]] = {}
    for scope, group, pid, node, delta in rows:
        entry = sums.setdefault((scope, group, pid), [node, 0])
        entry[1] += delta
    return [(s, g, p, n, d) for (s, g, p), (n, d) in sums.items()]


class ClusterStore(abc.ABC):
    """What the cluster layer asks of the database; each call is one round trip."""

    # -- kv ------------------------------------------------------------------------

    @abc.abstractmethod
    async def kv_get(self, key: str) -> tuple[str, int] | None:
        """A live key's (value, revision); None when absent, deleted or expired."""

    @abc.abstractmethod
    async def kv_put(self, key: str, value: str, ttl: float | None) -> int:
        """Set a key (expiring after `ttl` seconds); returns its new revision."""

    @abc.abstractmethod
    async def kv_delete(self, key: str) -> int | None:
        """Delete a live key; returns the revision of the delete, None when it was absent."""

    @abc.abstractmethod
    async def kv_cas(
        self, key: str, expected: str | None, new: str, ttl: float | None
    ) -> int | None:
        """Set `key` to `new` only if its value equals `expected` (None: absent), atomically
        (linearizable: one row, one statement). Returns the new revision, None if it differed."""

    @abc.abstractmethod
    async def kv_scan(self, prefix: str) -> list[tuple[str, str, int]]:
        """Live (key, value, revision) under a prefix, in key order."""

    @abc.abstractmethod
    async def kv_changes(
        self, after: int, prefix: str, limit: int
    ) -> tuple[int, list[tuple[str, str | None, int]]]:
        """(oldest revision kept, [(key, value or None for a delete, revision)] under a
        prefix after `after`, in revision order). Revisions commit in order, so reading
        past `after` never skips; a reader behind the oldest revision kept missed some."""

    @abc.abstractmethod
    async def kv_head(self) -> int:
        """The latest revision (0 when empty)."""

    @abc.abstractmethod
    async def kv_expire(self, tombstone_age: float) -> int:
        """Turn expired keys into deletes (watchers see them) and forget tombstones older
        than `tombstone_age` seconds; returns how many keys expired."""

    # -- registry ------------------------------------------------------------------

    @abc.abstractmethod
    async def name_register(self, name: str, pid: str, node: str, ttl: float) -> int | None:
        """Take a name: free, held on a node silent for `ttl`, or already this pid's (same
        token). Returns the fencing token (monotonic per name), None when held by another."""

    @abc.abstractmethod
    async def name_lookup(self, name: str, ttl: float) -> tuple[str, int] | None:
        """(pid, token) of a name held on a live node, else None."""

    @abc.abstractmethod
    async def name_unregister(self, name: str, pid: str | None) -> bool:
        """Free a name (only if `pid` holds it, when given)."""

    @abc.abstractmethod
    async def names_release(self, pids: Sequence[str] | None, ttl: float) -> list[str]:
        """Free the names of these pids (exited); with None, those on nodes silent for `ttl`."""

    @abc.abstractmethod
    async def names(self) -> list[tuple[str, str, str, int]]:
        """Every held (name, pid, node, token)."""

    # -- process groups ------------------------------------------------------------

    @abc.abstractmethod
    async def group_apply(self, rows: Sequence[GroupRow], origin: str) -> None:
        """Add (scope, group, pid, node, delta) to membership counts and append each to the
        group log in order, in one transaction; members reaching 0 are removed."""

    @abc.abstractmethod
    async def group_remove(
        self, nodes: Sequence[str] | None, pids: Sequence[str] | None, origin: str
    ) -> list[GroupRow]:
        """Remove every membership of pids on `nodes` (or these `pids`), logging each as a
        negative delta; returns the removed (scope, group, pid, node, count)."""

    @abc.abstractmethod
    async def group_snapshot(self) -> tuple[int, list[GroupRow]]:
        """(log position, whole membership) read consistently in one transaction."""

    @abc.abstractmethod
    async def group_tail(
        self, after: int, limit: int
    ) -> tuple[int, list[tuple[int, GroupRow, str]]]:
        """(oldest position kept, [(seq, (scope, group, pid, node, delta), origin)] after
        `after` in order). A reader behind the oldest position must reload the snapshot."""

    @abc.abstractmethod
    async def group_prune(self, age: float) -> None:
        """Forget group log entries older than `age` seconds."""

    # -- hub membership ------------------------------------------------------------

    @abc.abstractmethod
    async def hub_join(self, node: str) -> None:
        """This node serves the hub (and is not draining)."""

    @abc.abstractmethod
    async def hub_leave(self, node: str) -> None:
        """This node no longer serves the hub."""

    @abc.abstractmethod
    async def hub_drain(self, node: str) -> None:
        """Leave `node` out of placement from now on."""

    @abc.abstractmethod
    async def hub_topology(self, ttl: float) -> list[tuple[str, bool, bool, float | None]]:
        """Every hub node as (node, draining, alive within `ttl`, heartbeat age in seconds)."""

    @abc.abstractmethod
    async def hub_prune(self, ttl: float) -> list[str]:
        """Forget hub nodes silent for `ttl` seconds; returns them."""

    # -- processes -----------------------------------------------------------------

    @abc.abstractmethod
    async def proc_insert(self, rows: Sequence[tuple[str, str, str, str, str | None]]) -> set[str]:
        """Insert children (child_id, name, args, metadata, nodes as JSON); returns the ids
        inserted (an existing child id is left as it is)."""

    @abc.abstractmethod
    async def proc_list(self) -> list[tuple[str, str, str, str | None, str, int, str | None]]:
        """Every child as (child_id, name, state, nodes, metadata, incarnation, error)."""

    @abc.abstractmethod
    async def proc_instances(self) -> list[tuple[str, str, str, int]]:
        """Every running instance as (child_id, node, role, incarnation)."""

    @abc.abstractmethod
    async def proc_get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Children by id: child_id, name, state, error, metadata, nodes, incarnations."""

    @abc.abstractmethod
    async def proc_drop_instances(self, nodes: Sequence[str]) -> list[tuple[str, str, int]]:
        """Remove every instance on these (dead) nodes; returns (child_id, node, incarnation)."""

    @abc.abstractmethod
    async def proc_claim(self, ids: Sequence[str], node: str, role: str) -> list[Claim]:
        """Start instances of running children on `node` with a new incarnation each. A child
        that already has an active instance (or one on `node`) is skipped: the database
        guarantees at most one active instance per child."""

    @abc.abstractmethod
    async def proc_release(
        self, node: str, rows: Sequence[tuple[str, int, str | None]]
    ) -> set[str]:
        """Give up instances (child_id, incarnation, handover state or None) of `node`,
        keeping each state for the next owner; returns the ids released."""

    @abc.abstractmethod
    async def proc_transfer(
        self, node: str, rows: Sequence[tuple[str, int, str | None, str]]
    ) -> list[tuple[str, str, int]]:
        """Move active instances (child_id, incarnation, state, target) from `node` to their
        targets atomically (no moment without an owner); returns (child_id, target, incarnation)."""

    @abc.abstractmethod
    async def proc_ready(self, node: str, rows: Sequence[tuple[str, int]]) -> None:
        """Record that these instances (child_id, incarnation) of `node` finished `init`."""

    @abc.abstractmethod
    async def proc_state(self, child_id: str) -> tuple[str | None, str | None]:
        """A child's (args, last handover or checkpoint state), as JSON text."""

    @abc.abstractmethod
    async def proc_promote(self, child_id: str, node: str) -> None:
        """Make `node`'s passive replica the active instance (raises if one is active)."""

    @abc.abstractmethod
    async def proc_checkpoint(self, child_id: str, node: str, incarnation: int, state: str) -> bool:
        """Persist a child's state if this instance still runs it."""

    @abc.abstractmethod
    async def proc_fail(self, child_id: str, node: str, error: str) -> None:
        """Mark a child failed with its error and remove its instance on `node`."""

    @abc.abstractmethod
    async def proc_stop(self, ids: Sequence[str]) -> set[str]:
        """Ask for children to stop; returns the ids that exist."""

    @abc.abstractmethod
    async def proc_drop_local(self, ids: Sequence[str], node: str) -> None:
        """Remove the instances of these children on `node` (terminated there)."""

    @abc.abstractmethod
    async def proc_delete_stopped(self, ids: Sequence[str]) -> set[str]:
        """Delete stopping or failed children no instance runs, with their mailboxes."""

    # -- mailboxes -----------------------------------------------------------------

    @abc.abstractmethod
    async def mailbox_put(
        self, rows: Sequence[tuple[str, str, str | None, str | None, int | None]]
    ) -> None:
        """Append messages (child_id, body, reply_to, name, token) durably, in order."""

    @abc.abstractmethod
    async def mailbox_take(
        self, ids: Sequence[str], node: str, inflight: Sequence[int], limit: int
    ) -> list[Mail]:
        """Messages of these children, for their instances on `node` only (a node that lost a
        child gets nothing), skipping seqs in flight, oldest first."""

    @abc.abstractmethod
    async def mailbox_ack(self, seqs: Sequence[int]) -> None:
        """Delete handled messages."""

    @abc.abstractmethod
    async def reply_put(self, rows: Sequence[tuple[str, str | None, str | None]]) -> None:
        """Store answers (call id, body, error) for remote callers."""

    @abc.abstractmethod
    async def reply_take(self, ids: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
        """Take the answers that arrived for these calls."""

    @abc.abstractmethod
    async def prune(self, age: float) -> None:
        """Forget unanswered replies and orphan messages older than `age` seconds."""

    # -- events --------------------------------------------------------------------

    @abc.abstractmethod
    async def notify(self, text: str) -> None:
        """Tell every hub something changed ('proc', 'mb:<ids>', 'rp:<ids>', 'top', 'pg')."""

    @abc.abstractmethod
    async def listen(self, callback: Callable[[str], None]) -> bool:
        """Call `callback` for notifications; False when other processes' writes must be
        noticed by polling `changed()` instead (SQLite)."""

    @abc.abstractmethod
    async def unlisten(self) -> None:
        """Stop calling the callback."""

    def listening(self) -> bool:
        """True while pushed notifications arrive (never, on a polling backend)."""
        return False

    @abc.abstractmethod
    async def changed(self) -> bool:
        """Whether another connection wrote since the last call (polling backends)."""


_adapters: weakref.WeakKeyDictionary[Store, ClusterStore] = weakref.WeakKeyDictionary()


def cluster_store(store: Store) -> ClusterStore:
    """The cluster interface over an open store (one per store)."""
    adapter = _adapters.get(store)
    if adapter is None:
        if store.backend == "postgres":
            from mainspring.cluster.postgres import PostgresCluster

            adapter = PostgresCluster(store)  # type: ignore[arg-type]
        else:
            from mainspring.cluster.sqlite import SqliteCluster

            adapter = SqliteCluster(store)  # type: ignore[arg-type]
        _adapters[store] = adapter
    return adapter
