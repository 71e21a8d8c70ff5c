"""The persistence contract: every database interaction the engine can make.

Each backend (sqlite.py, postgres.py) is one class that fulfils this list with
its own named SQL (store/sql/<backend>.sql). Telemetry and retries live around
the interface, never inside a backend. The cluster layer's part of the contract
(KV, registry, groups, processes, mailboxes) is mainspring.cluster.store.ClusterStore.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mainspring import payload
from mainspring.run import Claimed, NewRun, NodeInfo, Outcome, Run


@dataclass(frozen=True, slots=True)
class QueueDemand:
    """How many runs of `queue` this node can start now."""

    queue: str
    limit: int


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """What the database knows about a queue: its global limit and its runs by state."""

    name: str
    global_limit: int | None
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class SignalRow:
    """One signal in a run's inbox (not yet consumed)."""

    id: str
    name: str
    payload: Any
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class ChildRow:
    """One child of a run (what a parent sees of it after a Spawn)."""

    id: str
    kind: str
    name: str
    state: str
    output: Any
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class EventRow:
    """One entry of a run's journal."""

    seq: int
    kind: str
    data: Any


@dataclass(frozen=True, slots=True)
class StepData:
    """What a claimed step reads besides its row: the unconsumed inbox and the children
    (and, for a workflow, its journal)."""

    inbox: list[SignalRow]
    children: list[ChildRow]
    events: list[EventRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SignalDelivery:
    """What became of one signal: 'delivered', 'duplicate', 'not_found' or 'terminal'."""

    result: str
    run_id: str | None = None
    woke: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """A token bucket: `allowed` tokens per `period` seconds, holding at most `burst`."""

    name: str
    allowed: int
    period: float
    burst: int


@dataclass(frozen=True, slots=True)
class BucketStatus:
    """One bucket of a rate limit: tokens now (refilled to this moment) and runs waiting on it."""

    key: str
    tokens: float
    waiting: int


@dataclass(frozen=True, slots=True)
class Throttle:
    """A claim found `wanted` runs waiting on bucket `key` and could grant only `granted`."""

    key: str
    granted: int
    wanted: int


def run_from_row(row: Any, when: Callable[[Any], datetime | None]) -> Run:
    """A Run from a full ms_runs row (mapping-like); `when` turns stored times into datetimes."""
    loads = payload.loads
    return Run(
        id=row["id"],
        kind=row["kind"],
        name=row["name"],
        namespace=row["namespace"],
        queue=row["queue"],
        state=row["state"],
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        run_at=when(row["run_at"]),  # type: ignore[arg-type]
        input=loads(row["input"]),
        output=loads(row["output"]),
        error=loads(row["error"]),
        correlation_key=row["correlation_key"],
        concurrency_key=row["concurrency_key"],
        attributes=loads(row["attributes"]) or {},
        lease_owner=row["lease_owner"],
        lease_expires_at=when(row["lease_expires_at"]),
        fence=row["fence"],
        parent_id=row["parent_id"],
        created_at=when(row["created_at"]),  # type: ignore[arg-type]
        started_at=when(row["started_at"]),
        finished_at=when(row["finished_at"]),
        updated_at=when(row["updated_at"]),  # type: ignore[arg-type]
        step=row["step"],
        state_data=loads(row["state_data"]),
        rate_limit=row["rate_limit"],
        weight=row["weight"],
        awaits=_names(row["awaits"]),
        deadline=when(row["deadline"]),
        children_pending=row["children_pending"],
        version=row["version"],
        heartbeat_timeout=row["heartbeat_timeout"],
        idempotency_key=row["idempotency_key"],
    )


def _names(value: Any) -> list[str] | None:
    """A stored list of names: a text[] on PostgreSQL, JSON text on SQLite."""
    if value is None:
        return None
    if isinstance(value, str):
        return list(payload.loads(value))
    return list(value)


class Store(abc.ABC):
    """One backend's implementation of every engine query.

    A store belongs to the event loop that opened it. Timestamps are aware UTC
    datetimes on both backends.
    """

    backend: str
    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect; raises BackendUnavailable with the reason when the database is unreachable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection; in-flight calls finish first."""

    @abc.abstractmethod
    async def migrate(self) -> int:
        """Apply missing schema migrations under a lock; returns the schema version now in force."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The applied schema version (0 for an empty database)."""

    # -- enqueue -------------------------------------------------------------

    @abc.abstractmethod
    async def insert_runs(self, runs: Sequence[NewRun]) -> dict[str, str]:
        """Insert runs in one round trip and wake workers of their queues.

        A run whose correlation_key is held by a non-terminal run is not
        inserted. Returns {requested id: actual id}: the actual id is the
        existing run's id for such duplicates, the requested id otherwise.
        """

    # -- the hot path --------------------------------------------------------

    @abc.abstractmethod
    async def claim_runs(
        self, node: str, demand: Sequence[QueueDemand], lease_ttl: float
    ) -> list[Claimed]:
        """Claim available runs for this node in one statement.

        Highest priority first, then oldest run_at; at most `limit` per queue;
        never a second running run for a concurrency_key; never beyond a
        queue's global limit. Each claimed run gets attempt + 1, a lease until
        now + lease_ttl owned by `node`, and a new fence.

        Runs with a rate_limit (a bucket key: the limit's name, or
        "name:partition") are granted only from their bucket's tokens: the
        bucket refills lazily (tokens + elapsed * allowed / period, at most
        burst; a new bucket starts full) and grants the highest-priority prefix
        of its waiting runs whose cumulative weight fits, debiting what it
        grants. Runs of an unconfigured limit are held. Buckets that granted
        fewer than were waiting are reported by take_throttled().
        """

    @abc.abstractmethod
    async def commit_outcomes(self, outcomes: Sequence[Outcome]) -> set[str]:
        """Commit attempt outcomes in one statement; returns the ids committed.

        (A backend whose statements update a row once may commit a batch holding
        a run and its children's terminal outcomes as two, the parents first:
        the children's fan-in must see the parents' new rows.)

        An outcome whose fence no longer matches (lease lost, run cancelled or
        taken over) is not written and its id is absent from the result, and
        nothing else it carries happens. For each committed outcome, atomically:
        - its StepCommit (`outcome.step`) columns are written, signals in
          `consume` are marked consumed, `children` are inserted (parent_id =
          the run) and `children_pending` is set to their number; a park
          (state waiting with awaits) whose signal_seq moved past `seen_seq`
          is made available instead;
        - a terminal outcome marks the run's whole inbox consumed, and counts
          toward its parent's fan-in: the parent's children_pending drops by
          one and the parent, if waiting, becomes available when it reaches
          zero (exactly once, whichever node commits the last child);
        - rate-limit buckets named by the run or its children exist afterwards;
        - the StepCommit's `events` are appended to the run's journal.
        A waiting workflow parent is woken by each child that finishes, not
        only the last.
        Workers of queues that got available runs are woken. A committed workflow
        run records the committing node as its sticky node; where the backend
        pushes notifications, a wake-up of such a run (here, or by a signal, a
        timer or a reaped child) goes to that node (see `listen`).
        """

    def take_throttled(self) -> list[Throttle]:
        """Buckets that granted fewer runs than were waiting, since the last call."""
        return []

    @abc.abstractmethod
    async def load_step_data(
        self,
        run_ids: Sequence[str],
        *,
        events: bool = False,
        after: Sequence[int] = (),
        children: Sequence[Sequence[str] | None] = (),
    ) -> dict[str, StepData]:
        """The unconsumed inbox and the children of each run, in one round trip.

        With `events`, each run's journal in seq order: the entries after seq
        `after[i]` (all of them when `after` is empty). `children[i]`, when given
        and not None, limits run i's children to those ids (a cached workflow
        run needs only the ones it still waits for).
        """

    @abc.abstractmethod
    async def insert_with_journal(
        self, run: NewRun, events: Sequence[tuple[int, str, str]]
    ) -> None:
        """Insert a run and its starting journal of (seq, kind, JSON) entries atomically
        (a reset run starts from a copied journal), then wake its queue."""

    # -- signals and rate limits -------------------------------------------------

    @abc.abstractmethod
    async def send_signal(
        self,
        run_id: str | None,
        correlation_key: str | None,
        signal_id: str,
        name: str,
        payload_json: str,
        dedup_key: str | None,
    ) -> SignalDelivery:
        """Put a signal in a run's durable inbox (by id, or the live run holding a key).

        Duplicate (same run, same dedup_key): nothing written, 'duplicate'.
        Terminal run: 'terminal'. No such run: 'not_found'. Otherwise the run's
        signal_seq goes up and, if it waits for this name, it becomes
        available ('delivered', woke=True) and its queue is woken. Serialized
        with the run's commits by the row lock, so a park never misses it.
        """

    @abc.abstractmethod
    async def set_rate_limits(self, configs: Sequence[RateLimitConfig]) -> None:
        """Create or replace rate-limit configurations."""

    @abc.abstractmethod
    async def rate_limit_configs(self) -> dict[str, RateLimitConfig]:
        """Every configured rate limit by name."""

    @abc.abstractmethod
    async def rate_limit_status(self, name: str) -> list[BucketStatus]:
        """The buckets of a rate limit (one per partition) with tokens now and runs waiting."""

    @abc.abstractmethod
    async def extend_leases(
        self, node: str, held: Sequence[tuple[str, int]], lease_ttl: float
    ) -> set[str]:
        """Extend the leases of (id, fence) pairs this node holds; returns the ids still held."""

    @abc.abstractmethod
    async def heartbeat_run(
        self, run_id: str, fence: int, details_json: str, lease_ttl: float
    ) -> bool:
        """A job's heartbeat: keep `details` on the run (state_data), note its time (for a
        heartbeat timeout) and extend its lease, under its fence; False when the run is no
        longer held."""

    @abc.abstractmethod
    async def silent_runs(self, limit: int) -> list[Claimed]:
        """Running runs with a heartbeat_timeout that have gone longer than it without a
        heartbeat, counting from their claim (whatever their lease says), as claimed.

        Nothing is written: the caller commits their failed attempt as an outcome
        under the fence returned, so an owner's commit that got there first wins,
        and the owner's later commit is refused.
        """

    @abc.abstractmethod
    async def completed_output(self, name: str, idempotency_key: str) -> str | None:
        """The output (JSON text) of a completed run of task `name` that held this
        idempotency key, or None while no such run is kept (none completed, or GC
        deleted it)."""

    # -- timers and recovery ---------------------------------------------------

    @abc.abstractmethod
    async def promote_due(self, limit: int) -> tuple[list[str], datetime | None]:
        """Make scheduled runs whose run_at has passed available, and time out awaits.

        A waiting run whose deadline passed becomes available with step =
        coalesce(wake_step, step) and awaits/deadline cleared. Returns the
        queues that got work and the next moment something is due, if any.
        """

    @abc.abstractmethod
    async def reap_expired(self, limit: int) -> list[tuple[str, str]]:
        """Take back runs whose lease expired (their node died or stalled).

        Each gets a new fence; it becomes available again, or failed when it
        has used its last attempt (which counts toward its parent's fan-in, as
        in commit_outcomes). Returns (id, new state) pairs.
        """

    @abc.abstractmethod
    async def delete_terminal(self, finished_before: datetime, limit: int) -> int:
        """Delete at most `limit` terminal runs finished before the given time.

        A child whose parent is not terminal is kept (the parent reads it);
        a run's signals go with it.
        """

    @abc.abstractmethod
    async def prune_rate_buckets(self) -> int:
        """Delete full buckets no run waits on (they come back full when next named)."""

    @abc.abstractmethod
    async def pending_before(self, queues: Sequence[str], moment: datetime) -> int:
        """How many runs of these queues are available or running, or due before `moment`.

        Due: scheduled to run, or waiting with an await deadline, before `moment`.
        """

    # -- operator actions ------------------------------------------------------

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> Run | None:
        """The run's row, or None."""

    @abc.abstractmethod
    async def get_runs(self, run_ids: Sequence[str]) -> list[Run]:
        """The rows of the runs that exist among these ids."""

    @abc.abstractmethod
    async def list_runs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
    ) -> list[Run]:
        """Runs, newest first, filtered; page with `before_id`."""

    @abc.abstractmethod
    async def cancel_run(self, run_id: str) -> Run | None:
        """Cancel a non-terminal run and its non-terminal descendants; returns its row.

        Running ones lose their lease at once (their nodes are told); inboxes
        are cleared; the run counts toward its parent's fan-in.
        """

    @abc.abstractmethod
    async def retry_run(self, run_id: str) -> Run | None:
        """Make a failed or cancelled run available again with one more attempt allowed."""

    @abc.abstractmethod
    async def running_with_key(self, concurrency_key: str) -> Run | None:
        """The running run holding a concurrency key, if any."""

    @abc.abstractmethod
    async def count_ahead(self, run: Run) -> int:
        """How many available runs of the same queue will be claimed before this one."""

    @abc.abstractmethod
    async def queue_status(self, queue: str) -> QueueStatus:
        """A queue's global limit and run counts by state."""

    @abc.abstractmethod
    async def set_queue_limits(self, limits: Mapping[str, int | None]) -> None:
        """Record each queue's global (cluster-wide) concurrency limit; None removes it."""

    # -- nodes -----------------------------------------------------------------

    @abc.abstractmethod
    async def heartbeat_node(
        self, name: str, queues: Sequence[str], tasks: Sequence[str], concurrency: int, status: str
    ) -> None:
        """Register or refresh this node's row."""

    @abc.abstractmethod
    async def remove_node(self, name: str) -> None:
        """Delete this node's row (clean shutdown)."""

    @abc.abstractmethod
    async def list_nodes(self, alive_within: float) -> list[NodeInfo]:
        """Every node row; `alive` when its heartbeat is younger than `alive_within` seconds."""

    @abc.abstractmethod
    async def prune_nodes(self, dead_after: float) -> list[str]:
        """Delete nodes silent for longer than `dead_after` seconds; returns their names."""

    # -- wake-ups --------------------------------------------------------------

    @abc.abstractmethod
    async def notify(self, payload: str) -> None:
        """Tell listening workers something happened (a queue name, or 'cancel:<id>')."""

    @abc.abstractmethod
    async def listen(self, callback: Callable[[str], None], node: str | None = None) -> bool:
        """Call `callback(payload)` on notifications; False when the backend cannot push them.

        With `node`, wake-ups routed to that node (a workflow run it parked, whose
        live coroutine its cache holds, became available) arrive as '~claim'.
        Routing is advisory: such runs stay claimable by every node.
        """

    def listening(self) -> bool:
        """True while pushed notifications arrive (never, on a polling backend)."""
        return False

    @abc.abstractmethod
    async def changed(self) -> bool:
        """Cheap check whether another connection wrote since the last call (polling backends)."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed call may succeed if repeated (connection lost, database busy)."""
        return isinstance(exc, (OSError, TimeoutError, ConnectionError))

    # -- assets (mainspring.assets) ------------------------------------------------

    @abc.abstractmethod
    async def record_materialization(self, m: MaterializationRow) -> None:
        """Write a finished materialization and its lineage edges atomically; an upsert by id,
        so a step executed again after a crash rewrites its own row (and clears an
        invalidation) instead of adding one."""

    @abc.abstractmethod
    async def latest_materializations(
        self, assets: Sequence[str], partitions: Sequence[str] | None = None
    ) -> list[MaterializationRow]:
        """The latest completed materialization of each (asset, partition) of these assets
        (of these partitions, or every one)."""

    @abc.abstractmethod
    async def list_materializations(
        self, asset: str, partition: str | None, limit: int
    ) -> list[MaterializationRow]:
        """An asset's materializations (of one partition, or all), newest first."""

    @abc.abstractmethod
    async def get_materializations(self, ids: Sequence[str]) -> list[MaterializationRow]:
        """The materializations that exist among these ids."""

    @abc.abstractmethod
    async def downstream_materializations(self, ids: Sequence[str]) -> list[MaterializationRow]:
        """The materializations built (directly) from any of these."""

    @abc.abstractmethod
    async def invalidate_materializations(self, pairs: Sequence[tuple[str, str | None]]) -> int:
        """Mark the latest completed materialization of each (asset, partition; None: every
        partition) invalidated, so it counts as stale; returns how many were marked."""

    @abc.abstractmethod
    async def put_asset_value(self, key: str, data: bytes, compressed: bool) -> None:
        """Keep a value out of line (DbIO's large values)."""

    @abc.abstractmethod
    async def get_asset_value(self, key: str) -> tuple[bytes, bool] | None:
        """A value kept by put_asset_value: (data, compressed)."""

    @abc.abstractmethod
    async def start_scatter(
        self,
        barrier: str,
        asset: str,
        partition: str,
        run_id: str,
        inputs: str,
        keys: Sequence[tuple[str, str]],
    ) -> set[str]:
        """Create (or reuse) a scatter barrier and join its keys ((hash, JSON), distinct) to
        it in one transaction: a key of (asset, partition) already completed from the same
        `inputs` (upstream fingerprint) stays completed, the others become pending.
        Returns the pending hashes (they must run). Idempotent for one barrier."""

    @abc.abstractmethod
    async def finish_scatter(
        self, barrier: str, results: Sequence[ScatterResultRow], status: str
    ) -> None:
        """Record the barrier's instance outcomes and its final counts and status atomically."""

    @abc.abstractmethod
    async def barrier_results(self, barrier: str) -> list[ScatterResultRow]:
        """Every key of a barrier with its status and result."""

    @abc.abstractmethod
    async def list_barriers(
        self, asset: str, partition: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """An asset's scatter barriers, newest first (id, run_id, total, skipped, completed,
        failed, status, created_at, finished_at)."""

    @abc.abstractmethod
    async def count_children(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """The children of each run counted by state (progress of plans and scatters)."""

    @abc.abstractmethod
    async def create_gate(self, gate: GateRow) -> None:
        """Open a gate, or name the asset of one a signal opened first (an upsert: a waiting
        gate takes the new expiry; a resolved one keeps its status)."""

    @abc.abstractmethod
    async def signal_gate(
        self, gate: GateRow, signal_id: str, payload_json: str
    ) -> tuple[str, GateRow | None]:
        """Resolve a gate and put signal "gate" (dedup key = the gate id) in its run's inbox,
        in one transaction. `gate` is the gate as its token describes it: a gate whose row
        does not exist yet is opened first (the run has not parked yet: the signal waits in
        its inbox). Exactly one caller gets 'resumed'; the others get the gate's status
        ('signaled', 'timeout', 'cancelled', 'expired') and nothing changes. A gate whose
        run has finished or is gone is cancelled."""

    @abc.abstractmethod
    async def get_gate(self, gate_id: str) -> GateRow | None:
        """A gate by id."""

    @abc.abstractmethod
    async def close_gate(self, gate_id: str, status: str) -> bool:
        """A waiting gate becomes `status` (timeout, cancelled); False when it was not waiting."""

    @abc.abstractmethod
    async def list_gates(self, status: str | None, limit: int) -> list[GateRow]:
        """Gates (in one status, or all), oldest first."""

    @abc.abstractmethod
    async def sweep_gates(self, grace: float) -> list[GateRow]:
        """Close waiting gates whose run finished or is gone (cancelled) and those more than
        `grace` seconds past their expiry (timeout); returns them."""

    @abc.abstractmethod
    async def take_tokens(self, key: str, cost: float) -> tuple[bool, float] | None:
        """Take `cost` tokens from bucket `key` (the claim's buckets) if it holds them:
        (granted, seconds until `cost` tokens are there); None when its limit is not
        configured."""

    @abc.abstractmethod
    async def reset_rate_buckets(self, name: str) -> int:
        """Refill every bucket of a rate limit."""

    @abc.abstractmethod
    async def acquire_slot(self, name: str, slots: int, holder: str, ttl: float) -> int | None:
        """Take the lowest free slot of a semaphore (never held, or its lease lapsed) for
        `holder`, leased `ttl` seconds; None when all are held. Serialized per name."""

    @abc.abstractmethod
    async def renew_slot(self, name: str, slot: int, holder: str, ttl: float) -> bool:
        """Extend a held slot's lease; False when it lapsed or was taken."""

    @abc.abstractmethod
    async def release_slot(self, name: str, slot: int, holder: str) -> bool:
        """Give a slot back; False when `holder` no longer held it."""

    @abc.abstractmethod
    async def list_slots(self, name: str) -> list[tuple[int, str, datetime]]:
        """The live slots of a semaphore: (slot, holder, lease expiry)."""

    @abc.abstractmethod
    async def reset_slots(self, name: str) -> int:
        """Release every slot of a semaphore."""

    async def execute_script(self, sql: str) -> None:  # pragma: no cover - used by tests/bench only
        """Run raw SQL (tests and benchmarks)."""
        raise NotImplementedError

    async def fetch_value(self, sql: str, *args: Any) -> Any:  # pragma: no cover
        """Fetch one value with raw SQL (tests and benchmarks)."""
        raise NotImplementedError


# -- rows of the asset layer --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaterializationRow:
    """One finished materialization: what was built, from which upstream materializations."""

    id: str
    asset: str
    partition: str
    run_id: str | None
    status: str
    value_ref: Any
    upstream: list[dict[str, Any]]
    metadata: dict[str, Any]
    error: dict[str, Any] | None
    started_at: datetime
    finished_at: datetime
    duration_ms: float | None
    invalidated_at: datetime | None = None


def materialization_from_row(
    row: Any, when: Callable[[Any], datetime | None]
) -> MaterializationRow:
    """A MaterializationRow from a full ms_materializations row."""
    loads = payload.loads
    return MaterializationRow(
        id=row["id"], asset=row["asset"], partition=row["partition"], run_id=row["run_id"],
        status=row["status"], value_ref=loads(row["value_ref"]),
        upstream=loads(row["upstream"]) or [], metadata=loads(row["metadata"]) or {},
        error=loads(row["error"]), started_at=when(row["started_at"]),  # type: ignore[arg-type]
        finished_at=when(row["finished_at"]),  # type: ignore[arg-type]
        duration_ms=row["duration_ms"], invalidated_at=when(row["invalidated_at"]),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ScatterResultRow:
    """One scatter key's outcome: status, result bytes (zlib when `compressed`), error JSON."""

    key_hash: str
    key: Any
    status: str
    result: bytes | None = None
    compressed: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class GateRow:
    """A signal gate: the run waiting on it, its status and expiry."""

    id: str
    run_id: str
    asset: str
    partition: str
    status: str
    expires_at: datetime
    round: int = 0
    payload: Any = None
    signaled_at: datetime | None = None


def gate_from_row(row: Any, when: Callable[[Any], datetime | None]) -> GateRow:
    return GateRow(
        id=row["id"], run_id=row["run_id"], asset=row["asset"], partition=row["partition"],
        status=row["status"], expires_at=when(row["expires_at"]),  # type: ignore[arg-type]
        round=row["round"], payload=payload.loads(row["payload"]),
        signaled_at=when(row["signaled_at"]),
    )  # fmt: skip
