"""The hub: starts children on the cluster's nodes, delivers their messages, and keeps
each child on the node its strategy picks as nodes join, drain, die or lose quorum.

Everything the hub knows is rows (mainspring.cluster.store): children, their
instances (at most one active per child, enforced by a unique index), their
durable mailboxes. Each node's cluster loop reconciles what runs here with
those rows; nodes never talk to each other except through the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mainspring import payload
from mainspring.cluster.hooks import Hooks
from mainspring.cluster.migration import ColdSwap, HotSwap, Migration
from mainspring.cluster.process import ChildSpec, Pid, Process, ProcessDef
from mainspring.cluster.quorum import Quorum
from mainspring.cluster.store import Claim, ClusterStore
from mainspring.cluster.strategies import (
    ConsistentHashing,
    Distribution,
    Guided,
    Redundancy,
    Replication,
    Singularity,
    topology_signature,
)
from mainspring.engine.worker import error_info
from mainspring.errors import ConfigError, ProcessError

if TYPE_CHECKING:
    from mainspring.cluster.node import Cluster

log = logging.getLogger("mainspring.cluster")

_FETCH = 2000  # messages taken per mailbox read


@dataclass(slots=True)
class StartResult:
    """What `start_children` did: started {child id: pids}, errors {child id: why}, and the
    children stopped again by `on_failure="rollback"`."""

    started: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(slots=True)
class StopResult:
    stopped: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """A child as the hub last read it: where it runs (owner first) and its pids."""

    child_id: str
    name: str
    state: str
    metadata: dict[str, Any]
    nodes: list[str]
    pids: list[str]
    error: dict[str, Any] | None = None


@dataclass(slots=True)
class _Envelope:
    msg: Any
    seq: int | None = None
    future: asyncio.Future[Any] | None = None
    reply_to: str | None = None
    control: Any = None  # a coroutine function run between messages (handover, stop)


class _Local:
    """A child instance running on this node: its Process object and its mailbox task."""

    def __init__(
        self, hub: Hub, claim: Claim, pdef: ProcessDef, role: str, origin: str | None
    ) -> None:
        self.hub = hub
        self.child_id = claim.child_id
        self.incarnation = claim.incarnation
        self.pdef = pdef
        self.role = role
        self.args: dict[str, Any] = payload.loads(claim.args) or {}
        self.metadata: dict[str, Any] = payload.loads(claim.metadata) or {}
        self.state: dict[str, Any] | None = payload.loads(claim.state_data)
        self.origin = origin  # why it starts: None (first start), 'restart', 'migration'
        self.pid = str(Pid(hub.node, claim.child_id, claim.incarnation))
        self.queue: asyncio.Queue[_Envelope] = asyncio.Queue()
        self.proc: Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.crashes: deque[float] = deque()
        self.ready = asyncio.Event()
        self.done = False

    def new_process(self) -> Process:
        proc = self.pdef.cls()
        proc.pid = self.pid
        proc.child_id = self.child_id
        proc.hub = self.hub
        proc.metadata = self.metadata
        proc.role = self.role
        return proc


class Hub:
    """`app.hub`: the client API of processes, and the node-side runtime behind it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.app = cluster.app
        self.hooks = Hooks()
        self.processes: dict[str, ProcessDef] = {}
        self.distribution: Distribution = ConsistentHashing()
        self.migration: Migration = ColdSwap()
        self.redundancy: Redundancy = Singularity()
        self.quorum: Quorum | None = None
        self.nodedown_batch_window_ms = 500
        # node runtime state
        self._local: dict[str, _Local] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._view: dict[str, ChildInfo] = {}
        self._alive: list[str] = []  # hub nodes alive, as this node last saw them
        self._placement: list[str] = []  # alive and not draining: where children go
        self._signature = ""
        self._desired: dict[str, list[str]] = {}
        self._partitioned = False
        self._self_ok = False  # this node's own heartbeat is fresh: its view can be trusted
        self._down: set[str] = set()
        self._down_deadline = 0.0
        self._inflight: set[int] = set()
        self._acks: list[int] = []
        self._ready: list[tuple[str, int]] = []  # instances whose init succeeded, to record
        self._replies_out: list[tuple[str, str | None, str | None]] = []
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._outbox: list[
            tuple[tuple[str, str, str | None, str | None, int | None], asyncio.Future[None]]
        ] = []
        self._send_lock: asyncio.Lock | None = None
        self._reconcile_lock: asyncio.Lock | None = None

    @property
    def node(self) -> str:
        return self.cluster.node_name

    # -- configuration ------------------------------------------------------------------

    def configure(
        self,
        *,
        distribution: Distribution | None = None,
        migration: Migration | None = None,
        redundancy: Redundancy | None = None,
        quorum: Quorum | None = None,
        nodedown_batch_window_ms: int | None = None,
    ) -> None:
        """Choose the hub's strategies (every node of a cluster must choose the same).

        Raises ConfigError for handover migration combined with Replication: a passive
        replica has no state to hand over, so ask for `ColdSwap(handover=False)`.
        """
        distribution = distribution or self.distribution
        migration = migration or self.migration
        redundancy = redundancy or self.redundancy
        if isinstance(redundancy, Replication) and migration.handover:
            raise ConfigError(
                "handover migration cannot be combined with Replication (invalid config: "
                "handover_with_replication_not_supported); use migration=ColdSwap(handover=False)"
            )
        self.distribution, self.migration, self.redundancy = distribution, migration, redundancy
        if quorum is not None:
            self.quorum = quorum
        if nodedown_batch_window_ms is not None:
            if nodedown_batch_window_ms < 0:
                raise ConfigError("nodedown_batch_window_ms must be >= 0")
            self.nodedown_batch_window_ms = nodedown_batch_window_ms

    def register(self, pdef: ProcessDef) -> None:
        if pdef.name in self.processes and self.processes[pdef.name].cls is not pdef.cls:
            raise ConfigError(f"a process named {pdef.name!r} is already registered")
        self.processes[pdef.name] = pdef

    # -- client API -----------------------------------------------------------------------

    async def start_children(
        self,
        specs: Sequence[ChildSpec],
        *,
        metadata: Mapping[str, Any] | None = None,
        child_metadata: Mapping[str, Mapping[str, Any]] | None = None,
        on_failure: Literal["continue", "rollback"] = "continue",
        call_timeout: float | None = None,
    ) -> StartResult:
        """Start children wherever their strategy places them; wait until each runs (or
        failed) within `call_timeout` (default 5 s + 1 ms per child). With "rollback",
        any failure stops the ones that started (all or nothing)."""
        if on_failure not in ("continue", "rollback"):
            raise ConfigError(f"on_failure is 'continue' or 'rollback', got {on_failure!r}")
        timeout = _call_timeout(call_timeout, len(specs))
        result = StartResult()
        rows = []
        seen: set[str] = set()
        for spec in specs:
            name = spec.process_name
            if name not in self.processes:
                raise ConfigError(f"process {name!r} is not registered: use @app.process")
            if spec.child_id in seen:
                raise ConfigError(f"child id {spec.child_id!r} appears twice")
            seen.add(spec.child_id)
            if isinstance(self.distribution, Guided) and not spec.nodes:
                raise ConfigError(
                    f"child {spec.child_id!r}: the Guided strategy needs ChildSpec(nodes=[...]) "
                    "(missing child mapping)"
                )
            meta = {
                **(metadata or {}),
                **spec.metadata,
                **((child_metadata or {}).get(spec.child_id) or {}),
            }
            rows.append(
                (spec.child_id, name, payload.dumps(spec.args), payload.dumps(meta),
                 payload.dumps(list(spec.nodes)) if spec.nodes else None)
            )  # fmt: skip
        cs = await self.cluster.store()
        inserted = await cs.proc_insert(rows) if rows else set()
        for spec in specs:
            if spec.child_id not in inserted:
                result.errors[spec.child_id] = "already started (a child with this id exists)"
        await self._poke(cs, "proc")
        pending = [s.child_id for s in specs if s.child_id in inserted]
        deadline = time.monotonic() + timeout
        while pending:
            for row in await cs.proc_get(pending):
                cid = row["child_id"]
                if row["state"] == "failed":
                    error = payload.loads(row["error"]) or {}
                    result.errors[cid] = f"{error.get('type')}: {error.get('message')}"
                elif row["nodes"]:
                    result.started[cid] = [
                        str(Pid(n, cid, i))
                        for n, i in zip(row["nodes"], row["incarnations"], strict=True)
                    ]
            pending = [c for c in pending if c not in result.started and c not in result.errors]
            if not pending:
                break
            if time.monotonic() > deadline:
                for cid in pending:
                    result.errors[cid] = f"not started within call_timeout ({timeout:g} s)"
                break
            await asyncio.sleep(0.02)
        if on_failure == "rollback" and result.errors:
            started = list(inserted)
            await self.stop_children(started, call_timeout=timeout)
            result.rolled_back = sorted(started)
            result.started = {}
        await self.hooks.dispatch("post_children_start", {
            "started": result.started, "errors": result.errors, "rolled_back": result.rolled_back,
        })  # fmt: skip
        return result

    async def start_child(self, spec: ChildSpec, **options: Any) -> StartResult:
        return await self.start_children([spec], **options)

    async def stop_children(
        self, child_ids: Iterable[str], *, call_timeout: float | None = None
    ) -> StopResult:
        """Stop children wherever they run (`terminate('stopped')`) and forget them; waits
        up to `call_timeout` (default 5 s + 1 ms per child)."""
        ids = list(child_ids)
        timeout = _call_timeout(call_timeout, len(ids))
        cs = await self.cluster.store()
        result = StopResult()
        found = await cs.proc_stop(ids) if ids else set()
        for cid in ids:
            if cid not in found:
                result.errors[cid] = "no such child"
        await self._poke(cs, "proc")
        pending = set(found)
        deadline = time.monotonic() + timeout
        while pending:
            gone = await cs.proc_delete_stopped(sorted(pending))
            result.stopped.extend(sorted(gone))
            pending -= gone
            still = (
                {r["child_id"] for r in await cs.proc_get(sorted(pending))} if pending else set()
            )
            result.stopped.extend(sorted(pending - still))
            pending &= still
            if not pending:
                break
            if time.monotonic() > deadline:
                for cid in pending:
                    result.errors[cid] = f"not stopped within call_timeout ({timeout:g} s)"
                break
            await asyncio.sleep(0.02)
        return result

    async def send(
        self, child_id: str, msg: Any, *, durable: bool = True, _name: tuple[str, int] | None = None
    ) -> None:
        """Deliver `msg` to the child wherever it lives, in order, at least once.

        Durable (the default): written to its mailbox before this returns, handled by the
        child's owner now or after any migration or crash. `durable=False` hands the
        message over in memory when the child runs on this node (the fast path; lost if
        this node dies) and falls back to the mailbox otherwise.
        """
        body = payload.dumps(msg)
        local = self._local.get(child_id)
        if not durable and local is not None and local.role != "passive" and _name is None:
            local.queue.put_nowait(_Envelope(msg))
            return
        name, token = _name if _name else (None, None)
        await self._mail((child_id, body, None, name, token))

    async def call(self, child_id: str, msg: Any, timeout: float = 5.0) -> Any:
        """Send `msg` and wait for what the child's `handle` returns. Raises TimeoutError
        after `timeout`, ms.ProcessError when `handle` raised."""
        local = self._local.get(child_id)
        loop = asyncio.get_running_loop()
        if local is not None and local.role != "passive" and not local.done:
            future: asyncio.Future[Any] = loop.create_future()
            local.queue.put_nowait(_Envelope(msg, future=future))
            return await asyncio.wait_for(future, timeout)
        call_id = uuid.uuid4().hex
        future = self._calls[call_id] = loop.create_future()
        try:
            await self._mail((child_id, payload.dumps(msg), call_id, None, None))
            if self.cluster.serving:
                return await asyncio.wait_for(future, timeout)
            return await self._poll_reply(call_id, timeout)
        finally:
            self._calls.pop(call_id, None)

    async def _poll_reply(self, call_id: str, timeout: float) -> Any:
        """Wait for a reply without a cluster loop in this process (a plain client)."""
        cs = await self.cluster.store()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _id, body, error in await cs.reply_take([call_id]):
                return _answer(body, error)
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no reply within {timeout:g} s")

    def which_nodes(self, child_id: str) -> list[str]:
        """The nodes running the child (owner first), as this node last saw them."""
        info = self._view.get(child_id)
        return list(info.nodes) if info else []

    def children(self, tags: Mapping[str, Any] | None = None) -> dict[str, ChildInfo]:
        """Every child (as this node last saw them), or those whose metadata has every
        key/value of `tags`."""
        if not tags:
            return dict(self._view)
        return {
            cid: info
            for cid, info in self._view.items()
            if all(info.metadata.get(k) == v for k, v in tags.items())
        }

    def local_children(self) -> dict[str, str]:
        """{child id: pid} of the instances running on this node."""
        return {cid: lc.pid for cid, lc in self._local.items() if not lc.done}

    def nodes(self) -> list[str]:
        """The live hub nodes (placement targets) as this node sees them."""
        return list(self._placement)

    def is_partitioned(self) -> bool:
        """True while this node lacks quorum (it runs no children then)."""
        return self._partitioned

    async def refresh(self) -> None:
        """Re-read children and nodes now (a process without a cluster loop)."""
        cs = await self.cluster.store()
        self._read_view(await cs.proc_list(), await cs.proc_instances())
        await self._refresh_topology(cs)

    async def drain(self, node: str | None = None, timeout: float = 60.0) -> dict[str, int]:
        """Take `node` (default: this one) out of placement and wait until its children
        moved away with their handover state; returns {'migrated': n, 'forced': m}
        (forced: released with their last checkpoint after `timeout`)."""
        target = node or self.node
        cs = await self.cluster.store()
        if self._partitioned:
            raise ProcessError("cannot drain a partitioned hub")
        await self._refresh_topology(cs)
        if not [n for n in self._placement if n != target]:
            raise ProcessError(f"cannot drain {target}: no other node to move its children to")
        before = {c for c, _n, role, _i in await cs.proc_instances() if _n == target}
        await cs.hub_drain(target)
        await self._poke(cs, "top")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = {c for c, n, _r, _i in await cs.proc_instances() if n == target}
            if not left:
                return {"migrated": len(before), "forced": 0}
            await asyncio.sleep(0.05)
        forced = [lc for lc in self._local.values() if target == self.node and not lc.done]
        await self._stop_local(cs, forced, "shutdown", release=True)
        return {"migrated": len(before) - len(forced), "forced": len(forced)}

    # -- messages out ----------------------------------------------------------------------

    async def _mail(self, row: tuple[str, str, str | None, str | None, int | None]) -> None:
        """Write a message with whatever other sends are waiting (group commit)."""
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((row, future))
        async with self._send_lock:
            if future.done():
                return future.result()
            batch, self._outbox = self._outbox, []
            try:
                cs = await self.cluster.store()
                await cs.mailbox_put([r for r, _ in batch])
            except BaseException as exc:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                raise
            for _, f in batch:
                if not f.done():
                    f.set_result(None)
            ids = sorted({r[0] for r, _ in batch})
            local = [c for c in ids if c in self._local]
            if local:
                self.cluster.mark_mail(local)
            remote = [c for c in ids if c not in self._local]
            if remote:
                text = ",".join(remote)
                await cs.notify("mb:" + (text if len(text) < 7000 else "*"))
        return future.result()

    async def _poke(self, cs: ClusterStore, what: str) -> None:
        await cs.notify(what)
        self.cluster.wake(what)

    # -- the node runtime: called by the cluster loop --------------------------------------

    async def _refresh_topology(self, cs: ClusterStore) -> bool:
        """Read hub nodes and liveness; returns True when the placement node set changed
        (node-down events are batched over `nodedown_batch_window_ms`)."""
        ttl = self.app.lease_ttl
        rows = await cs.hub_topology(ttl)
        mine = next((r for r in rows if r[0] == self.node), None)
        # A node that cannot keep its heartbeat fresh cannot trust its view: it counts
        # only itself (and fences itself: see _cycle).
        self_ok = mine is not None and mine[3] is not None and mine[3] < ttl * 0.8
        alive = sorted({r[0] for r in rows if r[2]} | {self.node}) if self_ok else [self.node]
        self._self_ok = self_ok
        draining = {r[0] for r in rows if r[1]}
        previous = set(self._alive)
        now = time.monotonic()
        gone = previous - set(alive)
        if gone:
            if not self._down:
                self._down_deadline = now + self.nodedown_batch_window_ms / 1000
            self._down |= gone
        if self._down and now < self._down_deadline and self_ok:
            alive = sorted(set(alive) | (self._down & previous))  # wait for the batch window
        else:
            self._down = set()
        joined = set(alive) - previous
        left = previous - set(alive)
        partitioned = (
            self.quorum.partitioned(len(alive)) if self.quorum is not None else False
        ) or not self_ok
        if partitioned != self._partitioned:
            self._partitioned = partitioned
            self.app.telemetry.emit(
                "hub.partitioned", node=self.node, partitioned=partitioned, live=len(alive)
            )
            what = "partitioned" if partitioned else "has quorum again"
            log.warning("hub on %s %s (%d live nodes)", self.node, what, len(alive))
        for n in sorted(joined - {self.node} if previous else set()):
            await self.hooks.dispatch("pre_node_join", {"node": n})
        for n in sorted(left):
            await self.hooks.dispatch("pre_node_leave", {"node": n})
        self._alive = alive
        placement = [n for n in alive if n not in draining]
        changed = placement != self._placement
        self._placement = placement
        if left and self_ok:
            await self._node_down(cs, sorted(left))
        for n in sorted(joined - {self.node} if previous else set()):
            await self.hooks.dispatch("post_node_join", {"node": n})
        for n in sorted(left):
            await self.hooks.dispatch("post_node_leave", {"node": n})
        return changed

    async def _node_down(self, cs: ClusterStore, nodes: list[str]) -> None:
        """Dead nodes: their instances, names and group members go (any node may do it)."""
        dropped = await cs.proc_drop_instances(nodes)
        for cid, node, incarnation in dropped:
            await self.hooks.dispatch("child_unregistered", {
                "child_id": cid, "node": node, "pid": str(Pid(node, cid, incarnation)),
                "reason": "nodedown",
            })  # fmt: skip
        await cs.names_release(None, self.app.lease_ttl)
        self.app.telemetry.emit(
            "hub.nodes_down", nodes=nodes, children=len(dropped), node=self.node
        )

    def _read_view(
        self,
        rows: list[tuple[str, str, str, str | None, str, int, str | None]],
        instances: list[tuple[str, str, str, int]],
    ) -> dict[str, list[tuple[str, str, int]]]:
        by_child: dict[str, list[tuple[str, str, int]]] = {}
        for cid, node, role, inc in instances:
            by_child.setdefault(cid, []).append((node, role, inc))
        view = {}
        for cid, name, state, _nodes, meta, _inc, error in rows:
            placed = sorted(by_child.get(cid, []), key=lambda i: i[1] != "active")
            view[cid] = ChildInfo(
                cid, name, state, payload.loads(meta) or {}, [p[0] for p in placed],
                [str(Pid(p[0], cid, p[2])) for p in placed], payload.loads(error),
            )  # fmt: skip
        self._view = view
        return by_child

    async def reconcile(self, cs: ClusterStore, topology_changed: bool) -> None:
        """Make what runs here match the rows and the strategy's placement."""
        if self._reconcile_lock is None:
            self._reconcile_lock = asyncio.Lock()
        async with self._reconcile_lock:
            await self._reconcile(cs, topology_changed)

    async def _reconcile(self, cs: ClusterStore, topology_changed: bool) -> None:
        rows = await cs.proc_list()
        by_child = self._read_view(rows, await cs.proc_instances())
        me = self.node
        states = {r[0]: r[2] for r in rows}
        # Children stopped, failed or gone from the rows, or whose instance here was taken.
        lost = [
            lc
            for cid, lc in self._local.items()
            if not lc.done
            and (states.get(cid) != "running" or (me, lc.incarnation) not in _held(by_child, cid))
        ]
        if lost:
            await self._stop_local(cs, lost, "stopped", release=False)
        finishing = [c for c, s in states.items() if s in ("stopping", "failed") and c in by_child]
        if any(n == me for c in finishing for n, _r, _i in by_child[c]):
            await cs.proc_drop_local(finishing, me)
        stopping = [c for c, s in states.items() if s == "stopping"]
        if stopping:
            await cs.proc_delete_stopped(stopping)
        if self._partitioned:
            return
        signature = topology_signature(self._placement)
        guided = {r[0]: payload.loads(r[3]) for r in rows if r[2] == "running"}
        if signature != self._signature or not self.distribution.deterministic:
            self._desired = {}
            self._signature = signature
            if topology_changed:
                await self.hooks.dispatch("pre_redistribution", {"nodes": list(self._placement)})
        fresh = {c: g for c, g in guided.items() if c not in self._desired}
        if fresh:
            self._desired.update(
                self.distribution.belongs_to(fresh, self._placement, self.redundancy.factor)
            )
        for cid in [c for c in self._desired if c not in guided]:
            del self._desired[cid]
        # Instances of mine in the rows but not running here (this loop restarted, a
        # HotSwap handed one to me, quorum came back): start them.
        for cid, placed in by_child.items():
            for node, role, inc in placed:
                if node == me and states.get(cid) == "running":
                    lc = self._local.get(cid)
                    if lc is None or lc.done or lc.incarnation != inc:
                        await self._resume(cs, cid, role, inc)
        claims: dict[str, list[str]] = {"active": [], "passive": [], "replica": []}
        promote: list[str] = []
        moves: list[tuple[_Local, str]] = []
        for cid, want in self._desired.items():
            placed = by_child.get(cid, [])
            has_active = any(r == "active" for _n, r, _i in placed)
            here = any(n == me for n, _r, _i in placed)
            if me in want and not here:
                if not has_active and want[0] == me:
                    claims["active"].append(cid)
                elif isinstance(self.redundancy, Replication):
                    role = "replica" if self.redundancy.mode == "active_active" else "passive"
                    claims[role].append(cid)
            elif here and not has_active and want and want[0] == me:
                promote.append(cid)
            lc = self._local.get(cid)
            if lc is not None and not lc.done and want and me not in want:
                moves.append((lc, want[0]))
        for role, ids in claims.items():
            for start in range(0, len(ids), 1000):
                for claim in await cs.proc_claim(ids[start : start + 1000], me, role):
                    await self._start(claim, role, "migration" if claim.state_data else None)
        for cid in promote:
            await self._promote(cs, cid)
        if moves:
            await self._migrate(cs, moves)
        if topology_changed:
            await self.hooks.dispatch("post_redistribution", {"nodes": list(self._placement)})

    async def _promote(self, cs: ClusterStore, cid: str) -> None:
        """The active replica is gone and this passive one is next: it becomes active,
        restarted with the child's last checkpoint (`init` runs again with it)."""
        lc = self._local.get(cid)
        if lc is None or lc.done:
            return
        try:
            await cs.proc_promote(cid, self.node)
        except Exception:  # another replica won the promotion (the unique index)
            return

        async def end(proc: Process) -> None:
            with contextlib.suppress(Exception):
                await proc.terminate("promoted")

        await self._control(lc, end, self.migration.state_query_timeout)
        lc.done = True
        self._local.pop(cid, None)
        await self._resume(cs, cid, "active", lc.incarnation)

    async def _resume(self, cs: ClusterStore, cid: str, role: str, incarnation: int) -> None:
        rows = await cs.proc_get([cid])
        if not rows:
            return
        state = await cs.proc_state(cid)
        claim = Claim(cid, rows[0]["name"], state[0], rows[0]["metadata"], state[1], incarnation)
        await self._start(claim, role, "migration" if state[1] else None)

    async def _start(self, claim: Claim, role: str, origin: str | None) -> None:
        pdef = self.processes.get(claim.name)
        cs = await self.cluster.node_store()
        if pdef is None:
            error = {"type": "UnknownProcess", "message":
                     f"node {self.node} has no @app.process named {claim.name!r}"}  # fmt: skip
            await cs.proc_fail(claim.child_id, self.node, payload.dumps(error))
            return
        old = self._local.get(claim.child_id)
        if old is not None and not old.done:
            await self._stop_local(cs, [old], "restart", release=False)
        lc = _Local(self, claim, pdef, role, origin)
        self._local[claim.child_id] = lc
        task = asyncio.create_task(self._run(lc), name=f"process {claim.child_id}")
        lc.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await lc.ready.wait()
        if lc.done:
            return
        self.cluster.mark_mail([claim.child_id])
        await self.hooks.dispatch("child_registered", {
            "child_id": claim.child_id, "pid": lc.pid, "node": self.node, "role": role,
        })  # fmt: skip
        if claim.incarnation > 1:
            await self.hooks.dispatch(
                "child_pid_updated", {"child_id": claim.child_id, "pid": lc.pid}
            )
        if origin == "migration" and lc.state is not None:
            await self.hooks.dispatch(
                "handover_delivered", {"child_id": claim.child_id, "pid": lc.pid}
            )

    async def _run(self, lc: _Local) -> None:
        """The child's mailbox loop: init, then one message at a time; a crash restarts it
        (with its last state) until the restart intensity is exceeded, then it fails."""
        try:
            while not lc.done:
                proc = lc.new_process()
                try:
                    await proc.init(lc.args, lc.state)
                except Exception as exc:
                    if not await self._crashed(lc, exc):
                        return
                    continue
                lc.proc = proc
                if not lc.ready.is_set():
                    self._ready.append((lc.child_id, lc.incarnation))
                    self.cluster.wake()
                lc.ready.set()
                if not await self._serve(lc, proc):
                    return
        finally:
            lc.done = True
            lc.ready.set()

    async def _serve(self, lc: _Local, proc: Process) -> bool:
        """Handle messages until told to stop (False) or a crash to restart from (True)."""
        while True:
            env = await lc.queue.get()
            if env.control is not None:
                try:
                    result = await env.control(proc)
                except Exception as exc:
                    if env.future is not None and not env.future.done():
                        env.future.set_exception(exc)
                    return False
                if env.future is not None and not env.future.done():
                    env.future.set_result(result)
                return False
            try:
                answer = await proc.handle(env.msg)
            except Exception as exc:
                self._answer(env, None, exc)
                with contextlib.suppress(Exception):
                    await proc.terminate(f"{type(exc).__name__}: {exc}")
                return await self._crashed(lc, exc)
            self._answer(env, answer, None)

    def _answer(self, env: _Envelope, answer: Any, exc: BaseException | None) -> None:
        if env.seq is not None:
            self._acks.append(env.seq)
            self.cluster.wake()
        if env.future is not None and not env.future.done():
            if exc is None:
                env.future.set_result(answer)
            else:
                env.future.set_exception(ProcessError(f"handle raised {type(exc).__name__}: {exc}"))
        if env.reply_to is not None:
            if exc is None:
                self._replies_out.append((env.reply_to, payload.dumps(answer), None))
            else:
                self._replies_out.append((env.reply_to, None, payload.dumps(error_info(exc, 0))))

    async def _crashed(self, lc: _Local, exc: BaseException) -> bool:
        """Count a crash; True to restart, False when the child is now failed."""
        now = time.monotonic()
        lc.crashes.append(now)
        while lc.crashes and lc.crashes[0] < now - lc.pdef.max_seconds:
            lc.crashes.popleft()
        log.warning("process %s crashed (%s: %s)", lc.pid, type(exc).__name__, exc)
        self.app.telemetry.emit("process.crashed", pid=lc.pid, error=repr(exc))
        if len(lc.crashes) <= lc.pdef.max_restarts:
            lc.origin = "restart"
            return True
        lc.done = True
        cs = await self.cluster.node_store()
        info = error_info(exc, len(lc.crashes))
        await cs.proc_fail(lc.child_id, self.node, payload.dumps(info))
        self.app.telemetry.emit("process.failed", pid=lc.pid, error=repr(exc))
        await self._exited([lc], "failed")
        return False

    async def _control(self, lc: _Local, fn: Any, timeout: float) -> Any:
        """Run `fn(proc)` in the child's own task between messages; None if it is gone."""
        if lc.done or lc.task is None:
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lc.queue.put_nowait(_Envelope(None, future=future, control=fn))
        done, _ = await asyncio.wait(
            [future, lc.task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if future in done and future.exception() is None:
            return future.result()
        if not future.done():
            lc.task.cancel()
        return None

    async def _stop_local(
        self, cs: ClusterStore, children: Sequence[_Local], reason: str, *, release: bool
    ) -> None:
        """Terminate children here; with `release`, hand their state over and give up their
        instances so the next owner starts them with it."""
        states: dict[str, str | None] = {}

        async def stop(lc: _Local) -> None:
            async def end(proc: Process) -> Any:
                state = await proc.handover() if release and self.migration.handover else None
                with contextlib.suppress(Exception):
                    await proc.terminate(reason)
                return state

            state = await self._control(lc, end, self.migration.state_query_timeout)
            states[lc.child_id] = payload.dumps(state) if state is not None else None
            lc.done = True

        live = [lc for lc in children if not lc.done]
        await asyncio.gather(*(stop(lc) for lc in live))
        for lc in children:
            lc.done = True
        await self._forward(cs, children)
        await self._flush(cs)
        if release:
            await cs.proc_release(
                self.node,
                [(lc.child_id, lc.incarnation, states.get(lc.child_id)) for lc in children],
            )
            await self._poke(cs, "proc")
        elif reason == "stopped":
            await cs.proc_drop_local([lc.child_id for lc in children], self.node)
        await self._exited(children, reason)

    async def _forward(self, cs: ClusterStore, children: Sequence[_Local]) -> None:
        """Messages queued here in memory (the fast path) go to the mailbox for the next owner."""
        rows = []
        for lc in children:
            while not lc.queue.empty():
                env = lc.queue.get_nowait()
                if env.future is not None and not env.future.done():
                    env.future.set_exception(ProcessError(f"{lc.child_id} moved; call it again"))
                elif env.seq is None and env.control is None:
                    rows.append((lc.child_id, payload.dumps(env.msg), env.reply_to, None, None))
                elif env.seq is not None:
                    self._inflight.discard(env.seq)
        if rows:
            await cs.mailbox_put(rows)
            await self.hooks.dispatch("children_forwarded", {"messages": len(rows)})

    async def _exited(self, children: Sequence[_Local], reason: str) -> None:
        for lc in children:
            if self._local.get(lc.child_id) is lc:
                del self._local[lc.child_id]
        pids = [lc.pid for lc in children]
        if pids:
            cs = await self.cluster.node_store()
            await cs.names_release(pids, self.app.lease_ttl)
            await self.cluster.groups.remove_pids(pids)
        for lc in children:
            await self.hooks.dispatch("child_unregistered", {
                "child_id": lc.child_id, "pid": lc.pid, "node": self.node, "reason": reason,
            })  # fmt: skip

    async def _migrate(self, cs: ClusterStore, moves: list[tuple[_Local, str]]) -> None:
        """Move children to their new owners with their handover state."""
        if isinstance(self.migration, HotSwap):
            states: dict[str, str | None] = {}

            async def take(lc: _Local) -> None:
                async def end(proc: Process) -> Any:
                    return await proc.handover()

                state = await self._control(lc, end, self.migration.state_query_timeout)
                states[lc.child_id] = payload.dumps(state) if state is not None else None
                lc.done = True

            await asyncio.gather(*(take(lc) for lc, _ in moves))
            await self._forward(cs, [lc for lc, _ in moves])
            await self._flush(cs)
            moved = await cs.proc_transfer(
                self.node,
                [(lc.child_id, lc.incarnation, states.get(lc.child_id), t) for lc, t in moves],
            )
            await self._poke(cs, "proc")
            for lc, _ in moves:
                if lc.proc is not None:
                    with contextlib.suppress(Exception):
                        await lc.proc.terminate("migrated")
            await self._exited([lc for lc, _ in moves], "migrated")
            targets = {cid: node for cid, node, _inc in moved}
        else:
            await self._stop_local(cs, [lc for lc, _ in moves], "migrated", release=True)
            targets = {lc.child_id: t for lc, t in moves}
        for lc, target in moves:
            await self.hooks.dispatch("migration_completed", {
                "child_id": lc.child_id, "from": self.node, "to": targets.get(lc.child_id, target),
            })  # fmt: skip

    async def _checkpoint(self, proc: Process, state: dict[str, Any]) -> bool:
        lc = self._local.get(proc.child_id)
        if lc is None or lc.pid != proc.pid:
            return False
        encoded = payload.dumps(state)
        cs = await self.cluster.store()
        ok = await cs.proc_checkpoint(lc.child_id, self.node, lc.incarnation, encoded)
        if ok:
            lc.state = state
        return ok

    # -- messages in ----------------------------------------------------------------------

    async def deliver(self, cs: ClusterStore, ids: set[str] | None) -> int:
        """Take mailbox messages of local children (these, or all) into their queues."""
        local = [
            c for c, lc in self._local.items()
            if not lc.done and lc.role == "active" and (ids is None or c in ids)
        ]  # fmt: skip
        if not local:
            return 0
        mail = await cs.mailbox_take(local, self.node, sorted(self._inflight), _FETCH)
        stale = []
        for m in mail:
            lc = self._local.get(m.child_id)
            if m.stale or lc is None or lc.done:
                if m.stale:
                    stale.append(m.seq)
                continue
            self._inflight.add(m.seq)
            lc.queue.put_nowait(_Envelope(payload.loads(m.body), seq=m.seq, reply_to=m.reply_to))
        if stale:
            await cs.mailbox_ack(stale)
        return len(mail)

    async def _flush(self, cs: ClusterStore) -> None:
        """Record started instances, acknowledge handled messages and send replies."""
        if self._ready:
            ready, self._ready = self._ready, []
            await cs.proc_ready(self.node, ready)
        if self._acks:
            acks, self._acks = self._acks, []
            await cs.mailbox_ack(acks)
            self._inflight.difference_update(acks)
        if self._replies_out:
            replies, self._replies_out = self._replies_out, []
            await cs.reply_put(replies)
            text = ",".join(r[0] for r in replies)
            await cs.notify("rp:" + (text if len(text) < 7000 else "*"))
            self.cluster.wake("rp:" + text)

    async def take_replies(self, cs: ClusterStore) -> None:
        """Resolve calls of this process whose replies arrived."""
        if not self._calls:
            return
        for call_id, body, error in await cs.reply_take(list(self._calls)):
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                try:
                    future.set_result(_answer(body, error))
                except ProcessError as exc:
                    future.set_exception(exc)

    async def shutdown(self, cs: ClusterStore) -> None:
        """This node leaves: hand every child over (the others start them) and stop."""
        live = [lc for lc in self._local.values() if not lc.done]
        if live:
            await self._stop_local(cs, live, "shutdown", release=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await cs.hub_leave(self.node)
        await cs.notify("top")

    def fence(self) -> list[_Local]:
        """This node lost its view (or quorum): every child here must stop."""
        return [lc for lc in self._local.values() if not lc.done]


def _held(by_child: dict[str, list[tuple[str, str, int]]], cid: str) -> set[tuple[str, int]]:
    return {(n, i) for n, _r, i in by_child.get(cid, [])}


def _answer(body: str | None, error: str | None) -> Any:
    if error is not None:
        info = payload.loads(error) or {}
        raise ProcessError(f"handle raised {info.get('type')}: {info.get('message')}")
    return payload.loads(body) if body is not None else None


def _call_timeout(given: float | None, children: int) -> float:
    """How long start_children/stop_children wait: as given, else 5 s + 1 ms per child."""
    return given if given is not None else 5.0 + 0.001 * children
