"""The webhook endpoint that resolves signal gates: `POST /gates/{token}` (`mainspring serve`).

The request body is the gate's payload (JSON; empty means null). A good token
answers 200 and resumes its asset exactly once; a forged token 403, an
expired one 410, an unknown gate 404, a replayed or cancelled one 409, a body
that is not JSON 400: in each of those cases nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from mainspring.assets.gates import GateError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from mainspring.app import App


def gate_app(app: App) -> Starlette:
    """An ASGI application serving the gate endpoint (and GET /healthz) for `app`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def signal(request: Request) -> Response:
        body = await request.body()
        try:
            value: Any = orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError:
            return JSONResponse({"error": "the body must be JSON (or empty)"}, status_code=400)
        try:
            result = await app.gates.signal_async(request.path_params["token"], value)
        except GateError as exc:
            return JSONResponse(
                {"error": str(exc), "type": type(exc).__name__}, status_code=exc.status
            )
        return JSONResponse({"status": "signaled", "gate": result.gate_id, "run_id": result.run_id,
                             "asset": result.asset, "partition": result.partition})  # fmt: skip

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await app.aclose()

    routes = [
        Route("/gates/{token}", signal, methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def serve(app: App, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the gate endpoint until interrupted."""
    import uvicorn

    uvicorn.run(gate_app(app), host=host, port=port, log_level="info")
