"""The cluster registry: unique names for processes, with fencing tokens.

A name is unique cluster-wide (the database's primary key decides races), each
registration gets a token that only grows per name, and a message sent to a
name carries the token it resolved, so it is dropped rather than delivered to
a process that no longer holds the name. Names held on a dead node are free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mainspring.cluster.process import Pid
from mainspring.cluster.store import ClusterStore, cluster_store
from mainspring.errors import NameTaken, ProcessError

if TYPE_CHECKING:
    from mainspring.app import App


class Registry:
    """`app.registry`: register, lookup, unregister and send by name."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def _cs(self) -> ClusterStore:
        return cluster_store(await self.app.store())

    async def register(self, name: str, pid: str) -> int:
        """Register `name` for `pid`; returns its fencing token (greater than any earlier
        holder's). Idempotent for the same pid. Raises ms.NameTaken naming the live holder."""
        node = Pid.parse(pid).node
        cs = await self._cs()
        for _ in range(3):
            token = await cs.name_register(name, pid, node, self.app.lease_ttl)
            if token is not None:
                return token
            held = await cs.name_lookup(name, self.app.lease_ttl)
            if held is not None:
                raise NameTaken(name, held[0])
            # The holder's node died between the two reads: the name is free now.
        raise NameTaken(name, "an unknown holder")

    async def lookup(self, name: str) -> tuple[str, int] | None:
        """(pid, token) of the live holder, or None."""
        return await (await self._cs()).name_lookup(name, self.app.lease_ttl)

    async def unregister(self, name: str, pid: str | None = None) -> bool:
        """Free a name (only when `pid` holds it, if given); False when it was not held."""
        return await (await self._cs()).name_unregister(name, pid)

    async def names(self) -> dict[str, tuple[str, int]]:
        """Every held name: {name: (pid, token)} (holders on dead nodes included until freed)."""
        return {n: (pid, token) for n, pid, _node, token in await (await self._cs()).names()}

    async def send(self, name: str, msg: Any) -> None:
        """Send to the process holding `name`, fenced by its token: if the name changes hands
        before delivery, the message is dropped instead of reaching the old holder."""
        held = await self.lookup(name)
        if held is None:
            raise ProcessError(f"no live process is registered as {name!r}")
        pid, token = held
        await self.app.hub.send(Pid.parse(pid).child_id, msg, _name=(name, token))
