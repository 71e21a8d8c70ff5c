"""The app of the asset process tests and its worker process (`python asset_app.py`).

The test and every worker process build the same app with `build(url)`. A worker is
configured by environment variables: ASSET_URL (required), ASSET_NODE, ASSET_RECORDS (a
JSON-lines file each instance appends its start and end to), ASSET_CONCURRENCY.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import mainspring as ms

KEYS = 500
MAX_CONCURRENT = 8


def record(**line: Any) -> None:
    path = os.environ.get("ASSET_RECORDS")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def build(url: str, node: str | None = None) -> ms.App:
    app = ms.App(url, lease_ttl=2.0, shutdown_grace=1.0, node_name=node)

    @app.asset(name="pages")
    def pages(ctx: ms.AssetContext) -> list[int]:
        return list(range(KEYS))

    options = ms.ScatterOptions(
        max_concurrent=MAX_CONCURRENT, max_attempts=5, retry_strategy=ms.Backoff.constant(0.1)
    )

    @app.asset(name="fetched", deps=[pages], scatter=lambda pages: [{"page": p} for p in pages],
               scatter_options=options)  # fmt: skip
    async def fetched(ctx: ms.AssetContext, key: dict[str, int]) -> dict[str, Any]:
        started = time.time()
        record(event="start", page=key["page"], pid=os.getpid(), at=started, run=ctx.run_id)
        await asyncio.sleep(0.02)
        ended = time.time()
        record(event="end", page=key["page"], pid=os.getpid(), at=ended, run=ctx.run_id)
        return {"page": key["page"], "pid": os.getpid(), "span": [started, ended]}

    @app.asset(name="index", deps=[fetched], gather=True)
    def index(ctx: ms.AssetContext, fetched: dict[ms.ScatterKey, Any]) -> dict[str, int]:
        return {str(k["page"]): v["pid"] for k, v in fetched.items()}

    return app


if __name__ == "__main__":
    node = os.environ.get("ASSET_NODE")
    app = build(os.environ["ASSET_URL"], node)
    app.run_worker(concurrency=int(os.environ.get("ASSET_CONCURRENCY", "20")))
