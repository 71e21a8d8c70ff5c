"""The cluster contract on SQLite: named statements on the store's connection (its one
thread); other processes' writes are noticed by polling PRAGMA data_version."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from mainspring.cluster.store import Claim, ClusterStore, GroupRow, Mail, net_deltas
from mainspring.store.queries import load_queries
from mainspring.store.sqlite import SqliteStore

Q = load_queries("sqlite")

# Hubs of this process listening on a database file: in-process notifications are instant.
_listeners: dict[str, set[Callable[[str], None]]] = {}
_lock = threading.Lock()


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _expires(ttl: float | None, now: float) -> float | None:
    return None if ttl is None else now + ttl


class SqliteCluster(ClusterStore):
    """ClusterStore on a SqliteStore's connection."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self._callback: Callable[[str], None] | None = None
        self._data_version = 0
        self._pruned_at = 0.0

    async def _read(self, query: str, /, **params: Any) -> list[sqlite3.Row]:
        params.setdefault("now", time.time())
        return await self.store._call(self._fetch, query, params)

    def _fetch(self, query: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        return self.store.con.execute(Q[query], params).fetchall()

    async def _one(self, query: str, /, **params: Any) -> sqlite3.Row | None:
        """A single statement (a write is its own transaction); its first row."""
        rows = await self._read(query, **params)
        return rows[0] if rows else None

    # -- kv ------------------------------------------------------------------------

    async def kv_get(self, key: str) -> tuple[str, int] | None:
        row = await self._one("kv_get", key=key)
        return None if row is None else (row[0], row[1])

    async def _logged(self, query: str, **params: Any) -> int | None:
        """One KV write and its change log entry, in one transaction; the new revision."""

        def write(con: sqlite3.Connection) -> int | None:
            row = con.execute(Q[query], params).fetchone()
            if row is None:
                return None
            value = None if query == "kv_delete" else params["value"]
            log = {"rev": row[0], "key": params["key"], "value": value, "now": params["now"]}
            con.execute(Q["kv_log"], log)
            return int(row[0])

        params.setdefault("now", time.time())
        return await self.store._write(write)

    async def kv_put(self, key: str, value: str, ttl: float | None) -> int:
        now = time.time()
        rev = await self._logged(
            "kv_put", key=key, value=value, expires_at=_expires(ttl, now), now=now
        )
        assert rev is not None
        return rev

    async def kv_delete(self, key: str) -> int | None:
        return await self._logged("kv_delete", key=key)

    async def kv_cas(
        self, key: str, expected: str | None, new: str, ttl: float | None
    ) -> int | None:
        now = time.time()
        params = {"key": key, "value": new, "expires_at": _expires(ttl, now), "now": now}
        if expected is None:
            return await self._logged("kv_cas_absent", **params)
        return await self._logged("kv_cas", expected=expected, **params)

    async def kv_scan(self, prefix: str) -> list[tuple[str, str, int]]:
        return [(r[0], r[1], r[2]) for r in await self._read("kv_scan", prefix=prefix)]

    async def kv_changes(
        self, after: int, prefix: str, limit: int
    ) -> tuple[int, list[tuple[str, str | None, int]]]:
        def read() -> tuple[int, list[Any]]:
            con = self.store.con
            start = con.execute(Q["kv_log_start"]).fetchone()[0]
            params = {"after": after, "prefix": prefix, "n": limit}
            return int(start), con.execute(Q["kv_changes"], params).fetchall()

        start, rows = await self.store._call(read)
        return start, [(r[0], r[1], r[2]) for r in rows]

    async def kv_head(self) -> int:
        return int((await self._read("kv_head"))[0][0])

    async def kv_expire(self, tombstone_age: float) -> int:
        # Read first: the write lock is taken only when something expired.
        due = await self._read("kv_expired")
        if not due and time.time() - self._pruned_at < 60:
            return 0
        self._pruned_at = time.time()

        def expire(con: sqlite3.Connection) -> int:
            now = time.time()
            keys = [r[0] for r in con.execute(Q["kv_expired"], {"now": now}).fetchall()]
            for key in keys:
                rev = con.execute(Q["kv_tombstone"], {"key": key, "now": now}).fetchone()[0]
                con.execute(Q["kv_log"], {"rev": rev, "key": key, "value": None, "now": now})
            con.execute(Q["kv_prune"], {"now": now, "age": tombstone_age})
            con.execute(Q["kv_log_prune"], {"now": now, "age": tombstone_age})
            return len(keys)

        return await self.store._write(expire)

    # -- registry ------------------------------------------------------------------

    async def name_register(self, name: str, pid: str, node: str, ttl: float) -> int | None:
        row = await self._one("name_register", name=name, pid=pid, node=node, ttl=ttl)
        return None if row is None else int(row[0])

    async def name_lookup(self, name: str, ttl: float) -> tuple[str, int] | None:
        row = await self._one("name_lookup", name=name, ttl=ttl)
        return None if row is None else (row[0], row[1])

    async def name_unregister(self, name: str, pid: str | None) -> bool:
        return await self._one("name_unregister", name=name, pid=pid) is not None

    async def names_release(self, pids: Sequence[str] | None, ttl: float) -> list[str]:
        if pids is None:
            rows = await self._read("names_release_dead", ttl=ttl)
        else:
            rows = await self._read("names_release_pids", pids=_json(list(pids)))
        return [r[0] for r in rows]

    async def names(self) -> list[tuple[str, str, str, int]]:
        return [(r[0], r[1], r[2], r[3]) for r in await self._read("names_of")]

    # -- process groups ------------------------------------------------------------

    async def group_apply(self, rows: Sequence[GroupRow], origin: str) -> None:
        data = _json([list(r) for r in rows])
        net = net_deltas(rows)

        def apply(con: sqlite3.Connection) -> None:
            now = time.time()
            con.execute(Q["group_upsert"], {"rows": _json([list(r) for r in net])})
            if any(r[4] <= 0 for r in net):
                con.execute(Q["group_drop_empty"])
            con.execute(Q["group_log"], {"rows": data, "origin": origin, "now": now})

        await self.store._write(apply)

    async def group_remove(
        self, nodes: Sequence[str] | None, pids: Sequence[str] | None, origin: str
    ) -> list[GroupRow]:
        def remove(con: sqlite3.Connection) -> list[GroupRow]:
            if nodes is not None:
                found = con.execute(Q["group_remove_nodes"], {"nodes": _json(list(nodes))})
            else:
                found = con.execute(Q["group_remove_pids"], {"pids": _json(list(pids or ()))})
            removed: list[GroupRow] = [(r[0], r[1], r[2], r[3], r[4]) for r in found.fetchall()]
            if removed:
                data = _json([[*r[:4], -r[4]] for r in removed])
                con.execute(Q["group_log"], {"rows": data, "origin": origin, "now": time.time()})
            return removed

        return await self.store._write(remove)

    async def group_snapshot(self) -> tuple[int, list[GroupRow]]:
        def read() -> tuple[int, list[GroupRow]]:
            con = self.store.con
            con.execute("BEGIN")  # one read transaction: a consistent snapshot, no write lock
            try:
                head = con.execute(Q["group_head"]).fetchone()[0]
                rows = con.execute(Q["group_members_all"]).fetchall()
            finally:
                con.execute("COMMIT")
            return int(head), [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await self.store._call(read)

    async def group_tail(
        self, after: int, limit: int
    ) -> tuple[int, list[tuple[int, GroupRow, str]]]:
        def read() -> tuple[int, list[Any]]:
            con = self.store.con
            start = con.execute(Q["group_log_start"]).fetchone()[0]
            return int(start), con.execute(Q["group_tail"], {"after": after, "n": limit}).fetchall()

        start, rows = await self.store._call(read)
        return start, [(r[0], (r[1], r[2], r[3], r[4], r[5]), r[6]) for r in rows]

    async def group_prune(self, age: float) -> None:
        await self._read("group_prune", age=age)

    # -- hub membership ------------------------------------------------------------

    async def hub_join(self, node: str) -> None:
        await self._read("hub_join", node=node)

    async def hub_leave(self, node: str) -> None:
        await self._read("hub_leave", node=node)

    async def hub_drain(self, node: str) -> None:
        await self._read("hub_drain", node=node)

    async def hub_topology(self, ttl: float) -> list[tuple[str, bool, bool, float | None]]:
        rows = await self._read("hub_topology", ttl=ttl)
        return [(r[0], bool(r[1]), bool(r[2]), r[3]) for r in rows]

    async def hub_prune(self, ttl: float) -> list[str]:
        return [r[0] for r in await self._read("hub_prune", ttl=ttl)]

    # -- processes -----------------------------------------------------------------

    async def proc_insert(self, rows: Sequence[tuple[str, str, str, str, str | None]]) -> set[str]:
        found = await self._read("proc_insert", rows=_json([list(r) for r in rows]))
        return {r[0] for r in found}

    async def proc_list(self) -> list[tuple[str, str, str, str | None, str, int, str | None]]:
        rows = await self._read("proc_list")
        return [(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def proc_instances(self) -> list[tuple[str, str, str, int]]:
        return [(r[0], r[1], r[2], r[3]) for r in await self._read("proc_instances")]

    async def proc_get(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        rows = await self._read("proc_get", ids=_json(list(ids)))
        loads = orjson.loads
        return [
            {**dict(r), "nodes": loads(r["nodes"]), "incarnations": loads(r["incarnations"])}
            for r in rows
        ]

    async def proc_drop_instances(self, nodes: Sequence[str]) -> list[tuple[str, str, int]]:
        rows = await self._read("proc_drop_instances", nodes=_json(list(nodes)))
        return [(r[0], r[1], r[2]) for r in rows]

    async def proc_claim(self, ids: Sequence[str], node: str, role: str) -> list[Claim]:
        def claim(con: sqlite3.Connection) -> list[Claim]:
            now = time.time()
            params = {"ids": _json(list(ids)), "node": node, "role": role}
            got = con.execute(Q["proc_claim_insert"], params).fetchall()
            if not got:
                return []
            data = _json([[r[0], r[1]] for r in got])
            rows = con.execute(Q["proc_claim_update"], {"rows": data, "now": now}).fetchall()
            return [Claim(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

        return await self.store._write(claim)

    async def proc_release(
        self, node: str, rows: Sequence[tuple[str, int, str | None]]
    ) -> set[str]:
        data = _json([list(r) for r in rows])

        def release(con: sqlite3.Connection) -> set[str]:
            params = {"node": node, "rows": data}
            gone = [r[0] for r in con.execute(Q["proc_release_instance"], params).fetchall()]
            if gone:
                keep = {"rows": data, "ids": _json(gone), "now": time.time()}
                con.execute(Q["proc_keep_state"], keep)
            return set(gone)

        return await self.store._write(release)

    async def proc_transfer(
        self, node: str, rows: Sequence[tuple[str, int, str | None, str]]
    ) -> list[tuple[str, str, int]]:
        data = _json([list(r) for r in rows])

        def transfer(con: sqlite3.Connection) -> list[tuple[str, str, int]]:
            now = time.time()
            params = {"node": node, "rows": data}
            gone = [r[0] for r in con.execute(Q["proc_release_instance"], params).fetchall()]
            if not gone:
                return []
            ids = _json(gone)
            con.execute(Q["proc_keep_state"], {"rows": data, "ids": ids, "now": now})
            moved = con.execute(Q["proc_transfer_insert"], {"rows": data, "ids": ids}).fetchall()
            con.execute(Q["proc_bump"], {"ids": ids, "now": now})
            return [(r[0], r[1], r[2]) for r in moved]

        return await self.store._write(transfer)

    async def proc_ready(self, node: str, rows: Sequence[tuple[str, int]]) -> None:
        await self._read("proc_ready", node=node, rows=_json([list(r) for r in rows]))

    async def proc_state(self, child_id: str) -> tuple[str | None, str | None]:
        row = await self._one("proc_state", id=child_id)
        return (None, None) if row is None else (row[0], row[1])

    async def proc_promote(self, child_id: str, node: str) -> None:
        await self._read("proc_promote", id=child_id, node=node)

    async def proc_checkpoint(self, child_id: str, node: str, incarnation: int, state: str) -> bool:
        row = await self._one(
            "proc_checkpoint", id=child_id, node=node, incarnation=incarnation, state=state
        )
        return row is not None

    async def proc_fail(self, child_id: str, node: str, error: str) -> None:
        def fail(con: sqlite3.Connection) -> None:
            con.execute(Q["proc_fail_instance"], {"id": child_id, "node": node})
            con.execute(Q["proc_fail"], {"id": child_id, "error": error, "now": time.time()})

        await self.store._write(fail)

    async def proc_stop(self, ids: Sequence[str]) -> set[str]:
        return {r[0] for r in await self._read("proc_stop", ids=_json(list(ids)))}

    async def proc_drop_local(self, ids: Sequence[str], node: str) -> None:
        await self._read("proc_drop_local", ids=_json(list(ids)), node=node)

    async def proc_delete_stopped(self, ids: Sequence[str]) -> set[str]:
        def delete(con: sqlite3.Connection) -> set[str]:
            gone = [r[0] for r in con.execute(Q["proc_delete_stopped"], {"ids": _json(list(ids))})]
            if gone:
                con.execute(Q["mailbox_drop"], {"ids": _json(gone)})
            return set(gone)

        return await self.store._write(delete)

    # -- mailboxes -----------------------------------------------------------------

    async def mailbox_put(
        self, rows: Sequence[tuple[str, str, str | None, str | None, int | None]]
    ) -> None:
        await self._read("mailbox_put", rows=_json([list(r) for r in rows]))

    async def mailbox_take(
        self, ids: Sequence[str], node: str, inflight: Sequence[int], limit: int
    ) -> list[Mail]:
        rows = await self._read(
            "mailbox_take", ids=_json(list(ids)), node=node, inflight=_json(list(inflight)), n=limit
        )
        return [Mail(r[0], r[1], r[2], r[3], r[4] is not None and r[4] != r[5]) for r in rows]

    async def mailbox_ack(self, seqs: Sequence[int]) -> None:
        await self._read("mailbox_ack", seqs=_json(list(seqs)))

    async def reply_put(self, rows: Sequence[tuple[str, str | None, str | None]]) -> None:
        await self._read("reply_put", rows=_json([list(r) for r in rows]))

    async def reply_take(self, ids: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
        return [(r[0], r[1], r[2]) for r in await self._read("reply_take", ids=_json(list(ids)))]

    async def prune(self, age: float) -> None:
        await self._read("reply_prune", age=age)
        await self._read("mailbox_prune", age=age)

    # -- events --------------------------------------------------------------------

    async def notify(self, text: str) -> None:
        with _lock:
            callbacks = list(_listeners.get(self.store._key, ()))
        for callback in callbacks:
            callback(text)

    async def listen(self, callback: Callable[[str], None]) -> bool:
        await self.unlisten()
        with _lock:
            _listeners.setdefault(self.store._key, set()).add(callback)
        self._callback = callback
        return False

    async def unlisten(self) -> None:
        if self._callback is not None:
            with _lock:
                _listeners.get(self.store._key, set()).discard(self._callback)
            self._callback = None

    async def changed(self) -> bool:
        def version() -> int:
            return int(self.store.con.execute("PRAGMA data_version").fetchone()[0])

        current = await self.store._call(version)
        changed, self._data_version = current != self._data_version, current
        return changed
