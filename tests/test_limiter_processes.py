"""The global limiter across three real processes: the bucket holds, slots are never exceeded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from limiter_app import BURST, RATE, SLOTS, build
from processes import WorkerProcesses

pytestmark = pytest.mark.slow


def hammer(db_url: str, tmp_path: Path, mode: str, seconds: float) -> list[dict[str, object]]:
    client = build(db_url)
    client.migrate()
    client.limiter.check("shared")  # the configuration is stored once the client connects
    client.limiter.reset("shared")
    client.close()
    start = time.time() + 2.0
    env = {**os.environ, "MS_URL": db_url, "MS_MODE": mode, "MS_START": str(start),
           "MS_UNTIL": str(start + seconds)}  # fmt: skip
    with WorkerProcesses(tmp_path, Path(__file__).parent / "limiter_app.py") as procs:
        env["MS_RECORDS"] = str(procs.record_file)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).parent.parent / "src"), env.get("PYTHONPATH", "")]
        )
        for i in range(3):
            procs.spawn(f"p{i}", env)
        for proc in procs.procs.values():
            assert proc.wait(timeout=120) == 0, procs.logs()
        return procs.records()


def test_a_bucket_holds_across_three_processes(db_url: str, tmp_path: Path) -> None:
    seconds = 2.0
    granted = sorted(float(r["at"]) for r in hammer(db_url, tmp_path, "bucket", seconds))
    assert granted, "no check was granted"
    # In any window the grants never exceed the burst plus what refilled meanwhile.
    for i, first in enumerate(granted):
        for j in range(i, len(granted)):
            window = granted[j] - first
            assert j - i + 1 <= BURST + RATE * window + 1, (i, j, window)
    total = len(granted)
    assert total <= BURST + RATE * (seconds + 0.1)
    assert total >= 0.5 * RATE * seconds  # and it is not starved either


def test_a_semaphore_never_exceeds_its_slots_across_three_processes(
    db_url: str, tmp_path: Path
) -> None:
    held = hammer(db_url, tmp_path, "slots", 2.0)
    spans = sorted((float(r["start"]), float(r["end"])) for r in held)  # type: ignore[arg-type]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    assert len(spans) > 20
    assert most <= SLOTS
