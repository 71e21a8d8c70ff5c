"""The hub in one test process: nodes are Apps on one database, each serving the cluster."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import mainspring as ms
from helpers import aio, eventually

EVENTS: list[tuple[str, str, Any]] = []


class Counter(ms.Process):
    """Counts 'inc' messages; hands the count over; crashes on 'boom'."""

    async def init(self, args: dict[str, Any], handover: dict[str, Any] | None) -> None:
        self.count = (handover or {}).get("count", args.get("start", 0))
        EVENTS.append(("init", self.pid, handover))
        if args.get("fail_init"):
            raise RuntimeError("init refused")

    async def handle(self, msg: Any) -> Any:
        if msg == "boom":
            raise ValueError("boom")
        if msg == "inc":
            self.count += 1
            return self.count
        if msg == "save":
            return await self.checkpoint({"count": self.count})
        if isinstance(msg, dict) and "register" in msg:
            return await self.hub.app.registry.register(msg["register"], self.pid)
        if isinstance(msg, dict) and "join" in msg:
            await self.hub.app.groups.join(msg["join"], self.pid)
            return True
        return self.count

    async def handover(self) -> dict[str, Any]:
        return {"count": self.count}

    async def terminate(self, reason: str) -> None:
        EVENTS.append(("terminate", self.pid, reason))


def make(url: str, node: str, **hub: Any) -> ms.App:
    app = ms.App(url, lease_ttl=3.0, node_name=node)
    app.process(Counter)
    if hub:
        app.hub.configure(**hub)
    return app


@contextlib.asynccontextmanager
async def cluster(url: str, *names: str, **hub: Any) -> AsyncIterator[list[ms.App]]:
    apps = [make(url, n, **hub) for n in names]
    async with contextlib.AsyncExitStack() as stack:
        for app in apps:
            await stack.enter_async_context(app.cluster.running())
        try:
            yield apps
        finally:
            await stack.aclose()
            for app in apps:
                await app.aclose()


async def settled(apps: list[ms.App], n: int) -> None:
    """Every node sees `n` nodes."""

    async def check() -> bool:
        return all(len(a.hub.nodes()) == n for a in apps)

    await eventually(check, 15)


@pytest.fixture(autouse=True)
def _clear_events() -> None:
    EVENTS.clear()


@aio
async def test_children_start_answer_calls_and_count_messages_in_order(db_url: str) -> None:
    async with cluster(db_url, "n1", "n2") as (a, b):
        await settled([a, b], 2)
        specs = [
            ms.ChildSpec(f"c{i}", Counter, metadata={"tenant": "t" + str(i % 2)}) for i in range(6)
        ]
        result = await a.hub.start_children(specs, child_metadata={"c0": {"vip": True}})
        assert result.ok, result.errors
        assert sorted(result.started) == [f"c{i}" for i in range(6)]
        for i in range(6):
            for _ in range(3):
                await b.hub.send(f"c{i}", "inc")
        for i in range(6):
            await eventually(lambda i=i: _count(a, f"c{i}", 3), 10)
        await a.hub.refresh()
        assert set(a.hub.which_nodes("c0")) <= {"n1", "n2"} and len(a.hub.which_nodes("c0")) == 1
        assert sorted(a.hub.children(tags={"tenant": "t0"})) == ["c0", "c2", "c4"]
        assert a.hub.children()["c0"].metadata == {"tenant": "t0", "vip": True}
        placed = {a.hub.which_nodes(f"c{i}")[0] for i in range(6)}
        assert placed == {"n1", "n2"}  # spread over both nodes


async def _count(app: ms.App, child: str, want: int) -> bool:
    return await app.hub.call(child, "get", timeout=5) == want


@aio
async def test_a_second_start_of_one_id_is_an_error(db_url: str) -> None:
    async with cluster(db_url, "n1") as (a,):
        await settled([a], 1)
        assert (await a.hub.start_children([ms.ChildSpec("x", Counter)])).ok
        again = await a.hub.start_children([ms.ChildSpec("x", Counter)])
        assert "already started" in again.errors["x"]


@aio
async def test_rollback_stops_every_started_child_when_one_fails(db_url: str) -> None:
    async with cluster(db_url, "n1") as (a,):
        await settled([a], 1)
        specs = [
            ms.ChildSpec("ok1", Counter),
            ms.ChildSpec("bad", Counter, args={"fail_init": True}),
        ]
        result = await a.hub.start_children(specs, on_failure="rollback")
        assert "init refused" in result.errors["bad"]
        assert result.rolled_back == ["bad", "ok1"] and result.started == {}
        await a.hub.refresh()
        assert a.hub.children() == {}


@aio
async def test_a_crashing_child_restarts_from_its_checkpoint_then_fails(db_url: str) -> None:
    async with cluster(db_url, "n1") as (a,):
        await settled([a], 1)
        assert (await a.hub.start_children([ms.ChildSpec("c", Counter)])).ok
        assert await a.hub.call("c", "inc") == 1
        assert await a.hub.call("c", "save") is True
        assert await a.hub.call("c", "inc") == 2
        with pytest.raises(ms.ProcessError, match="boom"):
            await a.hub.call("c", "boom")
        assert await a.hub.call("c", "get") == 1  # restarted from the checkpoint
        for _ in range(3):
            with contextlib.suppress(ms.ProcessError):
                await a.hub.call("c", "boom")

        async def failed() -> bool:
            await a.hub.refresh()
            return a.hub.children()["c"].state == "failed"

        await eventually(failed, 10)
        assert "boom" in (a.hub.children()["c"].error or {}).get("message", "")


@aio
async def test_stop_children_terminates_them(db_url: str) -> None:
    async with cluster(db_url, "n1") as (a,):
        await settled([a], 1)
        await a.hub.start_children([ms.ChildSpec("s1", Counter), ms.ChildSpec("s2", Counter)])
        result = await a.hub.stop_children(["s1", "s2", "nope"])
        assert sorted(result.stopped) == ["s1", "s2"] and "nope" in result.errors
        assert sorted(r for k, _p, r in EVENTS if k == "terminate") == ["stopped", "stopped"]


@pytest.mark.parametrize("migration", [ms.ColdSwap(), ms.HotSwap()], ids=["cold", "hot"])
@aio
async def test_a_joining_node_takes_its_share_with_handover_state(
    db_url: str, migration: Any
) -> None:
    async with cluster(db_url, "n1", migration=migration) as (a,):
        await settled([a], 1)
        specs = [ms.ChildSpec(f"m{i}", Counter, args={"start": i}) for i in range(40)]
        assert (await a.hub.start_children(specs)).ok
        moved: list[dict[str, Any]] = []
        a.hub.hooks.register("migration_completed", moved.append)
        b = make(db_url, "n2", migration=migration)
        async with b.cluster.running():
            await settled([a, b], 2)

            async def balanced() -> bool:
                await a.hub.refresh()
                return (
                    len(moved) > 0
                    and all(a.hub.which_nodes(f"m{i}") for i in range(40))
                    and len(b.hub.local_children()) == len(moved)
                )

            await eventually(balanced, 20)
            assert 8 <= len(moved) <= 32  # about half, with 128 vnodes per node
            for event in moved:
                cid = event["child_id"]
                i = int(cid[1:])
                assert await b.hub.call(cid, "get") == i  # state came over
            handed = [h for k, p, h in EVENTS if k == "init" and p.startswith("n2/")]
            assert len(handed) == len(moved) and all(h is not None for h in handed)
        await b.aclose()


@aio
async def test_guided_children_run_where_the_caller_says(db_url: str) -> None:
    async with cluster(db_url, "n1", "n2", distribution=ms.Guided()) as (a, b):
        await settled([a, b], 2)
        with pytest.raises(ms.ConfigError, match="child mapping"):
            await a.hub.start_children([ms.ChildSpec("g0", Counter)])
        result = await a.hub.start_children(
            [ms.ChildSpec("g1", Counter, nodes=["n2"]), ms.ChildSpec("g2", Counter, nodes=["n1"])]
        )
        assert result.ok
        assert set(b.hub.local_children()) == {"g1"} and set(a.hub.local_children()) == {"g2"}


@aio
async def test_drain_moves_children_away_with_their_state(db_url: str) -> None:
    async with cluster(db_url, "n1", "n2") as (a, b):
        await settled([a, b], 2)
        assert (await a.hub.start_children([ms.ChildSpec(f"d{i}", Counter) for i in range(10)])).ok
        await eventually(lambda: _has_local(a), 10)
        for cid in a.hub.local_children():
            await a.hub.call(cid, "inc")
        mine = set(a.hub.local_children())
        report = await a.hub.drain(timeout=20)
        assert report == {"migrated": len(mine), "forced": 0}
        assert a.hub.local_children() == {}
        for cid in mine:
            assert await b.hub.call(cid, "get") == 1


async def _has_local(app: ms.App) -> bool:
    return bool(app.hub.local_children())


@aio
async def test_a_node_without_quorum_is_partitioned_and_runs_nothing(db_url: str) -> None:
    async with cluster(db_url, "n1", quorum=ms.StaticQuorum(2)) as (a,):
        await eventually(lambda: _partitioned(a), 10)
        result = await a.hub.start_children([ms.ChildSpec("q", Counter)], call_timeout=1)
        assert "not started" in result.errors["q"]
        b = make(db_url, "n2", quorum=ms.StaticQuorum(2))
        async with b.cluster.running():
            await eventually(lambda: _not_partitioned(a), 10)
            await eventually(lambda: _runs_somewhere(a, "q"), 10)
        await b.aclose()


async def _partitioned(app: ms.App) -> bool:
    return app.hub.is_partitioned()


async def _not_partitioned(app: ms.App) -> bool:
    return not app.hub.is_partitioned()


async def _runs_somewhere(app: ms.App, cid: str) -> bool:
    await app.hub.refresh()
    return bool(app.hub.which_nodes(cid))


def test_handover_with_replication_is_rejected_at_startup() -> None:
    app = ms.App("sqlite:///:memory:")
    with pytest.raises(ms.ConfigError, match="handover_with_replication_not_supported"):
        app.hub.configure(redundancy=ms.Replication(factor=2))
    app.hub.configure(redundancy=ms.Replication(factor=2), migration=ms.ColdSwap(handover=False))


@aio
async def test_a_message_to_a_name_never_reaches_a_stale_holder(db_url: str) -> None:
    async with cluster(db_url, "n1") as (a,):
        await settled([a], 1)
        await a.hub.start_children([ms.ChildSpec("r1", Counter), ms.ChildSpec("r2", Counter)])
        token = await a.hub.call("r1", {"register": "leader"})
        await a.registry.send("leader", "inc")
        await eventually(lambda: _count(a, "r1", 1), 10)
        # The name changes hands between lookup and delivery: the message is dropped.
        held = await a.registry.lookup("leader")
        assert held is not None and held[1] == token
        await a.registry.unregister("leader")
        assert await a.hub.call("r2", {"register": "leader"}) > token
        await a.hub.send("r1", "inc", _name=("leader", token))
        await a.hub.send("r1", "inc")
        await eventually(lambda: _count(a, "r1", 2), 10)


@aio
async def test_broadcast_reaches_every_member_process(db_url: str) -> None:
    async with cluster(db_url, "n1", "n2") as (a, b):
        await settled([a, b], 2)
        await a.hub.start_children([ms.ChildSpec(f"b{i}", Counter) for i in range(4)])
        for i in range(4):
            await a.hub.call(f"b{i}", {"join": "all"})
        await eventually(lambda: _members(a, "all", 4), 10)
        assert await a.groups.broadcast("all", "inc") == 4
        for i in range(4):
            await eventually(lambda i=i: _count(a, f"b{i}", 1), 10)
        await a.hub.stop_children(["b0"])
        await eventually(lambda: _members(b, "all", 3), 10)  # an exited process left


async def _members(app: ms.App, group: str, n: int) -> bool:
    return len(app.groups.members(group)) == n


@aio
async def test_active_passive_replicas_take_over_when_the_active_node_leaves(db_url: str) -> None:
    options: dict[str, Any] = {
        "redundancy": ms.Replication(factor=2, mode="active_passive"),
        "migration": ms.ColdSwap(handover=False),
    }
    a, b = make(db_url, "n1", **options), make(db_url, "n2", **options)
    async with a.cluster.running():
        async with b.cluster.running():
            await settled([a, b], 2)
            assert (
                await a.hub.start_children([ms.ChildSpec(f"p{i}", Counter) for i in range(12)])
            ).ok

            async def replicated() -> bool:
                await a.hub.refresh()
                return all(len(a.hub.which_nodes(f"p{i}")) == 2 for i in range(12))

            await eventually(replicated, 15)
            roles = {
                cid: (a.hub._local[cid].role if cid in a.hub._local else None,
                      b.hub._local[cid].role if cid in b.hub._local else None)
                for cid in (f"p{i}" for i in range(12))
            }  # fmt: skip
            assert all(sorted(r) == ["active", "passive"] for r in roles.values()), roles
            on_b = [cid for cid, (_ra, rb) in roles.items() if rb == "active"]
            assert on_b  # some actives on each node (12 children on the ring)
            for cid in on_b:
                assert await a.hub.call(cid, "inc") == 1
                assert await a.hub.call(cid, "save") is True  # a checkpoint the twin reads
        await b.aclose()

        # n2 left: its active replicas' passive twins on n1 become active.
        async def promoted() -> bool:
            return all(
                cid in a.hub._local and a.hub._local[cid].role == "active"
                for cid in (f"p{i}" for i in range(12))
            )

        await eventually(promoted, 15)
        for cid in on_b:  # promoted with the last checkpoint
            assert await a.hub.call(cid, "get") == 1
            assert a.hub._local[cid].proc.role == "active"  # type: ignore[union-attr]
    await a.aclose()


class Recorder(ms.Process):
    """Keeps every message it got, in order."""

    async def init(self, args: dict[str, Any], handover: dict[str, Any] | None) -> None:
        self.got: list[Any] = []

    async def handle(self, msg: Any) -> Any:
        if msg == "list":
            return self.got
        self.got.append(msg)
        return None


@aio
async def test_messages_from_one_sender_arrive_in_order_on_another_node(db_url: str) -> None:
    a, b = (
        make(db_url, "n1", distribution=ms.Guided()),
        make(db_url, "n2", distribution=ms.Guided()),
    )
    for app in (a, b):
        app.process(Recorder)
    async with a.cluster.running(), b.cluster.running():
        await settled([a, b], 2)
        assert (await a.hub.start_children([ms.ChildSpec("rec", Recorder, nodes=["n2"])])).ok
        for i in range(50):
            await a.hub.send("rec", i)

        async def all_there() -> bool:
            return len(await a.hub.call("rec", "list")) == 50

        await eventually(all_there, 10)
        assert await a.hub.call("rec", "list") == list(range(50))
    await a.aclose()
    await b.aclose()


@aio
async def test_hooks_see_nodes_join_and_leave_and_children_come_and_go(db_url: str) -> None:
    async with cluster(db_url, "n1") as (a,):
        await settled([a], 1)
        seen: list[tuple[str, Any]] = []
        for name in ("pre_node_join", "post_node_join", "pre_node_leave", "post_node_leave",
                     "child_registered", "child_unregistered", "post_children_start",
                     "pre_redistribution", "post_redistribution"):  # fmt: skip
            a.hub.hooks.register(name, lambda d, name=name: seen.append((name, d)))
        await a.hub.start_children([ms.ChildSpec("h1", Counter)])
        b = make(db_url, "n2")
        async with b.cluster.running():
            await settled([a, b], 2)
        await b.aclose()
        await settled([a], 1)
        await a.hub.stop_children(["h1"])
        names = [n for n, _ in seen]
        expected = {"post_children_start", "child_registered", "pre_node_join", "post_node_join",
                    "pre_node_leave", "post_node_leave", "pre_redistribution",
                    "post_redistribution", "child_unregistered"}  # fmt: skip
        assert expected <= set(names), (expected - set(names), names)
        assert ("post_node_join", {"node": "n2"}) in seen


def test_quorum_strategies_count_live_nodes() -> None:
    static = ms.StaticQuorum(3)
    assert static.partitioned(2) and not static.partitioned(3)
    majority = ms.MajorityQuorum()
    assert not majority.partitioned(5)  # seen 5: quorum 3
    assert not majority.partitioned(3) and majority.partitioned(2)
    majority.reset_cluster_size(2)  # shrunk on purpose
    assert not majority.partitioned(2)
    with pytest.raises(ms.ConfigError):
        ms.StaticQuorum(0)


def test_consistent_hashing_moves_only_what_the_new_node_takes() -> None:
    ring = ms.ConsistentHashing(vnodes=128)
    children = {f"c{i}": None for i in range(3000)}
    before = ring.belongs_to(children, ["a", "b", "c"], 1)
    after = ring.belongs_to(children, ["a", "b", "c", "d"], 1)
    moved = [c for c in children if before[c] != after[c]]
    assert all(after[c] == ["d"] for c in moved)  # nothing moves between old nodes
    assert 0.18 < len(moved) / len(children) < 0.32  # about 1/4
    assert ring.belongs_to(children, ["a", "b", "c"], 2)["c1"][0] == before["c1"][0]


async def _age(app: ms.App, node: str) -> None:
    """Make a node's heartbeat older than the TTL (it looks dead from now on)."""
    store = await app.store()
    if store.backend == "postgres":
        ago = "now() - interval '60 seconds'"
        sql = f"UPDATE ms_nodes SET heartbeat_at = {ago} WHERE name = '{node}'"
    else:
        sql = f"UPDATE ms_nodes SET heartbeat_at = {time.time() - 60} WHERE name = '{node}'"
    await store.execute_script(sql)


