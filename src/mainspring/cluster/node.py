"""The cluster on one node: `app.cluster` holds the KV, the registry, the process
groups and the hub, and `serve()` is the loop a node runs for them.

A worker runs `serve` as one more of its owned loops; a process without a
worker can run it with `async with app.cluster.running(): ...`. The loop wakes
on LISTEN/NOTIFY (PostgreSQL) or polls PRAGMA data_version (SQLite), and each
turn refreshes the topology, reconciles children, delivers mail, acknowledges
handled messages, and keeps the group snapshot current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

from mainspring.cluster.groups import Groups
from mainspring.cluster.hub import Hub
from mainspring.cluster.kv import KV
from mainspring.cluster.registry import Registry
from mainspring.cluster.store import ClusterStore, cluster_store
from mainspring.engine.loops import wait_event
from mainspring.engine.worker import default_node_name

if TYPE_CHECKING:
    from mainspring.app import App
    from mainspring.engine.worker import Worker
    from mainspring.store.base import Store

log = logging.getLogger("mainspring.cluster")


class Cluster:
    """Everything of the cluster layer for one App on one node."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.node_name = app.node_name or default_node_name()
        self.kv = KV(app)
        self.registry = Registry(app)
        self.groups = Groups(self)
        self.hub = Hub(self)
        self.serving = False
        self._event: asyncio.Event | None = None
        self._flags: set[str] = set()
        self._mail: set[str] | None = set()  # children with new mail; None: all of them
        self._node_cs: ClusterStore | None = None

    async def store(self) -> ClusterStore:
        """The cluster interface over the App's store for the running loop."""
        return cluster_store(await self.app.store())

    async def node_store(self) -> ClusterStore:
        """The serving loop's own connection when serving, else the App's."""
        return self._node_cs if self._node_cs is not None else await self.store()

    def wake(self, what: str | None = None) -> None:
        """Note a notification ('proc', 'top', 'pg', 'rp:<ids>', 'mb:<ids>') and wake the loop."""
        if what:
            kind, _, ids = what.partition(":")
            if kind == "mb":
                self.mark_mail(None if ids == "*" else ids.split(","))
                return
            self._flags.add(kind)
        if self._event is not None:
            self._event.set()

    def mark_mail(self, child_ids: Iterable[str] | None) -> None:
        if child_ids is None:
            self._mail = None
        elif self._mail is not None:
            self._mail.update(c for c in child_ids if c in self.hub._local)
        if self._event is not None:
            self._event.set()

    @contextlib.asynccontextmanager
    async def running(self, name: str | None = None) -> AsyncIterator[Cluster]:
        """Serve the cluster from this process without a worker (it heartbeats its own
        node row) for the duration of the block."""
        if name:
            self.node_name = name
        started = asyncio.Event()
        task = asyncio.create_task(self.serve(None, started))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def serve(
        self, worker: Worker | None = None, started: asyncio.Event | None = None
    ) -> None:
        """The node's cluster loop, until cancelled; on the way out every local child is
        handed over to the other nodes."""
        if worker is not None:
            self.node_name = worker.name
        store = await self.app.open_store()
        cs = cluster_store(store)
        self._node_cs = cs
        self._event = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_notify(text: str) -> None:
            loop.call_soon_threadsafe(self.wake, text)

        push = await cs.listen(on_notify)
        self.serving = True
        try:
            if worker is None:
                await self._heartbeat(store)
            await cs.hub_join(self.node_name)
            await cs.notify("top")
            await self._loop(store, cs, push, on_notify, heartbeat=worker is None, started=started)
        finally:
            self.serving = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.hub.shutdown(cs), timeout=self.app.shutdown_grace)
            with contextlib.suppress(Exception):
                await self.groups.flush()
            if worker is None:
                with contextlib.suppress(Exception):
                    await store.remove_node(self.node_name)
            self._node_cs = None
            await cs.unlisten()
            await store.close()

    async def _heartbeat(self, store: Store) -> None:
        await store.heartbeat_node(self.node_name, [], [], 0, "up")

    async def _loop(
        self,
        store: Store,
        cs: ClusterStore,
        push: bool,
        on_notify: Callable[[str], None],
        *,
        heartbeat: bool,
        started: asyncio.Event | None,
    ) -> None:
        hub, groups, ttl = self.hub, self.groups, self.app.lease_ttl
        assert self._event is not None
        next_topology = next_reconcile = next_beat = next_slow = next_prune = 0.0
        topology_changed = True
        last_ok = time.monotonic()
        while True:
            self._event.clear()
            now = time.monotonic()
            flags, self._flags = self._flags, set()
            mail, self._mail = self._mail, set()
            try:
                if push and not cs.listening():
                    # The notification connection was lost: listen again and catch up
                    # on everything it may have missed.
                    log.warning("cluster notifications on %s lost; listening again", self.node_name)
                    await cs.listen(on_notify)
                    flags |= {"proc", "rp", "pg"}
                    mail = None
                # Pushed or not, a slow turn re-reads everything (a lost notification
                # costs at most a second).
                slow = now >= next_slow
                polled = (not push and await cs.changed()) or slow
                if heartbeat and now >= next_beat:
                    await self._heartbeat(store)
                    next_beat = now + min(5.0, ttl / 3)
                if now >= next_topology or "top" in flags:
                    topology_changed |= await hub._refresh_topology(cs)
                    next_topology = now + min(0.25, ttl / 10)
                    if hub.is_partitioned() and hub.fence():
                        await self._fence(cs)
                if topology_changed or "proc" in flags or now >= next_reconcile:
                    await hub.reconcile(cs, topology_changed)
                    topology_changed = False
                    next_reconcile = now + (1.0 if push else 0.3)
                if mail is None or mail or polled:
                    while await hub.deliver(cs, None if (mail is None or polled) else mail) >= 2000:
                        await hub._flush(cs)
                await hub._flush(cs)
                if "rp" in flags or polled or (hub._calls and not push):
                    await hub.take_replies(cs)
                if groups._pending:
                    await groups.flush()
                    await cs.notify("pg")
                if "pg" in flags or polled:
                    await groups.sync(cs)
                if slow:
                    next_slow = now + 1.0
                    await cs.kv_expire(3600.0)
                    if hub._self_ok:
                        await groups.remove_nodes(cs, set(hub._alive))
                if now >= next_prune:
                    next_prune = now + 60.0
                    await cs.hub_prune(ttl * 3)
                    await cs.group_prune(600.0)
                    await cs.prune(600.0)
                last_ok = time.monotonic()
                if started is not None and not started.is_set():
                    started.set()
            except Exception as exc:
                log.warning("cluster loop on %s: %s: %s", self.node_name, type(exc).__name__, exc)
                if time.monotonic() - last_ok > ttl * 0.8 and hub.fence():
                    hub._partitioned = True
                    await self._fence(cs)
                await asyncio.sleep(0.1)
            busy = hub._acks or hub._replies_out or self._flags or self._mail
            await wait_event(self._event, 0 if busy else (0.25 if push else 0.02))

    async def _fence(self, cs: ClusterStore) -> None:
        """Stop every local child without touching their rows: the others restart them."""
        log.warning(
            "node %s fences itself: stopping %d children", self.node_name, len(self.hub.fence())
        )
        with contextlib.suppress(Exception):
            await self.hub._stop_local(cs, self.hub.fence(), "partitioned", release=False)
        for lc in self.hub.fence():
            lc.done = True
            self.hub._local.pop(lc.child_id, None)
