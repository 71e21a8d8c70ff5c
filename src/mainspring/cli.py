"""The `mainspring` command line: run workers, migrate, inspect and act on runs, benchmark."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table

from mainspring.app import App
from mainspring.errors import MainspringError
from mainspring.run import STATES, Run

T = TypeVar("T")
console = Console()


def load_app(spec: str) -> App:
    """Import `module:attribute` (or `module`, finding its App) and return the App."""
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="--app"
        ) from exc
    if attr:
        app = getattr(module, attr, None)
    else:
        app = next((v for v in vars(module).values() if isinstance(v, App)), None)
    if not isinstance(app, App):
        raise click.BadParameter(f"{spec!r} is not a mainspring.App", param_hint="--app")
    return app


class Ctx:
    def __init__(self, app_spec: str | None, url: str | None) -> None:
        self.app_spec = app_spec
        self.url = url
        self._app: App | None = None

    @property
    def app(self) -> App:
        if self._app is None:
            if self.app_spec:
                self._app = load_app(self.app_spec)
            else:
                self._app = App(self.url)
        return self._app

    def run(self, fn: Callable[[App], Awaitable[T]]) -> T:
        async def main() -> T:
            try:
                return await fn(self.app)
            finally:
                await self.app.aclose()

        try:
            return asyncio.run(main())
        except MainspringError as exc:
            raise click.ClickException(str(exc)) from exc


pass_ctx = click.make_pass_decorator(Ctx)
format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode()


@click.group()
@click.option("--app", "app_spec", envvar="MAINSPRING_APP", help="module:app holding your App.")
@click.option("--url", envvar="MAINSPRING_DATABASE_URL", help="Database URL (without --app).")
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None, url: str | None, verbose: bool) -> None:
    """Mainspring: durable execution on SQLite or PostgreSQL."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = Ctx(app_spec, url)


@main.command()
@click.option("--app", "app_spec", help="module:app holding your App.")
@click.option("--queues", help="Comma-separated queues (default: every queue of the app's tasks).")
@click.option("--concurrency", type=int, default=50, show_default=True)
@click.option("--burst", is_flag=True, help="Exit when no work is left.")
@pass_ctx
def worker(
    ctx: Ctx, app_spec: str | None, queues: str | None, concurrency: int, burst: bool
) -> None:
    """Run a worker node until SIGTERM/SIGINT (graceful drain)."""
    if app_spec:
        ctx.app_spec = app_spec
    if not ctx.app_spec:
        raise click.UsageError("worker needs --app module:app so it knows your tasks")
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    ctx.app.run_worker(queues=queue_list, concurrency=concurrency, burst=burst)


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
@pass_ctx
def migrate(ctx: Ctx) -> None:
    """Apply the schema migrations (App does this on its own unless migrate=False)."""
    version = ctx.run(lambda app: app.migrate_async())
    console.print(f"schema at version {version} ({ctx.app.url})")


@main.group()
def runs() -> None:
    """Inspect and act on runs."""


def _runs_table(items: list[Run]) -> Table:
    table = Table("name", "queue", "state", "step", "attempt", "priority", "run_at", "waits on")
    table.add_column("error")
    table.add_column("id", no_wrap=True, min_width=36)
    for r in items:
        error = (r.error or {}).get("message", "") if r.error else ""
        table.add_row(
            r.name, r.queue, r.state, r.step or "", f"{r.attempt}/{r.max_attempts}",
            str(r.priority), r.run_at.strftime("%Y-%m-%d %H:%M:%S"), _waits_on(r),
            str(error)[:60], r.id,
        )  # fmt: skip
    return table


def _waits_on(run: Run) -> str:
    """What a run that is not running waits for, in a few words (`runs explain` says more)."""
    if run.state == "available" and run.rate_limit:
        return f"rate limit {run.rate_limit} ({run.weight} token{'s' if run.weight > 1 else ''})"
    if run.state == "available" and run.concurrency_key:
        return f"concurrency key {run.concurrency_key}"
    if run.state == "waiting" and run.awaits:
        names = [n for n in run.awaits if not n.startswith("__")]  # not the internal cancel
        return "signal " + " | ".join(names) if names else "its children or a timer"
    if run.state == "waiting" and run.children_pending:
        return f"{run.children_pending} children"
    if run.state == "scheduled":
        return "its time"
    return ""


