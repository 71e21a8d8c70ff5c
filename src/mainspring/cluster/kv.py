"""Cluster KV: JSON values under string keys, shared by every node through the database.

`cas` is linearizable (one row, one atomic statement); `watch` streams changes
in revision order from a bounded buffer, so a slow watcher costs a marker, not memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from mainspring import payload
from mainspring.cluster.store import ClusterStore, cluster_store
from mainspring.errors import ConfigError

if TYPE_CHECKING:
    from mainspring.app import App


@dataclass(frozen=True, slots=True)
class KVChange:
    """A key set (value) or deleted (deleted=True, value None, also on expiry) at `rev`."""

    key: str
    value: Any
    rev: int
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class KVOverflow:
    """The watcher fell more than its buffer behind: changes up to `rev` were skipped.

    Re-read what you need with `scan` and keep iterating: changes after `rev` follow.
    """

    rev: int


class KV:
    """`app.kv`: get, put (with a TTL), delete, cas, scan and watch over the cluster."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def _cs(self) -> ClusterStore:
        return cluster_store(await self.app.store())

    async def get(self, key: str, default: Any = None) -> Any:
        """The key's value, or `default` when absent, deleted or expired."""
        found = await (await self._cs()).kv_get(key)
        return default if found is None else payload.loads(found[0])

    async def get_with_rev(self, key: str) -> tuple[Any, int] | None:
        """(value, revision), or None when absent."""
        found = await (await self._cs()).kv_get(key)
        return None if found is None else (payload.loads(found[0]), found[1])

    async def put(self, key: str, value: Any, ttl: float | None = None) -> int:
        """Set a key (JSON value), expiring after `ttl` seconds when given; returns its revision."""
        _check_ttl(ttl)
        return await (await self._cs()).kv_put(key, payload.dumps(value), ttl)

    async def delete(self, key: str) -> bool:
        """Delete a key; False when it was absent."""
        return await (await self._cs()).kv_delete(key) is not None

    async def cas(self, key: str, expected: Any, new: Any, ttl: float | None = None) -> bool:
        """Set `key` to `new` only if its value equals `expected` (None: only if absent).

        Linearizable: concurrent cas calls on one key from any nodes see each other's
        effects in one total order; exactly one of two racing for the same value wins.
        """
        _check_ttl(ttl)
        old = None if expected is None else payload.dumps(expected)
        return await (await self._cs()).kv_cas(key, old, payload.dumps(new), ttl) is not None

    async def scan(self, prefix: str = "") -> dict[str, Any]:
        """Every live key under `prefix` with its value, in key order."""
        rows = await (await self._cs()).kv_scan(prefix)
        return {key: payload.loads(value) for key, value, _ in rows}

    def watch(self, prefix: str = "", *, buffer: int = 1000, poll: float = 0.05) -> Watch:
        """Changes under `prefix` from now on: `async with app.kv.watch("cfg/") as w:
        async for change in w: ...` yields KVChange, or KVOverflow when more than `buffer`
        changes were pending (memory stays bounded by `buffer`)."""
        if buffer < 1:
            raise ConfigError(f"watch buffer must be >= 1, got {buffer}")
        return Watch(self, prefix, buffer, poll)


class Watch:
    """An async iterator of KVChange / KVOverflow under one prefix (see KV.watch)."""

    def __init__(self, kv: KV, prefix: str, buffer: int, poll: float) -> None:
        self.kv = kv
        self.prefix = prefix
        self.buffer = buffer
        self.poll = poll
        self.rev: int | None = None
        self._ready: deque[KVChange | KVOverflow] = deque()

    async def start(self) -> Self:
        """Fix the starting point: changes after the latest revision now."""
        if self.rev is None:
            self.rev = await (await self.kv._cs()).kv_head()
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        self._ready.clear()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> KVChange | KVOverflow:
        await self.start()
        while not self._ready:
            cs = await self.kv._cs()
            assert self.rev is not None
            start, rows = await cs.kv_changes(self.rev, self.prefix, self.buffer + 1)
            if len(rows) > self.buffer or start > self.rev + 1:
                self.rev = await cs.kv_head()
                return KVOverflow(self.rev)
            for key, value, rev in rows:
                self._ready.append(
                    KVChange(key, None, rev, True)
                    if value is None
                    else KVChange(key, payload.loads(value), rev)
                )
                self.rev = rev
            if not self._ready:
                await asyncio.sleep(self.poll)
        return self._ready.popleft()


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and ttl <= 0:
        raise ConfigError(f"ttl must be > 0 seconds, got {ttl}")
