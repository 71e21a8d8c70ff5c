"""How materializations run: three machines and one task per scatter asset.

- `mainspring.assets.plan` (one per `app.materialize`): decides which upstream
  assets are missing or stale, then builds them level by level, in
  dependency order, each level a Spawn fan-out whose fan-in starts the next.
- `mainspring.assets.materialize` (one per asset and partition built): loads
  the upstream values, calls the asset function, stores the value through the
  asset's IO manager and records the materialization with its lineage. A
  scatter asset spawns its instances instead and gathers them in a second
  step; a gated asset parks on its gate.
- `mainspring.assets.backfill`: many partitions, at most `max_parallel` plans at once.
- `mainspring.assets.scatter:<asset>` tasks: one run per scatter key.

They are ordinary machines and tasks, so claims, fencing, leases, retries,
signals, rate limits, queue limits and cancellation are the engine's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mainspring import payload
from mainspring.assets.asset import AssetContext, AssetDef, call, upstream_kwargs
from mainspring.assets.gates import SIGNAL, GateHandle, GateSuspended, gate_id
from mainspring.assets.scatter import (
    ScatterKey,
    decode_result,
    encode_result,
    result_bytes,
    scatter_keys,
)
from mainspring.context import current_run
from mainspring.machines.machine import ChildSpec, Machine, StepContext
from mainspring.machines.outcomes import Await, Done, Next, Retry, Spawn, Stop
from mainspring.run import COMPLETED, NewRun
from mainspring.store.base import GateRow, MaterializationRow, ScatterResultRow

if TYPE_CHECKING:
    from mainspring.app import App
    from mainspring.assets.catalog import Assets

log = logging.getLogger("mainspring.assets")

PLAN = "mainspring.assets.plan"
MATERIALIZE = "mainspring.assets.materialize"
BACKFILL = "mainspring.assets.backfill"


@dataclass(frozen=True, slots=True)
class _Child(ChildSpec):
    """A child machine run with its own attempt budget (an asset's max_attempts)."""

    max_attempts: int | None = None

    def to_new_run(self, parent_id: str, now: datetime) -> NewRun:
        return self.machine.new_run(
            self.state, now, queue=self.queue, priority=self.priority, parent_id=parent_id,
            max_attempts=self.max_attempts,
        )  # fmt: skip


def register_machines(app: App, assets: Assets) -> None:
    """Register the asset machines on `app` (once)."""

    def compute_child(name: str, partition: str) -> _Child:
        asset = assets.get(name)
        state = {"asset": name, "partition": partition}
        return _Child(Materialize._def(), state, asset.queue, asset.priority, asset.max_attempts)

    @app.machine(name=PLAN, queue=assets.queue, max_attempts=5)
    class Plan(Machine):
        """Build an asset's stale or missing upstream, level by level, then the asset."""

        initial = "plan"

        async def plan(self, ctx: StepContext, state: dict[str, Any]) -> Any:
            levels = await assets.plan(state["asset"], state["partition"], state.get("force"))
            state = {**state, "levels": levels, "level": 0}
            children = [compute_child(n, state["partition"]) for n in levels[0]]
            return Spawn(children, then="advance", state=state)

        async def advance(self, ctx: StepContext, state: dict[str, Any]) -> Any:
            failed = [c for c in ctx.children if c.state != COMPLETED]
            if failed:
                reasons = "; ".join(_reason(c.state, c.error) for c in failed)
                return Stop(f"materializing {state['asset']} failed: {reasons}")
            level = state["level"] + 1
            if level < len(state["levels"]):
                children = [compute_child(n, state["partition"]) for n in state["levels"][level]]
                return Spawn(children, then="advance", state={**state, "level": level})
            built = [c.output for c in ctx.children]
            target = next(o for o in built if o["asset"] == state["asset"])
            return Done({**target, "built": [o["asset"] for o in built]})

    @app.machine(name=MATERIALIZE, queue=assets.queue, max_attempts=3)
    class Materialize(Machine):
        """Build one asset partition: compute (or scatter, then gather), record it."""

        initial = "compute"

        async def compute(self, ctx: StepContext, state: dict[str, Any]) -> Any:
            return await Step(assets, ctx, state).compute()

        async def gather(self, ctx: StepContext, state: dict[str, Any]) -> Any:
            return await Step(assets, ctx, state).gather()

        async def gate_timeout(self, ctx: StepContext, state: dict[str, Any]) -> Any:
            return await Step(assets, ctx, state).gate_timeout()

    @app.machine(name=BACKFILL, queue=assets.queue, max_attempts=5)
    class Backfill(Machine):
        """Materialize an asset over many partitions, at most max_parallel at a time."""

        initial = "advance"

        async def advance(self, ctx: StepContext, state: dict[str, Any]) -> Any:
            start = state.get("next", 0)
            parts = state["partitions"]
            if start >= len(parts):
                done = {c.output["partition"] for c in ctx.children if c.state == COMPLETED}
                return Done({"succeeded": [p for p in parts if p in done],
                             "failed": [p for p in parts if p not in done]})  # fmt: skip
            chunk = parts[start : start + state["max_parallel"]]
            plans = [
                ChildSpec(
                    Plan._def(),
                    {"asset": state["asset"], "partition": p, "force": state.get("force", False)},
                )
                for p in chunk
            ]
            return Spawn(plans, then="advance", state={**state, "next": start + len(chunk)})

    assets.machines = (Plan, Materialize, Backfill)


def _reason(state: str, error: dict[str, Any] | None) -> str:
    if state == "cancelled":
        return "cancelled"
    return (error or {}).get("message") or state


class Step:
    """One step of a materialization run."""

    def __init__(self, assets: Assets, ctx: StepContext, state: dict[str, Any]) -> None:
        self.assets = assets
        self.app = assets.app
        self.ctx = ctx
        self.state = state
        self.asset = assets.get(state["asset"])
        self.partition: str = state["partition"]

    def context(self, upstream: dict[str, MaterializationRow], **extra: Any) -> AssetContext:
        started = self.state.get("started")
        return AssetContext(
            self.app, self.asset.name, self.partition, self.ctx.run_id, self.ctx.attempt,
            self.ctx.node, upstream,
            started_at=datetime.fromtimestamp(started, UTC) if started else datetime.now(UTC),
            **extra,
        )  # fmt: skip

    async def compute(self) -> Any:
        asset = self.asset
        self.state.setdefault("started", time.time())
        upstream = await self.assets.upstream_of(asset, self.partition)
        if isinstance(upstream, str):
            return await self.fail(upstream)
        values = {d: await self.assets.load(row) for d, row in upstream.items()}
        if asset.scatter is not None:
            return await self.scatter(upstream, values)
        handle = None
        if asset.gate is not None:
            handle = self.gate_handle()
        ctx = self.context(upstream, _gate=handle)
        try:
            value = await call(asset.fn, ctx, **upstream_kwargs(asset.fn, values, 1))
        except GateSuspended as suspended:
            return await self.suspend(suspended.gate)
        except Exception as exc:
            return await self.failed_attempt(exc)
        return await self.record(value, upstream, ctx.metadata)

    async def record(
        self, value: Any, upstream: dict[str, MaterializationRow], metadata: dict[str, Any]
    ) -> Any:
        """Store the value, record the materialization and finish the run."""
        store = await self.app.store()
        ref = await self.asset.io.store(store, self.asset.name, self.partition, self.ctx.run_id,
                                        value)  # fmt: skip
        if self.asset.version is not None:
            metadata = {**metadata, "code_version": self.asset.version}
        await self.write(COMPLETED, ref, upstream, metadata, None)
        self.app.telemetry.emit("asset.materialized", asset=self.asset.name,
                                partition=self.partition, id=self.ctx.run_id)  # fmt: skip
        return Done({"asset": self.asset.name, "partition": self.partition,
                     "materialization": self.ctx.run_id})  # fmt: skip

    async def write(
        self,
        status: str,
        ref: Any,
        upstream: dict[str, MaterializationRow],
        metadata: dict[str, Any],
        error: dict[str, Any] | None,
    ) -> None:
        now = datetime.now(UTC)
        started = datetime.fromtimestamp(self.state.get("started") or time.time(), UTC)
        lineage = [{"asset": r.asset, "partition": r.partition, "id": r.id}
                   for r in upstream.values()]  # fmt: skip
        row = MaterializationRow(
            id=self.ctx.run_id, asset=self.asset.name, partition=self.partition,
            run_id=self.ctx.run_id, status=status, value_ref=ref, upstream=lineage,
            metadata=metadata, error=error, started_at=started, finished_at=now,
            duration_ms=(now - started).total_seconds() * 1000,
        )  # fmt: skip
        await (await self.app.store()).record_materialization(row)

    async def fail(self, message: str, details: dict[str, Any] | None = None) -> Any:
        """Record a failed materialization and end the run (no retry)."""
        error = {"type": "AssetFailed", "message": message, **(details or {})}
        await self.write("failed", None, {}, {}, error)
        self.app.telemetry.emit("asset.failed", asset=self.asset.name, partition=self.partition,
                                id=self.ctx.run_id, error=message)  # fmt: skip
        return Stop(message, details or {})

    async def failed_attempt(self, exc: Exception) -> Any:
        label = f"{self.asset.name}[{self.partition}]" if self.partition else self.asset.name
        if self.ctx.attempt < self.ctx.max_attempts:
            delay = self.asset.backoff.delay(self.ctx.attempt)
            log.warning("asset %s: attempt %d failed (%s: %s); retrying in %.1f s", label,
                        self.ctx.attempt, type(exc).__name__, exc, delay)  # fmt: skip
            return Retry(delay=delay)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        message = (f"asset {label} failed after {self.ctx.attempt} attempts: "
                   f"{type(exc).__name__}: {exc}")  # fmt: skip
        return await self.fail(message, {"asset": self.asset.name, "traceback": tb})

    # -- scatter ---------------------------------------------------------------------

    async def scatter(self, upstream: dict[str, MaterializationRow], values: dict[str, Any]) -> Any:
        asset = self.asset
        assert asset.scatter is not None and asset.scatter_options is not None
        try:
            keys = scatter_keys(
                await call(asset.scatter, **upstream_kwargs(asset.scatter, values, 0))
            )
        except Exception as exc:
            return await self.failed_attempt(exc)
        inputs = ",".join(sorted(r.id for r in upstream.values()))
        barrier = self.ctx.run_id
        store = await self.app.store()
        pending = await store.start_scatter(
            barrier, asset.name, self.partition, self.ctx.run_id, inputs,
            [(k.hash, k.canonical) for k in keys],
        )  # fmt: skip
        self.app.telemetry.emit("scatter.start", asset=asset.name, partition=self.partition,
                                barrier=barrier, total=len(keys), pending=len(pending))  # fmt: skip
        task = self.app.tasks[asset.instance_task]
        options = asset.scatter_options
        run = task.options(queue=self.assets.instance_queue(asset), priority=options.priority,
                           rate_limit=options.rate_limit, weight=options.weight)  # fmt: skip
        lineage = {d: r.id for d, r in upstream.items()}
        calls = [run.call(self.partition, k.value, k.hash, lineage) for k in keys
                 if k.hash in pending]  # fmt: skip
        state = {**self.state, "barrier": barrier, "upstream": lineage}
        return Spawn(calls, then="gather", state=state)

    async def gather(self) -> Any:
        """Record the instances' outcomes; continue with the successes or fail the scatter.

        Idempotent: executed again after a crash it reads the barrier as the first
        execution left it and reaches the same verdict.
        """
        asset = self.asset
        options = asset.scatter_options
        assert options is not None
        store = await self.app.store()
        barrier = self.state["barrier"]
        keys = {r.key_hash: r for r in await store.barrier_results(barrier)}
        results: dict[str, ScatterResultRow] = {}
        errors: list[dict[str, Any]] = []
        for child in self.ctx.children:
            output = child.output
            if child.state == COMPLETED and isinstance(output, dict) and "h" in output:
                data, compressed = result_bytes(output)
                results[output["h"]] = ScatterResultRow(output["h"], keys[output["h"]].key,
                                                        COMPLETED, data, compressed)  # fmt: skip
            elif child.error is not None:
                errors.append(child.error)
        failed = [h for h, r in keys.items() if r.status != COMPLETED and h not in results]
        ran = len(self.ctx.children)
        ok = options.accepts(len(failed), ran)
        status = ("completed" if not failed else "partial_failure") if ok else "failed"
        rows = list(results.values()) + [
            ScatterResultRow(h, None, "failed", error=payload.dumps({"error": "instance failed"}))
            for h in failed
        ]
        await store.finish_scatter(barrier, rows, status)
        for h in failed:
            self.app.telemetry.emit("scatter.instance_fail", asset=asset.name, barrier=barrier,
                                    key_hash=h)  # fmt: skip
        summary = {"total": len(keys), "ran": ran, "skipped": len(keys) - ran,
                   "completed": len(keys) - len(failed), "failed": len(failed)}  # fmt: skip
        if not ok:
            self.app.telemetry.emit("scatter.failed", asset=asset.name, barrier=barrier, **summary)
            sample = "; ".join(_reason("failed", e) for e in errors[:3])
            return await self.fail(
                f"scatter of {asset.name} failed: {len(failed)} of {ran} instances failed "
                f"(threshold {options.failure_threshold:g}, mode {options.failure_mode}): "
                f"{sample}",
                {"asset": asset.name, "scatter": summary},
            )
        done = {**{h: r for h, r in keys.items() if r.status == COMPLETED}, **results}
        value = [{"key": r.key, "result": decode_result(r.result, r.compressed)}
                 for r in done.values()]  # fmt: skip
        self.app.telemetry.emit("scatter.complete", asset=asset.name, barrier=barrier, **summary)
        self.app.telemetry.emit("scatter.gather_ready", asset=asset.name, barrier=barrier,
                                results=len(value))  # fmt: skip
        ids = list(self.state["upstream"].values())
        upstream = {r.asset: r for r in await store.get_materializations(ids)}
        return await self.record(value, upstream, {"scatter": summary})

    # -- gates -----------------------------------------------------------------------

    def gate_handle(self) -> GateHandle:
        assert self.asset.gate is not None
        round = self.state.get("gate_round", 0)
        expires = self.state.get("gate_expires")
        if expires is None:
            expires = time.time() + self.asset.gate.wait_for(round)
            self.state["gate_expires"] = expires
        return GateHandle(self.ctx.run_id, round, expires, self.ctx.inbox)

    async def suspend(self, gate: GateHandle) -> Any:
        store = await self.app.store()
        row = GateRow(gate.id, self.ctx.run_id, self.asset.name, self.partition, "waiting",
                      datetime.fromtimestamp(gate.expires_at, UTC), gate.round)  # fmt: skip
        await store.create_gate(row)
        self.app.telemetry.emit("gate.create", gate_id=gate.id, asset=self.asset.name,
                                partition=self.partition, expires_at=row.expires_at)  # fmt: skip
        timeout = max(0.0, gate.expires_at - time.time())
        return Await(SIGNAL, then="compute", state=self.state, timeout=timeout,
                     on_timeout="gate_timeout")  # fmt: skip

    async def gate_timeout(self) -> Any:
        gate = self.asset.gate
        assert gate is not None
        round = self.state.get("gate_round", 0)
        gid = gate_id(self.ctx.run_id, round)
        store = await self.app.store()
        if not await store.close_gate(gid, "timeout"):
            row = await store.get_gate(gid)
            if row is not None and row.status == "signaled":
                return Next("compute", self.state)  # the signal won the race: it is in the inbox
        self.app.telemetry.emit("gate.timeout", gate_id=gid, asset=self.asset.name,
                                partition=self.partition, round=round)  # fmt: skip
        if gate.on_timeout != "fail" and round < gate.max_timeouts:
            self.app.telemetry.emit("gate.timeout_retry", gate_id=gid, asset=self.asset.name,
                                    round=round + 1)  # fmt: skip
            state = {**self.state, "gate_round": round + 1, "gate_expires": None}
            return Next("compute", state)
        return await self.fail(f"the gate of asset {self.asset.name} timed out "
                               f"(round {round + 1}, no signal)")  # fmt: skip


# -- scatter instances ---------------------------------------------------------------


class Inputs:
    """The upstream rows and values of a scatter's instances, loaded once per process.

    A thousand instances starting together ask for the same inputs: the first
    asks the database and the others await its answer (one future per lineage).
    """

    kept = 8

    def __init__(self, assets: Assets) -> None:
        self.assets = assets
        self._loading: OrderedDict[
            tuple[tuple[str, str], ...],
            asyncio.Future[tuple[dict[str, MaterializationRow], dict[str, Any]]],
        ] = OrderedDict()

    async def get(
        self, lineage: dict[str, str]
    ) -> tuple[dict[str, MaterializationRow], dict[str, Any]]:
        key = tuple(sorted(lineage.items()))
        future = self._loading.get(key)
        if future is None:
            future = asyncio.ensure_future(self._load(lineage))
            self._loading[key] = future
            while len(self._loading) > self.kept:
                self._loading.popitem(last=False)
        else:
            self._loading.move_to_end(key)
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._loading.get(key) is future:
                del self._loading[key]  # a failed load is tried again by the next instance
            raise

    async def _load(
        self, lineage: dict[str, str]
    ) -> tuple[dict[str, MaterializationRow], dict[str, Any]]:
        store = await self.assets.app.store()
        found = {r.id: r for r in await store.get_materializations(list(lineage.values()))}
        upstream = {d: found[i] for d, i in lineage.items()}
        return upstream, {d: await self.assets.load(r) for d, r in upstream.items()}


def register_instances(app: App, assets: Assets, asset: AssetDef) -> None:
    """The task that runs one scatter key of `asset` (a child of its materialization)."""
    options = asset.scatter_options
    assert options is not None
    inputs = Inputs(assets)

    async def instance(partition: str, key: Any, key_hash: str, lineage: dict[str, str]) -> Any:
        upstream, values = await inputs.get(lineage)
        run = current_run()
        ctx = AssetContext(app, asset.name, partition, run.id, run.attempt, run.node,
                           upstream, key=ScatterKey(key))  # fmt: skip
        try:
            result = await call(asset.fn, ctx, key, **upstream_kwargs(asset.fn, values, 2))
        except Exception:
            if run.attempt >= run.max_attempts:
                app.telemetry.emit("scatter.instance_fail", asset=asset.name, key_hash=key_hash,
                                   run_id=run.id)  # fmt: skip
            raise
        app.telemetry.emit("scatter.instance_complete", asset=asset.name, key_hash=key_hash,
                           run_id=run.id)  # fmt: skip
        return {"h": key_hash, **encode_result(result)}

    app.task(
        name=asset.instance_task, queue=assets.instance_queue(asset),
        max_attempts=options.max_attempts, priority=options.priority, timeout=options.timeout,
        backoff=options.retry_strategy,
    )(instance)  # fmt: skip