@aio
async def test_node_downs_within_the_batch_window_are_one_redistribution(db_url: str) -> None:
    a = make(db_url, "n1", nodedown_batch_window_ms=800)
    downs: list[dict[str, Any]] = []
    a.telemetry.attach("hub.nodes_down", lambda _event, data: downs.append(data))
    async with a.cluster.running():
        store, cs = await a.store(), await a.cluster.store()
        for fake in ("f1", "f2"):  # nodes that joined the hub and then went silent
            await store.heartbeat_node(fake, [], [], 0, "up")
            await cs.hub_join(fake)
        await settled([a], 3)
        redistributions: list[Any] = []
        a.hub.hooks.register("post_redistribution", redistributions.append)
        await _age(a, "f1")
        await asyncio.sleep(0.3)
        await _age(a, "f2")
        await settled([a], 1)
        await asyncio.sleep(0.3)
        assert [sorted(d["nodes"]) for d in downs] == [["f1", "f2"]]
        assert len(redistributions) == 1
    await a.aclose()


@aio
async def test_active_active_replicas_answer_local_calls_and_the_active_one_the_mailbox(
    db_url: str,
) -> None:
    options: dict[str, Any] = {
        "redundancy": ms.Replication(factor=2, mode="active_active"),
        "migration": ms.ColdSwap(handover=False),
    }
    async with cluster(db_url, "n1", "n2", **options) as (a, b):
        await settled([a, b], 2)
        assert (await a.hub.start_children([ms.ChildSpec("aa", Counter)])).ok

        async def both() -> bool:
            return "aa" in a.hub.local_children() and "aa" in b.hub.local_children()

        await eventually(both, 15)
        assert {a.hub._local["aa"].role, b.hub._local["aa"].role} == {"active", "replica"}
        for _ in range(20):
            await a.hub.send("aa", "inc")

        active = a if a.hub._local["aa"].role == "active" else b
        replica = b if active is a else a

        async def handled() -> bool:
            return await active.hub.call("aa", "get") == 20

        await eventually(handled, 15)
        assert await replica.hub.call("aa", "get") == 0  # answered by the local replica
