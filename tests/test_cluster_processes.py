"""Real multi-process clusters: worker nodes in their own processes on one database.

1,000 children over three nodes; a fourth joins and takes about a quarter, each with
its handover state; a SIGKILLed node's children come back on the others within the
heartbeat TTL plus the batch window, none lost and none active twice; a node whose
heartbeats stop reports itself partitioned.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mainspring as ms
from helpers import aio
from processes import WorkerProcesses

SCRIPT = Path(__file__).parent / "cluster_node.py"
TTL = 3.0


def spawn(procs: WorkerProcesses, url: str, node: str, **env: str) -> None:
    procs.spawn(node, {
        **os.environ, "MAINSPRING_DATABASE_URL": url, "NODE": node, "TTL": str(TTL),
        "RECORDS": str(procs.record_file), **env,
    })  # fmt: skip


async def wait(check: Any, timeout: float, procs: WorkerProcesses, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{procs.logs()}")
        await asyncio.sleep(0.1)


async def placement(client: ms.App) -> tuple[dict[str, list[str]], Counter[str]]:
    """{child: nodes of its started instances} and the children's states."""
    cs = await client.cluster.store()
    children = {r[0]: r[2] for r in await cs.proc_list()}
    ready = await cs.proc_get(list(children))
    return {r["child_id"]: r["nodes"] for r in ready}, Counter(children.values())


async def live_nodes(client: ms.App) -> int:
    return sum(n.alive for n in await client.nodes_async())


def client_app(url: str) -> ms.App:
    app = ms.App(url, lease_ttl=TTL)
    app.process(ms.Process, name="Session")  # the client only names the class
    return app


async def start(client: ms.App, n: int) -> Any:
    specs = [ms.ChildSpec(f"s{i}", "Session") for i in range(n)]
    return await client.hub.start_children(specs, call_timeout=120)


@aio
async def test_join_moves_a_quarter_with_state_and_a_killed_node_loses_nothing(
    tmp_path: Path, db_url: str
) -> None:
    client = client_app(db_url)
    await client.migrate_async()
    with WorkerProcesses(tmp_path, SCRIPT) as procs:
        for i in range(3):
            spawn(procs, db_url, f"node{i}")

        async def three() -> bool:
            return await live_nodes(client) == 3

        await wait(three, 60, procs, "three nodes up")
        await asyncio.sleep(1.0)  # every hub sees the other two
        result = await start(client, 1000)
        assert result.ok, list(result.errors.items())[:5]
        placed, _ = await placement(client)
        assert all(len(n) == 1 for n in placed.values()) and len(placed) == 1000
        per_node = Counter(n[0] for n in placed.values())
        assert set(per_node) == {"node0", "node1", "node2"}, per_node

        # A fourth node joins: it takes about a quarter, each child with its handover.
        spawn(procs, db_url, "node3")

        async def moved_to_node3() -> bool:
            placed, _ = await placement(client)
            here = [c for c, n in placed.items() if n == ["node3"]]
            inits = procs.records("init", node="node3")
            return len(placed) == 1000 and len(here) > 0 and len(inits) == len(here)

        await wait(moved_to_node3, 60, procs, "node3 took its share")
        await asyncio.sleep(2.0)  # let the redistribution finish
        placed, _ = await placement(client)
        on3 = sorted(c for c, n in placed.items() if n == ["node3"])
        assert 150 <= len(on3) <= 350, (len(on3), procs.logs())  # about 1/4 of 1,000
        inits3 = procs.records("init", node="node3")
        assert len(inits3) == len(on3)
        assert all(r["handover"] is not None and r["handover"]["from"] != "node3" for r in inits3)
        # Only children that now belong to node3 moved (never more than its share).
        moves = [r for r in procs.records("terminate") if r["reason"] == "migrated"]
        assert len(moves) == len(on3)

        # SIGKILL node1: its children come back elsewhere within TTL + batch window.
        victim = "node1"
        lost = sorted(c for c, n in placed.items() if n == [victim])
        procs.procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.time()

        async def recovered() -> bool:
            placed, _ = await placement(client)
            return all(placed.get(c) and placed[c] != [victim] for c in lost)

        await wait(recovered, 30, procs, "the killed node's children restarted")
        restarts = [
            r for r in procs.records("init") if r["child"] in set(lost) and r["at"] > killed_at
        ]
        assert sorted(r["child"] for r in restarts) == lost  # each restarted exactly once
        took = max(r["at"] for r in restarts) - killed_at
        placed, states = await placement(client)
        assert states == Counter({"running": 1000})  # none lost
        assert all(len(n) == 1 and n[0] != victim for n in placed.values())  # none active twice
        # Within the heartbeat TTL plus the batch window (and one topology read of slack).
        assert took < TTL + 0.5 + 1.0, took
        print(f"\n{len(lost)} children of the killed node back in {took:.2f} s")


@aio
async def test_a_node_whose_heartbeats_stop_reports_partitioned(
    tmp_path: Path, db_url: str
) -> None:
    client = client_app(db_url)
    await client.migrate_async()
    pause = tmp_path / "pause-node2"
    with WorkerProcesses(tmp_path, SCRIPT) as procs:
        for i in range(3):
            spawn(
                procs,
                db_url,
                f"node{i}",
                QUORUM="2",
                PAUSE_HEARTBEAT=str(tmp_path / f"pause-node{i}"),
            )

        async def three() -> bool:
            return await live_nodes(client) == 3

        await wait(three, 60, procs, "three nodes up")
        await asyncio.sleep(1.0)
        assert (await start(client, 60)).ok
        pause.write_text("stop")  # node2 is cut off: its heartbeats stop

        async def recorded(event: str, node: str) -> bool:
            return bool(procs.records(event, node=node))

        await wait(lambda: recorded("partitioned", "node2"), 20, procs, "node2 partitioned")

        async def majority_took_over() -> bool:
            placed, _ = await placement(client)
            return len(placed) == 60 and all(n and n[0] != "node2" for n in placed.values())

        await wait(majority_took_over, 20, procs, "the majority runs every child")
        fenced = [
            r for r in procs.records("terminate", node="node2") if r["reason"] == "partitioned"
        ]
        assert fenced  # the minority stopped its children itself
        pause.unlink()  # the partition heals
        await wait(lambda: recorded("healed", "node2"), 20, procs, "node2 healed")
