"""An approval gate resumed through the HTTP endpoint (`mainspring serve` does the same).

`report` is built, then `published` waits at its gate: it hands the signed
callback URL to a reviewer (here a thread that POSTs its decision after a
moment) and parks, holding no worker slot, until the endpoint resumes it.

    MAINSPRING_SECRET=change-me python examples/approval_gate.py [DATABASE_URL]
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

import uvicorn

import mainspring as ms
from mainspring.assets.http import gate_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reviewer(url: str, decision: dict[str, Any]) -> None:
    """A human (or a webhook) answering a gate's URL a moment later."""

    def answer() -> None:
        time.sleep(0.5)
        request = urllib.request.Request(url, data=json.dumps(decision).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            print(f"reviewer: HTTP {response.status} {response.read().decode()}")

    threading.Thread(target=answer, daemon=True).start()


def build(url: str) -> ms.App:
    app = ms.App(url)

    @app.asset
    def report(ctx: ms.AssetContext) -> dict[str, Any]:
        return {"revenue": 1200, "regions": 3}

    @app.asset(deps=[report], gate=ms.Gate(timeout=3600, on_timeout="fail"))
    async def published(ctx: ms.AssetContext, report: dict[str, Any]) -> dict[str, Any]:
        if not ctx.gate.resumed:  # notify once per wait, not again on resume
            print(f"asking for approval at {ctx.gate.url}")
            reviewer(ctx.gate.url, {"approved": True, "by": "alice"})
        decision = await ctx.gate.wait()
        if not decision.get("approved"):
            raise ValueError(f"rejected by {decision.get('by')}")
        return {**report, "approved_by": decision["by"]}

    return app


async def run(url: str) -> dict[str, Any]:
    os.environ.setdefault("MAINSPRING_SECRET", "example-secret")
    port = free_port()
    os.environ["MAINSPRING_GATE_URL"] = f"http://127.0.0.1:{port}"
    app = build(url)
    server = uvicorn.Server(uvicorn.Config(gate_app(app), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    await app.store()  # create the database before the worker opens it too
    serving = asyncio.create_task(server.serve())
    worker = asyncio.create_task(
        app.run_worker_async(concurrency=10, install_signal_handlers=False)
    )
    try:
        handle = await app.assets.materialize_async("published")
        await handle.result_async(timeout=60)
        value: dict[str, Any] = await app.assets.value_async("published")
    finally:
        await app.drain_async(5)
        await worker
        server.should_exit = True
        await serving
        await app.aclose()
    return value


def main(url: str = "sqlite:///approval.db") -> dict[str, Any]:
    value = asyncio.run(run(url))
    print(f"published: {value}")
    return value


if __name__ == "__main__":
    main(*sys.argv[1:2])
