"""Process groups (Erlang pg semantics), with two nodes of one database in one test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import mainspring as ms
from helpers import aio, eventually
from mainspring.cluster.groups import GroupEvent


@contextlib.asynccontextmanager
async def nodes(url: str, *names: str) -> AsyncIterator[list[ms.App]]:
    """Apps on one database, each serving the cluster as its own node."""
    apps = [ms.App(url, lease_ttl=3.0, node_name=n) for n in names]
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app.cluster.running())
        try:
            yield apps
        finally:
            await stack.aclose()
            for app in apps:
                await app.aclose()


def until(check: Callable[[], bool], timeout: float = 10.0) -> asyncio.Future[None]:
    async def probe() -> bool:
        return check()

    return asyncio.ensure_future(eventually(probe, timeout))


@aio
async def test_a_pid_joined_twice_stays_until_it_left_twice(db_url: str) -> None:
    async with nodes(db_url, "n1") as (a,):
        g = a.groups
        await g.join("chat", "n1/p/1")
        await g.join(["chat", "ops"], "n1/p/1")
        assert g.members("chat") == ["n1/p/1", "n1/p/1"]
        assert g.which_groups() == ["chat", "ops"]
        assert await g.leave("chat", "n1/p/1") is True
        assert g.members("chat") == ["n1/p/1"]
        assert await g.leave("chat", "n1/p/1") is True
        assert g.members("chat") == []
        assert await g.leave("chat", "n1/p/1") is False
        assert g.which_groups() == ["ops"]


@aio
async def test_membership_is_cluster_wide_and_local_members_are_this_nodes(db_url: str) -> None:
    async with nodes(db_url, "n1", "n2") as (a, b):
        await a.groups.join("g", "n1/x/1")
        await b.groups.join("g", "n2/y/1")
        await until(lambda: a.groups.members("g") == b.groups.members("g") == ["n1/x/1", "n2/y/1"])
        assert a.groups.local_members("g") == ["n1/x/1"]
        assert b.groups.local_members("g") == ["n2/y/1"]
        assert a.groups.which_local_groups() == ["g"]


@aio
async def test_monitor_gives_a_snapshot_then_every_event_without_a_gap(db_url: str) -> None:
    async with nodes(db_url, "n1", "n2") as (a, b):
        await a.groups.join("room", "n1/a/1")
        await until(lambda: b.groups.members("room") == ["n1/a/1"])
        snapshot, events = b.groups.monitor("room")
        assert snapshot == ["n1/a/1"]
        await a.groups.join("room", "n1/b/1")
        await a.groups.join("room", "n1/b/1")
        await a.groups.leave("room", "n1/a/1")
        got = [await asyncio.wait_for(anext(events), 10) for _ in range(3)]
        assert got == [
            GroupEvent("join", "room", ["n1/b/1"]),
            GroupEvent("join", "room", ["n1/b/1"]),
            GroupEvent("leave", "room", ["n1/a/1"]),
        ]
        events.close()


@aio
async def test_an_exited_process_leaves_every_group_once_per_join(db_url: str) -> None:
    async with nodes(db_url, "n1", "n2") as (a, b):
        await a.groups.join("g", "n1/p/1")
        await a.groups.join("g", "n1/p/1")
        await a.groups.join("h", "n1/p/1")
        await until(lambda: len(b.groups.members("g")) == 2 and b.groups.members("h"))
        _, events = b.groups.monitor()
        await a.groups.remove_pids(["n1/p/1"])
        assert a.groups.which_groups() == []
        got = [await asyncio.wait_for(anext(events), 10) for _ in range(2)]
        assert sorted((e.group, e.pids) for e in got if isinstance(e, GroupEvent)) == [
            ("g", ["n1/p/1", "n1/p/1"]),
            ("h", ["n1/p/1"]),
        ]


@aio
async def test_members_of_a_dead_node_are_removed(db_url: str) -> None:
    async with nodes(db_url, "n1") as (a,):
        dead = ms.App(db_url, lease_ttl=3.0, node_name="n2")
        async with dead.cluster.running():
            await dead.groups.join("g", "n2/z/1")
            await until(lambda: a.groups.members("g") == ["n2/z/1"])
        await dead.aclose()  # n2 is gone: its node row too
        await until(lambda: a.groups.members("g") == [], timeout=30)


@aio
async def test_scopes_are_independent(db_url: str) -> None:
    async with nodes(db_url, "n1", "n2") as (a, b):
        await a.groups.scope("s1").join("g", "n1/p/1")
        await a.groups.join("g", "n1/q/1")
        await until(lambda: b.groups.scope("s1").members("g") == ["n1/p/1"])
        await until(lambda: b.groups.members("g") == ["n1/q/1"])
        assert b.groups.scope("s2").members("g") == []


@aio
async def test_a_plain_client_reads_members_after_a_refresh(db_url: str) -> None:
    async with nodes(db_url, "n1") as (a,):
        await a.groups.join("g", "n1/p/1")
        client = ms.App(db_url, lease_ttl=3.0)
        try:
            await eventually(lambda: _refreshed(client, ["n1/p/1"]), 10)
        finally:
            await client.aclose()


async def _refreshed(app: ms.App, want: list[str]) -> bool:
    await app.groups.refresh()
    return app.groups.members("g") == want
