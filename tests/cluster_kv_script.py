"""A process of the KV and registry race tests: increments a counter with cas, or
races for one name; records what it did (see test_cluster_kv.py)."""

from __future__ import annotations

import asyncio
import json
import os

import mainspring as ms


def record(**fields: object) -> None:
    line = (json.dumps(fields) + "\n").encode()
    fd = os.open(os.environ["RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def started() -> bool:
    return os.path.exists(os.environ["GO"])


async def main() -> None:
    app = ms.App(os.environ["MAINSPRING_DATABASE_URL"], lease_ttl=10.0)
    node = os.environ["NODE"]
    # Start together: wait for the go file the test writes once every process is up.
    record(event="ready", node=node)
    while not started():
        await asyncio.sleep(0.01)
    if os.environ["MODE"] == "cas":
        conflicts = 0
        for _ in range(int(os.environ["N"])):
            while True:
                current = await app.kv.get("counter", 0)
                if await app.kv.cas("counter", current if current else None, current + 1):
                    break
                conflicts += 1
        record(event="done", node=node, conflicts=conflicts)
    else:
        store = await app.store()
        await store.heartbeat_node(node, [], [], 0, "up")
        try:
            token = await app.registry.register("leader", f"{node}/leader/1")
            record(event="won", node=node, token=token)
        except ms.NameTaken as exc:
            record(event="lost", node=node, holder=exc.holder)
    await app.aclose()


asyncio.run(main())
