"""The process benchmark: messages to processes, redistribution, and pg latency.

``mainspring bench processes`` and ``benchmarks/bench_processes.py`` call
:func:`run_processes_bench` and print :func:`render`. Each measurement gets a
fresh database (:class:`mainspring.bench.jobs._Databases`).

Measurement
-----------
1. **remote**: one node in a subprocess (``python -m mainspring.bench.processes _node``)
   runs ``children`` Sink processes placed on it (Guided). This process, a plain client,
   sends ``messages`` durable messages from 64 concurrent senders (their writes share
   statements: group commit); the rate is messages over the time from the first send to
   the moment the sinks have handled them all (counted by calls to each sink).
2. **local**: this process serves a node with 16 sinks and sends ``local_messages`` to
   them with ``durable=False`` (handed over in memory, the local fast path), then the same
   count durably (through the mailbox); each rate is up to the last message handled.
3. **redistribute**: ``redistribute`` children run on one subprocess node; a second node
   starts; the time is from the moment it is seen live to the moment every child runs
   again (started) with the new node holding its share (ConsistentHashing, ColdSwap).
4. **pg**: join and leave of one pid in a group, ``pg_ops`` times, timed one by one, and
   reads of ``members``: both work on the node's local snapshot (the database write of a
   join is batched by the cluster loop afterwards), so no round trip is in them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import mainspring as ms
from mainspring.bench.jobs import (
    _SRC,
    Check,
    _backend_name,
    _Child,
    _Databases,
    _fmt_rate,
    _machine_info,
)
from mainspring.bench.report import host_line, render_checks

TARGET_REMOTE: Final = 5_000.0  # messages per second to processes on other nodes (PostgreSQL)
TARGET_LOCAL: Final = 100_000.0  # messages per second to local processes
SENDERS: Final = 64
LOCAL_SINKS: Final = 16


class Sink(ms.Process):
    """Counts messages; answers "count" with how many it handled."""

    async def init(self, args: dict[str, Any], handover: dict[str, Any] | None) -> None:
        self.count = (handover or {}).get("count", 0)

    async def handle(self, msg: Any) -> Any:
        if msg == "count":
            return self.count
        self.count += 1
        return None

    async def handover(self) -> dict[str, Any]:
        return {"count": self.count}


def _app(url: str, name: str | None = None, **hub: Any) -> ms.App:
    app = ms.App(url, lease_ttl=10.0, node_name=name)
    app.process(Sink, name="bench.sink")
    if hub:
        app.hub.configure(**hub)
    return app


@dataclass
class ProcessesBenchResult:
    backend: str
    messages: int
    children: int
    local_messages: int
    redistribute: int
    pg_ops: int = 10_000
    host: dict[str, Any] = field(default_factory=dict)
    remote_per_s: float | None = None
    remote_send_per_s: float | None = None
    local_per_s: float | None = None
    local_durable_per_s: float | None = None
    redistribute_s: float | None = None
    redistribute_moved: int | None = None
    pg_join_leave_us: float | None = None  # mean of one join plus one leave
    pg_join_leave_p99_us: float | None = None
    pg_members_us: float | None = None
    duration_s: float = 0.0

    def checks(self) -> list[Check]:
        pg = self.backend == "postgres"
        remote_met = (
            None if not pg or self.remote_per_s is None else self.remote_per_s >= TARGET_REMOTE
        )
        local_met = None if self.local_per_s is None else self.local_per_s >= TARGET_LOCAL
        us = "—" if self.pg_join_leave_us is None else f"{self.pg_join_leave_us:.1f} µs"
        p99 = "—" if self.pg_join_leave_p99_us is None else f"{self.pg_join_leave_p99_us:.1f} µs"
        red = "—" if self.redistribute_s is None else f"{self.redistribute_s:.2f} s"
        reads = "—" if self.pg_members_us is None else f"{self.pg_members_us:.2f} µs"
        durable = _fmt_rate(self.local_durable_per_s)
        return [
            Check(f"remote messages ({self.children} processes on another node)",
                  _fmt_rate(self.remote_per_s), target=f"≥ {TARGET_REMOTE:,.0f}/s" if pg else "",
                  passed=remote_met),
            Check("remote sends committed (64 senders)", _fmt_rate(self.remote_send_per_s)),
            Check("local messages (fast path, in memory)", _fmt_rate(self.local_per_s),
                  target=f"≥ {TARGET_LOCAL:,.0f}/s", passed=local_met),
            Check("local messages (durable, through the mailbox)", durable),
            Check(f"redistribute {self.redistribute:,} children after a join "
                  f"({self.redistribute_moved or 0:,} moved)", red),
            Check("pg join + leave, local snapshot (mean / p99)", f"{us} / {p99}"),
            Check("pg members() read", reads),
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checks"] = [asdict(c) for c in self.checks()]
        return data


async def _node(url: str, name: str) -> None:
    """A subprocess node: serve the cluster until stdin closes."""
    app = _app(url, name)
    async with app.cluster.running(name):
        print(json.dumps({"ready": name}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await app.aclose()


async def _spawn_node(url: str, name: str) -> _Child:
    """A node subprocess (it runs until its stdin closes)."""
    path = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH", "")) if p)
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mainspring.bench.processes", "_node", "--url", url, "--name", name,
        stdin=pipe, stdout=pipe, stderr=pipe, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    child = _Child(proc, time.time())
    line = await asyncio.wait_for(child.lines.get(), 60)
    if line is None or "ready" not in line:
        raise RuntimeError(f"node {name} did not start: {child.stderr.decode()[-2000:]}")
    return child


async def _stop(child: _Child) -> None:
    proc = child.proc
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def _counted(app: ms.App, ids: Sequence[str], want: int, timeout: float) -> float:
    """Wait until the sinks handled `want` messages in all; returns when (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while True:
        counts = await asyncio.gather(*(app.hub.call(c, "count", timeout=30) for c in ids))
        if sum(counts) >= want:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"sinks handled {sum(counts)} of {want} messages")
        await asyncio.sleep(0.02)


