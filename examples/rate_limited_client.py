"""A rate-limited API client: any code can share the cluster's limits through `app.limiter`.

A local API (127.0.0.1) allows 20 requests per second (bursts of 5 more)
and 2 at once; it answers 429 beyond that. The client takes a token from the bucket "api" and
a slot of the semaphore "api-conn" before each call, so however many
processes run it, the API never says 429.

    python examples/rate_limited_client.py [DATABASE_URL]
"""

from __future__ import annotations

import asyncio
import http.server
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mainspring as ms

RATE, BURST, CONNECTIONS = 20, 5, 2


class Api(http.server.BaseHTTPRequestHandler):
    """Counts requests in the last second and in flight; 429 when a limit is passed."""

    lock = threading.Lock()
    window: list[float] = []
    in_flight = 0
    refused = 0

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            now = time.monotonic()
            cls.window = [t for t in cls.window if now - t < 1.0] + [now]
            cls.in_flight += 1
            # The bucket spends tokens when calls leave; allow two of scheduling jitter on arrival.
            over = len(cls.window) > RATE + BURST + 2 or cls.in_flight > CONNECTIONS
            cls.refused += over
        time.sleep(0.01)  # the work of the call
        with cls.lock:
            cls.in_flight -= 1
        self.send_response(429 if over else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def local_api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Client:
    """An API client whose every call waits for the shared bucket and a shared connection."""

    def __init__(self, app: ms.App, base: str) -> None:
        self.app = app
        self.base = base

    async def get(self, path: str) -> int:
        # The connection first, then the token: a token is spent only when the call goes out.
        async with self.app.limiter.slot("api-conn"), self.app.limiter.limit("api"):
            return await asyncio.to_thread(self._get, path)

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code


def build(url: str) -> ms.App:
    app = ms.App(url)
    app.rate_limits.configure("api", allowed=RATE, period=1, burst=BURST)
    app.limiter.semaphore("api-conn", slots=CONNECTIONS, lease=10)
    return app


async def run(url: str, calls: int = 40) -> dict[str, Any]:
    Api.window, Api.refused = [], 0
    app = build(url)
    try:
        await app.limiter.reset_async("api")
        with local_api() as base:
            client = Client(app, base)
            began = time.monotonic()
            statuses = await asyncio.gather(*(client.get(f"/items/{i}") for i in range(calls)))
            elapsed = time.monotonic() - began
    finally:
        await app.aclose()
    return {"calls": calls, "ok": statuses.count(200), "refused": Api.refused,
            "seconds": round(elapsed, 2)}  # fmt: skip


def main(url: str = "sqlite:///client.db") -> dict[str, Any]:
    summary = asyncio.run(run(url))
    print(f"rate-limited client: {summary}")
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:2])
