"""Running workflow tasks on a worker: load the journal, replay, commit what the code decided.

A node keeps the runs it parked live in a bounded cache, so their next task
continues the waiting coroutine instead of replaying the journal.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
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


@dataclass(slots=True)
class LiveRun:
    """A parked run's live coroutine, as its last workflow task left it.

    It stands for the run only on the claim right after that task's commit:
    `fence` is that task's claim fence (commit and next claim add one each) and
    `last_seq` the last journal entry it committed.
    """

    replayer: Replayer
    definition: WorkflowDef
    fence: int
    last_seq: int


class WorkflowRunner:
    """Executes claimed workflow runs for one worker.

    Runs it parks stay live in an LRU of `App(workflow_cache_size=)` entries
    (0 turns it off). A claimed run continues its cached coroutine only when
    nothing else touched it since: the claim's fence is the next one after this
    node's confirmed commit and the journal holds nothing past what the
    coroutine consumed; otherwise (moved to another node and back, evicted,
    a commit refused, a new deploy) the entry is dropped and the journal
    replayed. Telemetry: `workflow.cache_hit`, `workflow.cache_miss` (with a
    reason). MAINSPRING_PARANOID=1 replays every task from scratch as well and
    demands the same commands.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = worker.app
        self.loader = StepLoader(worker.store, events=True)
        self.paranoid = os.environ.get("MAINSPRING_PARANOID", "") not in ("", "0")
        self.cache_size = self.app.workflow_cache_size
        self.cache: OrderedDict[str, LiveRun] = OrderedDict()

    async def execute(self, run: Claimed) -> Outcome:
        recorded = run.input if isinstance(run.input, dict) else {}
        version = str(recorded.get("version", "1"))
        definition = self.app.workflow_versions.get((run.name, version))
        if definition is None:
            return self._unknown_version(run, version)
        live = self._cached(run, definition)
        try:
            # A cached run reads the journal's tail (to prove it is empty) and the children
            # it waits for; paranoid mode reads everything, to replay beside it.
            narrow = live is not None and not self.paranoid
            after = live.last_seq if live is not None and narrow else 0
            waits = live.replayer.waiting_children() if live is not None and narrow else None
            data = await self.loader.load(run.id, after, waits)
            if live is not None and any(e.seq > live.last_seq for e in data.events):
                self._miss(run, "journal moved")
                live = None
                if after:
                    data = await self.loader.load(run.id)
        except Exception as exc:
            if not self.worker.store.is_transient(exc):
                raise
            log.warning("run %s: could not read its journal (%s); releasing it", run.id, exc)
            return Outcome(run.id, run.fence, AVAILABLE, refund_attempt=True)
        try:
            replayer = self._resume(definition, run, data, live) if live else None
            if replayer is None:
                replayer = self._task(definition, run, data, datetime.now(UTC) + _SKEW)
            result = replayer.result
            if self.paranoid:
                if live is not None:
                    self._check_cached(definition, run, data, result)
                self._check_replay(definition, run, data, result)
        except NondeterminismError as exc:
            log.error("%s", exc)
            error = {"type": "NondeterminismError", "message": str(exc), "traceback": None}
            at = datetime.now(UTC) + timedelta(seconds=_NONDETERMINISM_RETRY)
            return Outcome(run.id, run.fence, SCHEDULED, error=payload.dumps(error), run_at=at,
                           refund_attempt=True)  # fmt: skip
        for message in result.logs:
            log.info("[%s %s] %s", definition.name, run.id, message)
        outcome = self._outcome(definition, run, result)
        if not result.done and self.cache_size:
            # kept once the commit is confirmed (see committed)
            outcome.extra["live"] = LiveRun(replayer, definition, run.fence, replayer.last_seq)
        return outcome

    def committed(self, outcome: Outcome) -> None:
        """The worker committed a park that carries a live run: cache it (LRU, bounded)."""
        live: LiveRun = outcome.extra.pop("live")
        held = self.cache.get(outcome.id)
        if held is not None and held.fence > live.fence:
            return  # a later task of the run got here first
        self.cache[outcome.id] = live
        self.cache.move_to_end(outcome.id)
        while len(self.cache) > self.cache_size:
            evicted, _ = self.cache.popitem(last=False)
            self._emit("workflow.cache_evicted", evicted)

    def _cached(self, run: Claimed, definition: WorkflowDef) -> LiveRun | None:
        """The live run to continue for this claim, or None (the entry is dropped either way)."""
        live = self.cache.pop(run.id, None)
        if live is None:
            if run.fence > 1:  # claimed before: a task here could have kept it
                self._miss(run, "not cached")
            return None
        if live.fence + 2 != run.fence or live.definition is not definition:
            self._miss(run, "moved")  # another claim (elsewhere, or a lost lease) since
            return None
        return live

    def _resume(
        self, definition: WorkflowDef, run: Claimed, data: StepData, live: LiveRun
    ) -> Replayer | None:
        """Continue the cached coroutine with what happened since; None to replay instead."""
        try:
            live.replayer.resume(data.children, data.inbox, datetime.now(UTC) + _SKEW)
        except NondeterminismError:
            raise
        except Exception:
            log.exception("run %s: continuing its cached coroutine failed; replaying", run.id)
            self._miss(run, "error")
            return None
        self._emit("workflow.cache_hit", run.id)
        return live.replayer

    def _miss(self, run: Claimed, reason: str) -> None:
        self._emit("workflow.cache_miss", run.id, reason=reason)

    def _emit(self, event: str, run_id: str, **meta: Any) -> None:
        telemetry = self.worker.telemetry
        if telemetry.listening(event):
            telemetry.emit(event, id=run_id, node=self.worker.name, **meta)

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
    ) -> Replayer:
        """Replay the whole journal, then run live; the replayer holds the task's result."""
        recorded = run.input if isinstance(run.input, dict) else {"input": run.input}
        replayer = Replayer(self.app, definition, run.id, recorded.get("input"), data.events,
                            data.children, data.inbox, now)  # fmt: skip
        if not data.events:
            replayer._event(h.STARTED, {"version": recorded.get("version")})
        ctx = Workflow(replayer, run.id, definition.name, run.attempt)
        replayer.run(run_task(replayer, definition, ctx, recorded.get("input")))
        return replayer

    def _check_cached(
        self, definition: WorkflowDef, run: Claimed, data: StepData, result: TaskResult
    ) -> None:
        """MAINSPRING_PARANOID: a cached run's task must issue what a replay from scratch does."""
        fresh = self._task(definition, run, data, datetime.now(UTC)).result
        cached = ([e[:2] for e in result.events], len(result.children), result.done)
        replayed = ([e[:2] for e in fresh.events], len(fresh.children), fresh.done)
        if cached != replayed:
            raise NondeterminismError(
                f"cached run {run.id} of {definition.name} issued {cached}, but replaying its "
                f"journal from scratch issues {replayed}"
            )

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
        ).result
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