async def _remote(url: str, messages: int, children: int, result: ProcessesBenchResult) -> None:
    node = await _spawn_node(url, "bench-remote")
    client = _app(url, distribution=ms.Guided())
    try:
        ids = [f"sink{i}" for i in range(children)]
        specs = [ms.ChildSpec(c, "bench.sink", nodes=["bench-remote"]) for c in ids]
        started = await client.hub.start_children(specs, call_timeout=60)
        if not started.ok:
            raise RuntimeError(f"sinks did not start: {list(started.errors.items())[:3]}")
        per_sender = messages // SENDERS

        async def sender(k: int) -> None:
            for j in range(per_sender):
                await client.hub.send(ids[(k + j) % children], j)

        t0 = time.perf_counter()
        await asyncio.gather(*(sender(k) for k in range(SENDERS)))
        sent = time.perf_counter()
        done = await _counted(client, ids, per_sender * SENDERS, 300)
        result.remote_send_per_s = per_sender * SENDERS / (sent - t0)
        result.remote_per_s = per_sender * SENDERS / (done - t0)
    finally:
        await client.aclose()
        await _stop(node)


async def _local(url: str, messages: int, result: ProcessesBenchResult) -> None:
    app = _app(url, "bench-local", distribution=ms.Guided())
    async with app.cluster.running("bench-local"):
        ids = [f"local{i}" for i in range(LOCAL_SINKS)]
        specs = [ms.ChildSpec(c, "bench.sink", nodes=["bench-local"]) for c in ids]
        started = await app.hub.start_children(specs)
        if not started.ok:
            raise RuntimeError(f"sinks did not start: {started.errors}")
        for attempt in ("fast", "durable"):
            n = messages if attempt == "fast" else min(messages, 20_000)
            base = sum(await asyncio.gather(*(app.hub.call(c, "count") for c in ids)))
            t0 = time.perf_counter()
            if attempt == "fast":
                for j in range(n):
                    await app.hub.send(ids[j % LOCAL_SINKS], j, durable=False)
            else:
                per = n // SENDERS

                async def sender(k: int, per: int = per) -> None:
                    for j in range(per):
                        await app.hub.send(ids[(k + j) % LOCAL_SINKS], j)

                await asyncio.gather(*(sender(k) for k in range(SENDERS)))
                n = per * SENDERS
            done = await _counted(app, ids, base + n, 300)
            rate = n / (done - t0)
            if attempt == "fast":
                result.local_per_s = rate
            else:
                result.local_durable_per_s = rate
        # pg: join + leave on the local snapshot, then members() reads.
        pid = f"bench-local/{ids[0]}/1"
        groups = app.groups
        samples = []
        for _ in range(result.pg_ops):
            t = time.perf_counter()
            await groups.join("bench", pid)
            await groups.leave("bench", pid)
            samples.append(time.perf_counter() - t)
        await groups.join("bench", pid)
        t = time.perf_counter()
        reads = 100_000
        for _ in range(reads):
            groups.members("bench")
        result.pg_members_us = (time.perf_counter() - t) / reads * 1e6
        samples.sort()
        result.pg_join_leave_us = statistics.fmean(samples) * 1e6
        result.pg_join_leave_p99_us = samples[int(len(samples) * 0.99)] * 1e6
    await app.aclose()


