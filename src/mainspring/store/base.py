"""The persistence contract: every database interaction the engine can make.

Each backend (sqlite.py, postgres.py) is one class that fulfils this list with
its own named SQL (store/sql/<backend>.sql). Telemetry and retries live around
the interface, never inside a backend.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    )


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
        """

    @abc.abstractmethod
    async def commit_outcomes(self, outcomes: Sequence[Outcome]) -> set[str]:
        """Commit attempt outcomes in one statement; returns the ids committed.

        An outcome whose fence no longer matches (lease lost, run cancelled or
        taken over) is not written and its id is absent from the result.
        """

    @abc.abstractmethod
    async def extend_leases(
        self, node: str, held: Sequence[tuple[str, int]], lease_ttl: float
    ) -> set[str]:
        """Extend the leases of (id, fence) pairs this node holds; returns the ids still held."""

    # -- timers and recovery ---------------------------------------------------

    @abc.abstractmethod
    async def promote_due(self, limit: int) -> tuple[list[str], datetime | None]:
        """Make scheduled runs whose run_at has passed available.

        Returns the queues that got work and the next scheduled run_at, if any.
        """

    @abc.abstractmethod
    async def reap_expired(self, limit: int) -> list[tuple[str, str]]:
        """Take back runs whose lease expired (their node died or stalled).

        Each gets a new fence; it becomes available again, or failed when it
        has used its last attempt. Returns (id, new state) pairs.
        """

    @abc.abstractmethod
    async def delete_terminal(self, finished_before: datetime, limit: int) -> int:
        """Delete at most `limit` terminal runs finished before the given time."""

    @abc.abstractmethod
    async def pending_before(self, queues: Sequence[str], moment: datetime) -> int:
        """How many runs of these queues are available or running, or scheduled before `moment`."""

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
        """Cancel a non-terminal run (a running one loses its lease at once); returns its row."""

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
    async def listen(self, callback: Callable[[str], None]) -> bool:
        """Call `callback(payload)` on notifications; False when the backend cannot push them."""

    def listening(self) -> bool:
        """True while pushed notifications arrive (never, on a polling backend)."""
        return False

    @abc.abstractmethod
    async def changed(self) -> bool:
        """Cheap check whether another connection wrote since the last call (polling backends)."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed call may succeed if repeated (connection lost, database busy)."""
        return isinstance(exc, (OSError, TimeoutError, ConnectionError))

    async def execute_script(self, sql: str) -> None:  # pragma: no cover - used by tests/bench only
        """Run raw SQL (tests and benchmarks)."""
        raise NotImplementedError

    async def fetch_value(self, sql: str, *args: Any) -> Any:  # pragma: no cover
        """Fetch one value with raw SQL (tests and benchmarks)."""
        raise NotImplementedError
