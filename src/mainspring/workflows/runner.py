"""Running workflow tasks on a worker: load the journal, replay, commit what the code decided."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mainspring import payload
from mainspring.machines.runner import StepLoader
from mainspring.run import (
    AVAILABLE,
    CANCELLED,
    COMPLETED,
    FAILED,
    SCHEDULED,
    WAITING,
    Claimed,
    Outcome,
    StepCommit,
)
from mainspring.workflows import history as h
from mainspring.workflows.replay import NondeterminismError, Replayer, TaskResult
from mainspring.workflows.workflow import Workflow, WorkflowDef, run_task

if TYPE_CHECKING:
    from mainspring.engine.worker import Worker
    from mainspring.store.base import StepData

log = logging.getLogger("mainspring.workflows")

# A timer is due when the database says so; allow this much clock skew between nodes.
_SKEW = timedelta(milliseconds=10)
_NONDETERMINISM_RETRY = 60.0
_UNKNOWN_VERSION_RETRY = 30.0


class WorkflowRunner:
    """Executes claimed workflow runs for one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = worker.app
        self.loader = StepLoader(worker.store, events=True)
        self.paranoid = os.environ.get("MAINSPRING_PARANOID", "") not in ("", "0")

    async def execute(self, run: Claimed) -> Outcome:
        recorded = run.input if isinstance(run.input, dict) else {}
        version = str(recorded.get("version", "1"))
        definition = self.app.workflow_versions.get((run.name, version))
        if definition is None:
            return self._unknown_version(run, version)
        try:
            data = await self.loader.load(run.id)
        except Exception as exc:
            if not self.worker.store.is_transient(exc):
                raise
            log.warning("run %s: could not read its journal (%s); releasing it", run.id, exc)
            return Outcome(run.id, run.fence, AVAILABLE, refund_attempt=True)
        try:
            result = self._task(definition, run, data, datetime.now(UTC) + _SKEW)
            if self.paranoid:
                self._check_replay(definition, run, data, result)
        except NondeterminismError as exc:
            log.error("%s", exc)
            error = {"type": "NondeterminismError", "message": str(exc), "traceback": None}
            at = datetime.now(UTC) + timedelta(seconds=_NONDETERMINISM_RETRY)
            return Outcome(run.id, run.fence, SCHEDULED, error=payload.dumps(error), run_at=at,
                           refund_attempt=True)  # fmt: skip
        for message in result.logs:
            log.info("[%s %s] %s", definition.name, run.id, message)
        return self._outcome(definition, run, result)

    def _unknown_version(self, run: Claimed, version: str) -> Outcome:
        """No code for the run's version here: leave it for a node that has it; never fail it."""
        loaded = sorted(v for (n, v) in self.app.workflow_versions if n == run.name)
        message = (
            f"workflow {run.name} run {run.id} started on version {version}; this node "
            f"({self.worker.name}) has versions {loaded}: the run waits for a node with it"
        )
        self.worker.telemetry.emit("workflow.unknown_version", id=run.id, name=run.name,
                                   version=version, node=self.worker.name)  # fmt: skip
        log.warning("%s", message)
        error = {"type": "UnknownVersion", "message": message, "traceback": None}
        at = datetime.now(UTC) + timedelta(seconds=_UNKNOWN_VERSION_RETRY)
        return Outcome(run.id, run.fence, SCHEDULED, error=payload.dumps(error), run_at=at,
                       refund_attempt=True)  # fmt: skip

    def _task(
        self, definition: WorkflowDef, run: Claimed, data: StepData, now: datetime
    ) -> TaskResult:
        recorded = run.input if isinstance(run.input, dict) else {"input": run.input}
        replayer = Replayer(self.app, definition, run.id, recorded.get("input"), data.events,
                            data.children, data.inbox, now)  # fmt: skip
        if not data.events:
            replayer._event(h.STARTED, {"version": recorded.get("version")})
        ctx = Workflow(replayer, run.id, definition.name, run.attempt)
        return replayer.run(run_task(replayer, definition, ctx, recorded.get("input")))

    def _check_replay(
        self, definition: WorkflowDef, run: Claimed, data: StepData, result: TaskResult
    ) -> None:
        """MAINSPRING_PARANOID: replay the journal as it will be; demand no new command."""
        from mainspring.store.base import EventRow, StepData

        journal = [*data.events, *(EventRow(s, k, payload.loads(d)) for s, k, d in result.events)]
        consumed = set(result.consume)
        inbox = [s for s in data.inbox if s.id not in consumed]
        again = self._task(
            definition, run, StepData(inbox, data.children, journal), datetime.now(UTC)
        )
        if again.events or again.children:
            raise NondeterminismError(
                f"paranoid replay of {definition.name} run {run.id} issued new commands: "
                f"{[e[1] for e in again.events]}"
            )

    def _outcome(self, definition: WorkflowDef, run: Claimed, result: TaskResult) -> Outcome:
        commit = StepCommit(
            "workflow", run.state_data or "null", reset_attempt=True, awaits=result.awaits,
            deadline=result.deadline, consume=result.consume, children=result.children,
            events=result.events,
        )  # fmt: skip
        if not result.done:
            return Outcome(run.id, run.fence, WAITING, step=commit, seen_seq=run.signal_seq)
        if result.continued:
            nxt = definition.new_run(result.continue_input, datetime.now(UTC), parent_id=run.id)
            commit.children = [*commit.children, nxt]
            output: Any = {"continued_as_new": nxt.id}
            return Outcome(run.id, run.fence, COMPLETED, output=payload.dumps(output), step=commit)
        if result.cancelled:
            return Outcome(run.id, run.fence, CANCELLED, error=payload.dumps(result.error),
                           step=commit)  # fmt: skip
        if result.ok:
            return Outcome(run.id, run.fence, COMPLETED, output=payload.dumps(result.value),
                           step=commit)  # fmt: skip
        return Outcome(run.id, run.fence, FAILED, error=payload.dumps(result.error), step=commit)
