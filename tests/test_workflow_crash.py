"""Replay workflows survive the death of their worker process.

Worker processes run `tests/workflow_app.py` (with MAINSPRING_PARANOID=1) against a real
database. Every execution of an activity appends its start and its end to a shared
file, so the test counts how often each activity of each workflow really ran, and by
which process; the journals read from the database show what was replayed.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mainspring as ms
from mainspring.store.base import EventRow, StepData
from mainspring.workflows import history
from test_crash import wait_until
from workflow_app import FAN, FLOW, Workers, build

pytestmark = pytest.mark.slow

FLOWS = 10  # workflows at once
NAP = 0.2  # their first timer, fired before the kill
TIMER = 3.0  # their second timer: pending at the kill, due while no worker is alive
HOLD = 60.0  # the first attempt of activity "held" outlives worker A


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    with Workers(tmp_path) as processes:
        yield processes


@pytest.fixture
def client(db_url: str) -> Iterator[ms.App]:
    """The test's own client App (it creates the schema on first use)."""
    app = build(db_url)
    yield app
    app.close()


def journals(client: ms.App, run_ids: list[str]) -> dict[str, StepData]:
    """Each run's journal, children and unconsumed inbox, as a worker would load them."""

    async def load() -> dict[str, StepData]:
        try:
            return await (await client.store()).load_step_data(run_ids, events=True)
        finally:
            await client.aclose()

    return asyncio.run(load())


def commands(journal: list[EventRow]) -> list[tuple[str, Any]]:
    """The journal's commands in order, as (kind, key), checking they are numbered 0, 1, 2…"""
    issued = [e for e in journal if e.kind in history.COMMANDS]
    assert [e.data["cmd"] for e in issued] == list(range(len(issued)))
    return [(e.kind, e.data.get("key")) for e in issued]


def resolutions(journal: list[EventRow]) -> dict[int, EventRow]:
    """The journal's resolutions by command number, checking none is resolved twice."""
    resolved = [e for e in journal if e.kind in history.RESOLUTIONS]
    by_cmd = {e.data["cmd"]: e for e in resolved}
    assert len(by_cmd) == len(resolved), f"a command resolved twice: {resolved}"
    return by_cmd


def ran(k: int, label: str, node: str, attempt: int) -> dict[str, Any]:
    """What activity `label` of workflow `k` returns when `node` executes its `attempt`."""
    return {"k": k, "label": label, "attempt": attempt, "node": node}


# The commands of `crash.flow`, in the order it issues them, and the numbers of some.
ACTIVITY = (history.ACTIVITY, "crash.activity")
SLEEP = (history.TIMER, None)
FLOW_COMMANDS = [ACTIVITY, SLEEP, ACTIVITY, ACTIVITY, SLEEP, (history.WAIT_SIGNAL, "go"),
                 *[ACTIVITY] * FAN, (history.WAIT_SIGNAL, "late")]  # fmt: skip
FIRST, NAP_TIMER, SECOND, HELD, TIMER_CMD, GO = range(6)
LATE = len(FLOW_COMMANDS) - 1


