"""Process groups with Erlang `pg` semantics, cluster-wide through the database.

Membership is eventually consistent and read from a local snapshot: `join` and
`leave` change this node's snapshot at once (monitors see them at once) and
are written to the database in batches by the node's cluster loop; other
nodes apply them by tailing the group log. A pid may join a group several
times and stays a member until it left as often. Members on a dead node, and
every membership of an exited process, are removed (a leave event repeats the
pid once per join).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from mainspring.cluster.process import Pid
from mainspring.cluster.store import ClusterStore, GroupRow
from mainspring.errors import ConfigError

if TYPE_CHECKING:
    from mainspring.cluster.node import Cluster

DEFAULT_SCOPE = "default"


@dataclass(frozen=True, slots=True)
class GroupEvent:
    """Pids joined ('join') or left ('leave') a group; a pid appears once per join or leave."""

    kind: str
    group: str
    pids: list[str]


@dataclass(frozen=True, slots=True)
class GroupOverflow:
    """The monitor's buffer filled: events were dropped. Re-read `members()` and go on."""

    group: str | None


class GroupMonitor:
    """Join and leave events of one group (or of every group of a scope), from the moment
    the snapshot returned with it was taken; a bounded buffer with an overflow marker."""

    def __init__(self, scope: Scope, group: str | None, buffer: int) -> None:
        self.scope = scope
        self.group = group
        self._queue: asyncio.Queue[GroupEvent | GroupOverflow] = asyncio.Queue(buffer)
        self._overflowed = False

    def _push(self, event: GroupEvent) -> None:
        if self._overflowed:
            return
        if self._queue.qsize() >= self._queue.maxsize - 1:
            self._overflowed = True
            self._queue.put_nowait(GroupOverflow(self.group))
            return
        self._queue.put_nowait(event)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> GroupEvent | GroupOverflow:
        event = await self._queue.get()
        if isinstance(event, GroupOverflow):
            self._overflowed = False
        return event

    def get_nowait(self) -> GroupEvent | GroupOverflow | None:
        """The next buffered event, or None."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        """Stop receiving events."""
        self.scope._monitors.discard(self)


class Scope:
    """One independent pg scope: its own groups, members and monitors."""

    def __init__(self, groups: Groups, name: str) -> None:
        self.groups = groups
        self.name = name
        self._members: dict[str, Counter[str]] = {}
        self._monitors: set[GroupMonitor] = set()

    # -- writes (local at once, cluster-wide soon) ------------------------------------

    async def join(self, group: str | Iterable[str], pid: str) -> None:
        """Add `pid` to one group or several (all of them, or none on a bad pid)."""
        Pid.parse(pid)
        names = [group] if isinstance(group, str) else list(group)
        for g in names:
            self._apply(g, pid, 1)
        await self.groups._write([(self.name, g, pid, Pid.parse(pid).node, 1) for g in names])

    async def leave(self, group: str | Iterable[str], pid: str) -> bool:
        """Remove one join of `pid` from each group; False when it was in none of them."""
        names = [group] if isinstance(group, str) else list(group)
        left = [g for g in names if self._members.get(g, Counter())[pid] > 0]
        for g in left:
            self._apply(g, pid, -1)
        if left:
            node = Pid.parse(pid).node
            await self.groups._write([(self.name, g, pid, node, -1) for g in left])
        return bool(left)

    # -- reads (the local snapshot) ---------------------------------------------------

    def members(self, group: str) -> list[str]:
        """Every member pid, once per join, across the cluster."""
        return sorted(self._members.get(group, Counter()).elements())

    def local_members(self, group: str) -> list[str]:
        """Members on this node, once per join."""
        node = self.groups.cluster.node_name
        return [p for p in self.members(group) if Pid.parse(p).node == node]

    def which_groups(self) -> list[str]:
        return sorted(g for g, c in self._members.items() if c)

    def which_local_groups(self) -> list[str]:
        node = self.groups.cluster.node_name
        return sorted(
            g for g, c in self._members.items() if any(Pid.parse(p).node == node for p in c)
        )

    def monitor(
        self, group: str | None = None, *, buffer: int = 1024
    ) -> tuple[list[str] | dict[str, list[str]], GroupMonitor]:
        """(snapshot, events): the group's members now and every join/leave after, with no
        gap or overlap between them (both are taken in one step of the local snapshot).
        With group None: {group: members} of the whole scope and every group's events."""
        if buffer < 2:
            raise ConfigError(f"monitor buffer must be >= 2, got {buffer}")
        watcher = GroupMonitor(self, group, buffer)
        self._monitors.add(watcher)
        if group is None:
            return {g: self.members(g) for g in self.which_groups()}, watcher
        return self.members(group), watcher

    async def broadcast(self, group: str, msg: Any) -> int:
        """Send `msg` to every member process (durably, once per member); returns how many."""
        return await self._send(self.members(group), msg)

    async def broadcast_local(self, group: str, msg: Any) -> int:
        """Send `msg` to the members on this node; returns how many."""
        return await self._send(self.local_members(group), msg)

    async def _send(self, pids: Sequence[str], msg: Any) -> int:
        targets = sorted({Pid.parse(p).child_id for p in pids})
        hub = self.groups.cluster.hub
        await asyncio.gather(*(hub.send(child_id, msg) for child_id in targets))
        return len(targets)

    # -- the snapshot ------------------------------------------------------------------

    def _apply(self, group: str, pid: str, delta: int) -> None:
        counts = self._members.setdefault(group, Counter())
        counts[pid] += delta
        if counts[pid] <= 0:
            del counts[pid]
        if not counts:
            del self._members[group]
        if self._monitors:
            event = GroupEvent("join" if delta > 0 else "leave", group, [pid] * abs(delta))
            for watcher in list(self._monitors):
                if watcher.group is None or watcher.group == group:
                    watcher._push(event)


