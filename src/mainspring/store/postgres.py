"""The PostgreSQL backend (asyncpg): many nodes on many machines share one database.

Row locks with SKIP LOCKED hand out work, fences make ownership safe, unique
indexes enforce keys, LISTEN/NOTIFY wakes idle workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from mainspring import payload
from mainspring.errors import BackendUnavailable, MainspringError
from mainspring.run import (
    AVAILABLE,
    COMPLETED,
    SCHEDULED,
    TERMINAL,
    WAITING,
    Claimed,
    NewRun,
    NodeInfo,
    Outcome,
    Run,
)
from mainspring.store.base import (
    BucketStatus,
    ChildRow,
    EventRow,
    GateRow,
    MaterializationRow,
    QueueDemand,
    QueueStatus,
    RateLimitConfig,
    ScatterResultRow,
    SignalDelivery,
    SignalRow,
    StepData,
    Store,
    Throttle,
    gate_from_row,
    materialization_from_row,
    run_from_row,
)
from mainspring.store.queries import load_migrations, load_queries

log = logging.getLogger("mainspring.store")

Q = load_queries("postgres")
_TRANSIENT = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)
CHANNEL = "mainspring"
# The pools of the claim and commit statements plan each statement once per
# connection: a custom plan of a claim or a commit cost more than running it
# (the planner estimates `id = ANY($1)` element by element), and the generic
# plans have the same shape, driven by the claim index and the primary key
# (partial-index predicates are constants in the SQL). Every other statement
# keeps custom plans: some (the cluster's among them) need their parameters.
_HOT_PATH = {"plan_cache_mode": "force_generic_plan"}
# Batches this large and plain go in by COPY (see _copy_plain); the columns it fills:
_COPY_MIN = 32
_COPY_COLUMNS = ("id", "name", "queue", "state", "priority", "max_attempts", "input")
_MIGRATION_LOCK = 0x6D61696E  # "main"


def node_channel(node: str) -> str:
    """The LISTEN channel of one node: wake-ups routed to it (a valid, short identifier)."""
    return "mainspring_" + hashlib.blake2b(node.encode(), digest_size=8).hexdigest()


def _routes(rows: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Who to wake for runs that became available: (wake-up tokens, node channels).

    A workflow run parked by a node (its sticky_node) wakes that node at once on
    its own channel, where its cache holds the run; the other nodes of the queue
    get '~later:<queue>' and claim a moment later, so a busy or dead owner costs
    that moment, not a polling interval. Other runs wake their queue.
    """
    queues: set[str] = set()
    later: set[str] = set()
    nodes: set[str] = set()
    for row in rows:
        if row["state"] != AVAILABLE:
            continue
        sticky = row["sticky_node"]
        if sticky is None:
            queues.add(row["queue"])
        else:
            later.add(row["queue"])
            nodes.add(node_channel(sticky))
    return [*sorted(queues), *(f"~later:{q}" for q in sorted(later - queues))], sorted(nodes)


def _same(value: Any) -> Any:
    return value


def _run(row: asyncpg.Record) -> Run:
    return run_from_row(row, _same)


def _claimed(r: asyncpg.Record) -> Claimed:
    """A Claimed from a claim's RETURNING row (its columns are in Claimed's field order)."""
    return Claimed(
        r[0], r[1], r[2], r[3], payload.loads(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], r[11],
        r[12], r[13], r[14], r[15], r[16], r[17],
    )  # fmt: skip


def _insert_arrays(runs: Sequence[NewRun]) -> list[list[Any]]:
    """The arrays of insert_runs, one element per run."""
    return [
        [r.id for r in runs], [r.kind for r in runs], [r.name for r in runs],
        [r.namespace for r in runs], [r.queue for r in runs], [r.state for r in runs],
        [r.priority for r in runs], [r.run_at if r.state == SCHEDULED else None for r in runs],
        [r.max_attempts for r in runs], [r.timeout for r in runs],
        [r.correlation_key for r in runs], [r.concurrency_key for r in runs],
        [r.parent_id for r in runs], [r.input for r in runs], [r.attributes for r in runs],
        [r.step for r in runs], [r.state_data for r in runs], [r.rate_limit for r in runs],
        [r.weight for r in runs], [r.version for r in runs],
        [r.heartbeat_timeout for r in runs], [r.idempotency_key for r in runs],
    ]  # fmt: skip


