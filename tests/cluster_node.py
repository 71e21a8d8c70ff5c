"""A worker node of the multi-process cluster tests: serves the hub with one process
class and records every init and terminate (see test_cluster_processes.py).

PAUSE_HEARTBEAT names a file: while it exists this node writes no heartbeat, as if
cut off from the database (the partition test).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import mainspring as ms

NODE = os.environ["NODE"]
PAUSE = Path(os.environ.get("PAUSE_HEARTBEAT", "/nonexistent"))


def record(**fields: object) -> None:
    line = (json.dumps({"node": NODE, "at": time.time(), **fields}) + "\n").encode()
    fd = os.open(os.environ["RECORDS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


app = ms.App(
    os.environ["MAINSPRING_DATABASE_URL"], lease_ttl=float(os.environ["TTL"]), node_name=NODE
)
if os.environ.get("QUORUM"):
    app.hub.configure(quorum=ms.StaticQuorum(int(os.environ["QUORUM"])))


@app.process
class Session(ms.Process):
    async def init(self, args: dict[str, Any], handover: dict[str, Any] | None) -> None:
        self.seen = (handover or {}).get("seen", 0)
        record(event="init", child=self.child_id, pid=self.pid, handover=handover)

    async def handle(self, msg: Any) -> Any:
        self.seen += 1
        return self.seen

    async def handover(self) -> dict[str, Any]:
        return {"seen": self.seen, "from": NODE}

    async def terminate(self, reason: str) -> None:
        record(event="terminate", child=self.child_id, pid=self.pid, reason=reason)


def on_partition(event: str, data: dict[str, Any]) -> None:
    record(event="partitioned" if data["partitioned"] else "healed", live=data["live"])


app.telemetry.attach("hub.partitioned", on_partition)


def paused() -> bool:
    return PAUSE.exists()


def _install_pause(store_cls: Any) -> None:
    original = store_cls.heartbeat_node

    async def heartbeat(self: Any, *args: Any, **kwargs: Any) -> None:
        if paused():
            return
        await original(self, *args, **kwargs)

    store_cls.heartbeat_node = heartbeat


if app.url.startswith("postgres"):
    from mainspring.store.postgres import PostgresStore

    _install_pause(PostgresStore)
else:
    from mainspring.store.sqlite import SqliteStore

    _install_pause(SqliteStore)

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
record(event="up")
app.run_worker(concurrency=4)
