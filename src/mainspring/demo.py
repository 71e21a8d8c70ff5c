"""`mainspring demo`: the main job of Mainspring on the embedded SQLite default.

Enqueues a batch of "send a welcome email" jobs (some fail on their first
attempt and are retried with backoff, one is deduplicated by its business
key), runs a worker node until the batch is done, and shows what happened.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

import mainspring as ms


def build_app(url: str) -> tuple[ms.App, ms.Task[..., Any]]:
    app = ms.App(url, shutdown_grace=5.0)

    @app.task(queue="mail", max_attempts=3, backoff=ms.Backoff.exponential(base=0.05))
    async def send_welcome_email(user_id: int, address: str) -> dict[str, object]:
        await asyncio.sleep(random.uniform(0.001, 0.01))  # the SMTP round trip
        run = ms.current_run()
        if user_id % 10 == 3 and run.attempt == 1:
            raise ConnectionError(f"SMTP server refused {address} (transient)")
        return {"user_id": user_id, "sent_to": address, "attempt": run.attempt}

    return app, send_welcome_email


def run_demo(url: str, jobs: int, console: Console) -> None:
    app, send = build_app(url)
    calls = [
        send.options(correlation_key=f"welcome-{i}").call(i, f"user{i}@example.com")
        for i in range(jobs)
    ]
    started = time.perf_counter()
    handles = app.enqueue_many(calls)
    again = send.options(correlation_key="welcome-0").enqueue(0, "user0@example.com")
    enqueued = time.perf_counter() - started
    console.print(f"[bold]Mainspring demo[/bold] on {app.url}")
    console.print(f"enqueued {len(handles)} jobs in one round trip ({enqueued * 1000:.1f} ms)")
    console.print(
        f"enqueued welcome-0 again: same run {again.id == handles[0].id} (the business key dedups)"
    )
    started = time.perf_counter()
    app.run_worker(queues=["mail"], concurrency=50, burst=True)
    elapsed = time.perf_counter() - started
    runs = [app.get_run(h.id) for h in handles]
    states = Counter(r.state for r in runs)
    retried = [r for r in runs if r.attempt > 1]
    table = Table("run", "state", "attempts", "output")
    for r in runs[:3] + retried[:3]:
        table.add_row(r.id, r.state, str(r.attempt), str(r.output))
    console.print(table)
    console.print(
        f"worker finished in {elapsed:.2f} s: {dict(states)}; "
        f"{len(retried)} jobs failed once and succeeded on retry"
    )
    console.print("inspect them with: mainspring --url " + url + " runs list --state completed")
    app.close()
