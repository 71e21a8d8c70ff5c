"""The app's asset catalog: registration, the graph, and the client API (`app.assets`).

The graph is checked as each asset registers: a dep must name a registered
asset (registration order is dependency order, so the graph stays acyclic;
`check()` proves it and names any cycle), partitions must agree, and the
downstream of a scatter asset must gather it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mainspring.assets.asset import AssetDef, resolve_name
from mainspring.assets.gates import Gate
from mainspring.assets.io import DbIO, IOManager
from mainspring.assets.partitions import Partitions
from mainspring.assets.scatter import ScatterKey, ScatterOptions
from mainspring.backoff import Backoff
from mainspring.errors import ConfigError
from mainspring.run import TERMINAL, Run
from mainspring.store.base import MaterializationRow

if TYPE_CHECKING:
    from mainspring.app import App, RunHandle


@dataclass(frozen=True, slots=True)
class StalePartition:
    """A partition of an asset that needs building, and why: missing, invalidated,
    code_version (the asset's version changed) or upstream (a dep has newer data)."""

    partition: str
    reason: str
    upstream: str | None = None


@dataclass(frozen=True, slots=True)
class Lineage:
    """The materializations a value was built from: `root` and every ancestor, with edges
    (downstream id, upstream id)."""

    root: MaterializationRow
    nodes: dict[str, MaterializationRow] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def upstream(self, materialization_id: str) -> list[MaterializationRow]:
        return [self.nodes[u] for d, u in self.edges if d == materialization_id and u in self.nodes]

    def downstream(self, materialization_id: str) -> list[MaterializationRow]:
        return [self.nodes[d] for d, u in self.edges if u == materialization_id and d in self.nodes]

    def to_text(self) -> str:
        """An indented tree from the root (upstream or downstream, whichever it holds)."""
        lines: list[str] = []
        below = self.upstream if any(d == self.root.id for d, _ in self.edges) else self.downstream

        def walk(node: MaterializationRow, depth: int) -> None:
            part = f"[{node.partition}]" if node.partition else ""
            when = node.finished_at.strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"{'  ' * depth}{node.asset}{part}  {node.id}  {node.status}  {when}")
            for nxt in below(node.id):
                walk(nxt, depth + 1)

        walk(self.root, 0)
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        lines = ["graph BT"]
        for node in self.nodes.values():
            part = f"[{node.partition}]" if node.partition else ""
            lines.append(f'    m{node.id.replace("-", "")}["{node.asset}{part}"]')
        for down, up in self.edges:
            lines.append(f"    m{up.replace('-', '')} --> m{down.replace('-', '')}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class AssetProgress:
    """One asset of a running plan: its run's state, and its scatter instances when any."""

    asset: str
    state: str
    instances_done: int = 0
    instances_total: int = 0


@dataclass(frozen=True, slots=True)
class PlanProgress:
    """How far a materialization has got: assets built of the plan's total, and the assets
    started so far with their scatter instances."""

    state: str
    total: int
    done: int
    assets: list[AssetProgress]


class Assets:
    """Registered assets and what a user asks of them."""

    def __init__(self, app: App, queue: str = "default") -> None:
        self.app = app
        self.queue = queue
        self.defs: dict[str, AssetDef] = {}
        self.machines: tuple[Any, ...] = ()

    # -- registration ----------------------------------------------------------------

    def asset(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        deps: Iterable[Any] = (),
        partitions: Partitions | None = None,
        io: IOManager | None = None,
        queue: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        description: str | None = None,
        version: str | None = None,
        scatter: Callable[..., Any] | None = None,
        scatter_options: ScatterOptions | None = None,
        gather: bool = False,
        gate: Gate | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Register an asset function (see mainspring.assets.asset)."""

        def register(func: Callable[..., Any]) -> AssetDef:
            asset_name = name or func.__name__
            self._check_new(asset_name, func)
            dep_names = [resolve_name(self.app, d) for d in deps]
            for dep in dep_names:
                if dep == asset_name:
                    raise ConfigError(f"asset {asset_name!r} depends on itself")
                if dep not in self.defs:
                    raise ConfigError(
                        f"asset {asset_name!r} depends on unknown asset {dep!r}: register "
                        f"{dep!r} first (known: {', '.join(sorted(self.defs)) or 'none'})"
                    )
            if len(set(dep_names)) != len(dep_names):
                raise ConfigError(f"asset {asset_name!r} lists a dep twice: {dep_names}")
            if max_attempts < 1:
                raise ConfigError(f"asset {asset_name!r}: max_attempts must be >= 1")
            definition = AssetDef(
                self.app, func, asset_name, dep_names, io or DbIO(), partitions,
                self._partitions(asset_name, partitions, dep_names), queue or self.queue,
                priority, max_attempts, backoff or Backoff.exponential(),
                description or inspect.getdoc(func), version, scatter,
                (scatter_options or ScatterOptions()) if scatter is not None else None,
                gather, gate, dict(metadata or {}),
            )  # fmt: skip
            self._check_shape(definition)
            if not self.machines:
                from mainspring.assets.runner import register_machines

                register_machines(self.app, self)
            self.defs[asset_name] = definition
            if scatter is not None:
                self._register_scatter(definition)
            if gate is not None:
                self.app.gates.install_sweeper()
            self.check()
            func.asset_name = asset_name  # type: ignore[attr-defined]
            return definition

        return register(fn) if fn is not None else register

    def _check_new(self, asset_name: str, func: Callable[..., Any]) -> None:
        if not asset_name or not isinstance(asset_name, str):
            raise ConfigError(f"an asset name is a non-empty string, got {asset_name!r}")
        if asset_name in self.defs:
            raise ConfigError(f"an asset named {asset_name!r} is already registered")
        if not callable(func):
            raise ConfigError(f"@app.asset decorates a function, got {func!r}")

    def _partitions(
        self, asset_name: str, own: Partitions | None, deps: Sequence[str]
    ) -> Partitions | None:
        inherited = {self.defs[d].partitions for d in deps} - {None}
        if own is not None:
            for dep in deps:
                theirs = self.defs[dep].partitions
                if theirs is not None and theirs != own:
                    raise ConfigError(
                        f"asset {asset_name!r} is partitioned by {own!r} but its dep {dep!r} "
                        f"by {theirs!r}: partition P is built from partition P of each dep, "
                        "so they must agree"
                    )
            return own
        if len(inherited) > 1:
            raise ConfigError(
                f"asset {asset_name!r} has deps with different partitions "
                f"({', '.join(sorted(map(repr, inherited)))}); declare partitions= on it"
            )
        return next(iter(inherited), None)

    def _check_shape(self, asset: AssetDef) -> None:
        scattered = [d for d in asset.deps if self.defs[d].scatter is not None]
        if scattered and not asset.gather:
            raise ConfigError(
                f"asset {asset.name!r} depends on scatter asset {scattered[0]!r}: declare "
                "gather=True to receive its {key: result} mapping"
            )
        if asset.gather and not scattered:
            raise ConfigError(f"asset {asset.name!r} has gather=True but no scatter dep")
        if asset.scatter is not None and asset.gate is not None:
            raise ConfigError(f"asset {asset.name!r}: a scatter asset cannot have a gate")
        if asset.scatter_options is not None and asset.scatter is None:
            raise ConfigError(f"asset {asset.name!r}: scatter_options without scatter=")

    def instance_queue(self, asset: AssetDef) -> str:
        options = asset.scatter_options
        assert options is not None
        if options.queue is not None:
            return options.queue
        return f"scatter.{asset.name}" if options.max_concurrent is not None else asset.queue

    def _register_scatter(self, asset: AssetDef) -> None:
        from mainspring.assets.runner import register_instances

        options = asset.scatter_options
        assert options is not None
        queue = self.instance_queue(asset)
        if options.max_concurrent is not None:
            config = self.app.queues.get(queue)
            if config is not None and config.global_limit not in (None, options.max_concurrent):
                raise ConfigError(
                    f"scatter asset {asset.name!r}: queue {queue!r} already has a global limit "
                    f"of {config.global_limit}; max_concurrent={options.max_concurrent} needs "
                    "a queue of its own (leave ScatterOptions.queue unset to get one)"
                )
            self.app.queue(queue, global_limit=options.max_concurrent,
                           concurrency=config.concurrency if config else None)  # fmt: skip
        register_instances(self.app, self, asset)

    def get(self, ref: Any) -> AssetDef:
        name = resolve_name(self.app, ref)
        try:
            return self.defs[name]
        except KeyError:
            raise ConfigError(
                f"no asset named {name!r} (known: {', '.join(sorted(self.defs)) or 'none'})"
            ) from None

    # -- the graph -------------------------------------------------------------------

    def check(self) -> list[str]:
        """Every asset in dependency order; ConfigError naming the assets of a cycle."""
        order: list[str] = []
        marks: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if marks.get(name) == "done":
                return
            if marks.get(name) == "open":
                cycle = [*path[path.index(name) :], name]
                raise ConfigError(f"the asset graph has a cycle: {' -> '.join(cycle)}")
            if name not in self.defs:
                raise ConfigError(f"asset {path[-1]!r} depends on unknown asset {name!r}")
            marks[name] = "open"
            for dep in self.defs[name].deps:
                visit(dep, [*path, name])
            marks[name] = "done"
            order.append(name)

        for name in sorted(self.defs):
            visit(name, [])
        return order

    def ancestors(self, name: str) -> list[str]:
        """The asset and everything it is built from, in dependency order."""
        wanted: set[str] = set()
        stack = [name]
        while stack:
            current = stack.pop()
            if current not in wanted:
                wanted.add(current)
                stack.extend(self.defs[current].deps)
        return [n for n in self.check() if n in wanted]

    def downstream(self, name: str) -> list[str]:
        """Every asset built (directly or not) from this one, in dependency order."""
        found = {name}
        for n in self.check():
            if any(d in found for d in self.defs[n].deps):
                found.add(n)
        return [n for n in self.check() if n in found and n != name]

    def graph(self, format: Literal["mermaid", "text"] = "text") -> str:
        """The asset graph: Mermaid (`graph LR`) for docs and dashboards, or text."""
        order = self.check()
        if format == "mermaid":
            lines = ["graph LR"]
            for n in order:
                d = self.defs[n]
                tags = [t for t, on in (("scatter", d.scatter), ("gather", d.gather),
                                        ("gate", d.gate)) if on]  # fmt: skip
                label = n + (f" ({', '.join(tags)})" if tags else "")
                lines.append(f'    {_mermaid_id(n)}["{label}"]')
            for n in order:
                for dep in self.defs[n].deps:
                    lines.append(f"    {_mermaid_id(dep)} --> {_mermaid_id(n)}")
            return "\n".join(lines)
        if format != "text":
            raise ConfigError(f"graph format is 'mermaid' or 'text', got {format!r}")
        lines = []
        for n in order:
            d = self.defs[n]
            extras = []
            if d.partitions is not None:
                extras.append(f"partitions={type(d.partitions).__name__}")
            if d.scatter is not None:
                extras.append("scatter")
            if d.gather:
                extras.append("gather")
            if d.gate is not None:
                extras.append("gate")
            deps = f" <- {', '.join(d.deps)}" if d.deps else ""
            lines.append(f"{n}{deps}" + (f"  [{'; '.join(extras)}]" if extras else ""))
        return "\n".join(lines)

    # -- staleness and planning ------------------------------------------------------

    async def _latest(
        self, names: Sequence[str], partitions: Sequence[str] | None
    ) -> dict[tuple[str, str], MaterializationRow]:
        store = await self.app.store()
        rows = await store.latest_materializations(names, partitions)
        return {(r.asset, r.partition): r for r in rows}

    def _reason(
        self,
        asset: AssetDef,
        partition: str,
        latest: dict[tuple[str, str], MaterializationRow],
    ) -> StalePartition | None:
        mine = latest.get((asset.name, partition))
        if mine is None:
            return StalePartition(partition, "missing")
        if mine.invalidated_at is not None:
            return StalePartition(partition, "invalidated")
        if asset.version is not None and mine.metadata.get("code_version") != asset.version:
            return StalePartition(partition, "code_version")
        used = {u["asset"]: u["id"] for u in mine.upstream}
        for dep in asset.deps:
            theirs = latest.get((dep, asset.partition_of(self.defs[dep], partition)))
            if theirs is not None and theirs.id != used.get(dep):
                return StalePartition(partition, "upstream", dep)
        return None

    async def plan(
        self, target: str, partition: str, force: bool | None = False
    ) -> list[list[str]]:
        """What `materialize(target, partition)` builds, as levels in dependency order:
        the target, and each ancestor that is missing or stale (or whose own upstream
        is rebuilt); every ancestor with force."""
        names = self.ancestors(target)
        latest = await self._latest(names, sorted({partition, ""}))
        build: set[str] = set()
        depth: dict[str, int] = {}
        for name in names:
            asset = self.defs[name]
            part = partition if asset.partitions is not None else ""
            rebuilt_dep = any(d in build for d in asset.deps)
            if name == target or force or rebuilt_dep or self._reason(asset, part, latest):
                build.add(name)
                depth[name] = 1 + max((depth.get(d, -1) for d in asset.deps if d in build),
                                      default=-1)  # fmt: skip
        levels: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
        for name in names:
            if name in build:
                levels[depth[name]].append(name)
        return levels

    async def upstream_of(
        self, asset: AssetDef, partition: str
    ) -> dict[str, MaterializationRow] | str:
        """The latest materialization of each dep for this partition, or why one is missing."""
        if not asset.deps:
            return {}
        parts = sorted({partition, ""})
        latest = await self._latest(asset.deps, parts)
        found: dict[str, MaterializationRow] = {}
        for dep in asset.deps:
            part = asset.partition_of(self.defs[dep], partition)
            row = latest.get((dep, part))
            if row is None:
                where = f" partition {part!r}" if part else ""
                return f"asset {asset.name}: upstream {dep!r} has no materialization{where}"
            found[dep] = row
        return found

    async def load(self, row: MaterializationRow) -> Any:
        """The value of a materialization (a scatter asset's: {ScatterKey: result})."""
        asset = self.get(row.asset)
        value = await asset.io.load(await self.app.store(), row.value_ref)
        if asset.scatter is not None:
            return {ScatterKey(item["key"]): item["result"] for item in value}
        return value

    # -- client API (async) ----------------------------------------------------------

    async def materialize_async(
        self, asset: Any, partition: str | None = None, *, force: bool = False
    ) -> RunHandle:
        """Build an asset partition after its stale or missing upstream, in dependency order.

        Returns the handle of the plan run: `handle.result()` gives
        {"asset", "partition", "materialization", "built"}. While one plan for
        the same asset and partition is live, the same handle comes back
        (`handle.created` is False).
        """
        definition = self.get(asset)
        part = definition.check_partition(partition)
        plan = self.machines[0]
        state = {"asset": definition.name, "partition": part, "force": force}
        key = _key("materialize", definition, part)
        return await plan.start_async(state, correlation_key=key)  # type: ignore[no-any-return]

    async def backfill_async(
        self,
        asset: Any,
        partitions: Iterable[str],
        *,
        max_parallel: int = 8,
        force: bool = False,
    ) -> RunHandle:
        """Materialize many partitions, at most `max_parallel` plans at a time; the result is
        {"succeeded": [...], "failed": [...]}."""
        definition = self.get(asset)
        keys = [definition.check_partition(p) for p in partitions]
        if not keys:
            raise ConfigError("backfill needs at least one partition")
        if max_parallel < 1:
            raise ConfigError(f"max_parallel must be >= 1, got {max_parallel}")
        state = {"asset": definition.name, "partitions": keys, "max_parallel": max_parallel,
                 "force": force}  # fmt: skip
        return await self.machines[2].start_async(state)  # type: ignore[no-any-return]

    async def materializations_async(
        self, asset: Any, partition: str | None = None, limit: int = 50
    ) -> list[MaterializationRow]:
        """An asset's materializations, newest first: status, value reference, upstream
        materialization ids, metadata, duration."""
        definition = self.get(asset)
        part = None if partition is None else definition.check_partition(partition)
        store = await self.app.store()
        return await store.list_materializations(definition.name, part, limit)

    async def latest_async(self, asset: Any, partition: str | None = None) -> MaterializationRow:
        definition = self.get(asset)
        part = definition.check_partition(partition)
        found = (await self._latest([definition.name], [part])).get((definition.name, part))
        if found is None:
            where = f" partition {part!r}" if part else ""
            raise ConfigError(f"asset {definition.name!r}{where} has never been materialized")
        return found

    async def value_async(self, asset: Any, partition: str | None = None) -> Any:
        """The value of the latest completed materialization."""
        return await self.load(await self.latest_async(asset, partition))

    async def lineage_async(
        self,
        asset: Any,
        partition: str | None = None,
        *,
        materialization: str | None = None,
        direction: Literal["upstream", "downstream"] = "upstream",
    ) -> Lineage:
        """What a value was built from (upstream: every materialization it used,
        recursively), or what was built from it (downstream). The root is the latest
        materialization of the asset partition, or the one given. Edges are always
        (downstream id, upstream id)."""
        store = await self.app.store()
        if materialization is not None:
            found = await store.get_materializations([materialization])
            if not found:
                raise ConfigError(f"no materialization {materialization!r}")
            root = found[0]
        else:
            root = await self.latest_async(asset, partition)
        if direction not in ("upstream", "downstream"):
            raise ConfigError(f"direction is 'upstream' or 'downstream', got {direction!r}")
        lineage = Lineage(root, {root.id: root})
        frontier = [root]
        while frontier:
            if direction == "upstream":
                wanted = {u["id"] for m in frontier for u in m.upstream} - set(lineage.nodes)
                for m in frontier:
                    lineage.edges.extend((m.id, u["id"]) for u in m.upstream)
                rows = await store.get_materializations(sorted(wanted)) if wanted else []
            else:
                ids = {m.id for m in frontier}
                built = await store.downstream_materializations(sorted(ids))
                for row in built:
                    lineage.edges.extend((row.id, u["id"]) for u in row.upstream if u["id"] in ids)
                rows = [r for r in built if r.id not in lineage.nodes]
            for row in rows:
                lineage.nodes[row.id] = row
            frontier = rows
        return lineage

    async def stale_async(self, asset: Any) -> list[StalePartition]:
        """The partitions of an asset that are missing, invalidated or older than their
        upstream (every partition that exists now, for a partitioned asset)."""
        definition = self.get(asset)
        names = [definition.name, *definition.deps]
        latest = await self._latest(names, None)
        parts = definition.partitions.keys() if definition.partitions is not None else [""]
        found = [self._reason(definition, p, latest) for p in parts]
        return [s for s in found if s is not None]

    async def invalidate_async(self, asset: Any, partition: str | None = None) -> int:
        """Mark the asset (one partition, or all) and everything downstream of it stale;
        returns how many materializations were marked."""
        definition = self.get(asset)
        part = None if partition is None else definition.check_partition(partition)
        pairs: list[tuple[str, str | None]] = [(definition.name, part)]
        for name in self.downstream(definition.name):
            down = self.defs[name]
            pairs.append((name, part if down.partitions is not None else None))
        store = await self.app.store()
        return await store.invalidate_materializations(pairs)

    async def cancel_async(self, run_id: str) -> Run:
        """Cancel a materialization (a plan, a backfill or one asset's run) and every run
        under it, pending scatter instances included; scatters in flight are marked
        cancelled (telemetry scatter.cancel)."""
        from mainspring.assets.runner import MATERIALIZE

        store = await self.app.store()
        scattering: list[Run] = []
        frontier = [run_id]
        while frontier:
            runs = [r for r in await store.get_runs(frontier) if not r.terminal]
            scattering += [r for r in runs if r.name == MATERIALIZE and "barrier" in
                           (r.state_data or {})]  # fmt: skip
            data = await store.load_step_data([r.id for r in runs if r.name != MATERIALIZE])
            frontier = [c.id for d in data.values() for c in d.children if c.kind == "machine"]
        run = await self.app.cancel_async(run_id)
        for r in scattering:
            await store.finish_scatter(r.id, [], "cancelled")
            self.app.telemetry.emit("scatter.cancel", asset=r.state_data["asset"], barrier=r.id,
                                    partition=r.state_data["partition"])  # fmt: skip
        return run

    def cancel(self, run_id: str) -> Run:
        return self.app._sync(self.cancel_async(run_id))

    async def progress_async(self, plan_id: str) -> PlanProgress:
        """The progress of a materialization plan (for progress bars)."""
        store = await self.app.store()
        plan = await self.app.get_run_async(plan_id)
        levels = (plan.state_data or {}).get("levels") or []
        children = (await store.load_step_data([plan_id]))[plan_id].children
        runs = await store.get_runs([c.id for c in children])
        counts = await store.count_children([r.id for r in runs])
        found = []
        for run in sorted(runs, key=lambda r: r.id):
            mine = counts.get(run.id, {})
            done = sum(n for state, n in mine.items() if state in TERMINAL)
            found.append(AssetProgress((run.state_data or {}).get("asset", run.name), run.state,
                                       done, sum(mine.values())))  # fmt: skip
        built = sum(a.state == "completed" for a in found)
        return PlanProgress(plan.state, sum(len(level) for level in levels), built, found)

    def progress(self, plan_id: str) -> PlanProgress:
        return self.app._sync(self.progress_async(plan_id))

    # -- client API (sync) -----------------------------------------------------------

    def materialize(
        self, asset: Any, partition: str | None = None, *, force: bool = False
    ) -> RunHandle:
        return self.app._sync(self.materialize_async(asset, partition, force=force))

    def backfill(self, asset: Any, partitions: Iterable[str], *, max_parallel: int = 8,
                 force: bool = False) -> RunHandle:  # fmt: skip
        return self.app._sync(
            self.backfill_async(asset, list(partitions), max_parallel=max_parallel, force=force)
        )

    def materializations(self, asset: Any, partition: str | None = None,
                         limit: int = 50) -> list[MaterializationRow]:  # fmt: skip
        return self.app._sync(self.materializations_async(asset, partition, limit))

    def latest(self, asset: Any, partition: str | None = None) -> MaterializationRow:
        return self.app._sync(self.latest_async(asset, partition))

    def value(self, asset: Any, partition: str | None = None) -> Any:
        return self.app._sync(self.value_async(asset, partition))

    def lineage(self, asset: Any, partition: str | None = None, **options: Any) -> Lineage:
        return self.app._sync(self.lineage_async(asset, partition, **options))

    def stale(self, asset: Any) -> list[StalePartition]:
        return self.app._sync(self.stale_async(asset))

    def invalidate(self, asset: Any, partition: str | None = None) -> int:
        return self.app._sync(self.invalidate_async(asset, partition))


def _key(kind: str, asset: AssetDef, partition: str) -> str:
    return f"mainspring.assets.{kind}:{asset.name}:{partition}"


def _mermaid_id(name: str) -> str:
    return "a_" + "".join(c if c.isalnum() else "_" for c in name)