@runs.command("list")
@click.option("--state", type=click.Choice(STATES))
@click.option("--queue")
@click.option("--name")
@click.option("--limit", type=int, default=50, show_default=True)
@format_option
@pass_ctx
def runs_list(
    ctx: Ctx, state: str | None, queue: str | None, name: str | None, limit: int, fmt: str
) -> None:
    """List runs, newest first."""
    items = ctx.run(
        lambda app: app.list_runs_async(state=state, queue=queue, name=name, limit=limit)
    )
    if fmt == "json":
        click.echo(_json([{**r.to_dict(), "waits_on": _waits_on(r)} for r in items]))
    else:
        console.print(_runs_table(items))


@runs.command("show")
@click.argument("run_id")
@format_option
@pass_ctx
def runs_show(ctx: Ctx, run_id: str, fmt: str) -> None:
    """Show one run in full."""
    run = ctx.run(lambda app: app.get_run_async(run_id))
    data = run.to_dict()
    if fmt == "json":
        click.echo(_json(data))
        return
    table = Table("field", "value", show_header=False)
    for key, value in data.items():
        if key == "error" and value:
            value = f"{value.get('type')}: {value.get('message')}\n{value.get('traceback') or ''}"
        table.add_row(key, str(value))
    console.print(table)


@runs.command("cancel")
@click.argument("run_id")
@pass_ctx
def runs_cancel(ctx: Ctx, run_id: str) -> None:
    """Cancel a run that is not finished."""
    run = ctx.run(lambda app: app.cancel_async(run_id))
    console.print(f"{run.id}: {run.state}")


@runs.command("retry")
@click.argument("run_id")
@pass_ctx
def runs_retry(ctx: Ctx, run_id: str) -> None:
    """Run a failed or cancelled run again."""
    run = ctx.run(lambda app: app.retry_async(run_id))
    console.print(f"{run.id}: {run.state}")


@runs.command("signal")
@click.argument("target")
@click.argument("name")
@click.option("--payload", default="null", help="JSON payload.", show_default=True)
@click.option("--dedup-key", help="A resend with the same key is a no-op.")
@click.option("--key", "by_key", is_flag=True, help="TARGET is a correlation key, not a run id.")
@pass_ctx
def runs_signal(
    ctx: Ctx, target: str, name: str, payload: str, dedup_key: str | None, by_key: bool
) -> None:
    """Send signal NAME to a run (by id, or by correlation key with --key)."""
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    run_id, key = (None, target) if by_key else (target, None)
    result = ctx.run(
        lambda app: app.signal_async(run_id, name, data, correlation_key=key, dedup_key=dedup_key)
    )
    console.print(f"{target}: {result.value}")
    if result.value in ("not_found", "terminal"):
        raise SystemExit(1)


@main.command()
@click.option("--app", "app_spec", required=True, help="module:app holding your App.")
@format_option
def check(app_spec: str, fmt: str) -> None:
    """Check every registered workflow for calls that would break replay; exit 1 on findings."""
    from mainspring.workflows.check import DeterminismError, check_workflow

    try:
        app = load_app(app_spec)
    except DeterminismError as exc:  # raised while the module registers its workflows
        findings = [(exc.workflow, f) for f in exc.findings]
        checked: list[str] = []
    else:
        checked = sorted(app.workflows)
        findings = [(n, f) for n in checked for f in check_workflow(app.workflows[n].fn)]
    if fmt == "json":
        found = [{"workflow": n, **dataclasses.asdict(f)} for n, f in findings]
        click.echo(_json({"workflows": checked, "findings": found}))
    else:
        for name, finding in findings:
            console.print(f"{name}: {finding}")
        if not findings:
            console.print(f"{len(checked)} workflows checked: no call breaks replay")
    if findings:
        raise SystemExit(1)


