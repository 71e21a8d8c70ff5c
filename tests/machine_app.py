"""The app of the machine process tests, its worker process (`python machine_app.py`), and
`Workers`, which starts and watches those processes for a test.

The test process and every worker process build the same app with `build(url)`, so
machine names match. A worker process is configured by environment variables:

    MACHINE_URL          database URL (required)
    MACHINE_NODE         node name
    MACHINE_TTL          lease TTL in seconds (default 2)
    MACHINE_CONCURRENCY  steps at once (default 50)
    CRASH_LOG            file the steps append one JSON line per event to (`crash_app.record`)

Machines:

- `model.program` runs a program held in its state (see `Program`): the model tests
  predict its trace, output and every step execution from the program alone.
- `fanin.parent` spawns `n` `fanin.child` runs that all finish at the same instant.
- `rated.call` passes through the rate limit "api" (50 per second, burst 50) once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mainspring as ms
from crash_app import record
from processes import WorkerProcesses

MACHINE_APP = Path(__file__)

MAX_ATTEMPTS = 3  # attempts of each step of `model.program`
AWAIT_TIMEOUT = 0.2  # seconds an await whose signal never comes waits for it
RATE = 50  # tokens per second of the rate limit "api"; its burst is the same


class Boom(Exception):
    """The failure a program's op raises on its failing attempts."""


def _step(ctx: ms.StepContext, **fields: Any) -> None:
    record("step", run=ctx.run_id, step=ctx.step, attempt=ctx.attempt, node=ctx.node,
           t=time.time(), **fields)  # fmt: skip


