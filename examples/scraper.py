"""A web-scraping scatter against a local test HTTP server (127.0.0.1 only).

The `index` asset reads a site's index page; `pages` scatters over the links it
found (at most 4 fetches at once across every worker, 20 per second through the
rate limit "site"); `word_counts` gathers what each page said.

    python examples/scraper.py [DATABASE_URL]
"""

from __future__ import annotations

import asyncio
import http.server
import re
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mainspring as ms

PAGES = 25


class Site(http.server.BaseHTTPRequestHandler):
    """An index of PAGES links; page N says "page N" N times."""

    def do_GET(self) -> None:
        if self.path == "/":
            body = "".join(f'<a href="/page/{n}">{n}</a>\n' for n in range(1, PAGES + 1))
        elif (found := re.fullmatch(r"/page/(\d+)", self.path)) is not None:
            body = " ".join([f"page{found.group(1)}"] * int(found.group(1)))
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def local_site() -> Iterator[str]:
    """The test site on 127.0.0.1 (a free port) for the duration of the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def build(url: str, site: str) -> ms.App:
    app = ms.App(url)
    app.rate_limits.configure("site", allowed=20, period=1, burst=5)

    @app.asset
    async def index(ctx: ms.AssetContext) -> list[str]:
        html = await asyncio.to_thread(fetch, site + "/")
        ctx.metadata["links"] = html.count("href")
        return [site + path for path in re.findall(r'href="([^"]+)"', html)]

    options = ms.ScatterOptions(
        max_concurrent=4, rate_limit="site", max_attempts=3,
        retry_strategy=ms.Backoff.exponential(base=0.1), timeout=30,
    )  # fmt: skip

    @app.asset(deps=[index], scatter=lambda index: [{"url": u} for u in index],
               scatter_options=options)  # fmt: skip
    async def pages(ctx: ms.AssetContext, key: dict[str, str]) -> dict[str, int]:
        text = await asyncio.to_thread(fetch, key["url"])
        return {"words": len(text.split())}

    @app.asset(deps=[pages], gather=True)
    def word_counts(ctx: ms.AssetContext, pages: dict[ms.ScatterKey, Any]) -> dict[str, int]:
        return {k["url"].rsplit("/", 1)[1]: v["words"] for k, v in pages.items()}

    return app


async def run(url: str) -> dict[str, int]:
    with local_site() as site:
        app = build(url, site)
        await app.store()  # create the database before the worker opens it too
        work = app.run_worker_async(concurrency=20, install_signal_handlers=False)
        worker = asyncio.create_task(work)
        try:
            handle = await app.assets.materialize_async("word_counts")
            await handle.result_async(timeout=60)
            counts: dict[str, int] = await app.assets.value_async("word_counts")
        finally:
            await app.drain_async(5)
            await worker
            await app.aclose()
    return counts


def main(url: str = "sqlite:///scraper.db") -> dict[str, int]:
    counts = asyncio.run(run(url))
    print(f"{len(counts)} pages scraped; words per page: {dict(sorted(counts.items()))}")
    return counts


if __name__ == "__main__":
    main(*sys.argv[1:2])