@main.command()
@click.option("--app", "app_spec", required=True, help="module:app holding your App.")
@click.option("--strict", is_flag=True, help="Exit 1 on removable patches or stuck runs (CI).")
@format_option
def audit(app_spec: str, strict: bool, fmt: str) -> None:
    """Workflow versions loaded, patch guards safe to remove, runs on versions not loaded."""
    from mainspring.workflows.audit import audit as run_audit

    app = load_app(app_spec)

    async def go() -> Any:
        try:
            return await run_audit(app)
        finally:
            await app.aclose()

    report = asyncio.run(go())
    if fmt == "json":
        click.echo(_json(report.to_dict()))
    else:
        for name, versions in sorted(report.loaded.items()):
            active = {v: report.active.get(f"{name}@{v}", 0) for v in versions}
            console.print(f"{name}: versions {', '.join(versions)} (active runs {active})")
        for p in report.patches:
            verdict = "safe to remove" if p.safe_to_remove else f"{p.runs_before} runs need it"
            console.print(f"  patch {p.patch!r} at {p.file}:{p.line}: {verdict}")
        for s in report.stuck:
            console.print(f"  run {s['id']} of {s['workflow']}: version {s['version']} not loaded")
    if strict and report.problems():
        raise SystemExit(1)


@main.command("rate-limit")
@click.argument("name")
@format_option
@pass_ctx
def rate_limit(ctx: Ctx, name: str, fmt: str) -> None:
    """Show a rate limit: its configuration and each bucket's tokens and waiting runs."""
    status = ctx.run(lambda app: app.rate_limits.status_async(name))
    if fmt == "json":
        click.echo(_json({
            "name": name,
            "config": None if status.config is None else dataclasses.asdict(status.config),
            "buckets": [dataclasses.asdict(b) for b in status.buckets],
        }))  # fmt: skip
        return
    if status.config is None:
        console.print(f"rate limit {name!r} is not configured")
    else:
        c = status.config
        console.print(f"{name}: {c.allowed} per {c.period:g} s, burst {c.burst}")
    table = Table("bucket", "tokens", "waiting runs")
    for b in status.buckets:
        table.add_row(b.key, f"{b.tokens:.2f}", str(b.waiting))
    console.print(table)


@runs.command("explain")
@click.argument("run_id")
@format_option
@pass_ctx
def runs_explain(ctx: Ctx, run_id: str, fmt: str) -> None:
    """Why is this run not running?"""
    from mainspring.engine.explain import explain

    async def go(app: App) -> Any:
        run = await app.get_run_async(run_id)
        return await explain(await app.store(), run, app.lease_ttl)

    answer = ctx.run(go)
    if fmt == "json":
        click.echo(_json(answer.to_dict()))
        return
    console.print(f"[bold]{answer.run.id}[/bold] ({answer.run.name}, queue {answer.run.queue})")
    console.print(f"  {answer.verdict}")
    for reason in answer.reasons:
        console.print(f"  - {reason}")


@main.command()
@format_option
@pass_ctx
def nodes(ctx: Ctx, fmt: str) -> None:
    """List worker nodes and their heartbeats."""
    items = ctx.run(lambda app: app.nodes_async())
    if fmt == "json":
        click.echo(_json([_node(n) for n in items]))
        return
    table = Table("node", "alive", "status", "queues", "concurrency", "heartbeat", "started")
    for n in items:
        table.add_row(
            n.name, "yes" if n.alive else "NO", n.status, ",".join(n.queues), str(n.concurrency),
            n.heartbeat_at.strftime("%H:%M:%S"), n.started_at.strftime("%Y-%m-%d %H:%M:%S"),
        )  # fmt: skip
    console.print(table)


def _node(n: Any) -> dict[str, Any]:
    return {f: getattr(n, f) for f in n.__dataclass_fields__}


@main.group()
def bench() -> None:
    """Benchmarks against peers, on this machine."""


@bench.command("jobs")
@click.option("--backend", type=click.Choice(["sqlite", "postgres"]), default="sqlite")
@click.option("--url", "bench_url", help="Server URL for postgres (default: local server).")
@click.option("--jobs", type=int, default=20_000, show_default=True)
@click.option("--concurrency", type=int, default=200, show_default=True)
@click.option(
    "--pending", type=int, default=0, help="Also measure claim cost with this many pending."
)
@click.option("--peers/--no-peers", default=True, help="Run PgQueuer and Procrastinate too.")
@click.option("--rss/--no-rss", default=True, help="Measure worker RSS with 100k pending.")
@format_option
def bench_jobs(
    backend: str, bench_url: str | None, jobs: int, concurrency: int, pending: int, peers: bool,
    rss: bool, fmt: str,
) -> None:  # fmt: skip
    """Enqueue and process no-op jobs; print rates, latency and RSS beside the peers'."""
    from mainspring.bench.jobs import render, run_jobs_bench

    result = run_jobs_bench(
        backend, bench_url, jobs, concurrency=concurrency, peers=peers, pending=pending,
        include_rss=rss,
    )  # fmt: skip
    click.echo(render(result, fmt))