def build(url: str, *, lease_ttl: float = 2.0, node_name: str | None = None) -> ms.App:
    """The app for `url`, with its machines registered under fixed names."""
    app = ms.App(url, lease_ttl=lease_ttl, shutdown_grace=1.0, node_name=node_name)
    app.rate_limits.configure("api", allowed=RATE, period=1)

    @app.machine(name="model.child", max_attempts=1)
    class Child(ms.Machine):
        """A child of a program's spawn: completes with its value, or stops when told to fail."""

        initial = "run"

        async def run(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            _step(ctx, parent=state["parent"])
            if state["fail"]:
                return ms.Stop(f"child {state['v']} failed")
            return ms.Done(state["v"])

    @app.machine(name="model.program", max_attempts=MAX_ATTEMPTS, backoff=ms.Backoff.constant(0.01))
    class Program(ms.Machine):
        """Executes `state["ops"]`, one op per `op` step, from `state["pc"]`.

        An op is a dict: `kind` ("next", "await", "spawn", "done" or "stop"); `k`, the
        number of attempts that fail the way `fail` says ("raise": an exception,
        "retry": ms.Retry with the state's retry count increased); `crash`, whether the
        op's first attempt kills this worker process (SIGKILL) after recording its
        execution, before the step returns; `timing` of an await's signal ("before",
        "after" or "never": then it times out); `children` of a spawn (True: that
        child fails). Every step records its execution; what the program saw goes to
        `state["trace"]`: the run's output when it is done, its error's details when it
        stops.
        """

        initial = "begin"

        async def begin(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            _step(ctx, pc=state["pc"])
            return ms.Await("go", then="op", state=state)

        async def op(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            pc = state["pc"]
            op = state["ops"][pc]
            _step(ctx, pc=pc)
            if op["crash"] and ctx.attempt == 1:
                record("crash", run=ctx.run_id, pc=pc)
                os.kill(os.getpid(), signal.SIGKILL)
            if ctx.attempt <= op["k"]:
                if op["fail"] == "raise":
                    raise Boom(f"op {pc} failed attempt {ctx.attempt}")
                state["retries"] += 1
                return ms.Retry(delay=0, state=state)
            kind = op["kind"]
            seen = {"trace": state["trace"], "retries": state["retries"]}
            if kind == "done":
                return ms.Done(seen)
            if kind == "stop":
                return ms.Stop(f"stopped at op {pc}", details=seen)
            if kind == "next":
                state["trace"].append(["next", pc])
                state["pc"] = pc + 1
                return ms.Next("op", state)
            if kind == "await":
                if op["timing"] == "never":
                    return ms.Await(
                        f"s{pc}", then="resume", state=state, timeout=AWAIT_TIMEOUT,
                        on_timeout="expired",
                    )  # fmt: skip
                return ms.Await(f"s{pc}", then="resume", state=state)
            if kind == "spawn":
                children = [
                    Child.spec({"v": 10 * pc + j, "fail": fail, "parent": ctx.run_id})
                    for j, fail in enumerate(op["children"])
                ]
                return ms.Spawn(children, then="gather", state=state)
            raise ValueError(f"unknown op {op!r}")

        async def resume(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            pc = state["pc"]
            _step(ctx, pc=pc)
            seen = ctx.awaited.payload(f"s{pc}")
            state["trace"].append(["signal", pc, ctx.awaited.names, seen, sorted(ctx.inbox.names)])
            state["pc"] = pc + 1
            return ms.Next("op", state)

        async def expired(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            pc = state["pc"]
            _step(ctx, pc=pc)
            state["trace"].append(["timeout", pc, ctx.awaited.names, sorted(ctx.inbox.names)])
            state["pc"] = pc + 1
            return ms.Next("op", state)

        async def gather(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            pc = state["pc"]
            _step(ctx, pc=pc)
            seen = [[c.state, c.output, c.error and c.error["message"]] for c in ctx.children]
            state["trace"].append(["children", pc, seen])
            state["pc"] = pc + 1
            return ms.Next("op", state)

    @app.machine(name="fanin.child", max_attempts=1)
    class FanChild(ms.Machine):
        """Sleeps until the shared instant `at`, then completes with its index."""

        initial = "wait"

        async def wait(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            await asyncio.sleep(max(0.0, state["at"] - time.time()))
            record("child", run=ctx.run_id, i=state["i"], node=ctx.node, t=time.time())
            return ms.Done(state["i"])

    @app.machine(name="fanin.parent", max_attempts=1)
    class FanParent(ms.Machine):
        """Spawns `n` children; `fan_in` must run once, when every child is terminal."""

        initial = "fan_out"

        async def fan_out(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            children = [FanChild.spec({"i": i, "at": state["at"]}) for i in range(state["n"])]
            return ms.Spawn(children, then="fan_in", state=state)

        async def fan_in(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            states = sorted({c.state for c in ctx.children})
            outputs = sorted(c.output for c in ctx.children if c.state == "completed")
            record("fan_in", run=ctx.run_id, attempt=ctx.attempt, node=ctx.node,
                   children=len(ctx.children), states=states)  # fmt: skip
            return ms.Done({"children": len(ctx.children), "states": states, "outputs": outputs})

    @app.machine(name="rated.call", max_attempts=1)
    class RatedCall(ms.Machine):
        """Its `call` step runs only when the bucket "api" grants it a token."""

        initial = "ask"

        async def ask(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            return ms.Next("call", state, rate_limit="api")

        async def call(self, ctx: ms.StepContext, state: dict[str, Any]) -> ms.Outcome:
            record("granted", run=ctx.run_id, node=ctx.node, t=time.time())
            return ms.Done()

    def on_event(event: str, meta: dict[str, Any]) -> None:
        record(event, **{k: v for k, v in meta.items() if k != "error"})

    for event in ("run.lease_lost", "node.loop_crashed"):
        app.telemetry.attach(event, on_event)
    return app


class Workers(WorkerProcesses):
    """Machine-app worker processes of one test."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, MACHINE_APP)

    def start(
        self, url: str, node: str, *, ttl: float = 2.0, concurrency: int = 50
    ) -> subprocess.Popen[bytes]:
        env = dict(
            os.environ,
            MACHINE_URL=url,
            MACHINE_NODE=node,
            MACHINE_TTL=str(ttl),
            MACHINE_CONCURRENCY=str(concurrency),
            CRASH_LOG=str(self.record_file),
        )
        return self.spawn(node, env)


def main() -> None:
    node = os.environ.get("MACHINE_NODE") or f"machine:{os.getpid()}"
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s",
    )
    app = build(
        os.environ["MACHINE_URL"],
        lease_ttl=float(os.environ.get("MACHINE_TTL", "2")),
        node_name=node,
    )
    app.run_worker(concurrency=int(os.environ.get("MACHINE_CONCURRENCY", "50")))


if __name__ == "__main__":
    main()