def test_sigkill_mid_workflow_reruns_only_the_activity_in_flight(
    db_url: str, client: ms.App, workers: Workers
) -> None:
    flows = {
        client.start(FLOW, {"k": k, "nap": NAP, "timer": TIMER, "hold": HOLD}).id: k
        for k in range(FLOWS)
    }
    ids = list(flows)

    # A runs every workflow into its held activity, and dies there.
    a = workers.start(db_url, "A")
    wait_until(
        lambda: {r["k"] for r in workers.records("start", label="held")} == set(range(FLOWS)),
        30, "A to start the held activity of every workflow", workers,
    )  # fmt: skip
    a.send_signal(signal.SIGKILL)
    assert a.wait(timeout=10) == -signal.SIGKILL

    at_kill = journals(client, ids)
    for run_id in ids:
        journal = at_kill[run_id].events
        assert commands(journal) == FLOW_COMMANDS[: GO + 1]
        # Done: the first two activities and the first timer. Pending: the held
        # activity, the second timer and the signal "go".
        assert sorted(resolutions(journal)) == [FIRST, NAP_TIMER, SECOND]
        assert client.get_run(run_id).state == "waiting"

    # Both signals arrive while no worker is alive: "go" is awaited, "late" is not yet.
    for run_id, k in flows.items():
        assert client.signal(run_id, "go", {"go": k}) == ms.SignalResult.DELIVERED
        assert client.signal(run_id, "late", {"late": k}) == ms.SignalResult.DELIVERED

    workers.start(db_url, "B")

    def finished() -> list[ms.Run] | None:
        runs = [client.get_run(run_id) for run_id in ids]
        # A replay that diverged from its journal (in paranoid mode: from its own first
        # run) leaves the run waiting to be retried with the error: fail now, not at timeout.
        diverged = [r.error for r in runs if r.error and r.error["type"] == "NondeterminismError"]
        assert not diverged, diverged
        return runs if all(r.terminal for r in runs) else None

    runs = wait_until(finished, 40, "B to finish every workflow", workers)
    assert [(r.state, r.error) for r in runs] == [("completed", None)] * FLOWS, workers.logs()

    # Each activity ran once, except the one in flight at the kill: it ran again on B.
    starts = Counter((r["k"], r["label"], r["node"]) for r in workers.records("start"))
    dones = Counter((r["k"], r["label"], r["node"]) for r in workers.records("done"))
    fans = [f"fan{i}" for i in range(FAN)]
    expected_starts: Counter[tuple[int, str, str]] = Counter()
    for k in range(FLOWS):
        expected_starts.update([(k, "first", "A"), (k, "second", "A"), (k, "held", "A")])
        expected_starts.update([(k, "held", "B"), *((k, fan, "B") for fan in fans)])
    assert starts == expected_starts
    assert dones == expected_starts - Counter((k, "held", "A") for k in range(FLOWS))

    final = journals(client, ids)
    for run in runs:
        k = flows[run.id]
        # The results of A's activities reached B through the journal: B never ran them.
        assert run.output == {
            "k": k, "first": ran(k, "first", "A", 1), "second": ran(k, "second", "A", 1),
            "held": ran(k, "held", "B", 2), "go": {"go": k},
            "fan": [ran(k, fan, "B", 1) for fan in fans], "late": {"late": k},
        }  # fmt: skip

        journal = final[run.id].events
        # B continued the journal A wrote (replaying it), it did not start it over.
        assert journal[: len(at_kill[run.id].events)] == at_kill[run.id].events
        assert [e.kind for e in journal].count(history.STARTED) == 1
        assert commands(journal) == FLOW_COMMANDS
        resolved = resolutions(journal)
        assert sorted(resolved) == list(range(len(FLOW_COMMANDS)))
        # The activity in flight at the kill resolved once, with B's execution.
        assert resolved[HELD].data == {"cmd": HELD, "ok": True, "value": ran(k, "held", "B", 2)}
        # Every activity was scheduled once: one child run each, none left over.
        scheduled = [e.data["child"] for e in journal if e.kind == history.ACTIVITY]
        assert sorted(scheduled) == sorted(c.id for c in final[run.id].children)
        assert len(set(scheduled)) == 3 + FAN
        # The timer pending at the kill fired when it was due, not before.
        fire_at = next(e.data["fire_at"] for e in journal if e.data.get("cmd") == TIMER_CMD)
        assert resolved[TIMER_CMD].kind == history.TIMER_FIRED
        assert run.finished_at is not None and run.finished_at.timestamp() >= fire_at
        # Both signals were delivered from the durable inbox, once each.
        assert resolved[GO].kind == resolved[LATE].kind == history.SIGNAL_RECEIVED
        assert final[run.id].inbox == []