def _outcome_arrays(outcomes: Sequence[Outcome]) -> list[list[Any]]:
    """The arrays every commit statement starts with ($1..$7)."""
    return [
        [o.id for o in outcomes],
        [o.fence for o in outcomes],
        [o.state for o in outcomes],
        [o.output for o in outcomes],
        [o.error for o in outcomes],
        [o.run_at for o in outcomes],
        [1 if o.refund_attempt else 0 for o in outcomes],
    ]


async def _reset(con: asyncpg.Connection) -> None:
    """Return a connection to the pool without asyncpg's default reset query.

    The default (RESET ALL, UNLISTEN *, ...) is a second round trip on every
    pooled call; the store never changes session state on pooled connections
    (settings come from the connect parameters, locks are transaction-scoped,
    LISTEN has its own connection), so only an open transaction is undone.
    """
    if con.is_in_transaction():
        await con.execute("ROLLBACK")


class PostgresStore(Store):
    """Store on PostgreSQL 14+ through an asyncpg pool."""

    backend = "postgres"

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 10) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._relaxed: asyncpg.Pool | None = None
        self._committing: asyncpg.Pool | None = None
        # Which queues have a global limit, re-read every few seconds: the common
        # unlimited claim then stays one statement.
        self._limited_cache: dict[str, bool] | None = None
        self._limited_checked_at = 0.0
        self._listener: asyncpg.Connection | None = None
        self._rated_cache: bool | None = None
        self._rated_checked_at = 0.0
        self._throttled: list[Throttle] = []

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise MainspringError("the store is not open; call `await store.open()` first")
        return self._pool

    async def _create_pool(self, min_size: int, max_size: int, **settings: str) -> asyncpg.Pool:
        try:
            return await asyncpg.create_pool(
                self.url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=60,
                reset=_reset,
                server_settings={
                    "application_name": "mainspring",
                    # Plan statements with their real parameters (see _HOT_PATH for
                    # the pools that plan once). JIT only costs compile time on these
                    # short statements.
                    "plan_cache_mode": "force_custom_plan",
                    "jit": "off",
                    **settings,
                },
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise BackendUnavailable(f"cannot connect to PostgreSQL at {self.url}: {exc}") from exc

    async def open(self) -> None:
        self._pool = await self._create_pool(self._min_size, self._max_size)

    async def relaxed(self) -> asyncpg.Pool:
        """Connections whose transactions do not wait for their own WAL flush.

        For the writes that a crash of PostgreSQL may safely forget: claims,
        lease extensions, promotions, reaps and heartbeats. A forgotten claim
        puts the run back as it was (it runs again: at-least-once), and since
        every committed outcome bumps the fence, a stale claim can never
        overwrite a committed outcome. Enqueues, outcomes and operator actions
        stay durable: their transactions return only once flushed, and that
        flush also carries every earlier relaxed write.
        """
        if self._relaxed is None:
            self._relaxed = await self._create_pool(1, 3, synchronous_commit="off", **_HOT_PATH)
        return self._relaxed

    async def committing(self) -> asyncpg.Pool:
        """Connections for the outcome commits: durable, and planned once (_HOT_PATH)."""
        if self._committing is None:
            self._committing = await self._create_pool(1, 2, **_HOT_PATH)
        return self._committing

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
            self._listener = None
        for pool in (self._pool, self._relaxed, self._committing):
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()
        self._pool = self._relaxed = self._committing = None

    async def migrate(self) -> int:
        async with self.pool.acquire() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await con.execute(
                "CREATE TABLE IF NOT EXISTS ms_schema (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            # Every migration not yet applied runs (numbers may have gaps; see sqlite.py).
            applied = {r[0] for r in await con.fetch("SELECT version FROM ms_schema")}
            for version, name, sql in load_migrations("postgres"):
                if version not in applied:
                    await con.execute(sql)
                    await con.execute(
                        "INSERT INTO ms_schema (version, name) VALUES ($1, $2)", version, name
                    )
                    applied.add(version)
            return int(max(applied, default=0))

    async def schema_version(self) -> int:
        exists = await self.pool.fetchval("SELECT to_regclass('ms_schema') IS NOT NULL")
        if not exists:
            return 0
        return int(await self.pool.fetchval("SELECT coalesce(max(version), 0) FROM ms_schema"))

    async def insert_runs(self, runs: Sequence[NewRun]) -> dict[str, str]:
        inserted, wake = await self._insert(runs)
        if wake:
            await self.notify(wake)
        result = {r.id: r.id for r in runs}
        keyed = {
            r.correlation_key: r.id for r in runs if r.id not in inserted and r.correlation_key
        }
        if keyed:
            for key, existing in await self.pool.fetch(Q["live_correlation_ids"], list(keyed)):
                result[keyed[key]] = existing
            # Duplicates inside one batch point at the run that won.
            winners = {r.correlation_key: result[r.id] for r in runs if r.id in inserted}
            for r in runs:
                if r.id not in inserted and r.correlation_key in winners:
                    result[r.id] = winners[r.correlation_key]
        return result

    async def _insert(self, runs: Sequence[NewRun]) -> tuple[set[str], str | None]:
        """Insert with the cheapest statement that fits; returns (inserted ids, wake-up)."""
        if len(runs) == 1:
            r = runs[0]
            run_at = r.run_at if r.state == SCHEDULED else None
            if r.rate_limit is None:
                row_id = await self.pool.fetchval(
                    Q["insert_run"], r.id, r.kind, r.name, r.namespace, r.queue, r.state,
                    r.priority, run_at, r.max_attempts, r.timeout, r.correlation_key,
                    r.concurrency_key, r.parent_id, r.input, r.attributes, r.step, r.state_data,
                    r.version, r.heartbeat_timeout, r.idempotency_key,
                )  # fmt: skip
                if row_id is None:
                    return set(), None
                return {row_id}, r.queue if r.state == AVAILABLE else "~timer"
        if len(runs) >= _COPY_MIN and all(r.plain and r.state == AVAILABLE for r in runs):
            copied = await self._copy_plain(runs)
            if copied is not None:
                return copied
        ids = [r.id for r in runs]
        names = [r.name for r in runs]
        queues = [r.queue for r in runs]
        states = [r.state for r in runs]
        priorities = [r.priority for r in runs]
        run_ats = [r.run_at if r.state == SCHEDULED else None for r in runs]
        attempts = [r.max_attempts for r in runs]
        inputs = [r.input for r in runs]
        if all(r.plain for r in runs):
            row = await self.pool.fetchrow(
                Q["insert_plain_runs"], ids, names, queues, states, priorities, run_ats, attempts,
                inputs,
            )  # fmt: skip
        else:
            row = await self.pool.fetchrow(Q["insert_runs"], *_insert_arrays(runs))
        return set(row["ids"]), row["wake"]

    async def _copy_plain(self, runs: Sequence[NewRun]) -> tuple[set[str], str | None] | None:
        """COPY a batch of plain, available runs: the bulk path, half the server time of INSERT.

        Ids are fresh UUIDv7s and plain runs carry no correlation key, so there is
        nothing to dedup; run_at takes its default, the database's now(). A unique
        violation means an earlier try of this same batch committed before its
        answer was lost: None, and the caller re-inserts with ON CONFLICT DO NOTHING.
        """
        records = [
            (r.id, r.name, r.queue, r.state, r.priority, r.max_attempts, r.input) for r in runs
        ]
        try:
            await self.pool.copy_records_to_table("ms_runs", records=records, columns=_COPY_COLUMNS)
        except asyncpg.exceptions.UniqueViolationError:
            return None
        return {r.id for r in runs}, ",".join(sorted({r.queue for r in runs}))

    async def claim_runs(
        self, node: str, demand: Sequence[QueueDemand], lease_ttl: float
    ) -> list[Claimed]:
        queues = [d.queue for d in demand if d.limit > 0]
        limits = [d.limit for d in demand if d.limit > 0]
        if not queues:
            return []
        limited = self._limited(queues)
        if limited is None or limited:
            # Unknown or limited queues: serialize with other claimers of those queues.
            return await self._claim_limited(node, queues, limits, lease_ttl)
        return await self._claim(await self.relaxed(), node, queues, limits, lease_ttl)

    async def _rated(self, con: asyncpg.Pool | asyncpg.Connection) -> bool:
        """Whether rate limits are configured (re-read every few seconds)."""
        now = asyncio.get_running_loop().time()
        if self._rated_cache is None or now - self._rated_checked_at > 5.0:
            self._rated_cache = bool(await con.fetchval(Q["has_rate_limits"]))
            self._rated_checked_at = now
        return self._rated_cache

    def take_throttled(self) -> list[Throttle]:
        throttled, self._throttled = self._throttled, []
        return throttled

    def _limited(self, queues: list[str]) -> list[str] | None:
        cache = self._limited_cache
        loop = asyncio.get_running_loop()
        if cache is None or loop.time() - self._limited_checked_at > 5.0:
            return None
        if any(q not in cache for q in queues):
            return None
        return [q for q in queues if cache[q]]

    async def _claim_limited(
        self, node: str, queues: list[str], limits: list[int], lease_ttl: float
    ) -> list[Claimed]:
        async with (await self.relaxed()).acquire() as con:
            limited = {r["name"] for r in await con.fetch(Q["limited_queues"], queues)}
            self._limited_cache = {q: q in limited for q in queues}
            self._limited_checked_at = asyncio.get_running_loop().time()
            if not limited:
                return await self._claim(con, node, queues, limits, lease_ttl)
            async with con.transaction():
                for queue in sorted(limited):
                    await con.execute(Q["lock_queue"], queue)
                free = {
                    r["name"]: r["free"] for r in await con.fetch(Q["queue_free_slots"], queues)
                }
                limits = [
                    min(n, max(0, free.get(q, n))) for q, n in zip(queues, limits, strict=True)
                ]
                return await self._claim(con, node, queues, limits, lease_ttl)

    async def _claim(
        self,
        con: asyncpg.Pool | asyncpg.Connection,
        node: str,
        queues: list[str],
        limits: list[int],
        lease_ttl: float,
    ) -> list[Claimed]:
        rated = await self._rated(con)
        for _ in range(3):
            try:
                if rated:
                    rows = await con.fetch(
                        Q["claim_rated_runs"], queues, limits, node, lease_ttl, max(limits)
                    )
                else:
                    rows = await con.fetch(Q["claim_runs"], queues, limits, node, lease_ttl)
                break
            except asyncpg.UniqueViolationError:
                # Another node claimed a run with the same concurrency key at the same
                # moment; the index refused ours and nothing was written. Try again.
                continue
        else:
            return []
        claimed = []
        for r in rows:
            if r[0] is None:  # a bucket that granted fewer than were waiting
                self._throttled.append(Throttle(r[2], r[5], r[6]))
                continue
            claimed.append(_claimed(r))
        return claimed

    async def commit_outcomes(self, outcomes: Sequence[Outcome]) -> set[str]:
        if any(o.step or o.parent_id or o.state == WAITING for o in outcomes):
            ids = {o.id for o in outcomes}
            if any(o.parent_id in ids for o in outcomes):
                # A statement updates a row once: the fan-in of a child finishing in the
                # same statement as its parent's own commit would be lost (the parent
                # parked, never woken). The parents go first; their children follow.
                first = [o for o in outcomes if o.parent_id not in ids]
                later = [o for o in outcomes if o.parent_id in ids]
                return await self.commit_outcomes(first) | await self.commit_outcomes(later)
            return await self._commit_steps(outcomes)
        pool = await self.committing()
        if all(o.state == COMPLETED and o.error is None and o.run_at is None for o in outcomes):
            rows = await pool.fetch(
                Q["commit_completed"],
                [o.id for o in outcomes],
                [o.fence for o in outcomes],
                [o.output for o in outcomes],
            )
            return {r[0] for r in rows}
        rows = await pool.fetch(Q["commit_outcomes"], *_outcome_arrays(outcomes))
        return {r[0] for r in rows}

    async def _commit_steps(self, outcomes: Sequence[Outcome]) -> set[str]:
        steps = [o.step for o in outcomes]
        consume = [(o.id, sid) for o in outcomes if o.step for sid in o.step.consume]
        kids = [k for o in outcomes if o.step for k in o.step.children]
        rows = await (await self.committing()).fetch(
            Q["commit_steps"],
            *_outcome_arrays(outcomes),
            [s is not None for s in steps],
            [s.step if s else None for s in steps],
            [s.state_data if s else None for s in steps],
            [s.reset_attempt if s else False for s in steps],
            [payload.dumps(s.awaits) if s and s.awaits is not None else None for s in steps],
            [s.wake_step if s else None for s in steps],
            [s.deadline if s else None for s in steps],
            [o.seen_seq for o in outcomes],
            [s.rate_limit if s else None for s in steps],
            [s.weight if s else 1 for s in steps],
            [len(s.children) if s else 0 for s in steps],
            [c[0] for c in consume],
            [c[1] for c in consume],
            *_insert_arrays(kids),
            [o.id for o in outcomes if o.step for _ in o.step.events],
            [e[0] for o in outcomes if o.step for e in o.step.events],
            [e[1] for o in outcomes if o.step for e in o.step.events],
            [e[2] for o in outcomes if o.step for e in o.step.events],
        )
        woken, nodes = _routes(rows)
        if any(r["state"] == SCHEDULED for r in rows if r["what"] == "child"):
            woken.append("~timer")
        await self._wake(woken, nodes)
        return {r["id"] for r in rows if r["what"] == "run"}

    async def _wake(self, queues: Sequence[str], nodes: Sequence[str], con: Any = None) -> None:
        """Notify the workers of these queues and these node channels, in one statement."""
        if nodes:
            await (con or self.pool).execute(
                Q["notify_routed"], ",".join(queues) if queues else None, list(nodes)
            )
        elif queues:
            await (con or self.pool).execute(Q["notify"], ",".join(queues))

    async def load_step_data(
        self,
        run_ids: Sequence[str],
        *,
        events: bool = False,
        after: Sequence[int] = (),
        children: Sequence[Sequence[str] | None] = (),
    ) -> dict[str, StepData]:
        ids = list(run_ids)
        only = [None if c is None else payload.dumps(list(c)) for c in children]
        rows = await self.pool.fetch(
            Q["load_step_data"], ids, events, list(after) or [0] * len(ids),
            only or [None] * len(ids),
        )  # fmt: skip
        loads = payload.loads
        result = {}
        for row in rows:
            inbox = [
                SignalRow(i, n, p, datetime.fromtimestamp(t, UTC))
                for i, n, p, t in loads(row["inbox"])
            ]
            kids = [ChildRow(*c) for c in loads(row["children"])]
            journal = [EventRow(*e) for e in loads(row["events"])] if events else []
            result[row["id"]] = StepData(inbox, kids, journal)
        return result

    async def insert_with_journal(
        self, run: NewRun, events: Sequence[tuple[int, str, str]]
    ) -> None:
        async with self.pool.acquire() as con, con.transaction():
            row = await con.fetchrow(Q["insert_runs"], *_insert_arrays([run]))
            await con.execute(
                Q["append_events"], run.id, [e[0] for e in events], [e[1] for e in events],
                [e[2] for e in events],
            )  # fmt: skip
        if row["wake"]:
            await self.notify(row["wake"])

    async def send_signal(
        self,
        run_id: str | None,
        correlation_key: str | None,
        signal_id: str,
        name: str,
        payload_json: str,
        dedup_key: str | None,
    ) -> SignalDelivery:
        row = await self.pool.fetchrow(
            Q["send_signal"], run_id, signal_id, name, payload_json, dedup_key, correlation_key
        )
        target = row["run_id"]
        if target is None:
            if correlation_key is not None and run_id is None:
                held = await self.pool.fetchval(Q["terminal_with_key"], correlation_key)
                if held is not None:
                    return SignalDelivery("terminal", held)
            return SignalDelivery("not_found")
        if row["old_state"] in TERMINAL:
            return SignalDelivery("terminal", target)
        if not row["inserted"]:
            return SignalDelivery("duplicate", target)
        woke = row["old_state"] != AVAILABLE and row["new_state"] == AVAILABLE
        if row["new_state"] == AVAILABLE:
            # Available before too: a claim that skipped the row while this held its
            # lock may have used up the enqueue's wake-up, so wake the queue again.
            await self._wake(*_routes([{"state": AVAILABLE, "queue": row["queue"],
                                        "sticky_node": row["sticky_node"]}]))  # fmt: skip
        return SignalDelivery("delivered", target, woke)

    async def set_rate_limits(self, configs: Sequence[RateLimitConfig]) -> None:
        async with self.pool.acquire() as con, con.transaction():
            for c in configs:
                await con.execute(Q["set_rate_limit"], c.name, c.allowed, c.period, c.burst)
        if configs:
            self._rated_cache = True

    async def rate_limit_configs(self) -> dict[str, RateLimitConfig]:
        rows = await self.pool.fetch(Q["rate_limit_configs"])
        return {r["name"]: RateLimitConfig(*r) for r in rows}

    async def rate_limit_status(self, name: str) -> list[BucketStatus]:
        rows = await self.pool.fetch(Q["rate_limit_status"], name)
        return [BucketStatus(r["key"], float(r["tokens"]), int(r["waiting"])) for r in rows]

    async def heartbeat_run(
        self, run_id: str, fence: int, details_json: str, lease_ttl: float
    ) -> bool:
        row = await (await self.relaxed()).fetchval(
            Q["heartbeat_run"], run_id, fence, details_json, lease_ttl
        )
        return row is not None

    async def silent_runs(self, limit: int) -> list[Claimed]:
        rows = await self.pool.fetch(Q["silent_runs"], limit)
        return [_claimed(r) for r in rows]

    async def completed_output(self, name: str, idempotency_key: str) -> str | None:
        value = await self.pool.fetchval(Q["completed_with_key"], name, idempotency_key)
        return None if value is None else str(value)

    async def extend_leases(
        self, node: str, held: Sequence[tuple[str, int]], lease_ttl: float
    ) -> set[str]:
        rows = await (await self.relaxed()).fetch(
            Q["extend_leases"], [h[0] for h in held], [h[1] for h in held], node, lease_ttl
        )
        lost = {(r[0], r[1]) for r in rows}
        return {h[0] for h in held if (h[0], h[1]) not in lost}

    async def promote_due(self, limit: int) -> tuple[list[str], datetime | None]:
        async with (await self.relaxed()).acquire() as con:
            rows = await con.fetch(Q["promote_due"], limit)
            rows += await con.fetch(Q["expire_awaits"], limit)
            queues = sorted({r[0] for r in rows})
            routed = [{"state": AVAILABLE, "queue": r[0], "sticky_node": r[1]} for r in rows]
            await self._wake(*_routes(routed), con=con)
            nxt = await con.fetchval(Q["next_due"])
        return queues, nxt

    async def reap_expired(self, limit: int) -> list[tuple[str, str]]:
        rows = await (await self.relaxed()).fetch(Q["reap_expired"], limit)
        await self._wake(*_routes(rows))
        return [(r["id"], r["state"]) for r in rows if r["id"] is not None]

    async def delete_terminal(self, finished_before: datetime, limit: int) -> int:
        status = await self.pool.execute(Q["delete_terminal"], finished_before, limit)
        return int(status.split()[-1])

    async def prune_rate_buckets(self) -> int:
        status = await self.pool.execute(Q["prune_rate_buckets"])
        return int(status.split()[-1])

    async def pending_before(self, queues: Sequence[str], moment: datetime) -> int:
        return int(await self.pool.fetchval(Q["pending_before"], list(queues), moment))

    async def get_run(self, run_id: str) -> Run | None:
        runs = await self.get_runs([run_id])
        return runs[0] if runs else None

    async def get_runs(self, run_ids: Sequence[str]) -> list[Run]:
        return [_run(r) for r in await self.pool.fetch(Q["get_runs"], list(run_ids))]

    async def list_runs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
    ) -> list[Run]:
        rows = await self.pool.fetch(Q["list_runs"], state, queue, name, before_id, limit)
        return [_run(r) for r in rows]

    async def cancel_run(self, run_id: str) -> Run | None:
        rows = await self.pool.fetch(Q["cancel_run"], run_id)
        woke = {r["woke"] for r in rows if r["woke"]}
        if woke:
            await self.notify(",".join(sorted(woke)))
        return await self.get_run(run_id)

    async def retry_run(self, run_id: str) -> Run | None:
        try:
            row = await self.pool.fetchrow(Q["retry_run"], run_id)
        except asyncpg.UniqueViolationError:
            raise MainspringError(
                f"cannot retry run {run_id}: another live run holds its correlation key"
            ) from None
        if row:
            await self.notify(row["queue"])
        return await self.get_run(run_id)

    async def running_with_key(self, concurrency_key: str) -> Run | None:
        row = await self.pool.fetchrow(Q["running_with_key"], concurrency_key)
        return _run(row) if row else None

    async def count_ahead(self, run: Run) -> int:
        return int(
            await self.pool.fetchval(Q["count_ahead"], run.queue, run.priority, run.run_at, run.id)
        )

    async def queue_status(self, queue: str) -> QueueStatus:
        counts = {r[0]: r[1] for r in await self.pool.fetch(Q["queue_counts"], queue)}
        limit = await self.pool.fetchval(Q["queue_limit"], queue)
        return QueueStatus(queue, limit, counts)

    async def set_queue_limits(self, limits: Mapping[str, int | None]) -> None:
        async with self.pool.acquire() as con:
            for name, limit in limits.items():
                await con.execute(Q["set_queue_limit"], name, limit)
        self._limited_cache = None

    async def heartbeat_node(
        self, name: str, queues: Sequence[str], tasks: Sequence[str], concurrency: int, status: str
    ) -> None:
        await (await self.relaxed()).execute(
            Q["heartbeat_node"],
            name,
            payload.dumps(list(queues)),
            payload.dumps(list(tasks)),
            concurrency,
            status,
        )

    async def remove_node(self, name: str) -> None:
        await self.pool.execute(Q["remove_node"], name)

    async def list_nodes(self, alive_within: float) -> list[NodeInfo]:
        rows = await self.pool.fetch(Q["list_nodes"], alive_within)
        return [
            NodeInfo(
                name=r["name"],
                started_at=r["started_at"],
                heartbeat_at=r["heartbeat_at"],
                queues=payload.loads(r["queues"]),
                tasks=payload.loads(r["tasks"]),
                concurrency=r["concurrency"],
                status=r["status"],
                alive=r["alive"],
            )
            for r in rows
        ]

    async def prune_nodes(self, dead_after: float) -> list[str]:
        return [r[0] for r in await self.pool.fetch(Q["prune_nodes"], dead_after)]

    async def notify(self, payload_text: str) -> None:
        await self.pool.execute(Q["notify"], payload_text)

    async def listen(self, callback: Callable[[str], None], node: str | None = None) -> bool:
        """Listen on a dedicated connection; a lost connection is re-established by the caller."""
        if self._listener is not None and not self._listener.is_closed():
            return True

        def on_notify(_con: Any, _pid: int, _channel: str, text: str) -> None:
            callback(text)

        self._listener = await asyncpg.connect(self.url)
        await self._listener.add_listener(CHANNEL, on_notify)
        if node is not None:
            await self._listener.add_listener(node_channel(node), on_notify)
        return True

    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, _TRANSIENT) or super().is_transient(exc)

    async def changed(self) -> bool:
        return False

    # -- assets (mainspring.assets) ------------------------------------------------

    async def record_materialization(self, m: MaterializationRow) -> None:
        dumps = payload.dumps
        await self.pool.execute(
            Q["record_materialization"], m.id, m.asset, m.partition, m.run_id, m.status,
            dumps(m.value_ref), dumps(m.upstream), dumps(m.metadata),
            None if m.error is None else dumps(m.error), m.started_at, m.finished_at,
            m.duration_ms,
        )  # fmt: skip

    async def latest_materializations(
        self, assets: Sequence[str], partitions: Sequence[str] | None = None
    ) -> list[MaterializationRow]:
        rows = await self.pool.fetch(
            Q["latest_materializations"], list(assets),
            None if partitions is None else list(partitions),
        )  # fmt: skip
        return [materialization_from_row(r, _same) for r in rows]

    async def list_materializations(
        self, asset: str, partition: str | None, limit: int
    ) -> list[MaterializationRow]:
        rows = await self.pool.fetch(Q["list_materializations"], asset, partition, limit)
        return [materialization_from_row(r, _same) for r in rows]

    async def get_materializations(self, ids: Sequence[str]) -> list[MaterializationRow]:
        rows = await self.pool.fetch(Q["get_materializations"], list(ids))
        return [materialization_from_row(r, _same) for r in rows]

    async def downstream_materializations(self, ids: Sequence[str]) -> list[MaterializationRow]:
        rows = await self.pool.fetch(Q["downstream_materializations"], list(ids))
        return [materialization_from_row(r, _same) for r in rows]

    async def invalidate_materializations(self, pairs: Sequence[tuple[str, str | None]]) -> int:
        status = await self.pool.execute(
            Q["invalidate_materializations"], [a for a, _ in pairs], [p for _, p in pairs]
        )
        return int(status.split()[-1])

    async def put_asset_value(self, key: str, data: bytes, compressed: bool) -> None:
        await self.pool.execute(Q["put_asset_value"], key, data, compressed)

    async def get_asset_value(self, key: str) -> tuple[bytes, bool] | None:
        row = await self.pool.fetchrow(Q["get_asset_value"], key)
        return None if row is None else (bytes(row["data"]), bool(row["compressed"]))

    async def start_scatter(
        self,
        barrier: str,
        asset: str,
        partition: str,
        run_id: str,
        inputs: str,
        keys: Sequence[tuple[str, str]],
    ) -> set[str]:
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(Q["start_barrier"], barrier, asset, partition, run_id)
            rows = await con.fetch(
                Q["mark_scatter_keys"], barrier, asset, partition, len(keys),
                [h for h, _ in keys], [k for _, k in keys], inputs,
            )  # fmt: skip
        return {r[0] for r in rows}

    async def finish_scatter(
        self, barrier: str, results: Sequence[ScatterResultRow], status: str
    ) -> None:
        await self.pool.execute(
            Q["finish_barrier"], barrier, [r.key_hash for r in results],
            [r.status for r in results], [r.result for r in results],
            [r.compressed for r in results], [r.error for r in results], status,
        )  # fmt: skip

    async def barrier_results(self, barrier: str) -> list[ScatterResultRow]:
        rows = await self.pool.fetch(Q["barrier_results"], barrier)
        return [
            ScatterResultRow(
                r["key_hash"],
                payload.loads(r["key"]),
                r["status"],
                None if r["result"] is None else bytes(r["result"]),
                r["compressed"],
                r["error"],
            )
            for r in rows
        ]

    async def list_barriers(
        self, asset: str, partition: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(Q["list_barriers"], asset, partition, limit)]

    async def count_children(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for r in await self.pool.fetch(Q["count_children"], list(run_ids)):
            counts.setdefault(r["parent_id"], {})[r["state"]] = r["n"]
        return counts

    async def create_gate(self, gate: GateRow) -> None:
        await self.pool.execute(
            Q["create_gate"], gate.id, gate.run_id, gate.asset, gate.partition, gate.expires_at,
            gate.round,
        )  # fmt: skip

    async def signal_gate(
        self, gate: GateRow, signal_id: str, payload_json: str
    ) -> tuple[str, GateRow | None]:
        queue = None
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(Q["open_gate"], gate.id, gate.run_id, gate.expires_at, gate.round)
            run_id = await con.fetchval(Q["signal_gate"], gate.id, payload_json)
            if run_id is not None:
                row = await con.fetchrow(
                    Q["send_signal"], run_id, signal_id, "gate", payload_json, gate.id, None
                )
                if row["run_id"] is None or row["old_state"] in TERMINAL:
                    await con.execute(Q["cancel_gate"], gate.id)
                    run_id = None
                queue = row["queue"] if row["new_state"] == AVAILABLE else None
        if queue is not None:
            await self.notify(queue)
        found = await self.get_gate(gate.id)
        if run_id is not None:
            return "resumed", found
        if found is None:
            return "not_found", None
        return ("expired" if found.status == "waiting" else found.status), found

    async def get_gate(self, gate_id: str) -> GateRow | None:
        row = await self.pool.fetchrow(Q["get_gate"], gate_id)
        return None if row is None else gate_from_row(row, _same)

    async def close_gate(self, gate_id: str, status: str) -> bool:
        return await self.pool.fetchval(Q["close_gate"], gate_id, status) is not None

    async def list_gates(self, status: str | None, limit: int) -> list[GateRow]:
        return [
            gate_from_row(r, _same) for r in await self.pool.fetch(Q["list_gates"], status, limit)
        ]

    async def sweep_gates(self, grace: float) -> list[GateRow]:
        rows = await self.pool.fetch(Q["sweep_gates"], grace)
        return [gate_from_row(r, _same) for r in rows]

    async def take_tokens(self, key: str, cost: float) -> tuple[bool, float] | None:
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(Q["ensure_bucket"], key, key.split(":", 1)[0])
            row = await con.fetchrow(Q["take_tokens"], key, float(cost))
        return None if row is None else (bool(row["granted"]), float(row["retry_after"]))

    async def reset_rate_buckets(self, name: str) -> int:
        return int((await self.pool.execute(Q["reset_rate_buckets"], name)).split()[-1])

    async def acquire_slot(self, name: str, slots: int, holder: str, ttl: float) -> int | None:
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(Q["lock_slots"], name)
            slot = await con.fetchval(Q["acquire_slot"], name, slots, holder, ttl)
        return None if slot is None else int(slot)

    async def renew_slot(self, name: str, slot: int, holder: str, ttl: float) -> bool:
        return await self.pool.fetchval(Q["renew_slot"], name, slot, holder, ttl) is not None

    async def release_slot(self, name: str, slot: int, holder: str) -> bool:
        return await self.pool.fetchval(Q["release_slot"], name, slot, holder) is not None

    async def list_slots(self, name: str) -> list[tuple[int, str, datetime]]:
        return [(r[0], r[1], r[2]) for r in await self.pool.fetch(Q["list_slots"], name)]

    async def reset_slots(self, name: str) -> int:
        return int((await self.pool.execute(Q["reset_slots"], name)).split()[-1])

    async def execute_script(self, sql: str) -> None:
        await self.pool.execute(sql)

    async def fetch_value(self, sql: str, *args: Any) -> Any:
        return await self.pool.fetchval(sql, *args)
