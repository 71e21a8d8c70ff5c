"""Cluster KV and registry: on both backends, and raced from real processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import mainspring as ms
from helpers import aio
from mainspring.cluster.kv import KVChange, KVOverflow
from processes import WorkerProcesses

SCRIPT = Path(__file__).parent / "cluster_kv_script.py"


@aio
async def test_get_put_delete_and_scan(app: ms.App) -> None:
    assert await app.kv.get("a") is None
    assert await app.kv.get("a", 7) == 7
    r1 = await app.kv.put("cfg/a", {"x": 1})
    r2 = await app.kv.put("cfg/b", [1, 2])
    await app.kv.put("other", "z")
    assert r2 > r1
    assert await app.kv.get("cfg/a") == {"x": 1}
    assert await app.kv.scan("cfg/") == {"cfg/a": {"x": 1}, "cfg/b": [1, 2]}
    assert await app.kv.delete("cfg/a") is True
    assert await app.kv.delete("cfg/a") is False
    assert await app.kv.scan("cfg/") == {"cfg/b": [1, 2]}


@aio
async def test_a_key_expires_after_its_ttl(app: ms.App) -> None:
    await app.kv.put("session", "s1", ttl=0.3)
    assert await app.kv.get("session") == "s1"
    await asyncio.sleep(0.45)
    assert await app.kv.get("session") is None
    assert await app.kv.scan("sess") == {}
    assert await app.kv.cas("session", None, "s2") is True  # an expired key is absent


@aio
async def test_cas_compares_values_and_absence(app: ms.App) -> None:
    assert await app.kv.cas("k", None, {"v": 1}) is True
    assert await app.kv.cas("k", None, {"v": 2}) is False  # not absent
    assert await app.kv.cas("k", {"v": 9}, {"v": 2}) is False
    assert await app.kv.cas("k", {"v": 1}, {"v": 2}) is True
    assert await app.kv.get("k") == {"v": 2}
    await app.kv.delete("k")
    assert await app.kv.cas("k", {"v": 2}, 3) is False
    assert await app.kv.cas("k", None, 3) is True


@aio
async def test_watch_sees_puts_and_deletes_in_order(app: ms.App) -> None:
    await app.kv.put("w/old", 0)
    async with app.kv.watch("w/", poll=0.01) as changes:
        await app.kv.put("w/a", 1)
        await app.kv.put("elsewhere", 1)
        await app.kv.put("w/a", 2)
        await app.kv.delete("w/a")
        seen = [await asyncio.wait_for(anext(changes), 5) for _ in range(3)]
    assert [(c.key, c.value, c.deleted) for c in seen if isinstance(c, KVChange)] == [
        ("w/a", 1, False),
        ("w/a", 2, False),
        ("w/a", None, True),
    ]
    assert seen[0].rev < seen[1].rev < seen[2].rev  # type: ignore[union-attr]


@aio
async def test_a_slow_watcher_gets_an_overflow_marker(app: ms.App) -> None:
    watch = await app.kv.watch("f/", buffer=5, poll=0.01).start()
    for i in range(20):
        await app.kv.put(f"f/{i}", i)
    first = await asyncio.wait_for(anext(watch), 5)
    assert isinstance(first, KVOverflow)
    await app.kv.put("f/late", 1)
    after = await asyncio.wait_for(anext(watch), 5)
    assert isinstance(after, KVChange) and after.key == "f/late"


async def _live(app: ms.App, *nodes: str) -> None:
    store = await app.store()
    for node in nodes:
        await store.heartbeat_node(node, [], [], 0, "up")


@aio
async def test_register_gives_monotonic_tokens_and_names_the_holder(app: ms.App) -> None:
    await _live(app, "n1", "n2")
    t1 = await app.registry.register("db", "n1/a/1")
    assert await app.registry.register("db", "n1/a/1") == t1  # idempotent
    with pytest.raises(ms.NameTaken) as taken:
        await app.registry.register("db", "n2/b/1")
    assert taken.value.holder == "n1/a/1" and "n1/a/1" in str(taken.value)
    assert await app.registry.lookup("db") == ("n1/a/1", t1)
    assert await app.registry.unregister("db") is True
    assert await app.registry.lookup("db") is None
    t2 = await app.registry.register("db", "n2/b/1")
    assert t2 > t1
    assert await app.registry.unregister("db", "n1/a/1") is False  # not the holder


@aio
async def test_names_of_a_dead_node_are_released(app: ms.App) -> None:
    await _live(app, "n1", "n2")
    t1 = await app.registry.register("lock", "n1/a/1")
    store = await app.store()
    # n1 stops heartbeating: its heartbeat is now older than the TTL.
    ttl = app.lease_ttl
    if store.backend == "postgres":
        await store.execute_script(
            f"UPDATE ms_nodes SET heartbeat_at = now() - interval '{ttl + 1} seconds' "
            "WHERE name = 'n1'"
        )
    else:
        await store.execute_script(
            f"UPDATE ms_nodes SET heartbeat_at = {time.time() - ttl - 1} WHERE name = 'n1'"
        )
    assert await app.registry.lookup("lock") is None
    t2 = await app.registry.register("lock", "n2/b/1")
    assert t2 > t1


def _race(tmp_path: Path, db_url: str, mode: str, n: int = 0) -> WorkerProcesses:
    procs = WorkerProcesses(tmp_path, SCRIPT)
    go = tmp_path / "go"
    for i in range(3):
        env = {
            **os.environ, "MAINSPRING_DATABASE_URL": db_url, "NODE": f"node{i}", "MODE": mode,
            "N": str(n), "RECORDS": str(procs.record_file), "GO": str(go),
        }  # fmt: skip
        procs.spawn(f"node{i}", env)
    deadline = time.monotonic() + 60
    while len(procs.records("ready")) < 3:
        assert time.monotonic() < deadline, procs.logs()
        time.sleep(0.05)
    go.write_text("go")
    for proc in procs.procs.values():
        proc.wait(timeout=120)
    return procs


def test_three_processes_cas_increment_to_300(tmp_path: Path, db_url: str) -> None:
    ms.App(db_url).migrate()
    with _race(tmp_path, db_url, "cas", 100) as procs:
        assert len(procs.records("done")) == 3, procs.logs()

    async def read() -> int:
        app = ms.App(db_url)
        try:
            return int(await app.kv.get("counter"))
        finally:
            await app.aclose()

    assert asyncio.run(read()) == 300


def test_three_processes_racing_for_one_name_make_one_winner(tmp_path: Path, db_url: str) -> None:
    ms.App(db_url).migrate()
    with _race(tmp_path, db_url, "race") as procs:
        won, lost = procs.records("won"), procs.records("lost")
        assert len(won) == 1 and len(lost) == 2, procs.logs()
        winner = f"{won[0]['node']}/leader/1"
        assert all(r["holder"] == winner for r in lost)
