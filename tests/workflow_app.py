"""The app of the workflow crash tests, its worker process (`python workflow_app.py`), and
`Workers`, which starts those processes for a test.

The test process and every worker process build the same app with `build(url)`, so
workflow and task names match. A worker process is configured by environment variables:

    WORKFLOW_URL   database URL (required)
    WORKFLOW_NODE  node name
    CRASH_LOG      file every activity execution appends its start and end to
                   (`crash_app.record`: {"event": "start"|"done", "k", "label", "attempt", "node"})

`Workers` runs them with MAINSPRING_PARANOID=1 unless the environment says otherwise, so
every workflow task is followed by a replay from scratch that must issue the same commands.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import mainspring as ms
from crash_app import record
from processes import WorkerProcesses

WORKFLOW_APP = Path(__file__)
TTL = 1.5  # lease TTL of every node: a dead node's runs are reclaimed this long after it died
FLOW = "crash.flow"
FAN = 3  # parallel activities of `crash.flow` after its signal


def build(url: str, *, lease_ttl: float = TTL, node_name: str | None = None) -> ms.App:
    """The app for `url`, with its workflow and its activity registered under fixed names."""
    app = ms.App(url, lease_ttl=lease_ttl, shutdown_grace=1.0, node_name=node_name)

    @app.task(name="crash.activity")
    async def activity(k: int, label: str, hold: float) -> dict[str, Any]:
        """Activity `label` of workflow `k`: records its start and its end, and holds `hold`
        seconds in between on its first attempt only. Returns who executed it."""
        run = ms.current_run()
        seen = {"k": k, "label": label, "attempt": run.attempt, "node": run.node}
        record("start", **seen)
        if run.attempt == 1:
            await asyncio.sleep(hold)
        record("done", **seen)
        return seen

    @app.workflow(name=FLOW)
    async def flow(wf: ms.Workflow, input: dict[str, Any]) -> dict[str, Any]:
        """Two activities around a timer; then, all at once, a held activity, a timer and
        the signal "go"; then FAN parallel activities and the signal "late"."""
        k = input["k"]
        first = await wf.activity(activity, k, "first", 0.0)
        await wf.sleep(input["nap"])
        second = await wf.activity(activity, k, "second", 0.0)
        held, _, go = await asyncio.gather(
            wf.activity(activity, k, "held", input["hold"]),
            wf.sleep(input["timer"]),
            wf.wait_signal("go", timeout=120),
        )
        fan = await asyncio.gather(*(wf.activity(activity, k, f"fan{i}", 0.0) for i in range(FAN)))
        late = await wf.wait_signal("late", timeout=120)
        return {"k": k, "first": first, "second": second, "held": held, "go": go,
                "fan": list(fan), "late": late}  # fmt: skip

    return app


class Workers(WorkerProcesses):
    """Workflow-app worker processes of one test."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, WORKFLOW_APP)

    def start(self, url: str, node: str) -> subprocess.Popen[bytes]:
        env = {"MAINSPRING_PARANOID": "1", **os.environ}
        env.update(WORKFLOW_URL=url, WORKFLOW_NODE=node, CRASH_LOG=str(self.record_file))
        return self.spawn(node, env)


def main() -> None:
    node = os.environ.get("WORKFLOW_NODE") or f"workflow:{os.getpid()}"
    log_format = f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    build(os.environ["WORKFLOW_URL"], node_name=node).run_worker()


if __name__ == "__main__":
    main()
