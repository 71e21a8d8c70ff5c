"""The cluster contract on PostgreSQL: named statements over the store's asyncpg pool,
events on LISTEN/NOTIFY (channel mainspring_cluster)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from mainspring.cluster.store import CHANNEL, Claim, ClusterStore, GroupRow, Mail, net_deltas
from mainspring.store.postgres import PostgresStore
from mainspring.store.queries import load_queries

Q = load_queries("postgres")


def _cols(rows: Sequence[Sequence[Any]], n: int) -> list[list[Any]]:
    """Rows to n column arrays (asyncpg's unnest parameters)."""
    return [[r[i] for r in rows] for i in range(n)]


class PostgresCluster(ClusterStore):
    """ClusterStore on a PostgresStore's pool."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._listener: asyncpg.Connection | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        return self.store.pool

    # -- kv ------------------------------------------------------------------------

    async def kv_get(self, key: str) -> tuple[str, int] | None:
        row = await self.pool.fetchrow(Q["kv_get"], key)
        return None if row is None else (row[0], row[1])

    async def kv_put(self, key: str, value: str, ttl: float | None) -> int:
        return int(await self.pool.fetchval(Q["kv_put"], key, value, ttl))

    async def kv_delete(self, key: str) -> int | None:
        rev = await self.pool.fetchval(Q["kv_delete"], key)
        return None if rev is None else int(rev)

    async def kv_cas(
        self, key: str, expected: str | None, new: str, ttl: float | None
    ) -> int | None:
        if expected is None:
            rev = await self.pool.fetchval(Q["kv_cas_absent"], key, new, ttl)
        else:
            rev = await self.pool.fetchval(Q["kv_cas"], key, expected, new, ttl)
        return None if rev is None else int(rev)

    async def kv_scan(self, prefix: str) -> list[tuple[str, str, int]]:
        return [(r[0], r[1], r[2]) for r in await self.pool.fetch(Q["kv_scan"], prefix)]

    async def kv_changes(
        self, after: int, prefix: str, limit: int
    ) -> tuple[int, list[tuple[str, str | None, int]]]:
        async with self.pool.acquire() as con:
            start = await con.fetchval(Q["kv_log_start"])
            rows = await con.fetch(Q["kv_changes"], after, prefix, limit)
        return int(start), [(r[0], r[1], r[2]) for r in rows]

    async def kv_head(self) -> int:
        return int(await self.pool.fetchval(Q["kv_head"]))

    async def kv_expire(self, tombstone_age: float) -> int:
        status = await self.pool.execute(Q["kv_expire"])
        await self.pool.execute(Q["kv_prune"], tombstone_age)
        return int(status.split()[-1])

    # -- registry ------------------------------------------------------------------

    async def name_register(self, name: str, pid: str, node: str, ttl: float) -> int | None:
        token = await self.pool.fetchval(Q["name_register"], name, pid, node, ttl)
        return None if token is None else int(token)

    async def name_lookup(self, name: str, ttl: float) -> tuple[str, int] | None:
        row = await self.pool.fetchrow(Q["name_lookup"], name, ttl)
        return None if row is None else (row[0], row[1])

    async def name_unregister(self, name: str, pid: str | None) -> bool:
        return await self.pool.fetchval(Q["name_unregister"], name, pid) is not None

    async def names_release(self, pids: Sequence[str] | None, ttl: float) -> list[str]:
        if pids is None:
            rows = await self.pool.fetch(Q["names_release_dead"], ttl)
        else:
            rows = await self.pool.fetch(Q["names_release_pids"], list(pids))
        return [r[0] for r in rows]

    async def names(self) -> list[tuple[str, str, str, int]]:
        return [(r[0], r[1], r[2], r[3]) for r in await self.pool.fetch(Q["names_of"])]

    # -- process groups ------------------------------------------------------------

    async def group_apply(self, rows: Sequence[GroupRow], origin: str) -> None:
        net = net_deltas(rows)
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(Q["group_lock"])
            await con.execute(Q["group_upsert"], *_cols(net, 5))
            if any(r[4] <= 0 for r in net):
                await con.execute(Q["group_drop_empty"])
            await con.execute(Q["group_log"], *_cols(rows, 5), origin)

    async def group_remove(
        self, nodes: Sequence[str] | None, pids: Sequence[str] | None, origin: str
    ) -> list[GroupRow]:
        async with self.pool.acquire() as con, con.transaction():
            await con.execute(Q["group_lock"])
            if nodes is not None:
                found = await con.fetch(Q["group_remove_nodes"], list(nodes))
            else:
                found = await con.fetch(Q["group_remove_pids"], list(pids or ()))
            removed: list[GroupRow] = [(r[0], r[1], r[2], r[3], r[4]) for r in found]
            if removed:
                cols = _cols([(*r[:4], -r[4]) for r in removed], 5)
                await con.execute(Q["group_log"], *cols, origin)
        return removed

    async def group_snapshot(self) -> tuple[int, list[GroupRow]]:
        async with self.pool.acquire() as con, con.transaction(isolation="repeatable_read"):
            head = await con.fetchval(Q["group_head"])
            rows = await con.fetch(Q["group_members_all"])
        return int(head), [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def group_tail(
        self, after: int, limit: int
    ) -> tuple[int, list[tuple[int, GroupRow, str]]]:
        async with self.pool.acquire() as con:
            start = await con.fetchval(Q["group_log_start"])
            rows = await con.fetch(Q["group_tail"], after, limit)
        return int(start), [(r[0], (r[1], r[2], r[3], r[4], r[5]), r[6]) for r in rows]

    async def group_prune(self, age: float) -> None:
        await self.pool.execute(Q["group_prune"], age)

    # -- hub membership ------------------------------------------------------------

    async def hub_join(self, node: str) -> None:
        await self.pool.execute(Q["hub_join"], node)

    async def hub_leave(self, node: str) -> None:
        await self.pool.execute(Q["hub_leave"], node)

    async def hub_drain(self, node: str) -> None:
        await self.pool.execute(Q["hub_drain"], node)

    async def hub_topology(self, ttl: float) -> list[tuple[str, bool, bool, float | None]]:
        rows = await self.pool.fetch(Q["hub_topology"], ttl)
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def hub_prune(self, ttl: float) -> list[str]:
        return [r[0] for r in await self.pool.fetch(Q["hub_prune"], ttl)]

    # -- processes -----------------------------------------------------------------

    async def proc_insert(self, rows: Sequence[tuple[str, str, str, str, str | None]]) -> set[str]:
        found = await self.pool.fetch(Q["proc_insert"], *_cols(rows, 5))
        return {r[0] for r in found}

    async def proc_list(self) -> list[tuple[str, str, str, str | None, str, int, str | None]]:
        rows = await self.pool.fetch(Q["proc_list"])
        return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def proc_instances(self) -> list[tuple[str, str, str, int]]:
        return [(r[0], r[1], r[2], r[3]) for r in await self.pool.fetch(Q["proc_instances"])]

    async def proc_get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(Q["proc_get"], list(ids))
        return [
            {**dict(r), "nodes": list(r["nodes"]), "incarnations": list(r["incarnations"])}
            for r in rows
        ]

    async def proc_drop_instances(self, nodes: Sequence[str]) -> list[tuple[str, str, int]]:
        rows = await self.pool.fetch(Q["proc_drop_instances"], list(nodes))
        return [(r[0], r[1], r[2]) for r in rows]

    async def proc_claim(self, ids: Sequence[str], node: str, role: str) -> list[Claim]:
        rows = await self.pool.fetch(Q["proc_claim"], list(ids), node, role)
        return [Claim(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def proc_release(
        self, node: str, rows: Sequence[tuple[str, int, str | None]]
    ) -> set[str]:
        ids, incs, states = _cols(rows, 3)
        found = await self.pool.fetch(Q["proc_release"], ids, states, node, incs)
        return {r[0] for r in found}

    async def proc_transfer(
        self, node: str, rows: Sequence[tuple[str, int, str | None, str]]
    ) -> list[tuple[str, str, int]]:
        ids, incs, states, targets = _cols(rows, 4)
        found = await self.pool.fetch(Q["proc_transfer"], ids, incs, states, targets, node)
        return [(r[0], r[1], r[2]) for r in found]

    async def proc_ready(self, node: str, rows: Sequence[tuple[str, int]]) -> None:
        await self.pool.execute(Q["proc_ready"], *_cols(rows, 2), node)

    async def proc_state(self, child_id: str) -> tuple[str | None, str | None]:
        row = await self.pool.fetchrow(Q["proc_state"], child_id)
        return (None, None) if row is None else (row[0], row[1])

    async def proc_promote(self, child_id: str, node: str) -> None:
        await self.pool.execute(Q["proc_promote"], child_id, node)

    async def proc_checkpoint(self, child_id: str, node: str, incarnation: int, state: str) -> bool:
        found = await self.pool.fetchval(Q["proc_checkpoint"], child_id, node, incarnation, state)
        return found is not None

    async def proc_fail(self, child_id: str, node: str, error: str) -> None:
        await self.pool.execute(Q["proc_fail"], child_id, node, error)

    async def proc_stop(self, ids: Sequence[str]) -> set[str]:
        return {r[0] for r in await self.pool.fetch(Q["proc_stop"], list(ids))}

    async def proc_drop_local(self, ids: Sequence[str], node: str) -> None:
        await self.pool.execute(Q["proc_drop_local"], list(ids), node)

    async def proc_delete_stopped(self, ids: Sequence[str]) -> set[str]:
        return {r[0] for r in await self.pool.fetch(Q["proc_delete_stopped"], list(ids))}

    # -- mailboxes -----------------------------------------------------------------

    async def mailbox_put(
        self, rows: Sequence[tuple[str, str, str | None, str | None, int | None]]
    ) -> None:
        await self.pool.execute(Q["mailbox_put"], *_cols(rows, 5))

    async def mailbox_take(
        self, ids: Sequence[str], node: str, inflight: Sequence[int], limit: int
    ) -> list[Mail]:
        rows = await self.pool.fetch(Q["mailbox_take"], list(ids), node, list(inflight), limit)
        return [Mail(r[0], r[1], r[2], r[3], r[4] is not None and r[4] != r[5]) for r in rows]

    async def mailbox_ack(self, seqs: Sequence[int]) -> None:
        await self.pool.execute(Q["mailbox_ack"], list(seqs))

    async def reply_put(self, rows: Sequence[tuple[str, str | None, str | None]]) -> None:
        await self.pool.execute(Q["reply_put"], *_cols(rows, 3))

    async def reply_take(self, ids: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
        return [(r[0], r[1], r[2]) for r in await self.pool.fetch(Q["reply_take"], list(ids))]

    async def prune(self, age: float) -> None:
        await self.pool.execute(Q["reply_prune"], age)

    # -- events --------------------------------------------------------------------

    async def notify(self, text: str) -> None:
        await self.pool.execute(Q["cluster_notify"], text)

    async def listen(self, callback: Callable[[str], None]) -> bool:
        def on_notify(_con: Any, _pid: int, _channel: str, text: str) -> None:
            callback(text)

        await self.unlisten()
        self._listener = await asyncpg.connect(self.store.url)
        await self._listener.add_listener(CHANNEL, on_notify)
        return True

    async def unlisten(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
            self._listener = None

    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def changed(self) -> bool:
        return False
