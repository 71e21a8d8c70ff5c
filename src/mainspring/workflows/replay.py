"""One workflow task: replay the code against its journal, then run it live as far as it can go."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mainspring import payload
from mainspring.errors import MainspringError
from mainspring.run import TERMINAL, NewRun
from mainspring.store.base import ChildRow, EventRow, SignalRow
from mainspring.workflows import history as h
from mainspring.workflows.loop import ReplayLoop

if TYPE_CHECKING:
    from mainspring.app import App, Task
    from mainspring.workflows.workflow import WorkflowDef


class NondeterminismError(MainspringError):
    """Replayed code issued a different command than the journal recorded at that position.

    The workflow task fails and is retried later; the run is not failed, so a
    deploy of the fixed code continues it.
    """

    retryable = True


class ActivityError(MainspringError):
    """An activity or child workflow failed (all its attempts); raised at its await."""

    def __init__(self, name: str, error: dict[str, Any] | None) -> None:
        self.name = name
        self.error = error or {}
        super().__init__(
            f"{name} failed: {self.error.get('type', '?')}: {self.error.get('message', '')}"
        )


class ContinueAsNew(BaseException):
    """Raised by wf.continue_as_new(): end this run and start a fresh one with `input`."""

    def __init__(self, input: Any) -> None:
        self.input = input


@dataclass
class Command:
    cmd: int
    kind: str
    data: dict[str, Any]
    future: asyncio.Future[Any] | None = None


@dataclass
class TaskResult:
    """What one workflow task decided: to park, to finish, or to continue as new."""

    done: bool = False
    ok: bool = True
    value: Any = None
    error: dict[str, Any] | None = None
    continue_input: Any = None
    continued: bool = False
    cancelled: bool = False
    events: list[tuple[int, str, str]] = field(default_factory=list)
    children: list[NewRun] = field(default_factory=list)
    consume: list[str] = field(default_factory=list)
    awaits: list[str] = field(default_factory=list)
    deadline: datetime | None = None
    logs: list[str] = field(default_factory=list)


class Replayer:
    """Runs one workflow task for a run: replay, then the live tail."""

    def __init__(
        self,
        app: App,
        definition: WorkflowDef,
        run_id: str,
        input: Any,
        journal: list[EventRow],
        children: list[ChildRow],
        inbox: list[SignalRow],
        now: datetime,
    ) -> None:
        self.app = app
        self.definition = definition
        self.run_id = run_id
        self.input = input
        self.now = now
        self.loop = ReplayLoop()  # type: ignore[abstract]
        self.recorded = {e.data["cmd"]: e for e in journal if e.kind in h.COMMANDS}
        self.resolutions = [e for e in journal if e.kind in h.RESOLUTIONS]
        self.last_seq = max((e.seq for e in journal), default=0)
        self.children = {c.id: c for c in children}
        self.inbox = list(inbox)
        self.next_cmd = 0
        self.pending: dict[int, Command] = {}
        self.result = TaskResult()
        self.replaying = True
        self.divergence: NondeterminismError | None = None
        self.cancelled = False
        self.main: asyncio.Task[Any]

    # -- recording ------------------------------------------------------------------

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        self.last_seq += 1
        self.result.events.append((self.last_seq, kind, payload.dumps(data)))

    def _issue(
        self, kind: str, data: dict[str, Any], key: str | None = None
    ) -> tuple[int, EventRow | None]:
        """Number a command; compare it with the journal when replaying, record it when live."""
        cmd = self.next_cmd
        self.next_cmd += 1
        recorded = self.recorded.get(cmd)
        if recorded is not None:
            if recorded.kind != kind or (key is not None and recorded.data.get("key") != key):
                self.divergence = NondeterminismError(
                    f"workflow {self.definition.name} run {self.run_id}: command {cmd} was "
                    f"{recorded.kind} {recorded.data.get('key')!r} in the journal, but the code "
                    f"now issues {kind} {key!r}"
                )
                raise self.divergence
            return cmd, recorded
        self._event(kind, {"cmd": cmd, "key": key, **data})
        return cmd, None

    def _future(self, cmd: int, kind: str, data: dict[str, Any]) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.pending[cmd] = Command(cmd, kind, data, future)
        return future

    # -- the commands workflow code issues (through ms.Workflow) ------------------------

    def activity(self, task: Task[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 options: dict[str, Any]) -> asyncio.Future[Any]:  # fmt: skip
        cmd, recorded = self._issue(h.ACTIVITY, {}, key=task.name)
        if recorded is not None:
            child = recorded.data["child"]
        else:
            call = (
                task.options(**options).call(*args, **kwargs)
                if options
                else task.call(*args, **kwargs)
            )
            run = dataclasses.replace(call.to_new_run(self.now), parent_id=self.run_id)
            self.result.children.append(run)
            child = run.id
            self.result.events[-1] = _with(self.result.events[-1], child=child)
        return self._future(cmd, h.ACTIVITY, {"child": child, "name": task.name})

    def child(
        self, definition: WorkflowDef, input: Any, options: dict[str, Any]
    ) -> asyncio.Future[Any]:
        cmd, recorded = self._issue(h.CHILD, {}, key=definition.name)
        if recorded is not None:
            child = recorded.data["child"]
        else:
            run = definition.new_run(input, self.now, parent_id=self.run_id, **options)
            self.result.children.append(run)
            child = run.id
            self.result.events[-1] = _with(self.result.events[-1], child=child)
        return self._future(cmd, h.CHILD, {"child": child, "name": definition.name})

    def timer(self, seconds: float) -> asyncio.Future[Any]:
        fire_at = (self.now + timedelta(seconds=seconds)).timestamp()
        cmd, recorded = self._issue(h.TIMER, {"fire_at": fire_at})
        if recorded is not None:
            fire_at = recorded.data["fire_at"]
        return self._future(cmd, h.TIMER, {"fire_at": fire_at})

    def wait_signal(self, name: str, timeout: float | None) -> asyncio.Future[Any]:
        deadline = None if timeout is None else (self.now + timedelta(seconds=timeout)).timestamp()
        cmd, recorded = self._issue(h.WAIT_SIGNAL, {"deadline": deadline}, key=name)
        deadline = recorded.data["deadline"] if recorded else deadline
        return self._future(cmd, h.WAIT_SIGNAL, {"name": name, "deadline": deadline})

    def value(self, what: str, make: Callable[[], Any]) -> Any:
        _cmd, recorded = self._issue(h.VALUE, {}, key=what)
        if recorded is not None:
            return recorded.data["value"]
        value = make()
        self.result.events[-1] = _with(self.result.events[-1], value=value)
        return value

    def patched(self, patch: str) -> bool:
        recorded = self.recorded.get(self.next_cmd)
        if recorded is not None and not (
            recorded.kind == h.PATCH and recorded.data.get("key") == patch
        ):
            return False  # history recorded before the patch: keep the old code path
        self._issue(h.PATCH, {}, key=patch)
        return True

    def log(self, message: str) -> None:
        _cmd, recorded = self._issue(h.LOG, {"message": message})
        if recorded is None:
            self.result.logs.append(message)

    # -- running ----------------------------------------------------------------------

    def _run_ready(self) -> None:
        """Run the workflow code until it blocks; a divergence from the journal stops the task."""
        self.loop.run_ready()
        if self.divergence is not None:
            raise self.divergence

    def run(self, main: Callable[[], Coroutine[Any, Any, Any]]) -> TaskResult:
        task = self.main = self.loop.create_task(main())
        self._run_ready()
        for event in self.resolutions:
            if event.kind == h.CANCEL_REQUESTED:
                self.cancelled = True
                task.cancel()
            else:
                self._check_issued(event)
                self._resolve(event.data["cmd"], event.kind, event.data)
            self._run_ready()
            if task.done():
                break
        if self.next_cmd < len(self.recorded) and not task.done():
            missing = self.recorded[self.next_cmd]
            raise NondeterminismError(
                f"workflow {self.definition.name} run {self.run_id}: the journal has command "
                f"{missing.data['cmd']} ({missing.kind} {missing.data.get('key')!r}) but the "
                "code did not issue it"
            )
        self.replaying = False
        # Replayed: what is behind is never looked up again (a cached run keeps the rest).
        self.recorded = {c: e for c, e in self.recorded.items() if c >= self.next_cmd}
        self.resolutions = []
        return self._live()

    def resume(self, children: list[ChildRow], inbox: list[SignalRow], now: datetime) -> TaskResult:
        """The next workflow task of a run whose coroutine is still live (the workflow cache).

        Valid only when the journal is exactly what this replayer committed: the
        new results (children, inbox, the clock) are delivered to the waiting
        code as a replay of the whole journal would deliver them.
        """
        self.now = now
        self.children = {c.id: c for c in children}
        self.inbox = list(inbox)
        self.result = TaskResult()
        return self._live()

    def waiting_children(self) -> list[str]:
        """The activity and child runs whose results the code still waits for."""
        return [c.data["child"] for c in self.pending.values() if c.kind in (h.ACTIVITY, h.CHILD)]

    def _live(self) -> TaskResult:
        """Deliver what has happened to pending commands until the code blocks on the rest."""
        task = self.main
        while not task.done() and self._resolve_live():
            self._run_ready()
        self._finish(task)
        return self.result

    def _check_issued(self, event: EventRow) -> None:
        cmd = event.data["cmd"]
        if cmd not in self.pending:
            raise NondeterminismError(
                f"workflow {self.definition.name} run {self.run_id}: the journal resolves "
                f"command {cmd} ({event.kind}) which the code has not issued"
            )

    def _resolve(self, cmd: int, kind: str, data: dict[str, Any]) -> None:
        command = self.pending.pop(cmd)
        assert command.future is not None
        if command.future.done():
            return
        if kind in (h.ACTIVITY_DONE, h.CHILD_DONE):
            if data["ok"]:
                command.future.set_result(data.get("value"))
            else:
                command.future.set_exception(ActivityError(command.data["name"], data.get("error")))
        elif kind == h.TIMER_FIRED:
            command.future.set_result(None)
        elif kind == h.SIGNAL_RECEIVED:
            command.future.set_result(data.get("payload"))
        elif kind == h.SIGNAL_TIMED_OUT:
            command.future.set_result(None)

    def _resolve_live(self) -> bool:
        """Record and deliver whatever has happened to pending commands; False when nothing has."""
        resolved = False
        cancel = next((s for s in self.inbox if s.name == h.CANCEL_SIGNAL), None)
        if cancel is not None and not self.cancelled:
            self.inbox.remove(cancel)
            self.result.consume.append(cancel.id)
            self._event(h.CANCEL_REQUESTED, {"signal": cancel.id})
            self.cancelled = True
            self.main.cancel()
            return True
        for cmd, command in sorted(self.pending.items()):
            if command.future is not None and command.future.cancelled():
                self.pending.pop(cmd)
                continue
            found = self._outcome_of(command)
            if found is None:
                continue
            kind, data = found
            self._event(kind, {"cmd": cmd, **data})
            self._resolve(cmd, kind, data)
            resolved = True
        return resolved

    def _outcome_of(self, command: Command) -> tuple[str, dict[str, Any]] | None:
        now = self.now.timestamp()
        if command.kind in (h.ACTIVITY, h.CHILD):
            child = self.children.get(command.data["child"])
            if child is None or child.state not in TERMINAL:
                return None
            done = h.ACTIVITY_DONE if command.kind == h.ACTIVITY else h.CHILD_DONE
            if child.state == "completed":
                return done, {"ok": True, "value": child.output}
            error = child.error or {
                "type": "Cancelled",
                "message": f"{child.name} was {child.state}",
            }
            return done, {"ok": False, "error": error}
        if command.kind == h.TIMER:
            return (h.TIMER_FIRED, {}) if command.data["fire_at"] <= now else None
        if command.kind == h.WAIT_SIGNAL:
            name = command.data["name"]
            for signal in self.inbox:
                if signal.name == name:
                    self.inbox.remove(signal)
                    self.result.consume.append(signal.id)
                    return h.SIGNAL_RECEIVED, {"name": name, "payload": signal.payload,
                                               "signal": signal.id}  # fmt: skip
            deadline = command.data["deadline"]
            if deadline is not None and deadline <= now:
                return h.SIGNAL_TIMED_OUT, {}
        return None

    def _finish(self, task: asyncio.Task[Any]) -> None:
        result = self.result
        if task.done():
            result.done = True
            if task.cancelled():
                result.ok, result.cancelled = False, True
                result.error = {"type": "Cancelled", "message": "the workflow was cancelled"}
                return
            exc = task.exception()
            if isinstance(exc, ContinueAsNew):
                result.continued, result.continue_input = True, exc.input
            elif isinstance(exc, NondeterminismError):
                raise exc
            elif exc is not None:
                result.ok = False
                result.error = {"type": type(exc).__name__, "message": str(exc),
                                "traceback": _traceback(exc)}  # fmt: skip
            else:
                result.value = task.result()
            return
        deadlines = []
        result.awaits.append(h.CANCEL_SIGNAL)  # a cancellation always wakes it
        for command in self.pending.values():
            if command.kind == h.TIMER:
                deadlines.append(command.data["fire_at"])
            elif command.kind == h.WAIT_SIGNAL:
                result.awaits.append(command.data["name"])
                if command.data["deadline"] is not None:
                    deadlines.append(command.data["deadline"])
        if deadlines:
            result.deadline = datetime.fromtimestamp(min(deadlines), UTC)


def _with(event: tuple[int, str, str], **extra: Any) -> tuple[int, str, str]:
    seq, kind, data = event
    return seq, kind, payload.dumps({**payload.loads(data), **extra})


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
