"""An app for CLI tests; its URL comes from the environment."""

from __future__ import annotations

import mainspring as ms

app = ms.App()


@app.task(queue="cli")
async def hello(name: str) -> str:
    return f"hello {name}"
