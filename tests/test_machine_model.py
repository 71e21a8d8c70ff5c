"""Machine semantics against a model: generated programs, signals and worker crashes.

Hypothesis generates programs for the `model.program` machine (`tests/machine_app.py`):
a list of ops (next, await a signal, spawn children, done, stop), each of which may
fail its first attempts (an exception, or `ms.Retry`) and may kill the worker process
on its first attempt after its side effect and before its step returns. Signals are
sent before the run reaches their await, once it is parked on it, or never (the await
times out). `predict` is the model: from the program alone it computes the run's
terminal state, its output or error, and every step execution, in order, with its
attempt. The run executes on a real worker process; a killed worker is replaced by
a new process, which reclaims the run when its lease expires and executes the step
again from the last committed state. The test then demands that the database and
the record of executed steps match the model exactly.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import mainspring as ms
from machine_app import MAX_ATTEMPTS, Workers, build

pytestmark = pytest.mark.slow

TTL = 1.0  # lease TTL of the workers: a killed worker's run is reclaimed within ~1.5 s

Kind = Literal["next", "await", "spawn", "done", "stop"]
Timing = Literal["before", "after", "never"]


@dataclass(frozen=True)
class Op:
    """One op of a program (its dict form is what the machine reads)."""

    kind: Kind
    fail: Literal["raise", "retry"] | None = None
    k: int = 0  # its first k attempts fail
    crash: bool = False  # its first attempt kills the worker
    timing: Timing | None = None  # awaits: when the signal is sent
    children: tuple[bool, ...] = ()  # spawns: True for a child that fails
    by_key: bool = False  # awaits: signal by correlation key rather than run id
    twice: bool = False  # awaits: send the signal again with the same dedup key


@dataclass
class Prediction:
    """What the model says a program does."""

    state: Literal["completed", "failed"]
    output: Any = None  # what the program saw: the output of done, the details of stop
    error: tuple[str, str | None] | None = None  # (type, message; None: not predicted)
    steps: list[tuple[str, int, int]] = field(default_factory=list)  # (step, pc, attempt)
    crashes: int = 0
    children: int = 0


def signal_name(pc: int) -> str:
    return f"s{pc}"


def signal_payload(pc: int, op: Op) -> dict[str, Any]:
    return {"pc": pc, "timing": op.timing}


def predict(program: list[Op]) -> Prediction:
    """The model: the outcome of a program and each step execution, from the program alone."""
    early = {pc for pc, op in enumerate(program) if op.kind == "await" and op.timing == "before"}
    steps = [("begin", 0, 1)]
    trace: list[Any] = []
    children: list[list[Any]] = []
    retries = crashes = 0
    for pc, op in enumerate(program):
        # A crash takes the first attempt, each failure one more; the next attempt proceeds.
        proceeds = max(op.k, 1 if op.crash else 0) + 1
        steps += [("op", pc, attempt) for attempt in range(1, min(proceeds, MAX_ATTEMPTS) + 1)]
        crashes += op.crash
        if proceeds > MAX_ATTEMPTS:
            if op.fail == "raise":
                error = ("Boom", f"op {pc} failed attempt {MAX_ATTEMPTS}")
            else:
                error = ("RetriesExhausted", None)
            return Prediction("failed", None, error, steps, crashes, len(children))
        if op.fail == "retry":
            retries += op.k - op.crash  # each retry commits the state it returns
        seen = {"trace": trace, "retries": retries}
        if op.kind == "done":
            return Prediction("completed", seen, None, steps, crashes, len(children))
        if op.kind == "stop":
            error = ("Stopped", f"stopped at op {pc}")
            return Prediction("failed", seen, error, steps, crashes, len(children))
        if op.kind == "next":
            trace.append(["next", pc])
        elif op.kind == "await" and op.timing == "never":
            steps.append(("expired", pc, 1))
            inbox = sorted(signal_name(i) for i in early if i > pc)
            trace.append(["timeout", pc, [], inbox])
        elif op.kind == "await":
            # Early signals of later awaits stay in the inbox; earlier ones were consumed.
            steps.append(("resume", pc, 1))
            inbox = sorted(signal_name(i) for i in early | {pc} if i >= pc)
            trace.append(["signal", pc, [signal_name(pc)], signal_payload(pc, op), inbox])
        elif op.kind == "spawn":
            for j, fails in enumerate(op.children):
                v = 10 * pc + j
                children.append(["failed", None, f"child {v} failed"] if fails else
                                ["completed", v, None])  # fmt: skip
            steps.append(("gather", pc, 1))
            trace.append(["children", pc, [list(c) for c in children]])
    raise AssertionError("a program ends with done or stop")


# -- generated programs ------------------------------------------------------------------------

# An op fails none of its attempts, or fewer than all of them; `programs` picks at most
# one op that fails every attempt.
failures = st.one_of(
    st.just((None, 0)),
    st.tuples(st.sampled_from(["raise", "retry"]), st.integers(1, MAX_ATTEMPTS - 1)),
)
body_ops = st.one_of(
    st.builds(Op, kind=st.just("next")),
    st.builds(
        Op,
        kind=st.just("await"),
        timing=st.sampled_from(["before", "after", "never"]),
        by_key=st.booleans(),
        twice=st.booleans(),
    ),
    st.builds(Op, kind=st.just("spawn"), children=st.lists(st.booleans(), max_size=3).map(tuple)),
)


@st.composite
def programs(draw: st.DrawFn) -> list[Op]:
    """A body of one to six ops and a final done or stop; at most one op crashes (the
    explicit examples crash twice), and at most one fails all its attempts."""
    body = draw(st.lists(body_ops, min_size=1, max_size=6))
    program = [*body, Op(draw(st.sampled_from(["done", "stop"])))]
    pcs = st.integers(0, len(program) - 1)
    crashing = draw(st.sets(pcs, max_size=1))
    fails = draw(st.lists(failures, min_size=len(program), max_size=len(program)))
    exhausted = draw(st.integers(0, 3 * len(program) - 1)) - 2 * len(program)  # < 0: none
    if exhausted >= 0:
        fails[exhausted] = (draw(st.sampled_from(["raise", "retry"])), MAX_ATTEMPTS)
    return [
        replace(op, fail=fail, k=k, crash=pc in crashing)
        for pc, (op, (fail, k)) in enumerate(zip(program, fails, strict=True))
    ]


# -- running a program on real worker processes ------------------------------------------------


class Cluster:
    """One worker process at a time; a worker that killed itself is replaced by a new one."""

    def __init__(self, url: str, workers: Workers) -> None:
        self.url = url
        self.workers = workers
        self.deaths = 0
        self.current = workers.start(url, "w0", ttl=TTL, concurrency=10)

    def revive(self) -> None:
        code = self.current.poll()
        if code is None:
            return
        assert code == -signal.SIGKILL, f"a worker exited with {code}\n{self.workers.logs()}"
        self.deaths += 1
        self.current = self.workers.start(self.url, f"w{self.deaths}", ttl=TTL, concurrency=10)


@dataclass
class Observed:
    run: ms.Run
    steps: list[tuple[str, int, int]]
    crashes: int
    deaths: int
    child_executions: Counter[str]


def send(client: ms.App, run_id: str, key: str, pc: int, op: Op) -> None:
    """Deliver the signal of the await at `pc` (and check that a repeat is a duplicate)."""
    target = {"correlation_key": key} if op.by_key else {"run_id": run_id}
    name, payload = signal_name(pc), signal_payload(pc, op)
    sent = client.signal(**target, name=name, payload=payload, dedup_key=name)
    assert sent == ms.SignalResult.DELIVERED, f"signal {name}: {sent}"
    if op.twice:
        again = client.signal(**target, name=name, payload=payload, dedup_key=name)
        # A late signal lets the run go on: it may have ended before the repeat arrived.
        allowed = {ms.SignalResult.DUPLICATE}
        if op.timing == "after":
            allowed.add(ms.SignalResult.TERMINAL)
        assert again in allowed, f"signal {name} repeated: {again}"


def execute(client: ms.App, cluster: Cluster, program: list[Op]) -> Observed:
    """Start the program, deliver its signals, and keep one worker alive until it ends."""
    program_machine = client.machines["model.program"].cls
    key = f"program-{uuid.uuid4()}"
    ops = [asdict(op) for op in program]
    handle = program_machine.start({"ops": ops, "pc": 0, "trace": [], "retries": 0},
                                   correlation_key=key)  # fmt: skip
    deaths = cluster.deaths
    awaits = [(pc, op) for pc, op in enumerate(program) if op.kind == "await"]
    # "go" lets the program start: the early signals are in its inbox before any op runs.
    for pc, op in awaits:
        if op.timing == "before":
            send(client, handle.id, key, pc, op)
    assert client.signal(handle.id, "go") == ms.SignalResult.DELIVERED
    late = {signal_name(pc): (pc, op) for pc, op in awaits if op.timing == "after"}
    deadline = time.monotonic() + 30
    while not (run := client.get_run(handle.id)).terminal:
        if run.state == "waiting" and run.awaits and run.awaits[0] in late:
            send(client, handle.id, key, *late.pop(run.awaits[0]))
        cluster.revive()
        if time.monotonic() > deadline:
            raise AssertionError(f"run still {run.state} at step {run.step} after 30 s; "
                                 f"{run}\n{cluster.workers.logs()}")  # fmt: skip
        time.sleep(0.01)
    assert client.signal(handle.id, "late") == ms.SignalResult.TERMINAL
    records = cluster.workers.records
    return Observed(
        run=run,
        steps=[(r["step"], r["pc"], r["attempt"]) for r in records("step", run=handle.id)],
        crashes=len(records("crash", run=handle.id)),
        deaths=cluster.deaths - deaths,
        child_executions=Counter(r["run"] for r in records("step", parent=handle.id)),
    )


def check(observed: Observed, expected: Prediction) -> None:
    run = observed.run
    assert run.state == expected.state, run.error
    if expected.state == "completed":
        assert run.output == expected.output
    else:
        assert expected.error is not None and run.error is not None
        kind, message = expected.error
        # The worker runs machine_app.py as __main__: compare the class name only.
        assert run.error["type"].rsplit(".", 1)[-1] == kind, run.error
        if message is not None:
            assert run.error["message"] == message
        if expected.output is not None:
            assert run.error["details"] == expected.output
    # Every step ran, in the model's order, at the model's attempts: a step executed again
    # only where a crash (or a failed attempt) hit it, and the crashed one resumed from
    # the state committed before it.
    assert observed.steps == expected.steps
    assert observed.crashes == observed.deaths == expected.crashes
    assert len(observed.child_executions) == expected.children
    assert set(observed.child_executions.values()) <= {1}, "a child ran twice"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    with Workers(tmp_path) as processes:
        yield processes


def test_machine_runs_as_the_model_predicts(db_url: str, workers: Workers) -> None:
    client = build(db_url, lease_ttl=TTL)
    cluster = Cluster(db_url, workers)

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),  # shrinking would re-run workers for minutes
        print_blob=False,
    )
    @given(programs())
    # A crash in an await whose signal comes late, and in the step after a failed child.
    @example([
        Op("await", timing="after", crash=True),
        Op("spawn", children=(False, True)),
        Op("done", crash=True),
    ])  # fmt: skip
    # Early signals for two awaits, the first one retried; a timeout; a crash after retries.
    @example([
        Op("await", timing="before", fail="retry", k=2, by_key=True),
        Op("await", timing="never", crash=True),
        Op("await", timing="before", twice=True),
        Op("next", fail="raise", k=1, crash=True),
        Op("stop"),
    ])  # fmt: skip
    # Attempts run out: a crash, then failures up to the last attempt.
    @example([Op("next"), Op("next", fail="raise", k=MAX_ATTEMPTS, crash=True), Op("done")])
    def run_program(program: list[Op]) -> None:
        check(execute(client, cluster, program), predict(program))

    try:
        run_program()
    finally:
        client.close()
