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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from mainspring import payload
from mainspring.errors import BackendUnavailable, MainspringError
from mainspring.run import Claimed, NewRun, NodeInfo, Outcome, Run
from mainspring.store.base import QueueDemand, QueueStatus, Store, run_from_row
from mainspring.store.queries import load_migrations, load_queries

Q = load_queries("sqlite")
T = TypeVar("T")

_listeners: dict[str, set[Callable[[str], None]]] = {}
_listeners_lock = threading.Lock()


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _run(row: sqlite3.Row) -> Run:
    return run_from_row(row, _ts)


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
            current = con.execute("SELECT coalesce(max(version), 0) FROM ms_schema").fetchone()[0]
            for version, name, sql in load_migrations("sqlite"):
                if version > current:
                    for statement in _split_script(sql):
                        con.execute(statement)
                    con.execute(
                        "INSERT INTO ms_schema (version, name, applied_at) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
                    current = version
            return int(current)

        return await self._call(self._tx, apply)

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
        rows = [
            [
                r.id, r.kind, r.name, r.namespace, r.queue, r.state, r.priority,
                r.run_at.timestamp() if r.state == "scheduled" else None,
                r.max_attempts, r.timeout, r.correlation_key, r.concurrency_key, r.parent_id,
                r.input, r.attributes,
            ]
            for r in runs
        ]  # fmt: skip
        data = orjson.dumps(rows).decode()
        keys = [r.correlation_key for r in runs if r.correlation_key]

        def insert(con: sqlite3.Connection) -> tuple[list[Any], dict[str, str]]:
            out = con.execute(Q["insert_runs"], {"runs": data, "now": time.time()}).fetchall()
            live: dict[str, str] = {}
            if keys and len(out) < len(rows):
                found = con.execute(
                    Q["live_correlation_ids"], {"keys": orjson.dumps(keys).decode()}
                )
                live = {k: i for k, i in found.fetchall()}
            return out, live

        inserted_rows, live = await self._call(self._tx, insert)
        inserted = {r[0] for r in inserted_rows}
        result = {r.id: r.id for r in runs}
        for r in runs:
            if r.id not in inserted and r.correlation_key in live:
                result[r.id] = live[r.correlation_key]
        woken = sorted({r[1] if r[2] == "available" else "~timer" for r in inserted_rows})
        if woken:
            await self.notify(",".join(woken))
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
            rows: list[Any] = []
            for queue, n in wanted:
                free = con.execute(Q["queue_free_slots"], {"queue": queue}).fetchone()
                if free is not None:
                    n = min(n, max(0, free[0]))
                if n:
                    params = {"node": node, "now": now, "ttl": lease_ttl, "queue": queue, "n": n}
                    rows.extend(con.execute(Q["claim_runs"], params).fetchall())
            return rows

        rows = await self._call(self._tx, claim)
        loads = payload.loads
        return [
            Claimed(r[0], r[1], r[2], r[3], loads(r[4]), r[5], r[6], r[7], r[8], _ts(r[9]))  # type: ignore[arg-type]
            for r in rows
        ]

    async def commit_outcomes(self, outcomes: Sequence[Outcome]) -> set[str]:
        data = orjson.dumps(
            [
                [o.id, o.fence, o.state, o.output, o.error, _epoch(o.run_at), int(o.refund_attempt)]
                for o in outcomes
            ]
        ).decode()

        def commit() -> list[Any]:
            params = {"outcomes": data, "now": time.time()}
            return self.con.execute(Q["commit_outcomes"], params).fetchall()

        return {r[0] for r in await self._call(commit)}

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
        def promote() -> tuple[list[Any], float | None]:
            rows = self.con.execute(
                Q["promote_due"], {"now": time.time(), "limit": limit}
            ).fetchall()
            nxt = self.con.execute(Q["next_due"]).fetchone()[0]
            return rows, nxt

        rows, nxt = await self._call(promote)
        queues = sorted({r[0] for r in rows})
        if queues:
            await self.notify(",".join(queues))
        return queues, _ts(nxt)

    async def reap_expired(self, limit: int) -> list[tuple[str, str]]:
        def reap() -> list[Any]:
            return self.con.execute(
                Q["reap_expired"], {"now": time.time(), "limit": limit}
            ).fetchall()

        rows = await self._call(reap)
        queues = sorted({r[2] for r in rows if r[1] == "available"})
        if queues:
            await self.notify(",".join(queues))
        return [(r[0], r[1]) for r in rows]

    async def delete_terminal(self, finished_before: datetime, limit: int) -> int:
        def delete() -> int:
            params = {"before": finished_before.timestamp(), "limit": limit}
            return self.con.execute(Q["delete_terminal"], params).rowcount

        return await self._call(delete)

    async def pending_before(self, queues: Sequence[str], moment: datetime) -> int:
        def count() -> int:
            params = {"queues": orjson.dumps(list(queues)).decode(), "moment": moment.timestamp()}
            return int(self.con.execute(Q["pending_before"], params).fetchone()[0])

        return await self._call(count)

    # -- operator actions ----------------------------------------------------------

    def _fetch(self, name: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        return self.con.execute(Q[name], params).fetchall()

    async def get_run(self, run_id: str) -> Run | None:
        runs = await self.get_runs([run_id])
        return runs[0] if runs else None

    async def get_runs(self, run_ids: Sequence[str]) -> list[Run]:
        rows = await self._call(
            self._fetch, "get_runs", {"ids": orjson.dumps(list(run_ids)).decode()}
        )
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
        rows = await self._call(self._fetch, "cancel_run", {"id": run_id, "now": time.time()})
        if rows:
            await self.notify(f"cancel:{run_id}")
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

        await self._call(self._tx, write)

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

    async def notify(self, payload_text: str) -> None:
        """Wake listeners in this process at once; other processes see it by polling."""
        with _listeners_lock:
            callbacks = list(_listeners.get(self._key, ()))
        for callback in callbacks:
            callback(payload_text)

    async def listen(self, callback: Callable[[str], None]) -> bool:
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

    async def execute_script(self, sql: str) -> None:
        await self._call(self.con.executescript, sql)

    async def fetch_value(self, sql: str, *args: Any) -> Any:
        def fetch() -> Any:
            row = self.con.execute(sql, args).fetchone()
            return row[0] if row else None

        return await self._call(fetch)


def _split_script(sql: str) -> list[str]:
    """Split a migration into statements (migrations hold no semicolons inside literals)."""
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]