async def _redistribute(url: str, n: int, result: ProcessesBenchResult) -> None:
    first = await _spawn_node(url, "bench-a")
    client = _app(url)
    second = None
    try:
        await asyncio.sleep(0.5)
        specs = [ms.ChildSpec(f"r{i}", "bench.sink") for i in range(n)]
        started = await client.hub.start_children(specs, call_timeout=300)
        if not started.ok:
            raise RuntimeError(f"children did not start: {list(started.errors.items())[:3]}")
        second = await _spawn_node(url, "bench-b")
        cs = await client.cluster.store()
        ids = [s.child_id for s in specs]
        joined: float | None = None
        deadline = time.perf_counter() + 600
        while time.perf_counter() < deadline:
            if joined is None:
                topology = await cs.hub_topology(client.lease_ttl)
                if any(r[0] == "bench-b" and r[2] for r in topology):
                    joined = time.perf_counter()
                continue
            rows = await cs.proc_get(ids)
            on_b = sum(1 for r in rows if r["nodes"] == ["bench-b"])
            if on_b and all(len(r["nodes"]) == 1 for r in rows):
                # Settled when a second look finds the same placement.
                await asyncio.sleep(0.2)
                again = await cs.proc_get(ids)
                if [r["nodes"] for r in again] == [r["nodes"] for r in rows]:
                    result.redistribute_s = time.perf_counter() - joined
                    result.redistribute_moved = on_b
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError("redistribution did not settle")
    finally:
        await client.aclose()
        for child in (second, first):
            if child is not None:
                await _stop(child)


async def _run(
    backend: str, url: str | None, messages: int, children: int, local_messages: int,
    redistribute: int, pg_ops: int,
) -> ProcessesBenchResult:  # fmt: skip
    started = time.perf_counter()
    databases = _Databases(backend, url)
    result = ProcessesBenchResult(backend, messages, children, local_messages, redistribute, pg_ops)
    result.host = {**_machine_info("asyncio"), "db_version": await databases.version(),
                   "at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    if messages:
        async with databases.fresh() as fresh:
            await _remote(fresh, messages, children, result)
    if local_messages:
        async with databases.fresh() as fresh:
            await _local(fresh, local_messages, result)
    if redistribute:
        async with databases.fresh() as fresh:
            await _redistribute(fresh, redistribute, result)
    result.duration_s = time.perf_counter() - started
    return result


def run_processes_bench(
    backend: str,
    url: str | None = None,
    messages: int = 20_000,
    *,
    children: int = 100,
    local_messages: int = 200_000,
    redistribute: int = 10_000,
    pg_ops: int = 10_000,
) -> ProcessesBenchResult:
    """Run every measurement (a count of 0 skips it) and return the figures."""
    return asyncio.run(
        _run(_backend_name(backend), url, messages, children, local_messages, redistribute, pg_ops)
    )


def render(result: ProcessesBenchResult, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, default=str)
    r = result
    title = (
        f"mainspring bench processes: {r.backend}, {r.messages:,} remote messages to "
        f"{r.children} processes, {r.local_messages:,} local"
    )
    return render_checks(title, r.checks(), [host_line(r.host, r.duration_s)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mainspring.bench.processes")
    parser.add_argument("command", choices=("_node",))
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(_node(ns.url, ns.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
