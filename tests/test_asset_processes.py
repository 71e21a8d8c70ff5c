"""A scatter over three real worker processes, one SIGKILLed mid-way."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from asset_app import KEYS, MAX_CONCURRENT, build
from processes import WorkerProcesses
from test_crash import wait_until

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[WorkerProcesses]:
    with WorkerProcesses(tmp_path, TESTS / "asset_app.py") as processes:
        yield processes


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_500_key_scatter_survives_a_sigkill_with_each_key_committed_once(
    db_url: str, procs: WorkerProcesses
) -> None:
    client = build(db_url)
    try:
        client.migrate()
        env = {**os.environ, "ASSET_URL": db_url, "ASSET_RECORDS": str(procs.record_file),
               "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}  # fmt: skip
        for i in range(3):
            procs.spawn(f"w{i}", {**env, "ASSET_NODE": f"w{i}"})
        wait_until(lambda: len([n for n in client.nodes() if n.alive]) >= 3, 30,
                   "three worker nodes", procs)  # fmt: skip
        handle = client.materialize("index")
        # once instances are flowing, kill the busiest node (it is running some of them)
        wait_until(lambda: len(procs.records("start")) >= 100, 60, "instances to start", procs)
        busiest = Counter(r["pid"] for r in procs.records("start")).most_common(1)[0][0]
        victim = next(p for p in procs.procs.values() if p.pid == busiest)
        killed_at = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        result = handle.result(timeout=120)
        assert result["asset"] == "index"

        value = client.assets.value("index")
        assert sorted(value, key=int) == [str(p) for p in range(KEYS)]
        # exactly one committed result per key: one completed instance run per key
        runs = client.list_runs(name="mainspring.assets.scatter:fetched", limit=10_000)
        completed = [r for r in runs if r.state == "completed"]
        assert len(runs) == KEYS and len(completed) == KEYS
        assert Counter(r.output["r"]["page"] for r in completed) == Counter(range(KEYS))
        gathered = client.assets.value("fetched")
        assert len(gathered) == KEYS
        # max_concurrent measured over every execution, including those killed mid-way
        starts = {(r["run"], r["pid"]): r["at"] for r in procs.records("start")}
        ends = {(r["run"], r["pid"]): r["at"] for r in procs.records("end")}
        spans = [(s, ends.get(k, killed_at)) for k, s in starts.items()]
        assert most_at_once(spans) <= MAX_CONCURRENT
        killed_runs = [k for k in starts if k not in ends]
        assert all(k[1] == victim.pid for k in killed_runs)  # only the victim left work undone
        assert any(r.output["r"]["pid"] != victim.pid for r in completed)  # others took over
    finally:
        client.close()
