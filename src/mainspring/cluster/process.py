"""Processes: long-lived stateful actors placed on the cluster's nodes.

A user subclasses `ms.Process` and decorates it with `@app.process`; the hub
starts children from `ms.ChildSpec`s on the nodes their strategy picks, feeds
each its mailbox one message at a time, and moves it (with its handover state)
when nodes come and go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from mainspring.errors import ConfigError

if TYPE_CHECKING:
    from mainspring.app import App
    from mainspring.cluster.hub import Hub


class Pid(NamedTuple):
    """One incarnation of a child on a node: `node/child_id/incarnation`.

    Messages go to a child id and follow it across migrations; a pid names one
    run of it (a restart or a move makes a new incarnation, hence a new pid).
    """

    node: str
    child_id: str
    incarnation: int

    def __str__(self) -> str:
        return f"{self.node}/{self.child_id}/{self.incarnation}"

    @classmethod
    def parse(cls, pid: str | Pid) -> Pid:
        if isinstance(pid, Pid):
            return pid
        node, sep, rest = str(pid).partition("/")
        child_id, sep2, incarnation = rest.rpartition("/")
        if not sep or not sep2 or not incarnation.isdigit() or not child_id:
            raise ConfigError(f"not a pid (node/child_id/incarnation): {pid!r}")
        return cls(node, child_id, int(incarnation))


class Process:
    """Base class of processes. Override what you need; every method is async.

    - `init(args, handover)`: called on every start; `handover` is the state the
      previous owner handed over (migration), the last `checkpoint` (restart after
      a crash or node death), or None on the first start.
    - `handle(msg)`: one message at a time, in order; the return value answers `call`.
    - `handover()`: called before the child moves to another node; its JSON
      result becomes the next owner's `handover`.
    - `terminate(reason)`: the child stops here ('stopped', 'migrated', 'restart',
      'partitioned', 'shutdown', or the error that killed it).
    """

    pid: str
    child_id: str
    hub: Hub
    metadata: dict[str, Any]
    role: str = "active"

    async def init(self, args: dict[str, Any], handover: dict[str, Any] | None) -> None:
        return None

    async def handle(self, msg: Any) -> Any:
        return None

    async def handover(self) -> dict[str, Any]:
        return {}

    async def terminate(self, reason: str) -> None:
        return None

    async def checkpoint(self, state: dict[str, Any]) -> bool:
        """Persist `state` durably: a restart (crash, node death) passes it to `init`.

        False when this incarnation no longer owns the child (it moved or was stopped).
        """
        return await self.hub._checkpoint(self, state)


@dataclass(frozen=True, slots=True)
class ProcessDef:
    """A registered process class and its restart intensity: more than `max_restarts`
    crashes within `max_seconds` mark the child failed."""

    app: App
    cls: type[Process]
    name: str
    max_restarts: int = 3
    max_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """A child to start: its id (unique cluster-wide), process class, args and metadata.

    `nodes` names the node(s) to run on under the `Guided` strategy.
    """

    child_id: str
    process: type[Process] | str
    args: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    nodes: Sequence[str] | None = None

    @property
    def process_name(self) -> str:
        if isinstance(self.process, str):
            return self.process
        name = getattr(self.process, "__mainspring_process__", None)
        if name is None:
            raise ConfigError(
                f"{self.process.__qualname__} is not registered: decorate it with @app.process"
            )
        return str(name)


def register_process(
    app: App, cls: type[Process], name: str | None, max_restarts: int, max_seconds: float
) -> type[Process]:
    """What `@app.process` does: check the class and register it with the hub."""
    if not (isinstance(cls, type) and issubclass(cls, Process)):
        raise ConfigError(f"@app.process decorates a subclass of ms.Process, got {cls!r}")
    if max_restarts < 0 or max_seconds <= 0:
        raise ConfigError("max_restarts must be >= 0 and max_seconds > 0")
    pname = name or cls.__qualname__
    app.hub.register(ProcessDef(app, cls, pname, max_restarts, max_seconds))
    cls.__mainspring_process__ = pname  # type: ignore[attr-defined]
    return cls
