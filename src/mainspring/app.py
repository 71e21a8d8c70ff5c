"""The App: the registry of handlers and the client API.

`App(url)` is cheap and connects lazily, so importing a module that builds an
App (a worker process, a pool child) touches no database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, overload

from mainspring import payload
from mainspring import payload as _payload
from mainspring.assets.catalog import Assets
from mainspring.assets.gates import Gates
from mainspring.assets.limiter import Limiter
from mainspring.backoff import Backoff
from mainspring.batching import InsertBatcher
from mainspring.cron import Cron
from mainspring.engine.loops import LoopKind, event_loop_factory
from mainspring.errors import ConfigError, EncodeError, RunFailed, RunNotFound
from mainspring.ids import uuid7
from mainspring.portal import Portal
from mainspring.ratelimits import RateLimitRef, RateLimits, bucket_key
from mainspring.run import AVAILABLE, SCHEDULED, TERMINAL, NewRun, NodeInfo, Run
from mainspring.signals import SignalResult
from mainspring.store.base import Store
from mainspring.telemetry import Telemetry

if TYPE_CHECKING:
    from mainspring.assets.asset import AssetDef
    from mainspring.assets.catalog import Lineage, StalePartition
    from mainspring.cluster import KV, Cluster, Groups, Hub, Registry
    from mainspring.cluster.process import Process
    from mainspring.engine.worker import Worker
    from mainspring.machines.machine import Machine, MachineDef
    from mainspring.search import Page
    from mainspring.store.base import MaterializationRow
    from mainspring.workflows.workflow import WorkflowDef

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
M = TypeVar("M", bound="Machine")

Executor = Literal["async", "thread", "process"]
DEFAULT_URL = "sqlite:///mainspring.db"
# Live workflow runs a node keeps between their tasks, by default. A small workflow's
# entry is about 5.5 KB (measured: two activities done, waiting for a signal), so a
# full cache is some 55 MB; runs that hold large locals cost what they hold.
DEFAULT_WORKFLOW_CACHE = 10_000


def make_store(url: str) -> Store:
    """A store for a database URL (not yet opened)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgres", "postgresql"):
        from mainspring.store.postgres import PostgresStore

        return PostgresStore(url)
    if scheme == "sqlite":
        from mainspring.store.sqlite import SqliteStore

        return SqliteStore(url)
    raise ConfigError(
        f"unsupported database URL {url!r}: use sqlite:///path/to/file.db or "
        "postgresql://user@host:5432/db"
    )


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Limits of one queue: `concurrency` per node, `global_limit` across all nodes."""

    name: str
    concurrency: int | None = None
    global_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Periodic:
    """A task enqueued on every tick of a cron expression, exactly once per tick cluster-wide."""

    task: Task[..., Any]
    cron: Cron
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    queue: str | None = None
    priority: int | None = None
    delay: float | None = None
    run_at: datetime | None = None
    correlation_key: str | None = None
    concurrency_key: str | None = None
    max_attempts: int | None = None
    attributes: dict[str, Any] | None = None
    timeout: float | None = None
    rate_limit: RateLimitRef | None = None
    weight: int = 1
    heartbeat_timeout: float | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """A task call ready to enqueue (see `App.enqueue_many`)."""

    task: Task[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: EnqueueOptions

    def to_new_run(self, now: datetime) -> NewRun:
        task, opts = self.task, self.options
        run_at = opts.run_at
        if run_at is not None and run_at.tzinfo is None:
            raise ConfigError("run_at must be timezone-aware (for example datetime.now(UTC))")
        if opts.delay is not None:
            if opts.delay < 0:
                raise ConfigError(f"delay must be >= 0 seconds, got {opts.delay}")
            run_at = now + timedelta(seconds=opts.delay)
        max_attempts = opts.max_attempts if opts.max_attempts is not None else task.max_attempts
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        later = run_at is not None and run_at > now
        key = opts.idempotency_key
        beat = opts.heartbeat_timeout
        if beat is None:
            beat = task.heartbeat_timeout
        # one run of a key executes at a time: the others wait, then reuse its output
        slot = opts.concurrency_key if key is None else idempotency_slot(task.name, key)
        return NewRun(
            id=uuid7(),
            name=task.name,
            queue=opts.queue or task.queue,
            input=payload.encode_call(task.name, self.args, self.kwargs, key),
            state=SCHEDULED if later else AVAILABLE,
            run_at=run_at if later and run_at else now,
            priority=opts.priority if opts.priority is not None else task.priority,
            max_attempts=max_attempts,
            correlation_key=opts.correlation_key,
            concurrency_key=slot,
            attributes=payload.dumps(opts.attributes) if opts.attributes else "{}",
            timeout=opts.timeout if opts.timeout is not None else task.timeout,
            rate_limit=None if opts.rate_limit is None else bucket_key(opts.rate_limit),
            weight=opts.weight,
            heartbeat_timeout=beat,
            idempotency_key=key,
        )


def idempotency_slot(task_name: str, key: str) -> str:
    """The concurrency key that serializes the runs of one task's idempotency key."""
    return f"idempotency:{task_name}:{key}"