@bench.command("machines")
@click.option("--backend", type=click.Choice(["sqlite", "postgres"]), default="sqlite")
@click.option("--url", "bench_url", help="Server URL for postgres (default: local server).")
@click.option("--machines", type=int, default=5_000, show_default=True)
@click.option("--concurrency", type=int, default=500, show_default=True)
@format_option
def bench_machines(
    backend: str, bench_url: str | None, machines: int, concurrency: int, fmt: str
) -> None:
    """Run three-step machines to completion; print committed step transitions per second."""
    from mainspring.bench.machines import render, run_machines_bench

    result = run_machines_bench(backend, bench_url, machines, concurrency=concurrency)
    click.echo(render(result, fmt))


@bench.command("workflows")
@click.option("--backend", type=click.Choice(["sqlite", "postgres"]), default="sqlite")
@click.option("--url", "bench_url", help="Server URL for postgres (default: local server).")
@click.option("--workflows", type=int, default=2_000, show_default=True)
@click.option("--concurrency", type=int, default=500, show_default=True)
@click.option("--peers/--no-peers", default=True, help="Run DBOS Transact too (postgres).")
@click.option(
    "--workflow-cache", type=int, default=None,
    help="The worker's workflow_cache_size (default: the App's; 0 replays every task).",
)  # fmt: skip
@click.option(
    "--activities", "steps", type=int, default=3, show_default=True,
    help="Activities per workflow, in sequence (DBOS runs only with 3).",
)  # fmt: skip
@format_option
def bench_workflows(
    backend: str,
    bench_url: str | None,
    workflows: int,
    concurrency: int,
    peers: bool,
    workflow_cache: int | None,
    steps: int,
    fmt: str,
) -> None:
    """Run three-activity workflows to completion; print workflows per second and the ratio
    to DBOS Transact's."""
    from mainspring.bench.workflows import render, run_workflows_bench

    result = run_workflows_bench(
        backend, bench_url, workflows, concurrency=concurrency, peers=peers,
        workflow_cache=workflow_cache, steps=steps,
    )  # fmt: skip
    click.echo(render(result, fmt))


@bench.command("processes")
@click.option("--backend", type=click.Choice(["sqlite", "postgres"]), default="sqlite")
@click.option("--url", "bench_url", help="Server URL for postgres (default: local server).")
@click.option("--messages", type=int, default=20_000, show_default=True)
@click.option("--children", type=int, default=100, show_default=True)
@click.option("--local-messages", type=int, default=200_000, show_default=True)
@click.option("--redistribute", type=int, default=10_000, show_default=True)
@click.option("--pg-ops", type=int, default=10_000, show_default=True)
@format_option
def bench_processes(
    backend: str, bench_url: str | None, messages: int, children: int, local_messages: int,
    redistribute: int, pg_ops: int, fmt: str,
) -> None:  # fmt: skip
    """Messages per second to processes on another node and on this one, the time to
    redistribute children after a node joins, and pg join/leave latency."""
    from mainspring.bench.processes import render, run_processes_bench

    result = run_processes_bench(
        backend, bench_url, messages, children=children, local_messages=local_messages,
        redistribute=redistribute, pg_ops=pg_ops,
    )  # fmt: skip
    click.echo(render(result, fmt))


@main.command()
@click.option("--jobs", type=int, default=200, show_default=True)
@click.option("--url", "demo_url", default="sqlite:///mainspring-demo.db", show_default=True)
def demo(jobs: int, demo_url: str) -> None:
    """Enqueue a batch of jobs, run a worker until they are done, show the results."""
    from mainspring.demo import run_demo

    run_demo(demo_url, jobs, console)


def _asset_commands() -> None:
    from mainspring.assets import cli as assets_cli

    main.add_command(assets_cli.assets_group)
    main.add_command(assets_cli.serve)
    bench.add_command(assets_cli.bench_assets)


_asset_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
