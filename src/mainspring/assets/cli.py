"""`mainspring assets ...` and `mainspring serve`: the asset commands of the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, Literal

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mainspring.app import App
from mainspring.errors import MainspringError

if TYPE_CHECKING:
    from mainspring.cli import Ctx

# The main group keeps its Ctx in click's context object (this module is imported by
# mainspring.cli, so it cannot import from it at import time).
pass_ctx = click.pass_obj
console = Console()
format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2).decode()


@click.group("assets")
def assets_group() -> None:
    """Asset pipelines: list, materialize, lineage, graph (need --app)."""


def _app(ctx: Ctx) -> App:
    """The app that defines the assets (these commands need --app)."""
    if not ctx.app_spec:
        raise click.UsageError("asset commands need the app that defines them: --app module:app")
    return ctx.app


@assets_group.command("list")
@format_option
@pass_ctx
def assets_list(ctx: Ctx, fmt: str) -> None:
    """Every asset with its deps, partitions and latest materialization."""
    _app(ctx)

    async def go(app: App) -> list[dict[str, Any]]:
        names = app.assets.check()
        store = await app.store()
        latest: dict[str, Any] = {}
        for row in await store.latest_materializations(names):
            if row.asset not in latest or row.finished_at > latest[row.asset].finished_at:
                latest[row.asset] = row
        items = []
        for name in names:
            d = app.assets.defs[name]
            last = latest.get(name)
            items.append({
                "name": name, "deps": d.deps,
                "partitions": None if d.partitions is None else repr(d.partitions),
                "scatter": d.scatter is not None, "gather": d.gather, "gate": d.gate is not None,
                "latest": None if last is None else {
                    "id": last.id, "partition": last.partition,
                    "finished_at": last.finished_at.isoformat()},
            })  # fmt: skip
        return items

    items = ctx.run(go)
    if fmt == "json":
        click.echo(_json(items))
        return
    table = Table("asset", "deps", "partitions", "kind", "latest")
    for i in items:
        kind = ",".join(k for k in ("scatter", "gather", "gate") if i[k]) or "-"
        last = i["latest"]
        when = "never" if last is None else f"{last['finished_at'][:19]} {last['partition']}"
        table.add_row(i["name"], ", ".join(i["deps"]) or "-", i["partitions"] or "-", kind, when)
    console.print(table)


@assets_group.command("materialize")
@click.argument("name")
@click.option("--partition", help="The partition to build (partitioned assets).")
@click.option("--force", is_flag=True, help="Rebuild every upstream asset too.")
@click.option("--worker", "with_worker", is_flag=True, help="Run a worker in this process too.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many s.")
@pass_ctx
def assets_materialize(
    ctx: Ctx, name: str, partition: str | None, force: bool, with_worker: bool,
    timeout: float | None,
) -> None:  # fmt: skip
    """Materialize NAME (and its stale upstream) with a progress bar over the graph and the
    scatter instances; exit 1 when it fails."""
    _app(ctx)

    async def go(app: App) -> Any:
        handle = await app.assets.materialize_async(name, partition, force=force)
        worker_task = None
        if with_worker:
            from mainspring.engine.worker import Worker

            worker = Worker(app, install_signal_handlers=False)
            worker_task = asyncio.create_task(worker.run())
        try:
            return await _follow(app, handle.id, timeout)
        finally:
            if worker_task is not None:
                worker.stop()
                await worker_task

    run = ctx.run(go)
    if run.state != "completed":
        console.print(f"[red]{run.state}[/red]: {(run.error or {}).get('message', '')}")
        raise SystemExit(1)
    console.print(f"materialized {name}: {_json(run.output)}")


async def _follow(app: App, plan_id: str, timeout: float | None) -> Any:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as bar:
        graph = bar.add_task("assets", total=None)
        scatters: dict[str, Any] = {}
        while True:
            progress = await app.assets.progress_async(plan_id)
            bar.update(graph, total=progress.total or None, completed=progress.done)
            for a in progress.assets:
                if a.instances_total:
                    if a.asset not in scatters:
                        scatters[a.asset] = bar.add_task(f"  {a.asset} instances")
                    bar.update(scatters[a.asset], total=a.instances_total,
                               completed=a.instances_done)  # fmt: skip
            if progress.state in ("completed", "failed", "cancelled"):
                return await app.get_run_async(plan_id)
            if deadline is not None and loop.time() > deadline:
                raise click.ClickException(
                    f"still {progress.state} after {timeout} s: is a worker running?"
                )
            await asyncio.sleep(0.2)


@assets_group.command("lineage")
@click.argument("name")
@click.option("--partition")
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid", "json"]), default="text")
@click.option("--downstream", is_flag=True, help="What was built from it, instead.")
@pass_ctx
def assets_lineage(ctx: Ctx, name: str, partition: str | None, fmt: str, downstream: bool) -> None:
    """What the latest materialization of NAME was built from (or, with --downstream, what
    was built from it)."""
    _app(ctx)
    direction: Literal["upstream", "downstream"] = "downstream" if downstream else "upstream"
    lineage = ctx.run(lambda app: app.assets.lineage_async(name, partition, direction=direction))
    if fmt == "json":
        click.echo(
            _json(
                {
                    "root": lineage.root.id,
                    "edges": lineage.edges,
                    "nodes": [dataclasses.asdict(n) for n in lineage.nodes.values()],
                }
            )
        )
        return  # fmt: skip
    click.echo(lineage.to_mermaid() if fmt == "mermaid" else lineage.to_text())


@assets_group.command("graph")
@click.option("--format", "fmt", type=click.Choice(["text", "mermaid"]), default="text")
@pass_ctx
def assets_graph(ctx: Ctx, fmt: str) -> None:
    """The asset graph, as text or Mermaid."""
    click.echo(_app(ctx).graph(fmt))  # type: ignore[arg-type]


@click.command("serve")
@click.option("--app", "app_spec", required=True, help="module:app holding your App.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def serve(app_spec: str, host: str, port: int) -> None:
    """Serve the webhook endpoint POST /gates/{token} that resolves signal gates."""
    from mainspring.assets.gates import secret
    from mainspring.assets.http import serve as run_server
    from mainspring.cli import load_app

    try:
        secret()  # fail now, with the message, when MAINSPRING_SECRET is missing
    except MainspringError as exc:
        raise click.ClickException(str(exc)) from exc
    run_server(load_app(app_spec), host, port)


@click.command("assets")
@click.option("--backend", type=click.Choice(["sqlite", "postgres"]), default="postgres")
@click.option("--url", "bench_url", help="Server URL for postgres (default: local server).")
@click.option("--instances", type=int, default=10_000, show_default=True)
@click.option("--concurrency", type=int, default=1000, show_default=True)
@click.option("--materializations", type=int, default=500, show_default=True)
@format_option
def bench_assets(
    backend: str, bench_url: str | None, instances: int, concurrency: int,
    materializations: int, fmt: str,
) -> None:  # fmt: skip
    """A scatter of no-op instances (instances/s) and the cost of recording a materialization."""
    from mainspring.bench.assets import render, run_assets_bench

    result = run_assets_bench(backend, bench_url, instances, concurrency=concurrency,
                              materializations=materializations)  # fmt: skip
    click.echo(render(result, fmt))
