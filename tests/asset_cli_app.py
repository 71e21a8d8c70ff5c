"""An app for the asset CLI tests: its URL comes from $ASSET_CLI_URL at import."""

from __future__ import annotations

import os

import mainspring as ms

app = ms.App(os.environ["ASSET_CLI_URL"], lease_ttl=5.0)


@app.asset
def numbers(ctx: ms.AssetContext) -> list[int]:
    return list(range(6))


@app.asset(deps=[numbers], scatter=lambda numbers: numbers)
async def squared(ctx: ms.AssetContext, key: int) -> int:
    return key * key


@app.asset(deps=[squared], gather=True)
def total(ctx: ms.AssetContext, squared: dict[ms.ScatterKey, int]) -> int:
    return sum(squared.values())