class Groups:
    """`app.groups`: the default scope's API, `scope(name)` for others, and the snapshot
    upkeep the node's cluster loop runs (tail the log, flush local writes, clean up)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.origin = uuid.uuid4().hex
        self._scopes: dict[str, Scope] = {}
        self._seq = -1  # log position applied; -1 until the snapshot is loaded
        self._pending: list[GroupRow] = []
        self.default = self.scope(DEFAULT_SCOPE)

    def scope(self, name: str) -> Scope:
        """An independent scope (created on first use)."""
        found = self._scopes.get(name)
        if found is None:
            found = self._scopes[name] = Scope(self, name)
        return found

    # The default scope's API, so `app.groups.join(...)` reads like `pg:join(...)`.
    async def join(self, group: str | Iterable[str], pid: str) -> None:
        await self.default.join(group, pid)

    async def leave(self, group: str | Iterable[str], pid: str) -> bool:
        return await self.default.leave(group, pid)

    def members(self, group: str) -> list[str]:
        return self.default.members(group)

    def local_members(self, group: str) -> list[str]:
        return self.default.local_members(group)

    def which_groups(self) -> list[str]:
        return self.default.which_groups()

    def which_local_groups(self) -> list[str]:
        return self.default.which_local_groups()

    def monitor(
        self, group: str | None = None, *, buffer: int = 1024
    ) -> tuple[list[str] | dict[str, list[str]], GroupMonitor]:
        return self.default.monitor(group, buffer=buffer)

    async def broadcast(self, group: str, msg: Any) -> int:
        return await self.default.broadcast(group, msg)

    async def broadcast_local(self, group: str, msg: Any) -> int:
        return await self.default.broadcast_local(group, msg)

    # -- upkeep ------------------------------------------------------------------------

    async def _write(self, rows: list[GroupRow]) -> None:
        self._pending.extend(rows)
        if self.cluster.serving:
            self.cluster.wake()  # the cluster loop flushes soon, in a batch
        else:
            await self.flush()

    async def refresh(self) -> None:
        """Bring the local snapshot up to date now (in a process without a cluster loop,
        whose snapshot is otherwise only what it wrote itself)."""
        await self.sync(await self.cluster.store())

    async def flush(self) -> None:
        """Write this node's pending joins and leaves to the database now."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            await (await self.cluster.store()).group_apply(rows, self.origin)
        except BaseException:
            self._pending[:0] = rows
            raise

    async def sync(self, cs: ClusterStore) -> None:
        """Bring the local snapshot up to the group log (reloading it when too far behind)."""
        while True:
            if self._seq < 0:
                await self._reload(cs)
            start, entries = await cs.group_tail(self._seq, 5000)
            if start > self._seq + 1:
                self._seq = -1  # the log was pruned past us: reload the snapshot
                continue
            for seq, (scope, group, pid, _node, delta), origin in entries:
                self._seq = seq
                if origin != self.origin:
                    self.scope(scope)._apply(group, pid, delta)
            if len(entries) < 5000:
                return

    async def _reload(self, cs: ClusterStore) -> None:
        head, rows = await cs.group_snapshot()
        current: dict[tuple[str, str], Counter[str]] = {}
        for scope, group, pid, _node, count in rows:
            current.setdefault((scope, group), Counter())[pid] = count
        for rscope, group, pid, _node, delta in self._pending:  # not yet written: ours still
            current.setdefault((rscope, group), Counter())[pid] += delta
        # Turn the difference into events, so monitors stay consistent.
        keys = set(current) | {(s.name, g) for s in self._scopes.values() for g in s._members}
        for scope, group in keys:
            target = current.get((scope, group), Counter())
            have = self.scope(scope)._members.get(group, Counter())
            for pid in set(target) | set(have):
                delta = target[pid] - have[pid]
                if delta:
                    self.scope(scope)._apply(group, pid, delta)
        self._seq = head

    async def remove_pids(self, pids: Sequence[str]) -> None:
        """Processes exited: drop every membership of theirs (here at once, then everywhere)."""
        gone = set(pids)
        for scope in self._scopes.values():
            for group, counts in list(scope._members.items()):
                for pid in gone & set(counts):
                    scope._apply(group, pid, -counts[pid])
        self._pending = [r for r in self._pending if r[2] not in gone]
        await (await self.cluster.store()).group_remove(None, list(gone), self.origin)

    async def remove_nodes(self, cs: ClusterStore, alive: set[str]) -> None:
        """Drop members on nodes that are not alive (this node's view of the cluster)."""
        nodes = {
            Pid.parse(p).node for s in self._scopes.values() for c in s._members.values() for p in c
        }
        dead = sorted(nodes - alive - {self.cluster.node_name})
        if dead:
            for scope, group, pid, _node, count in await cs.group_remove(dead, None, self.origin):
                have = self.scope(scope)._members.get(group, Counter())[pid]
                if have:
                    self.scope(scope)._apply(group, pid, -min(count, have))
