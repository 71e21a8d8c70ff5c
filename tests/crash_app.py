"""The app of the crash tests, and the worker process they start (`python crash_app.py`).

The test process and every worker process build the same app with `build(url)`,
so task names match. A worker process is configured by environment variables:

    CRASH_URL          database URL (required)
    CRASH_NODE         node name (the handlers return it, so a test can tell who ran a run)
    CRASH_TTL          lease TTL in seconds (default 2)
    CRASH_GRACE        shutdown grace in seconds (default 1)
    CRASH_CONCURRENCY  handlers at once (default 10)
    CRASH_LOG          file the handlers append one JSON line per event to
    CRASH_HOLD         overrides the seconds `hold` and `hold_async` sleep (for a fast worker B)

Lines in CRASH_LOG are written with one O_APPEND write each, so concurrent
processes never interleave them: {"event": "start"|"done"|<telemetry event>, "id",
"attempt", "node", "pid", ...}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

import mainspring as ms


def record(event: str, **fields: Any) -> None:
    """Append one line to $CRASH_LOG (no-op when unset)."""
    path = os.environ.get("CRASH_LOG")
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _started() -> dict[str, Any]:
    run = ms.current_run()
    info = {"id": run.id, "attempt": run.attempt, "node": run.node}
    record("start", **info)
    return info


def _done(info: dict[str, Any]) -> dict[str, Any]:
    record("done", **info)
    return {"node": info["node"], "pid": os.getpid(), "attempt": info["attempt"]}


def _hold_seconds(default: float) -> float:
    override = os.environ.get("CRASH_HOLD")
    return float(override) if override else default


def build(
    url: str,
    *,
    lease_ttl: float = 2.0,
    shutdown_grace: float = 1.0,
    node_name: str | None = None,
) -> ms.App:
    """The crash-test app for `url`, with its tasks registered under fixed names."""
    app = ms.App(url, lease_ttl=lease_ttl, shutdown_grace=shutdown_grace, node_name=node_name)

    @app.task(name="crash.work")
    def work(i: int, seconds: float) -> dict[str, Any]:
        """A short unit of work: records its start and its end."""
        info = _started()
        time.sleep(seconds)
        return _done(info)

    @app.task(name="crash.stall_first")
    def stall_first(seconds: float) -> dict[str, Any]:
        """Sleeps `seconds` on its first attempt (longer than the lease), returns at once later."""
        info = _started()
        if info["attempt"] == 1:
            time.sleep(seconds)
        return _done(info)

    @app.task(name="crash.hold")
    def hold(seconds: float) -> dict[str, Any]:
        """A long blocking handler in a thread."""
        info = _started()
        time.sleep(_hold_seconds(seconds))
        return _done(info)

    @app.task(name="crash.hold_async")
    async def hold_async(seconds: float) -> dict[str, Any]:
        """A long handler on the event loop."""
        info = _started()
        await asyncio.sleep(_hold_seconds(seconds))
        return _done(info)

    def on_event(event: str, meta: dict[str, Any]) -> None:
        record(event, **{k: v for k, v in meta.items() if k != "error"})

    for event in ("run.lease_lost", "run.released", "node.loop_crashed"):
        app.telemetry.attach(event, on_event)
    return app


def main() -> None:
    node = os.environ.get("CRASH_NODE") or f"crash:{os.getpid()}"
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s",
    )
    app = build(
        os.environ["CRASH_URL"],
        lease_ttl=float(os.environ.get("CRASH_TTL", "2")),
        shutdown_grace=float(os.environ.get("CRASH_GRACE", "1")),
        node_name=node,
    )
    app.run_worker(concurrency=int(os.environ.get("CRASH_CONCURRENCY", "10")))


if __name__ == "__main__":
    main()
