"""The SQLite backend: the embedded default, several worker processes on one machine.

One connection per store, used from one dedicated thread (sqlite3 is blocking);
WAL mode lets readers run beside the single writer, and every write is one
short statement or one IMMEDIATE transaction, so processes never deadlock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from mainspring import payload
from mainspring.errors import BackendUnavailable, MainspringError
from mainspring.run import (
    AVAILABLE,
    FAILED,
    RUNNING,
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

Q = load_queries("sqlite")
T = TypeVar("T")

_listeners: dict[str, set[Callable[[str], None]]] = {}
_listeners_lock = threading.Lock()
# Refills (elapsed * allowed / period) can land a hair below a whole token.
_TOKEN_SLACK = 1e-9


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _run(row: sqlite3.Row) -> Run:
    return run_from_row(row, _ts)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def path_from_url(url: str) -> str:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db` or `sqlite://:memory:` to a path."""
    rest = url.split("://", 1)[1] if "://" in url else url
    if rest.startswith("/"):
        rest = rest[1:]
    return rest or "mainspring.db"


class SqliteStore(Store):
    """Store on one SQLite file in WAL mode."""

    backend = "sqlite"

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = path_from_url(url)
        self._key = str(Path(self.path).resolve()) if self.path != ":memory:" else url
        self._executor: ThreadPoolExecutor | None = None
        self._con: sqlite3.Connection | None = None
        self._data_version = 0
        self._callback: Callable[[str], None] | None = None
        self._throttled: list[Throttle] = []
        self._rated_cache: bool | None = None
        self._rated_checked_at = 0.0

    # -- plumbing --------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise MainspringError("the store is not open; call `await store.open()` first")
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    @property
    def con(self) -> sqlite3.Connection:
        assert self._con is not None
        return self._con

    def _connect(self) -> None:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise BackendUnavailable(
                f"SQLite {sqlite3.sqlite_version} is too old: Mainspring needs 3.35 or newer "
                "(RETURNING); upgrade Python or the system SQLite library"
            )
        try:
            con = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA temp_store=MEMORY")
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"cannot open SQLite database {self.path}: {exc}") from exc
        self._con = con

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn inside one IMMEDIATE transaction (the write lock is taken up front)."""
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            result = fn(con)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in one write transaction on the store's thread."""
        return await self._call(self._tx, fn)

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mainspring-sqlite")
        try:
            await self._call(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._callback is not None:
            with _listeners_lock:
                _listeners.get(self._key, set()).discard(self._callback)
            self._callback = None
        if self._executor is None:
            return
        if self._con is not None:
            await self._call(self.con.close)
            self._con = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def migrate(self) -> int:
        def apply(con: sqlite3.Connection) -> int:
            con.execute(
                "CREATE TABLE IF NOT EXISTS ms_schema (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at real NOT NULL)"
            )
            # Every migration not yet applied runs, so numbers may have gaps and a
            # branch's migration merged below an applied one still runs.
            applied = {v for (v,) in con.execute("SELECT version FROM ms_schema")}
            for version, name, sql in load_migrations("sqlite"):
                if version not in applied:
                    for statement in _split_script(sql):
                        con.execute(statement)
                    con.execute(
                        "INSERT INTO ms_schema (version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
                    applied.add(version)
            return max(applied, default=0)

        return await self._write(apply)

    async def schema_version(self) -> int:
        def read() -> int:
            exists = self.con.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ms_schema'"
            ).fetchone()
            if not exists:
                return 0
            return int(
                self.con.execute("SELECT coalesce(max(version), 0) FROM ms_schema").fetchone()[0]
            )

        return await self._call(read)

    # -- enqueue ---------------------------------------------------------------

    async def insert_runs(self, runs: Sequence[NewRun]) -> dict[str, str]:
        keys = [r.correlation_key for r in runs if r.correlation_key]

        def insert(con: sqlite3.Connection) -> tuple[list[Any], dict[str, str]]:
            out = _insert_runs(con, time.time(), runs)
            live: dict[str, str] = {}
            if keys and len(out) < len(runs):
                found = con.execute(Q["live_correlation_ids"], {"keys": _json(keys)})
                live = {k: i for k, i in found.fetchall()}
            return out, live

        inserted_rows, live = await self._write(insert)
        inserted = {r[0] for r in inserted_rows}
        result = {r.id: r.id for r in runs}
        for r in runs:
            if r.id not in inserted and r.correlation_key in live:
                result[r.id] = live[r.correlation_key]
        await self._wake({_wake_queue(r) for r in inserted_rows})
        return result

    # -- the hot path ------------------------------------------------------------

    async def claim_runs(
        self, node: str, demand: Sequence[QueueDemand], lease_ttl: float
    ) -> list[Claimed]:
        wanted = [(d.queue, d.limit) for d in demand if d.limit > 0]
        if not wanted:
            return []

        def claim(con: sqlite3.Connection) -> list[Any]:
            now = time.time()
            room: dict[str, int] = {}
            for queue, n in wanted:
                free = con.execute(Q["queue_free_slots"], {"queue": queue}).fetchone()
                if free is not None:
                    n = min(n, max(0, free[0]))
                if n:
                    room[queue] = n
            # Granted rate-limited runs first (their buckets bound them), so a steady
            # backlog of other runs cannot starve them; other runs fill the rest.
            rated = room and self._rated(con, now)
            rows: list[Any] = self._claim_granted(con, node, lease_ttl, now, room) if rated else []
            taken = Counter(r["queue"] for r in rows)
            for queue, n in room.items():
                if n > taken[queue]:
                    params = {"node": node, "now": now, "ttl": lease_ttl, "queue": queue,
                              "n": n - taken[queue]}  # fmt: skip
                    rows.extend(con.execute(Q["claim_runs"], params).fetchall())
            return rows

        return [_claimed(r) for r in await self._write(claim)]

    def _claim_granted(
        self, con: sqlite3.Connection, node: str, lease_ttl: float, now: float, room: dict[str, int]
    ) -> list[sqlite3.Row]:
        """Claim the rate-limited runs of these queues (at most `room` each) their buckets grant.

        Each bucket grants the longest prefix of its waiting runs, in claim
        order, whose cumulative weight fits its tokens; the granted runs of all
        buckets are then taken in claim order within each queue's room, and
        each bucket is debited what was claimed from it. A bucket whose tokens
        fit fewer runs than were waiting is recorded for take_throttled().
        """
        queues = _json(list(room))
        buckets = con.execute(Q["rated_buckets"], {"queues": queues, "now": now}).fetchall()
        tokens = {b["key"]: float(b["tokens"]) for b in buckets}
        short: dict[str, int] = {}  # buckets whose tokens fit fewer than were waiting
        granted: list[sqlite3.Row] = []
        for key, available in tokens.items():
            params = {"key": key, "queues": queues, "n": sum(room.values())}
            candidates = con.execute(Q["rated_candidates"], params).fetchall()
            fits = _fitting(candidates, available)
            if len(fits) < len(candidates):
                short[key] = len(candidates)
            granted.extend(fits)
        ids = _pick(granted, room)
        if not ids:
            rows = []
        else:
            params = {"node": node, "now": now, "ttl": lease_ttl, "ids": _json(ids)}
            rows = con.execute(Q["claim_granted"], params).fetchall()
        spent: Counter[str] = Counter()
        got: Counter[str] = Counter()
        for r in rows:
            spent[r["rate_limit"]] += r["weight"]
            got[r["rate_limit"]] += 1
        for key, weight in spent.items():
            con.execute(Q["debit_bucket"], {"key": key, "tokens": tokens[key] - weight, "now": now})
        self._throttled.extend(Throttle(k, got[k], n) for k, n in short.items())
        return rows

    def _rated(self, con: sqlite3.Connection, now: float) -> bool:
        """Whether rate limits are configured (re-read every few seconds)."""
        if self._rated_cache is None or now - self._rated_checked_at > 5.0:
            self._rated_cache = bool(con.execute(Q["has_rate_limits"]).fetchone()[0])
            self._rated_checked_at = now
        return self._rated_cache

    def take_throttled(self) -> list[Throttle]:
        throttled, self._throttled = self._throttled, []
        return throttled

    async def commit_outcomes(self, outcomes: Sequence[Outcome]) -> set[str]:
        data = _json([_outcome_row(o) for o in outcomes])
        steps = any(o.step for o in outcomes)
        statement = Q["commit_steps" if steps else "commit_outcomes"]

        def commit(con: sqlite3.Connection) -> tuple[set[str], set[str]]:
            now = time.time()
            rows = con.execute(statement, {"outcomes": data, "now": now}).fetchall()
            if not rows:
                return set(), set()
            # Columns: id, state, queue, parent_id, rate_limit, signal_seq.
            wake = {r[2] for r in rows if r[1] == AVAILABLE}
            if steps:
                wake |= _commit_effects(con, now, rows, outcomes)
            else:  # jobs: only a signalled or child run that finished has more to do
                wake |= _finish(con, now, [r for r in rows if (r[3] or r[5]) and r[1] in TERMINAL])
            return {r[0] for r in rows}, wake

        if steps or any(o.parent_id or o.state == WAITING for o in outcomes):
            committed, wake = await self._write(commit)
        else:
            # Plain outcomes: the UPDATE is the whole commit, so it runs as its own
            # transaction; clearing a finished run's leftover inbox may follow apart.
            committed, wake = await self._call(commit, self.con)
        await self._wake(wake)
        return committed

    async def load_step_data(
        self,
        run_ids: Sequence[str],
        *,
        events: bool = False,
        after: Sequence[int] = (),
        children: Sequence[Sequence[str] | None] = (),
    ) -> dict[str, StepData]:
        only = dict(zip(run_ids, children, strict=True)) if children else {}
        every = [r for r in run_ids if only.get(r) is None]
        pairs = [[r, c] for r, ids in only.items() if ids is not None for c in ids]

        def load() -> tuple[list[sqlite3.Row], list[sqlite3.Row], list[sqlite3.Row]]:
            params = {"ids": _json(list(run_ids))}
            since = list(zip(run_ids, after or [0] * len(run_ids), strict=True))
            journal = self._fetch("load_events", {"runs": _json(since)}) if events else []
            kids = self._fetch("children", {"ids": _json(every)}) if every else []
            if pairs:
                kids += self._fetch("children_by_id", {"pairs": _json(pairs)})
            return self._fetch("inboxes", params), kids, journal

        inboxes, kids, journal = await self._call(load)
        loads = payload.loads
        result = {run_id: StepData([], []) for run_id in run_ids}
        for r in journal:
            result[r["run_id"]].events.append(EventRow(r["seq"], r["kind"], loads(r["data"])))
        for r in inboxes:
            sent_at = datetime.fromtimestamp(r["created_at"], UTC)
            result[r["target_id"]].inbox.append(
                SignalRow(r["id"], r["name"], loads(r["payload"]), sent_at)
            )
        for r in kids:
            result[r["parent_id"]].children.append(
                ChildRow(
                    r["id"], r["kind"], r["name"], r["state"], loads(r["output"]), loads(r["error"])
                )
            )
        return result

    # -- signals and rate limits -------------------------------------------------

    async def insert_with_journal(
        self, run: NewRun, events: Sequence[tuple[int, str, str]]
    ) -> None:
        rows = _json([[run.id, seq, kind, data] for seq, kind, data in events])

        def insert(con: sqlite3.Connection) -> list[sqlite3.Row]:
            now = time.time()
            inserted = _insert_runs(con, now, [run])
            con.execute(Q["append_events"], {"events": rows, "now": now})
            return inserted

        inserted = await self._write(insert)
        await self._wake({_wake_queue(r) for r in inserted})

    async def send_signal(
        self,
        run_id: str | None,
        correlation_key: str | None,
        signal_id: str,
        name: str,
        payload_json: str,
        dedup_key: str | None,
    ) -> SignalDelivery:
        def deliver(con: sqlite3.Connection) -> tuple[SignalDelivery, str | None]:
            signal = (signal_id, name, payload_json, dedup_key)
            return _deliver(con, time.time(), run_id, correlation_key, *signal)

        delivery, queue = await self._write(deliver)
        if queue is not None:
            await self.notify(queue)
        return delivery

    async def set_rate_limits(self, configs: Sequence[RateLimitConfig]) -> None:
        def write(con: sqlite3.Connection) -> None:
            now = time.time()
            for c in configs:
                params = {
                    "name": c.name,
                    "allowed": c.allowed,
                    "period": c.period,
                    "burst": c.burst,
                    "now": now,
                }
                con.execute(Q["set_rate_limit"], params)

        await self._write(write)
        if configs:
            self._rated_cache = True

    async def rate_limit_configs(self) -> dict[str, RateLimitConfig]:
        rows = await self._call(self._fetch, "rate_limit_configs", {})
        return {
            r["name"]: RateLimitConfig(r["name"], r["allowed"], float(r["period"]), r["burst"])
            for r in rows
        }

    async def rate_limit_status(self, name: str) -> list[BucketStatus]:
        rows = await self._call(
            self._fetch, "rate_limit_status", {"name": name, "now": time.time()}
        )
        return [BucketStatus(r["key"], float(r["tokens"]), int(r["waiting"])) for r in rows]

    async def heartbeat_run(
        self, run_id: str, fence: int, details_json: str, lease_ttl: float
    ) -> bool:
        params = {"id": run_id, "fence": fence, "details": details_json, "ttl": lease_ttl}

        def beat(con: sqlite3.Connection) -> bool:
            params["now"] = time.time()
            return con.execute(Q["heartbeat_run"], params).fetchone() is not None

        return await self._write(beat)

    async def silent_runs(self, limit: int) -> list[Claimed]:
        params = {"now": time.time(), "limit": limit}
        return [_claimed(r) for r in await self._call(self._fetch, "silent_runs", params)]

    async def completed_output(self, name: str, idempotency_key: str) -> str | None:
        params = {"name": name, "key": idempotency_key}
        rows = await self._call(self._fetch, "completed_with_key", params)
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    async def extend_leases(
        self, node: str, held: Sequence[tuple[str, int]], lease_ttl: float
    ) -> set[str]:
        data = orjson.dumps([list(h) for h in held]).decode()

        def extend() -> list[Any]:
            params = {"held": data, "node": node, "ttl": lease_ttl, "now": time.time()}
            return self.con.execute(Q["extend_leases"], params).fetchall()

        return {r[0] for r in await self._call(extend)}

    # -- timers and recovery -------------------------------------------------------

    async def promote_due(self, limit: int) -> tuple[list[str], datetime | None]:
        def promote(con: sqlite3.Connection) -> tuple[list[Any], float | None]:
            params = {"now": time.time(), "limit": limit}
            rows = con.execute(Q["promote_due"], params).fetchall()
            rows += con.execute(Q["expire_awaits"], params).fetchall()
            return rows, con.execute(Q["next_due"]).fetchone()[0]

        rows, nxt = await self._write(promote)
        queues = sorted({r[0] for r in rows})
        await self._wake(set(queues))
        return queues, _ts(nxt)

    async def reap_expired(self, limit: int) -> list[tuple[str, str]]:
        def reap(con: sqlite3.Connection) -> tuple[list[Any], set[str]]:
            now = time.time()
            rows = con.execute(Q["reap_expired"], {"now": now, "limit": limit}).fetchall()
            return rows, _finish(con, now, [r for r in rows if r["state"] == FAILED])

        rows, woken = await self._write(reap)
        await self._wake(woken | {r["queue"] for r in rows if r["state"] == AVAILABLE})
        return [(r["id"], r["state"]) for r in rows]

    async def delete_terminal(self, finished_before: datetime, limit: int) -> int:
        def delete(con: sqlite3.Connection) -> int:
            params = {"before": finished_before.timestamp(), "limit": limit}
            ids = [r[0] for r in con.execute(Q["delete_terminal"], params).fetchall()]
            if ids:
                con.execute(Q["delete_signals"], {"ids": _json(ids)})
                con.execute(Q["delete_events"], {"ids": _json(ids)})
            return len(ids)

        return await self._write(delete)

    async def prune_rate_buckets(self) -> int:
        def prune(con: sqlite3.Connection) -> int:
            return con.execute(Q["prune_rate_buckets"], {"now": time.time()}).rowcount

        return await self._write(prune)

    async def pending_before(self, queues: Sequence[str], moment: datetime) -> int:
        def count() -> int:
            params = {"queues": _json(list(queues)), "moment": moment.timestamp()}
            return int(self.con.execute(Q["pending_before"], params).fetchone()[0])

        return await self._call(count)

    # -- operator actions ----------------------------------------------------------

    def _fetch(self, name: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        return self.con.execute(Q[name], params).fetchall()

    async def get_run(self, run_id: str) -> Run | None:
        runs = await self.get_runs([run_id])
        return runs[0] if runs else None

    async def get_runs(self, run_ids: Sequence[str]) -> list[Run]:
        rows = await self._call(self._fetch, "get_runs", {"ids": _json(list(run_ids))})
        return [_run(r) for r in rows]

    async def list_runs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
    ) -> list[Run]:
        params = {
            "state": state,
            "queue": queue,
            "name": name,
            "before_id": before_id,
            "limit": limit,
        }
        return [_run(r) for r in await self._call(self._fetch, "list_runs", params)]

    async def cancel_run(self, run_id: str) -> Run | None:
        def cancel(con: sqlite3.Connection) -> tuple[list[str], set[str]]:
            now = time.time()
            tree = con.execute(Q["cancel_tree"], {"id": run_id}).fetchall()
            if not tree:
                return [], set()
            con.execute(Q["cancel_runs"], {"ids": _json([r["id"] for r in tree]), "now": now})
            # Descendants count toward parents cancelled just before: no wake-up there.
            woken = _finish(con, now, tree)
            return [r["id"] for r in tree if r["state"] == RUNNING], woken

        running, woken = await self._write(cancel)
        for cancelled in running:
            await self.notify(f"cancel:{cancelled}")
        await self._wake(woken)
        return await self.get_run(run_id)

    async def retry_run(self, run_id: str) -> Run | None:
        try:
            rows = await self._call(self._fetch, "retry_run", {"id": run_id, "now": time.time()})
        except sqlite3.IntegrityError:
            raise MainspringError(
                f"cannot retry run {run_id}: another live run holds its correlation key"
            ) from None
        if rows:
            await self.notify(rows[0]["queue"])
        return await self.get_run(run_id)

    async def running_with_key(self, concurrency_key: str) -> Run | None:
        rows = await self._call(self._fetch, "running_with_key", {"key": concurrency_key})
        return _run(rows[0]) if rows else None

    async def count_ahead(self, run: Run) -> int:
        params = {
            "queue": run.queue,
            "priority": run.priority,
            "run_at": run.run_at.timestamp(),
            "id": run.id,
        }
        return int((await self._call(self._fetch, "count_ahead", params))[0][0])

    async def queue_status(self, queue: str) -> QueueStatus:
        counts = {
            r[0]: r[1] for r in await self._call(self._fetch, "queue_counts", {"queue": queue})
        }
        limit_rows = await self._call(self._fetch, "queue_limit", {"queue": queue})
        return QueueStatus(queue, limit_rows[0][0] if limit_rows else None, counts)

    async def set_queue_limits(self, limits: Mapping[str, int | None]) -> None:
        def write(con: sqlite3.Connection) -> None:
            for name, limit in limits.items():
                con.execute(
                    Q["set_queue_limit"], {"queue": name, "limit": limit, "now": time.time()}
                )

        await self._write(write)

    # -- nodes ---------------------------------------------------------------------

    async def heartbeat_node(
        self, name: str, queues: Sequence[str], tasks: Sequence[str], concurrency: int, status: str
    ) -> None:
        params = {
            "name": name,
            "now": time.time(),
            "queues": payload.dumps(list(queues)),
            "tasks": payload.dumps(list(tasks)),
            "concurrency": concurrency,
            "status": status,
        }
        await self._call(self._fetch, "heartbeat_node", params)

    async def remove_node(self, name: str) -> None:
        await self._call(self._fetch, "remove_node", {"name": name})

    async def list_nodes(self, alive_within: float) -> list[NodeInfo]:
        rows = await self._call(
            self._fetch, "list_nodes", {"now": time.time(), "within": alive_within}
        )
        return [
            NodeInfo(
                name=r["name"],
                started_at=datetime.fromtimestamp(r["started_at"], UTC),
                heartbeat_at=datetime.fromtimestamp(r["heartbeat_at"], UTC),
                queues=payload.loads(r["queues"]),
                tasks=payload.loads(r["tasks"]),
                concurrency=r["concurrency"],
                status=r["status"],
                alive=bool(r["alive"]),
            )
            for r in rows
        ]

    async def prune_nodes(self, dead_after: float) -> list[str]:
        rows = await self._call(
            self._fetch, "prune_nodes", {"now": time.time(), "after": dead_after}
        )
        return [r[0] for r in rows]

    # -- wake-ups ------------------------------------------------------------------

    async def _wake(self, queues: set[str]) -> None:
        """Notify the workers of these queues (one notification for all)."""
        if queues:
            await self.notify(",".join(sorted(queues)))

    async def notify(self, payload_text: str) -> None:
        """Wake listeners in this process at once; other processes see it by polling."""
        with _listeners_lock:
            callbacks = list(_listeners.get(self._key, ()))
        for callback in callbacks:
            callback(payload_text)

    async def listen(self, callback: Callable[[str], None], node: str | None = None) -> bool:
        with _listeners_lock:
            _listeners.setdefault(self._key, set()).add(callback)
        self._callback = callback
        return False

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.OperationalError):
            return "locked" in str(exc) or "busy" in str(exc)
        return super().is_transient(exc)

    async def changed(self) -> bool:
        def version() -> int:
            return int(self.con.execute("PRAGMA data_version").fetchone()[0])

        current = await self._call(version)
        changed, self._data_version = current != self._data_version, current
        return changed

    # -- assets (mainspring.assets) ------------------------------------------------

    async def record_materialization(self, m: MaterializationRow) -> None:
        dumps = payload.dumps
        params = {
            "id": m.id, "asset": m.asset, "partition": m.partition, "run_id": m.run_id,
            "status": m.status, "value_ref": dumps(m.value_ref), "upstream": dumps(m.upstream),
            "metadata": dumps(m.metadata), "error": None if m.error is None else dumps(m.error),
            "started_at": _epoch(m.started_at), "finished_at": _epoch(m.finished_at),
            "duration_ms": m.duration_ms,
        }  # fmt: skip

        def record(con: sqlite3.Connection) -> None:
            con.execute(Q["record_materialization"], params)
            con.execute(Q["record_lineage"], {"id": m.id, "upstream": params["upstream"]})

        await self._write(record)

    async def latest_materializations(
        self, assets: Sequence[str], partitions: Sequence[str] | None = None
    ) -> list[MaterializationRow]:
        params = {
            "assets": _json(list(assets)),
            "partitions": None if partitions is None else _json(list(partitions)),
        }
        rows = await self._call(self._fetch, "latest_materializations", params)
        return [materialization_from_row(r, _ts) for r in rows]

    async def list_materializations(
        self, asset: str, partition: str | None, limit: int
    ) -> list[MaterializationRow]:
        params = {"asset": asset, "partition": partition, "limit": limit}
        rows = await self._call(self._fetch, "list_materializations", params)
        return [materialization_from_row(r, _ts) for r in rows]

    async def get_materializations(self, ids: Sequence[str]) -> list[MaterializationRow]:
        rows = await self._call(self._fetch, "get_materializations", {"ids": _json(list(ids))})
        return [materialization_from_row(r, _ts) for r in rows]

    async def downstream_materializations(self, ids: Sequence[str]) -> list[MaterializationRow]:
        params = {"ids": _json(list(ids))}
        rows = await self._call(self._fetch, "downstream_materializations", params)
        return [materialization_from_row(r, _ts) for r in rows]

    async def invalidate_materializations(self, pairs: Sequence[tuple[str, str | None]]) -> int:
        params = {"pairs": _json([list(p) for p in pairs]), "now": time.time()}
        return await self._write(
            lambda con: con.execute(Q["invalidate_materializations"], params).rowcount
        )

    async def put_asset_value(self, key: str, data: bytes, compressed: bool) -> None:
        params = {"key": key, "data": data, "compressed": int(compressed)}
        await self._write(lambda con: con.execute(Q["put_asset_value"], params))

    async def get_asset_value(self, key: str) -> tuple[bytes, bool] | None:
        rows = await self._call(self._fetch, "get_asset_value", {"key": key})
        return None if not rows else (bytes(rows[0]["data"]), bool(rows[0]["compressed"]))

    async def start_scatter(
        self,
        barrier: str,
        asset: str,
        partition: str,
        run_id: str,
        inputs: str,
        keys: Sequence[tuple[str, str]],
    ) -> set[str]:
        def start(con: sqlite3.Connection) -> set[str]:
            now = time.time()
            base = {"asset": asset, "partition": partition, "now": now}
            con.execute(Q["start_barrier"], {**base, "id": barrier, "run_id": run_id})
            pending: set[str] = set()
            for key_hash, key in keys:
                params = {**base, "hash": key_hash, "key": key, "barrier": barrier,
                          "inputs": inputs}  # fmt: skip
                if con.execute(Q["mark_scatter_key"], params).fetchone()[0] == "pending":
                    pending.add(key_hash)
            counts = {"id": barrier, "total": len(keys), "skipped": len(keys) - len(pending)}
            con.execute(Q["count_barrier"], counts)
            return pending

        return await self._write(start)

    async def finish_scatter(
        self, barrier: str, results: Sequence[ScatterResultRow], status: str
    ) -> None:
        def finish(con: sqlite3.Connection) -> None:
            now = time.time()
            con.executemany(
                Q["write_scatter_result"],
                [
                    {
                        "barrier": barrier,
                        "hash": r.key_hash,
                        "status": r.status,
                        "result": r.result,
                        "compressed": int(r.compressed),
                        "error": r.error,
                        "now": now,
                    }
                    for r in results
                ],
            )
            con.execute(Q["close_barrier"], {"id": barrier, "status": status, "now": now})

        await self._write(finish)

    async def barrier_results(self, barrier: str) -> list[ScatterResultRow]:
        rows = await self._call(self._fetch, "barrier_results", {"barrier": barrier})
        return [
            ScatterResultRow(
                r["key_hash"],
                payload.loads(r["key"]),
                r["status"],
                r["result"],
                bool(r["compressed"]),
                r["error"],
            )
            for r in rows
        ]

    async def list_barriers(
        self, asset: str, partition: str | None, limit: int
    ) -> list[dict[str, Any]]:
        params = {"asset": asset, "partition": partition, "limit": limit}
        rows = await self._call(self._fetch, "list_barriers", params)
        found = [dict(r) for r in rows]
        for row in found:
            row["created_at"], row["finished_at"] = _ts(row["created_at"]), _ts(row["finished_at"])
        return found

    async def count_children(self, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        rows = await self._call(self._fetch, "count_children", {"ids": _json(list(run_ids))})
        counts: dict[str, dict[str, int]] = {}
        for r in rows:
            counts.setdefault(r["parent_id"], {})[r["state"]] = r["n"]
        return counts

    async def create_gate(self, gate: GateRow) -> None:
        params = {
            "id": gate.id, "run_id": gate.run_id, "asset": gate.asset,
            "partition": gate.partition, "expires_at": _epoch(gate.expires_at),
            "round": gate.round, "now": time.time(),
        }  # fmt: skip
        await self._write(lambda con: con.execute(Q["create_gate"], params))

    async def signal_gate(
        self, gate: GateRow, signal_id: str, payload_json: str
    ) -> tuple[str, GateRow | None]:
        def resolve(con: sqlite3.Connection) -> tuple[bool, str | None]:
            now = time.time()
            opened = {"id": gate.id, "run_id": gate.run_id, "round": gate.round,
                      "expires_at": _epoch(gate.expires_at), "now": now}  # fmt: skip
            con.execute(Q["open_gate"], opened)
            params = {"id": gate.id, "payload": payload_json, "now": now}
            row = con.execute(Q["signal_gate"], params).fetchone()
            if row is None:
                return False, None
            signal = (signal_id, "gate", payload_json, gate.id)
            delivery, queue = _deliver(con, now, row["run_id"], None, *signal)
            if delivery.result in ("terminal", "not_found"):
                con.execute(Q["cancel_gate"], {"id": gate.id})
                return False, None
            return True, queue

        signaled, queue = await self._write(resolve)
        if queue is not None:
            await self.notify(queue)
        found = await self.get_gate(gate.id)
        if signaled:
            return "resumed", found
        if found is None:
            return "not_found", None
        return ("expired" if found.status == "waiting" else found.status), found

    async def get_gate(self, gate_id: str) -> GateRow | None:
        rows = await self._call(self._fetch, "get_gate", {"id": gate_id})
        return gate_from_row(rows[0], _ts) if rows else None

    async def close_gate(self, gate_id: str, status: str) -> bool:
        params = {"id": gate_id, "status": status}
        return await self._write(
            lambda con: con.execute(Q["close_gate"], params).fetchone() is not None
        )

    async def list_gates(self, status: str | None, limit: int) -> list[GateRow]:
        rows = await self._call(self._fetch, "list_gates", {"status": status, "limit": limit})
        return [gate_from_row(r, _ts) for r in rows]

    async def sweep_gates(self, grace: float) -> list[GateRow]:
        params = {"now": time.time(), "grace": grace}
        rows = await self._write(lambda con: con.execute(Q["sweep_gates"], params).fetchall())
        return [gate_from_row(r, _ts) for r in rows]

    async def take_tokens(self, key: str, cost: float) -> tuple[bool, float] | None:
        def take(con: sqlite3.Connection) -> tuple[bool, float] | None:
            now = time.time()
            params = {"key": key, "name": key.split(":", 1)[0], "now": now}
            con.execute(Q["ensure_bucket"], params)
            row = con.execute(Q["bucket_tokens"], params).fetchone()
            if row is None:
                return None
            tokens = float(row["tokens"])
            granted = tokens + _TOKEN_SLACK >= cost
            left = tokens - cost if granted else tokens
            con.execute(Q["set_bucket_tokens"], {"key": key, "tokens": left, "now": now})
            wait = 0.0 if granted else (cost - tokens) * row["period"] / row["allowed"]
            return granted, wait

        return await self._write(take)

    async def reset_rate_buckets(self, name: str) -> int:
        return await self._write(
            lambda con: con.execute(Q["reset_rate_buckets"], {"name": name}).rowcount
        )

    async def acquire_slot(self, name: str, slots: int, holder: str, ttl: float) -> int | None:
        def acquire(con: sqlite3.Connection) -> int | None:
            now = time.time()
            params = {"name": name, "slots": slots, "holder": holder, "now": now,
                      "expires": now + ttl}  # fmt: skip
            row = con.execute(Q["acquire_slot"], params).fetchone()
            return None if row is None else int(row[0])

        return await self._write(acquire)

    async def renew_slot(self, name: str, slot: int, holder: str, ttl: float) -> bool:
        now = time.time()
        params = {"name": name, "slot": slot, "holder": holder, "now": now, "expires": now + ttl}
        return await self._write(
            lambda con: con.execute(Q["renew_slot"], params).fetchone() is not None
        )

    async def release_slot(self, name: str, slot: int, holder: str) -> bool:
        params = {"name": name, "slot": slot, "holder": holder}
        return await self._write(
            lambda con: con.execute(Q["release_slot"], params).fetchone() is not None
        )

    async def list_slots(self, name: str) -> list[tuple[int, str, datetime]]:
        rows = await self._call(self._fetch, "list_slots", {"name": name, "now": time.time()})
        return [(r[0], r[1], datetime.fromtimestamp(r[2], UTC)) for r in rows]

    async def reset_slots(self, name: str) -> int:
        return await self._write(lambda con: con.execute(Q["reset_slots"], {"name": name}).rowcount)

    async def execute_script(self, sql: str) -> None:
        await self._call(self.con.executescript, sql)

    async def fetch_value(self, sql: str, *args: Any) -> Any:
        def fetch() -> Any:
            row = self.con.execute(sql, args).fetchone()
            return row[0] if row else None

        return await self._call(fetch)


def _deliver(
    con: sqlite3.Connection,
    now: float,
    run_id: str | None,
    correlation_key: str | None,
    signal_id: str,
    name: str,
    payload_json: str,
    dedup_key: str | None,
) -> tuple[SignalDelivery, str | None]:
    """Put a signal in its run's inbox inside the caller's transaction (see send_signal);
    returns the delivery and the queue to wake."""
    target = _signal_target(con, run_id, correlation_key)
    if target is None:
        return SignalDelivery("not_found"), None
    if target["state"] in TERMINAL:
        return SignalDelivery("terminal", target["id"]), None
    signal = {
        "id": signal_id,
        "target": target["id"],
        "name": name,
        "payload": payload_json,
        "dedup_key": dedup_key,
        "now": now,
    }
    if con.execute(Q["insert_signal"], signal).fetchone() is None:
        return SignalDelivery("duplicate", target["id"]), None
    after = con.execute(Q["signal_run"], {"id": target["id"], "name": name, "now": now}).fetchone()
    woke = target["state"] == WAITING and after["state"] == AVAILABLE
    # An available run is woken too: a claim that skipped it may have used the wake-up.
    wake = after["queue"] if after["state"] == AVAILABLE else None
    return SignalDelivery("delivered", target["id"], woke), wake


def _signal_target(
    con: sqlite3.Connection, run_id: str | None, correlation_key: str | None
) -> sqlite3.Row | None:
    """The run (id, state) a signal goes to: by id, else the live run holding the key, else
    the terminal run that held it (the signal is then refused as 'terminal')."""
    found: sqlite3.Row | None = None
    if run_id is not None:
        found = con.execute(Q["signal_target"], {"id": run_id}).fetchone()
    elif correlation_key is not None:
        params = {"key": correlation_key}
        found = con.execute(Q["signal_target_by_key"], params).fetchone()
        if found is None:
            found = con.execute(Q["terminal_with_key"], params).fetchone()
    return found


def _claimed(r: sqlite3.Row) -> Claimed:
    """A Claimed from a claim's RETURNING row (its columns are in Claimed's field order)."""
    return Claimed(
        r[0], r[1], r[2], r[3], payload.loads(r[4]), r[5], r[6], r[7], r[8],
        r[9], r[10], r[11], r[12], r[13], payload.loads(r[14]),
        r[15], r[16], r[17],
    )  # fmt: skip


def _fitting(candidates: Sequence[sqlite3.Row], tokens: float) -> list[sqlite3.Row]:
    """The longest prefix of a bucket's candidates whose cumulative weight fits its tokens."""
    fits: list[sqlite3.Row] = []
    spent = 0
    for c in candidates:
        spent += c["weight"]
        if spent > tokens + _TOKEN_SLACK:
            break
        fits.append(c)
    return fits


def _pick(granted: Sequence[sqlite3.Row], room: Mapping[str, int]) -> list[str]:
    """Granted runs in claim order within each queue's room, one per concurrency key."""
    left = dict(room)
    keys: set[str] = set()
    picked = []
    for c in sorted(granted, key=lambda c: (-c["priority"], c["run_at"], c["id"])):
        key = c["concurrency_key"]
        if left[c["queue"]] <= 0 or key in keys:
            continue
        left[c["queue"]] -= 1
        if key is not None:
            keys.add(key)
        picked.append(c["id"])
    return picked


def _outcome_row(o: Outcome) -> list[Any]:
    """An outcome as commit_outcomes and commit_steps read it; step columns for a machine step."""
    row: list[Any] = [
        o.id, o.fence, o.state, o.output, o.error, _epoch(o.run_at), int(o.refund_attempt),
        o.seen_seq,
    ]  # fmt: skip
    s = o.step
    if s is not None:
        row += [
            s.step, s.state_data, int(s.reset_attempt), s.awaits, s.wake_step,
            _epoch(s.deadline), s.rate_limit, s.weight, len(s.children),
        ]  # fmt: skip
    return row


def _insert_runs(con: sqlite3.Connection, now: float, runs: Sequence[NewRun]) -> list[sqlite3.Row]:
    """Insert runs (skipping duplicates) and create the buckets they name; returns the inserted."""
    data = _json(
        [
            [
                r.id, r.kind, r.name, r.namespace, r.queue, r.state, r.priority,
                r.run_at.timestamp() if r.state == SCHEDULED else None,
                r.max_attempts, r.timeout, r.correlation_key, r.concurrency_key, r.parent_id,
                r.input, r.attributes, r.step, r.state_data, r.rate_limit, r.weight, r.version,
                r.heartbeat_timeout, r.idempotency_key,
            ]
            for r in runs
        ]
    )  # fmt: skip
    rows = con.execute(Q["insert_runs"], {"runs": data, "now": now}).fetchall()
    _ensure_buckets(con, now, [r["rate_limit"] for r in rows])
    return rows


def _ensure_buckets(con: sqlite3.Connection, now: float, keys: Sequence[str | None]) -> None:
    named = [k for k in keys if k is not None]
    if named:
        con.execute(Q["ensure_buckets"], {"keys": _json(named), "now": now})


def _wake_queue(row: sqlite3.Row) -> str:
    """What to wake for an inserted run: its queue when available, the timers when scheduled."""
    return str(row["queue"]) if row["state"] == AVAILABLE else "~timer"


def _commit_effects(
    con: sqlite3.Connection, now: float, rows: Sequence[sqlite3.Row], outcomes: Sequence[Outcome]
) -> set[str]:
    """What committed outcomes do beside their own row; returns the queues to wake.

    Consumed signals are marked, children inserted and buckets created for
    committed steps; terminal runs have their inbox cleared and count toward
    their parent's fan-in.
    """
    states = {r["id"]: r["state"] for r in rows}
    steps = [(o.id, o.step) for o in outcomes if o.step is not None and o.id in states]
    pairs = [
        [run_id, signal_id]
        for run_id, step in steps
        if states[run_id] not in TERMINAL
        for signal_id in step.consume
    ]
    if pairs:
        con.execute(Q["consume_signals"], {"pairs": _json(pairs), "now": now})
    journal = [
        [run_id, seq, kind, data] for run_id, step in steps for seq, kind, data in step.events
    ]
    if journal:
        con.execute(Q["append_events"], {"events": _json(journal), "now": now})
    wake: set[str] = set()
    children = [child for _, step in steps for child in step.children]
    if children:
        wake |= {_wake_queue(r) for r in _insert_runs(con, now, children)}
    _ensure_buckets(con, now, [r["rate_limit"] for r in rows])
    return wake | _finish(con, now, [r for r in rows if r["state"] in TERMINAL])


def _finish(con: sqlite3.Connection, now: float, finished: Sequence[sqlite3.Row]) -> set[str]:
    """Runs (rows with id, parent_id, signal_seq) that just became terminal: clear their
    inboxes and count them toward their parents' fan-in. Returns the queues of parents woken.

    A run whose signal_seq is 0 never received a signal, so it has no inbox to clear.
    """
    signalled = [r["id"] for r in finished if r["signal_seq"]]
    if signalled:
        con.execute(Q["clear_inboxes"], {"ids": _json(signalled), "now": now})
    parents = [r["parent_id"] for r in finished if r["parent_id"] is not None]
    if not parents:
        return set()
    rows = con.execute(Q["fan_in"], {"parents": _json(parents), "now": now}).fetchall()
    return {r["queue"] for r in rows if r["state"] == AVAILABLE}


def _split_script(sql: str) -> list[str]:
    """Split a migration into statements (migrations hold no semicolons inside literals)."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