_NO_PROCESS_HEARTBEATS = (
    "task {!r}: heartbeat_timeout needs heartbeats, which handlers in the process pool "
    "cannot send; use the thread or async executor"
)
_IDEMPOTENCY = uuid.UUID("6d61696e-7370-7269-6e67-000000000001")  # namespace of start keys


class RunHandle:
    """A reference to one run; `created` is False when an existing run was returned (dedup)."""

    __slots__ = ("app", "created", "id")

    def __init__(self, app: App, run_id: str, created: bool = True) -> None:
        self.app = app
        self.id = run_id
        self.created = created

    def __repr__(self) -> str:
        return f"RunHandle({self.id!r}, created={self.created})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def status(self) -> str:
        """ "started" for a new run, "existing" when an existing one was returned."""
        return "started" if self.created else "existing"

    def get(self) -> Run:
        return self.app.get_run(self.id)

    async def get_async(self) -> Run:
        return await self.app.get_run_async(self.id)

    def result(self, timeout: float | None = 30.0) -> Any:
        """Wait for the run's outcome: its return value, or RunFailed, or TimeoutError."""
        return self.app.result(self.id, timeout=timeout)

    async def result_async(self, timeout: float | None = 30.0) -> Any:
        return await self.app.result_async(self.id, timeout=timeout)

    def cancel(self) -> Run:
        return self.app.cancel(self.id)


class _Enqueuer(Generic[P, R]):
    """Shared enqueue API of a task and of a task with options."""

    task: Task[P, R]
    _options: EnqueueOptions

    def call(self, *args: P.args, **kwargs: P.kwargs) -> Call:
        """A call of this task to pass to `app.enqueue_many`."""
        return Call(self.task, args, kwargs, self._options)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle:
        """Enqueue one run (sync); returns its handle. Arguments must be JSON encodable."""
        return self.task.app.enqueue_many([self.call(*args, **kwargs)])[0]

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> RunHandle:
        """Enqueue one run from async code; returns its handle."""
        return (await self.task.app.enqueue_many_async([self.call(*args, **kwargs)]))[0]


class TaskWithOptions(_Enqueuer[P, R]):
    """A task with per-enqueue options (`task.options(...)`)."""

    def __init__(self, task: Task[P, R], options: EnqueueOptions) -> None:
        self.task = task
        self._options = options


