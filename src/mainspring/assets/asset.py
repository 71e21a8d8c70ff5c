"""Assets: named values a function builds from its upstream assets.

    @app.asset(partitions=ms.DailyPartitions(start="2026-01-01"))
    async def raw_orders(ctx: ms.AssetContext) -> list[dict]: ...

    @app.asset(deps=[raw_orders])
    async def clean_orders(ctx, raw_orders: list[dict]) -> list[dict]: ...

Upstream values are passed by parameter name (the dep's name, or its last
dotted segment). An asset inherits the partitions of its partitioned deps,
and partition P of an asset is built from partition P of each partitioned
dep (and the one partition of each unpartitioned dep).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mainspring.assets.gates import Gate, GateHandle
from mainspring.assets.io import DbIO, IOManager
from mainspring.assets.partitions import Partitions
from mainspring.assets.scatter import ScatterKey, ScatterOptions
from mainspring.backoff import Backoff
from mainspring.errors import ConfigError
from mainspring.store.base import MaterializationRow

if TYPE_CHECKING:
    from mainspring.app import App


@dataclass
class AssetContext:
    """What an asset function knows besides its upstream values.

    `metadata` is recorded with the materialization (row counts, sources...);
    `upstream` holds the materializations the values come from; `key` is the
    scatter key of an instance; `gate` the gate of a gated asset.
    """

    app: App
    asset: str
    partition: str
    run_id: str
    attempt: int
    node: str
    upstream: dict[str, MaterializationRow] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    key: ScatterKey | None = None
    _gate: GateHandle | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def gate(self) -> GateHandle:
        if self._gate is None:
            raise ConfigError(
                f"asset {self.asset!r} has no gate: declare @app.asset(gate=ms.Gate(...))"
            )
        return self._gate


@dataclass(eq=False)
class AssetDef:
    """A registered asset: its function, deps and options. Calling it calls the function."""

    app: App
    fn: Callable[..., Any]
    name: str
    deps: list[str]
    io: IOManager
    own_partitions: Partitions | None
    partitions: Partitions | None
    queue: str
    priority: int
    max_attempts: int
    backoff: Backoff
    description: str | None
    version: str | None
    scatter: Callable[..., Any] | None = None
    scatter_options: ScatterOptions | None = None
    gather: bool = False
    gate: Gate | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Asset {self.name}>"

    @property
    def instance_task(self) -> str:
        """The task name of this scatter asset's instances."""
        return f"mainspring.assets.scatter:{self.name}"

    def partition_of(self, dep: AssetDef, partition: str) -> str:
        """The partition of `dep` that partition `partition` of this asset is built from."""
        return partition if dep.partitions is not None else ""

    def check_partition(self, partition: str | None) -> str:
        """The partition key to build: validated, or '' for an unpartitioned asset."""
        if self.partitions is None:
            if partition not in (None, ""):
                raise ConfigError(f"asset {self.name!r} has no partitions; got {partition!r}")
            return ""
        if partition is None or partition == "":
            raise ConfigError(
                f"asset {self.name!r} is partitioned by {self.partitions!r}: pass partition="
            )
        return self.partitions.validate(partition)


def resolve_name(app: App, ref: Any) -> str:
    """An asset's name from an AssetDef, a decorated function or a name."""
    if isinstance(ref, AssetDef):
        return ref.name
    if isinstance(ref, str):
        return ref
    name = getattr(ref, "asset_name", None)
    if isinstance(name, str):
        return name
    raise ConfigError(f"an asset is an @app.asset function or its name, got {ref!r}")


def upstream_kwargs(fn: Callable[..., Any], values: dict[str, Any], skip: int) -> dict[str, Any]:
    """Upstream values for the parameters of `fn` after the first `skip` positional ones.

    A parameter named like a dep (or its last dotted segment) receives it; a
    **kwargs parameter receives every dep.
    """
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {_short(n): v for n, v in values.items()}
    wanted = {p.name for p in params[skip:]}
    found: dict[str, Any] = {}
    for name, value in values.items():
        for candidate in (name, _short(name)):
            if candidate in wanted:
                found[candidate] = value
                break
    return found


def _short(name: str) -> str:
    return name.replace("/", ".").rsplit(".", 1)[-1]


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a sync or async function (sync ones run in a thread)."""
    import asyncio

    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result


def default_io() -> IOManager:
    return DbIO()
