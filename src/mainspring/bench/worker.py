"""The worker subprocess the model benchmarks (machines, workflows) start and read."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from mainspring.app import App
from mainspring.bench.jobs import _SRC, _Child, _Databases, _machine_info, _Probe
from mainspring.engine.loops import event_loop_factory

BuildApp = Callable[[str, _Probe], App]


async def spawn(module: str, *argv: str) -> _Child:
    """``python -m module *argv`` with this checkout importable; its JSON line via the child."""
    path = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH", "")) if p)
    spawned = time.time()
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *argv, stdin=asyncio.subprocess.DEVNULL,
        stdout=pipe, stderr=pipe, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    return _Child(proc, spawned)


async def drain(
    build_app: BuildApp, url: str, concurrency: int, timeout: float, workflow_cache: int | None
) -> dict[str, Any]:
    """Run one burst worker until no run is left; its probe's figures (and an error, if any).

    `workflow_cache` overrides the App's workflow_cache_size (None: its default).
    """
    probe = _Probe()
    app = build_app(url, probe)
    if workflow_cache is not None:
        app.workflow_cache_size = workflow_cache
    error: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await app.run_worker_async(
                concurrency=concurrency, burst=True, install_signal_handlers=False
            )
    except TimeoutError:
        error = f"worker timed out after {timeout:g} s"
    return {**probe.to_dict(), "error": error}


def worker_main(prog: str, build_app: BuildApp, argv: Sequence[str] | None = None) -> int:
    """A benchmark's worker subprocess: drain, print one JSON line, exit non-zero on error."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("command", choices=("_worker",))
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--workflow-cache", type=int, default=None)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # as app.run_worker
            out = runner.run(
                drain(build_app, ns.url, ns.concurrency, ns.timeout, ns.workflow_cache)
            )
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
    return 0 if out.get("error") is None else 1


class _Measured(Protocol):
    host: dict[str, Any]
    duration_s: float


M = TypeVar("M", bound=_Measured)


def run_phases(
    result: M,
    backend: str,
    url: str | None,
    *phases: Callable[[_Databases], Coroutine[Any, Any, None]],
) -> M:
    """Run a model benchmark's phases (each on an event loop of its own) against the
    benchmark's databases, dropped afterwards; record the host and the total duration."""
    started = time.perf_counter()
    result.host = _machine_info("auto")  # the loop worker_main runs on
    dbs = _Databases(backend, url)
    try:
        for phase in phases:
            asyncio.run(phase(dbs))
    finally:
        dbs.cleanup()
    result.duration_s = time.perf_counter() - started
    return result