class Task(_Enqueuer[P, R]):
    """A registered handler. Calling it runs the function inline; `enqueue` makes a durable run."""

    def __init__(
        self,
        app: App,
        fn: Callable[P, R],
        *,
        name: str,
        queue: str,
        max_attempts: int,
        priority: int,
        timeout: float | None,
        backoff: Backoff,
        executor: Executor,
        heartbeat_timeout: float | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self.app = app
        self.fn = fn
        self.task = self
        self.name = name
        self.queue = queue
        self.max_attempts = max_attempts
        self.priority = priority
        self.timeout = timeout
        self.backoff = backoff
        self.executor = executor
        self.heartbeat_timeout = heartbeat_timeout
        self.is_async = inspect.iscoroutinefunction(fn)
        self._options = EnqueueOptions()

    @property
    def target(self) -> str:
        """Where a pool process imports the function from: module:qualname."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        correlation_key: str | None = None,
        concurrency_key: str | None = None,
        max_attempts: int | None = None,
        attributes: dict[str, Any] | None = None,
        timeout: float | None = None,
        rate_limit: RateLimitRef | None = None,
        weight: int = 1,
        heartbeat_timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> TaskWithOptions[P, R]:
        """This task with options for the runs enqueued through the result.

        `rate_limit` ("name" or (name, partition)) makes each run wait for
        `weight` tokens of that bucket (see `app.rate_limits.configure`).

        `heartbeat_timeout`: an attempt that goes this many seconds without a
        heartbeat (`ms.current_run().heartbeat()`, counting from its claim) is
        failed by any node's reaper (`ms.HeartbeatTimeout`, retried with the
        backoff), even while its node is alive and keeps its lease.

        `idempotency_key`: runs of this task with the same key execute one at a
        time, and once one of them completed every other run with the key
        completes with that output without calling the function. A failed run
        shares nothing: the next run with the key executes. The output is reused
        while the completed run is kept (the app's `retention` after it
        finished); once GC deleted it, the key executes again. Unlike
        `correlation_key`, which refuses a second *live* run, the runs are all
        inserted and the key deduplicates their *execution*.
        """
        if delay is not None and run_at is not None:
            raise ConfigError("pass either delay or run_at, not both")
        if heartbeat_timeout is not None and heartbeat_timeout <= 0:
            raise ConfigError(f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}")
        if heartbeat_timeout is not None and self.executor == "process":
            raise ConfigError(_NO_PROCESS_HEARTBEATS.format(self.name))
        if idempotency_key is not None and concurrency_key is not None:
            raise ConfigError(
                "idempotency_key already serializes the runs of its key; drop concurrency_key"
            )
        if rate_limit is not None:
            bucket_key(rate_limit)  # validates the name now
        if weight < 1:
            raise ConfigError(f"weight must be >= 1, got {weight}")
        return TaskWithOptions(
            self,
            EnqueueOptions(
                queue, priority, delay, run_at, correlation_key, concurrency_key, max_attempts,
                attributes, timeout, rate_limit, weight, heartbeat_timeout, idempotency_key,
            ),
        )  # fmt: skip


class App:
    """A Mainspring application: handlers, queues, and a client for one database.

    The URL defaults to $MAINSPRING_DATABASE_URL, else sqlite:///mainspring.db in
    the working directory. Nothing connects until the first call that needs to.

    `lease_ttl` is how long a dead node's runs wait before another node resumes
    them. `workflow_cache_size` bounds the parked workflow runs each node keeps
    live, so their next task continues the coroutine instead of replaying the
    journal (an LRU; 0 replays every task; the database stays the authority).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        lease_ttl: float = 30.0,
        node_name: str | None = None,
        migrate: bool = True,
        retention: float = 86_400.0,
        shutdown_grace: float = 25.0,
        process_pool_size: int | None = None,
        workflow_cache_size: int = DEFAULT_WORKFLOW_CACHE,
    ) -> None:
        self.url = url or os.environ.get("MAINSPRING_DATABASE_URL") or DEFAULT_URL
        make_store(self.url)  # validates the URL now, not at first use
        if lease_ttl <= 0:
            raise ConfigError(f"lease_ttl must be > 0 seconds, got {lease_ttl}")
        self.lease_ttl = lease_ttl
        self.node_name = node_name
        self.auto_migrate = migrate
        self.retention = retention
        self.shutdown_grace = shutdown_grace
        self.process_pool_size = process_pool_size or os.cpu_count() or 2
        if workflow_cache_size < 0:
            raise ConfigError(f"workflow_cache_size must be >= 0, got {workflow_cache_size}")
        # live workflow runs each node keeps between their tasks (0: replay every task)
        self.workflow_cache_size = workflow_cache_size
        self.tasks: dict[str, Task[..., Any]] = {}
        self.machines: dict[str, MachineDef] = {}
        self.workflows: dict[str, WorkflowDef] = {}
        self.workflow_versions: dict[tuple[str, str], WorkflowDef] = {}
        self.rate_limits = RateLimits(self)
        self.assets = Assets(self)  # asset pipelines: the methods below delegate to it
        self.gates = Gates(self)
        self.limiter = Limiter(self)
        self._rate_limits_dirty = False
        self.periodics: list[Periodic] = []
        self.queues: dict[str, QueueConfig] = {}
        self.telemetry = Telemetry()
        self._portal: Portal | None = None
        self._portal_lock = threading.Lock()
        self._stores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Store] = (
            weakref.WeakKeyDictionary()
        )
        self._inserters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InsertBatcher] = (
            weakref.WeakKeyDictionary()
        )
        self._opening: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Future[Store]
        ] = weakref.WeakKeyDictionary()
        self._migrated = False
        self._workers: set[Worker] = set()
        self._drained = False
        self._cluster: Cluster | None = None

    def __repr__(self) -> str:
        return f"<mainspring.App {self.url}>"

    # -- registration ------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 20,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        executor: Executor | None = None,
        heartbeat_timeout: float | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 20,
        priority: int = 0,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        executor: Executor | None = None,
        heartbeat_timeout: float | None = None,
    ) -> Any:
        """Register a function as a task (async functions run on the loop, sync ones in threads).

        With `heartbeat_timeout`, an attempt that goes that many seconds without
        a heartbeat is failed and retried (see `Task.options`).
        """

        def register(func: Callable[..., Any]) -> Task[..., Any]:
            task_name = name or f"{func.__module__}.{func.__qualname__}"
            if task_name in self.tasks:
                raise ConfigError(f"a task named {task_name!r} is already registered")
            if max_attempts < 1:
                raise ConfigError(f"task {task_name!r}: max_attempts must be >= 1")
            if timeout is not None and timeout <= 0:
                raise ConfigError(f"task {task_name!r}: timeout must be > 0 seconds")
            if heartbeat_timeout is not None and heartbeat_timeout <= 0:
                raise ConfigError(f"task {task_name!r}: heartbeat_timeout must be > 0 seconds")
            chosen: Executor = executor or (
                "async" if inspect.iscoroutinefunction(func) else "thread"
            )
            if chosen not in ("async", "thread", "process"):
                raise ConfigError(
                    f"task {task_name!r}: executor must be 'async', 'thread' or 'process'"
                )
            if chosen == "async" and not inspect.iscoroutinefunction(func):
                raise ConfigError(f"task {task_name!r}: executor='async' needs an async function")
            if chosen == "thread" and inspect.iscoroutinefunction(func):
                raise ConfigError(f"task {task_name!r}: executor='thread' needs a sync function")
            if chosen == "process" and heartbeat_timeout is not None:
                raise ConfigError(_NO_PROCESS_HEARTBEATS.format(task_name))
            if chosen == "process" and "<locals>" in func.__qualname__:
                raise ConfigError(
                    f"task {task_name!r}: executor='process' needs a module-level function "
                    "so pool processes can import it"
                )
            task = Task(
                self,
                func,
                name=task_name,
                queue=queue,
                max_attempts=max_attempts,
                priority=priority,
                timeout=timeout,
                backoff=backoff or Backoff.exponential(),
                executor=chosen,
                heartbeat_timeout=heartbeat_timeout,
            )
            self.tasks[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        cron: str,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 1,
        priority: int = 0,
        timeout: float | None = None,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a task enqueued on every tick of `cron` (UTC), exactly once per tick."""
        schedule = Cron.parse(cron)

        def register(func: Callable[P, R]) -> Task[P, R]:
            task = self.task(
                name=name, queue=queue, max_attempts=max_attempts, priority=priority,
                timeout=timeout,
            )(func)  # fmt: skip
            call_args, call_kwargs = tuple(args), dict(kwargs or {})
            payload.encode_call(task.name, call_args, call_kwargs)
            self.periodics.append(Periodic(task, schedule, call_args, call_kwargs))
            return task

        return register

    def machine(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 20,
        priority: int = 0,
        backoff: Backoff | None = None,
    ) -> Callable[[type[M]], type[M]]:
        """Register a `ms.Machine` subclass: its public methods are its steps.

        `max_attempts` and `backoff` apply to each step: an exception is a failed
        attempt of that step, retried until the attempts run out.
        """
        from mainspring.machines.machine import Machine, MachineDef, steps_of

        def register(cls: type[M]) -> type[M]:
            if not (isinstance(cls, type) and issubclass(cls, Machine)):
                raise ConfigError(f"@app.machine decorates a subclass of ms.Machine, got {cls!r}")
            machine_name = name or f"{cls.__module__}.{cls.__qualname__}"
            if machine_name in self.machines or machine_name in self.tasks:
                raise ConfigError(f"a task or machine named {machine_name!r} is already registered")
            if max_attempts < 1:
                raise ConfigError(f"machine {machine_name!r}: max_attempts must be >= 1")
            steps = steps_of(cls)
            if cls.initial not in steps:
                raise ConfigError(
                    f"machine {machine_name!r}: its initial step {cls.initial!r} is not a method "
                    f"(steps found: {', '.join(sorted(steps)) or 'none'})"
                )
            definition = MachineDef(
                self, cls, machine_name, queue, max_attempts, priority,
                backoff or Backoff.exponential(), steps,
            )  # fmt: skip
            cls._definition = definition
            self.machines[machine_name] = definition
            return cls

        return register

    # -- the cluster layer (mainspring.cluster) ------------------------------------

    @property
    def cluster(self) -> Cluster:
        """The cluster layer of this app on this node (hub, groups, registry, kv)."""
        if self._cluster is None:
            from mainspring.cluster import Cluster

            self._cluster = Cluster(self)
        return self._cluster

    @property
    def hub(self) -> Hub:
        return self.cluster.hub

    @property
    def groups(self) -> Groups:
        return self.cluster.groups

    @property
    def registry(self) -> Registry:
        return self.cluster.registry

    @property
    def kv(self) -> KV:
        return self.cluster.kv

    def process(
        self,
        cls: Any = None,
        /,
        *,
        name: str | None = None,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
    ) -> Any:
        """Register an `ms.Process` subclass (see mainspring.cluster.process)."""
        from mainspring.cluster.process import register_process

        def register(target: type[Process]) -> type[Process]:
            return register_process(self, target, name, max_restarts, max_seconds)

        return register(cls) if cls is not None else register

    def workflow(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        signals: dict[str, Any] | None = None,
        version: str = "1",
    ) -> Any:
        """Register a workflow: `async def flow(wf: ms.Workflow, input) -> result`.

        Its source is checked for calls that would break replay (clock,
        randomness, I/O, threads): those belong in activities. Runs finish on
        the `version` they started on: register the old function beside a new
        one (same name, new version) while old runs drain; a run whose version
        no node has loaded waits, it is never failed for it. Compatible edits
        keep the version and guard new paths with `wf.patched(...)`.
        """
        from mainspring.workflows.workflow import WorkflowDef, fingerprint

        def register(func: Any) -> Any:
            if not inspect.iscoroutinefunction(func):
                raise ConfigError(f"@app.workflow needs an async function, got {func!r}")
            workflow_name = name or f"{func.__module__}.{func.__qualname__}"
            if (workflow_name, version) in self.workflow_versions or workflow_name in self.tasks:
                raise ConfigError(
                    f"a task or workflow named {workflow_name!r} (version {version}) is "
                    "already registered"
                )
            _check_determinism(func)
            definition = WorkflowDef(
                self, func, workflow_name, queue, version, signals, fingerprint(func)
            )
            self.workflow_versions[workflow_name, version] = definition
            self.workflows[workflow_name] = definition  # new runs start on the latest
            func.workflow_name = workflow_name
            return func

        return register(fn) if fn is not None else register

    # -- assets (mainspring.assets: every method delegates to app.assets) ----------

    @overload
    def asset(self, fn: Callable[..., Any], /) -> AssetDef: ...

    @overload
    def asset(
        self, fn: None = None, /, **options: Any
    ) -> Callable[[Callable[..., Any]], AssetDef]: ...

    def asset(self, fn: Any = None, /, **options: Any) -> Any:
        """Register an asset: `@app.asset(deps=[...], partitions=..., io=..., scatter=...,
        gather=..., gate=...)` (see mainspring.assets)."""
        return self.assets.asset(fn, **options)

    def materialize(self, asset: Any, partition: str | None = None, **options: Any) -> RunHandle:
        """Build an asset partition after its stale or missing upstream; the plan's handle."""
        return self.assets.materialize(asset, partition, **options)

    def materializations(
        self, asset: Any, partition: str | None = None, **options: Any
    ) -> list[MaterializationRow]:
        """An asset's materialization history, newest first."""
        return self.assets.materializations(asset, partition, **options)

    def lineage(self, asset: Any, partition: str | None = None, **options: Any) -> Lineage:
        """The materializations a value was built from, recursively."""
        return self.assets.lineage(asset, partition, **options)

    def stale(self, asset: Any) -> list[StalePartition]:
        """The partitions of an asset that are missing or older than their upstream."""
        return self.assets.stale(asset)

    def backfill(self, asset: Any, partitions: Iterable[str], **options: Any) -> RunHandle:
        """Materialize many partitions, at most `max_parallel` at a time; the backfill's handle."""
        return self.assets.backfill(asset, partitions, **options)

    def invalidate(self, asset: Any, partition: str | None = None) -> int:
        """Mark an asset (a partition, or all) and its downstream stale."""
        return self.assets.invalidate(asset, partition)

    def graph(self, format: Literal["mermaid", "text"] = "text") -> str:
        """The asset graph as Mermaid or text."""
        return self.assets.graph(format)

    async def start_async(
        self,
        workflow: Any,
        input: Any = None,
        *,
        id: str | None = None,
        idempotency_key: str | None = None,
        namespace: str | None = None,
        attributes: dict[str, Any] | None = None,
        queue: str | None = None,
        run_at: datetime | None = None,
    ) -> RunHandle:
        """Start a workflow run; returns its handle.

        With an `id` (or an `idempotency_key`, which names the run id
        deterministically) that exists already, the existing run's handle is
        returned instead (`handle.created` is False, `handle.status` "existing").
        """
        from mainspring.workflows.workflow import _definition_of

        definition = _definition_of(self, workflow)
        if idempotency_key is not None:
            if id is not None:
                raise ConfigError("pass either id or idempotency_key, not both")
            id = str(uuid.uuid5(_IDEMPOTENCY, f"{definition.name}\x1f{idempotency_key}"))
        if id is not None:
            existing = await (await self.store()).get_run(id)
            if existing is not None:
                return RunHandle(self, id, created=False)
        run = definition.new_run(
            input, datetime.now(UTC), id=id, queue=queue, namespace=namespace,
            attributes=attributes, run_at=run_at,
        )  # fmt: skip
        return await self.insert_async(run)

    def start(self, workflow: Any, input: Any = None, **options: Any) -> RunHandle:
        """Start a workflow run (sync client); see `start_async`."""
        return self._sync(self.start_async(workflow, input, **options))

    async def reset_async(self, run_id: str, to_event: int) -> RunHandle:
        """Start a new run that replays `run_id`'s journal up to event `to_event`, then runs live.

        For recovering from a bad deploy: commands the journal had not resolved
        by then are issued again. The old run is cancelled; the new one links
        to it in its attributes (`reset_from`).
        """
        from mainspring.workflows.history import reset_journal

        store = await self.store()
        old = await store.get_run(run_id)
        if old is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        if old.kind != "workflow":
            raise ConfigError(f"run {run_id} is a {old.kind}, not a workflow: only workflows reset")
        journal = (await store.load_step_data([run_id], events=True))[run_id].events
        if not 1 <= to_event <= len(journal):
            raise ConfigError(f"to_event must be from 1 to {len(journal)} (the journal's length)")
        attributes = {**old.attributes, "reset_from": run_id, "reset_to": to_event}
        fresh = dataclasses.replace(
            _new_run_like(old), id=uuid7(), attributes=_payload.dumps(attributes)
        )
        await store.insert_with_journal(fresh, reset_journal(journal, to_event))
        await store.cancel_run(run_id)
        return RunHandle(self, fresh.id)

    def reset(self, run_id: str, to_event: int) -> RunHandle:
        """Reset a workflow run (sync client); see `reset_async`."""
        return self._sync(self.reset_async(run_id, to_event))

    async def schedule_at_async(self, workflow: Any, input: Any, when: datetime) -> RunHandle:
        """A durable one-shot schedule: the run (and its id) exists now and starts at `when`."""
        return await self.start_async(workflow, input, run_at=when)

    def schedule_at(self, workflow: Any, input: Any, when: datetime) -> RunHandle:
        return self._sync(self.schedule_at_async(workflow, input, when))

    def queue(
        self, name: str, *, concurrency: int | None = None, global_limit: int | None = None
    ) -> QueueConfig:
        """Limit a queue: `concurrency` runs at once per node, `global_limit` across the cluster."""
        for label, value in (("concurrency", concurrency), ("global_limit", global_limit)):
            if value is not None and value < 1:
                raise ConfigError(f"queue {name!r}: {label} must be >= 1, got {value}")
        config = QueueConfig(name, concurrency, global_limit)
        self.queues[name] = config
        return config

    # -- stores -------------------------------------------------------------------

    async def store(self) -> Store:
        """The open store for the running event loop (opened and migrated on first use)."""
        loop = asyncio.get_running_loop()
        store = self._stores.get(loop)
        if store is None:
            # Concurrent first calls on a loop share one opening, not one pool each.
            opening = self._opening.get(loop)
            if opening is None:
                opening = self._opening[loop] = asyncio.ensure_future(self.open_store())
            try:
                store = await asyncio.shield(opening)
            finally:
                if opening.done():
                    self._opening.pop(loop, None)
            self._stores[loop] = store
        if self._rate_limits_dirty:
            self._rate_limits_dirty = False
            await store.set_rate_limits(list(self.rate_limits.configs.values()))
        return store

    async def _inserter(self) -> InsertBatcher:
        loop = asyncio.get_running_loop()
        inserter = self._inserters.get(loop)
        if inserter is None:
            inserter = InsertBatcher(await self.store())
            self._inserters[loop] = inserter
        return inserter

    async def open_store(self) -> Store:
        """A new open store for this loop; the caller closes it."""
        store = make_store(self.url)
        await store.open()
        if self.auto_migrate and not self._migrated:
            await store.migrate()
            self._migrated = True
        return store

    def _sync(self, coro: Awaitable[T]) -> T:
        with self._portal_lock:
            if self._portal is None:
                self._portal = Portal()
        return self._portal.call(_wrap(coro))

    async def aclose(self) -> None:
        """Close the store of the running loop."""
        self._inserters.pop(asyncio.get_running_loop(), None)
        store = self._stores.pop(asyncio.get_running_loop(), None)
        if store is not None:
            await store.close()

    def close(self) -> None:
        """Close the sync client (its thread and connections)."""
        with self._portal_lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            try:
                portal.call(self.aclose(), timeout=10)
            finally:
                portal.stop()

    # -- client API ----------------------------------------------------------------

    async def enqueue_many_async(self, calls: Iterable[Call]) -> list[RunHandle]:
        """Enqueue many runs in one round trip; returns their handles in order."""
        now = datetime.now(UTC)
        runs = [call.to_new_run(now) for call in calls]
        if not runs:
            return []
        actual = await (await self._inserter()).insert(runs)
        handles = [RunHandle(self, actual[r.id], actual[r.id] == r.id) for r in runs]
        if self.telemetry.listening("run.enqueued"):
            for run, handle in zip(runs, handles, strict=True):
                self.telemetry.emit(
                    "run.enqueued", id=handle.id, name=run.name, queue=run.queue,
                    state=run.state, created=handle.created,
                )  # fmt: skip
        return handles

    def enqueue_many(self, calls: Iterable[Call]) -> list[RunHandle]:
        return self._sync(self.enqueue_many_async(list(calls)))

    async def insert_async(self, run: NewRun) -> RunHandle:
        """Insert one prepared run (machines start through this); returns its handle."""
        actual = (await (await self._inserter()).insert([run]))[run.id]
        handle = RunHandle(self, actual, actual == run.id)
        if self.telemetry.listening("run.enqueued"):
            self.telemetry.emit(
                "run.enqueued", id=handle.id, name=run.name, queue=run.queue, state=run.state,
                created=handle.created,
            )  # fmt: skip
        return handle

    async def signal_async(
        self,
        run_id: str | None = None,
        name: str | None = None,
        payload: Any = None,
        *,
        correlation_key: str | None = None,
        dedup_key: str | None = None,
        delivery_id: str | None = None,
    ) -> SignalResult:
        """Put a signal in a run's durable inbox, by run id or by the live run's correlation key.

        A second signal with the same (run, dedup_key) is a no-op (DUPLICATE);
        `delivery_id` is the same key under the name webhook senders use. A
        finished run answers TERMINAL, an unknown one NOT_FOUND. A workflow
        declaring `signals=` refuses other names and invalid payloads
        (ms.SignalRejected), writing nothing.
        """
        if (run_id is None) == (correlation_key is None):
            raise ConfigError("signal a run by run_id or by correlation_key (exactly one)")
        if not name or not isinstance(name, str):
            raise ConfigError(f"a signal needs a name (a non-empty string), got {name!r}")
        dedup_key = dedup_key if dedup_key is not None else delivery_id
        if run_id is not None and any(w.signals is not None for w in self.workflows.values()):
            await self._check_signal_contract(run_id, name, payload)
        try:
            data = _payload.dumps(payload)
        except EncodeError as exc:
            raise EncodeError(
                f"the payload of signal {name!r} is not JSON encodable: {exc}"
            ) from None
        store = await self.store()
        delivery = await store.send_signal(run_id, correlation_key, uuid7(), name, data, dedup_key)
        result = SignalResult(delivery.result)
        self.telemetry.emit("signal.sent", name=name, run_id=delivery.run_id, result=result.value)
        return result

    def signal(
        self,
        run_id: str | None = None,
        name: str | None = None,
        payload: Any = None,
        *,
        correlation_key: str | None = None,
        dedup_key: str | None = None,
        delivery_id: str | None = None,
    ) -> SignalResult:
        """Send a signal (sync client); see `signal_async`."""
        return self._sync(
            self.signal_async(
                run_id, name, payload, correlation_key=correlation_key, dedup_key=dedup_key,
                delivery_id=delivery_id,
            )
        )  # fmt: skip

    async def _check_signal_contract(self, run_id: str, name: str, payload: Any) -> None:
        run = await (await self.store()).get_run(run_id)
        if run is None or run.kind != "workflow" or run.name not in self.workflows:
            return
        from mainspring.workflows.workflow import check_signal

        check_signal(self.workflows[run.name], name, payload)

    async def get_run_async(self, run_id: str) -> Run:
        run = await (await self.store()).get_run(run_id)
        if run is None:
            raise RunNotFound(f"no run with id {run_id!r} (it may have been garbage-collected)")
        return run

    def get_run(self, run_id: str) -> Run:
        return self._sync(self.get_run_async(run_id))

    async def list_runs_async(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
    ) -> list[Run]:
        store = await self.store()
        return await store.list_runs(
            state=state, queue=queue, name=name, limit=limit, before_id=before_id
        )

    def list_runs(self, **filters: Any) -> list[Run]:
        return self._sync(self.list_runs_async(**filters))

    async def cancel_async(self, run_id: str) -> Run:
        """Cancel a run that is not finished; a running handler is cancelled on its node.

        A workflow is asked instead: asyncio.CancelledError reaches its code at
        its current await, so it can clean up (with activities) before it ends.
        """
        store = await self.store()
        current = await store.get_run(run_id)
        if current is not None and current.kind == "workflow" and not current.terminal:
            from mainspring.workflows.history import CANCEL_SIGNAL

            await store.send_signal(run_id, None, uuid7(), CANCEL_SIGNAL, "null", "cancel")
            return current
        run = await store.cancel_run(run_id)
        if run is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        return run

    def cancel(self, run_id: str) -> Run:
        return self._sync(self.cancel_async(run_id))

    async def retry_async(self, run_id: str) -> Run:
        """Run a failed or cancelled run again (one more attempt is allowed)."""
        run = await (await self.store()).retry_run(run_id)
        if run is None:
            raise RunNotFound(f"no run with id {run_id!r}")
        return run

    def retry(self, run_id: str) -> Run:
        return self._sync(self.retry_async(run_id))

    async def result_async(self, run_id: str, timeout: float | None = 30.0) -> Any:
        """Wait until the run is terminal; its output, or RunFailed, or TimeoutError.

        A workflow that continued as new is followed to the run that finished the chain.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            run = await self.get_run_async(run_id)
            if run.state in TERMINAL:
                if run.state != "completed":
                    raise RunFailed(run.id, run.state, run.error)
                output = run.output
                if (
                    run.kind == "workflow"
                    and isinstance(output, dict)
                    and (list(output) == ["continued_as_new"])
                ):
                    run_id, pause = output["continued_as_new"], 0.002
                    continue
                return output
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {run_id} still {run.state} after {timeout} s; "
                    "is a worker running for its queue? see `mainspring runs explain`"
                )
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
            pause = min(pause * 1.5, 0.1)

    def result(self, run_id: str, timeout: float | None = 30.0) -> Any:
        return self._sync(self.result_async(run_id, timeout))

    async def nodes_async(self) -> list[NodeInfo]:
        return await (await self.store()).list_nodes(self.lease_ttl)

    def nodes(self) -> list[NodeInfo]:
        return self._sync(self.nodes_async())

    async def migrate_async(self) -> int:
        store = make_store(self.url)
        await store.open()
        try:
            return await store.migrate()
        finally:
            await store.close()

    def migrate(self) -> int:
        return self._sync(self.migrate_async())

    # -- workers -------------------------------------------------------------------

    def run_worker(
        self,
        queues: Iterable[str] | None = None,
        concurrency: int = 50,
        burst: bool = False,
        *,
        loop: LoopKind = "auto",
        **options: Any,
    ) -> None:
        """Run a worker node in this thread until SIGTERM/SIGINT (or, with burst, until idle).

        `loop` "auto" runs it on uvloop when that is installed, else on asyncio's loop.
        """
        with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
            runner.run(self.run_worker_async(queues, concurrency, burst, **options))

    async def run_worker_async(
        self,
        queues: Iterable[str] | None = None,
        concurrency: int = 50,
        burst: bool = False,
        **options: Any,
    ) -> None:
        from mainspring.engine.worker import Worker

        worker = Worker(self, queues=queues, concurrency=concurrency, burst=burst, **options)
        self._workers.add(worker)
        try:
            await worker.run()
        finally:
            self._workers.discard(worker)
            self._drained = self._drained or worker.stopping

    async def query_async(
        self,
        *,
        namespace: str | None = None,
        where: Iterable[Any] = (),
        order_by: tuple[str, str] = ("desc", "created_at"),
        limit: int = 50,
        cursor: str | None = None,
        kind: str | None = "workflow",
    ) -> Page:
        """Search runs (workflows by default) by columns and attributes; see mainspring.search.

        `where` holds (operator, path, value) conditions: eq, ne, gt, gte, lt, lte,
        in, contains, exists on run columns (["state"]) or attribute paths
        (["attributes", "plan"]). Pages are stable under inserts; pass
        `page.next_cursor` back for the next one. Raises ms.QueryError.
        """
        from mainspring.search import query_runs

        return await query_runs(
            await self.store(), namespace=namespace, where=where, order_by=order_by,
            limit=limit, cursor=cursor, kind=kind,
        )  # fmt: skip

    def query(self, **options: Any) -> Page:
        """Search runs (sync client); see `query_async`."""
        return self._sync(self.query_async(**options))

    async def set_attributes_async(self, run_id: str, attributes: dict[str, Any]) -> Run:
        """Merge JSON into a run's search attributes (top level); never journaled or replayed."""
        from mainspring.search import set_attributes

        return await set_attributes(await self.store(), run_id, attributes)

    def set_attributes(self, run_id: str, attributes: dict[str, Any]) -> Run:
        return self._sync(self.set_attributes_async(run_id, attributes))

    def readiness(self) -> str:
        """For deploy probes: 'ready', 'draining', 'drained' (no worker left) or 'degraded'."""
        if not self._workers:
            return "drained" if self._drained else "ready"
        if any(w.stopping for w in self._workers):
            return "draining"
        return "degraded" if any(w.status == "degraded" for w in self._workers) else "ready"

    async def drain_async(self, timeout: float | None = None) -> str:
        """Stop claiming on this process's workers, let workflow tasks and handlers finish
        (up to `timeout`, else the shutdown grace), release what is left; returns readiness."""
        workers = list(self._workers)
        if timeout is not None:
            self.shutdown_grace = timeout
        for worker in workers:
            worker.stop_threadsafe()
        deadline = None if timeout is None else time.monotonic() + timeout + 5
        while self._workers and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        return self.readiness()

    def drain(self, timeout: float | None = None) -> str:
        """Drain the workers of this process (see `drain_async`)."""
        return self._sync(self.drain_async(timeout))


async def _wrap(aw: Awaitable[T]) -> T:
    return await aw


def _check_determinism(fn: Any) -> None:
    """Reject workflow code that would break replay (see mainspring.workflows.check)."""
    try:
        from mainspring.workflows.check import assert_deterministic
    except ImportError:  # pragma: no cover - the checker ships with the package
        return
    assert_deterministic(fn)


def _new_run_like(run: Run) -> NewRun:
    """A new available run with the same workflow, input (and so version) as `run`."""
    return NewRun(
        id=run.id, kind=run.kind, name=run.name, namespace=run.namespace, queue=run.queue,
        input=_payload.dumps(run.input), state=AVAILABLE, run_at=datetime.now(UTC),
        priority=run.priority, max_attempts=run.max_attempts, parent_id=run.parent_id,
    )  # fmt: skip
