"""Machines across real worker processes: fan-in under concurrency, and rate limits measured.

Worker processes run `tests/machine_app.py` against a real database; the steps append
one JSON line per event of interest to a shared file, so a test can count executions
and read when each one started.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import mainspring as ms
from machine_app import RATE, Workers, build
from test_crash import wait_until

pytestmark = pytest.mark.slow

BURST = RATE  # the bucket "api" holds at most RATE tokens


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    with Workers(tmp_path) as processes:
        yield processes


@pytest.fixture
def client(db_url: str) -> Iterator[ms.App]:
    """The test's own client App (it creates the schema and the rate limit on first use)."""
    app = build(db_url)
    yield app
    app.close()


def start_nodes(client: ms.App, workers: Workers, url: str, count: int, concurrency: int) -> None:
    names = {f"w{i}" for i in range(count)}
    for name in sorted(names):
        workers.start(url, name, concurrency=concurrency)
    wait_until(
        lambda: names <= {n.name for n in client.nodes() if n.alive},
        30,
        f"{count} worker processes to come up",
        workers,
    )


def start_many(client: ms.App, machine: str, states: list[object]) -> list[ms.RunHandle]:
    """Start runs concurrently (their inserts share statements), on a loop of their own."""
    cls = client.machines[machine].cls

    async def start_all() -> list[ms.RunHandle]:
        try:
            await client.store()  # open it once, before the concurrent starts use it
            return list(await asyncio.gather(*(cls.start_async(s) for s in states)))
        finally:
            await client.aclose()

    return asyncio.run(start_all())


# -- fan-in --------------------------------------------------------------------------------


def test_fan_in_of_200_children_finishing_together_runs_then_once(
    db_url: str, client: ms.App, workers: Workers
) -> None:
    n = 200
    start_nodes(client, workers, db_url, 4, concurrency=60)
    # Every child sleeps until `at`: by then all are claimed (4 x 60 slots), so their
    # commits, and the decrements of the parent's pending count, race across 4 processes.
    at = time.time() + 3.0
    handle = client.machines["fanin.parent"].cls.start({"n": n, "at": at})
    output = handle.result(timeout=60)

    assert output == {"children": n, "states": ["completed"], "outputs": list(range(n))}
    time.sleep(1.0)  # room for a second, wrong execution of the then step to show up
    fan_ins = workers.records("fan_in", run=handle.id)
    assert len(fan_ins) == 1, f"the then step ran {len(fan_ins)} times: {fan_ins}"
    assert fan_ins[0]["attempt"] == 1 and fan_ins[0]["children"] == n
    assert fan_ins[0]["states"] == ["completed"]

    children = workers.records("child")
    assert Counter(c["run"] for c in children).most_common(1)[0][1] == 1, "a child ran twice"
    assert sorted(c["i"] for c in children) == list(range(n))
    assert {c["node"] for c in children} == {"w0", "w1", "w2", "w3"}
    finishes = sorted(c["t"] for c in children)
    assert finishes[0] >= at - 0.005  # uvloop's timers have millisecond resolution
    # Finishing together is what makes the fan-in a race: most children end within 0.5 s.
    assert finishes[int(0.9 * n)] - at < 0.5, f"children finished over {finishes[-1] - at:.2f} s"
    parent = client.get_run(handle.id)
    assert parent.state == "completed" and parent.children_pending == 0
    assert parent.step == "fan_in"


# -- rate limits ---------------------------------------------------------------------------

WINDOW = 10.0  # seconds of saturation measured
# A step logs its start a little after its claim was granted (the claim's round trip and
# the worker's scheduling, tens of milliseconds; under load up to ~0.2 s). Measured on the
# log's clock, a window of 1 s can therefore hold grants made over 1.2 s: 0.2 s of refill,
# RATE * 0.2 tokens, is allowed on top of the bucket's bound.
LOG_SLACK = int(RATE * 0.2)


def most_in_any_window(times: list[float], length: float) -> int:
    """The largest number of `times` (sorted) inside one window [t, t + length)."""
    return max(bisect.bisect_left(times, t + length) - i for i, t in enumerate(times))


def test_rate_limit_holds_across_three_workers_and_is_used(
    db_url: str, client: ms.App, workers: Workers
) -> None:
    # Enough work to keep the bucket empty for longer than the window.
    n = BURST + int(RATE * WINDOW) + 75
    handles = start_many(client, "rated.call", [{} for _ in range(n)])
    start_nodes(client, workers, db_url, 3, concurrency=50)
    wait_until(
        lambda: len(workers.records("granted")) >= n,
        30 + n / RATE,
        "every rate-limited step to run",
        workers,
    )
    runs = {r.id: r for r in client.list_runs(name="rated.call", limit=n + 10)}
    assert runs.keys() == {h.id for h in handles}
    assert all(r.state == "completed" for r in runs.values())
    granted = workers.records("granted")
    assert len(granted) == n and len({g["run"] for g in granted}) == n, "a step ran twice"
    assert len({g["node"] for g in granted}) == 3

    # The grants as the database stamped them: the claim of each run's last step
    # (`started_at`), on the clock the bucket refills by. No slack: the bucket is exact.
    claims = sorted(r.started_at.timestamp() for r in runs.values() if r.started_at)
    # The same on the steps' own clock, when each one really started.
    starts = sorted(g["t"] for g in granted)
    for label, times, slack in (("claims", claims, 0), ("step starts", starts, LOG_SLACK)):
        t0 = times[0]
        window = [t for t in times if t < t0 + WINDOW]
        assert len(window) < n, f"{label}: the bucket was not saturated for {WINDOW} s"
        busiest = most_in_any_window(window, 1.0)
        assert busiest <= BURST + RATE + slack, f"{label}: {busiest} in one second"
        assert len(window) <= BURST + RATE * WINDOW + slack, f"{label}: {len(window)} in window"
        # Not starved: at least 80 % of what the bucket allows over the window.
        assert len(window) >= 0.8 * (BURST + RATE * WINDOW), f"{label}: only {len(window)}"
