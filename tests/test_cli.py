"""The `mainspring` command line against real databases."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mainspring as ms
from helpers import aio, running
from mainspring.cli import main
from mainspring.store.queries import load_migrations


def invoke(url: str, *args: str) -> str:
    result = CliRunner().invoke(main, ["--url", url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_db_migrate_reports_the_schema_version(db_url: str) -> None:
    backend = "postgres" if db_url.startswith("postgres") else "sqlite"
    latest = max(version for version, _, _ in load_migrations(backend))
    assert f"schema at version {latest}" in invoke(db_url, "db", "migrate")
    assert f"schema at version {latest}" in invoke(db_url, "db", "migrate")  # idempotent


def test_runs_list_show_cancel_retry(app: ms.App) -> None:
    @app.task(queue="mail")
    def send(to: str) -> None: ...

    handles = app.enqueue_many([send.call(f"u{i}") for i in range(3)])
    listed = json.loads(invoke(app.url, "runs", "list", "--format", "json"))
    assert {r["id"] for r in listed} == {h.id for h in handles}
    assert json.loads(invoke(app.url, "runs", "list", "--queue", "other", "--format", "json")) == []
    shown = json.loads(invoke(app.url, "runs", "show", handles[0].id, "--format", "json"))
    assert shown["state"] == "available" and shown["input"] == {"args": ["u0"], "kwargs": {}}
    assert "cancelled" in invoke(app.url, "runs", "cancel", handles[0].id)
    assert "available" in invoke(app.url, "runs", "retry", handles[0].id)
    table = invoke(app.url, "runs", "list", "--state", "available")
    assert handles[1].id[:8] in table
    result = CliRunner().invoke(main, ["--url", app.url, "runs", "show", "missing-id"])
    assert result.exit_code != 0 and "no run with id 'missing-id'" in result.output


async def explain(url: str, run_id: str) -> dict[str, object]:
    """The CLI's answer, run off the test's event loop (the CLI runs its own)."""
    out = await asyncio.to_thread(invoke, url, "runs", "explain", run_id, "--format", "json")
    return json.loads(out)  # type: ignore[no-any-return]


@aio
async def test_explain_names_why_a_run_is_not_running(app: ms.App) -> None:
    @app.task(queue="mail")
    async def send(to: str) -> None:
        await asyncio.sleep(30)

    later = await send.options(delay=600).enqueue_async("later")
    answer = await explain(app.url, later.id)
    assert str(answer["verdict"]).startswith("scheduled for later")

    waiting = await send.enqueue_async("nobody serves mail")
    answer = await explain(app.url, waiting.id)
    assert "no live node serves queue 'mail'" in " ".join(answer["reasons"])  # type: ignore[arg-type]

    holder = await send.options(concurrency_key="tenant-1").enqueue_async("first")
    async with running(app, name="node-x", concurrency=5):
        await asyncio.sleep(0.3)
        blocked = await send.options(concurrency_key="tenant-1").enqueue_async("second")
        await asyncio.sleep(0.2)
        answer = await explain(app.url, blocked.id)
        reasons = " ".join(answer["reasons"])  # type: ignore[arg-type]
        assert f"held by run {holder.id}" in reasons and "node-x" in reasons
        answer = await explain(app.url, holder.id)
        assert "leased by node node-x (alive)" in str(answer["verdict"])


@aio
async def test_explain_reports_global_limit_and_unknown_task(app: ms.App) -> None:
    app.queue("narrow", global_limit=1)

    @app.task(queue="narrow")
    async def slow() -> None:
        await asyncio.sleep(30)

    ghost_app = ms.App(app.url)

    @ghost_app.task(queue="narrow", name="ghost")
    async def ghost() -> None: ...

    try:
        first = await slow.enqueue_async()
        async with running(app, name="node-y", concurrency=5):
            await asyncio.sleep(0.3)
            assert (await first.get_async()).state == "running"
            second = await slow.enqueue_async()
            await asyncio.sleep(0.2)
            reasons = " ".join((await explain(app.url, second.id))["reasons"])  # type: ignore[arg-type]
            assert "global limit: 1 running of 1" in reasons
            unknown = await ghost.enqueue_async()
            reasons = " ".join((await explain(app.url, unknown.id))["reasons"])  # type: ignore[arg-type]
            assert "knows task 'ghost'" in reasons
    finally:
        await ghost_app.aclose()


@aio
async def test_explain_reports_dead_owner_and_terminal_states(app: ms.App) -> None:
    from mainspring.store.base import QueueDemand

    @app.task
    async def job() -> None: ...

    h = await job.enqueue_async()
    store = await app.store()
    await store.claim_runs("ghost-node", [QueueDemand("default", 1)], 0.1)
    await asyncio.sleep(0.2)
    answer = await explain(app.url, h.id)
    assert "ghost-node (not heartbeating" in str(answer["verdict"])
    assert "lease expired" in " ".join(answer["reasons"])  # type: ignore[arg-type]
    await app.cancel_async(h.id)
    assert str((await explain(app.url, h.id))["verdict"]).startswith("cancelled")


def test_nodes_command_lists_live_workers(app: ms.App) -> None:
    async def scenario() -> str:
        @app.task(queue="q1")
        async def t() -> None: ...

        async with running(app, name="cli-node"):
            return await asyncio.to_thread(invoke, app.url, "nodes", "--format", "json")

    try:
        listed = json.loads(asyncio.run(scenario()))
    finally:
        pass
    assert [(n["name"], n["alive"], n["queues"]) for n in listed] == [("cli-node", True, ["q1"])]


@pytest.mark.parametrize("entry", [["mainspring"], [sys.executable, "-m", "mainspring"]])
def test_worker_command_runs_the_app_in_burst_mode(
    db_url: str, entry: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAINSPRING_DATABASE_URL", db_url)
    import cli_app

    app = ms.App(db_url)
    hello = app.task(queue="cli", name=cli_app.hello.name)(cli_app.hello.fn)
    handle = hello.enqueue("world")
    out = subprocess.run(
        [*entry, "worker", "--app", "cli_app:app", "--burst", "--queues", "cli"],
        capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parent),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert handle.result(timeout=5) == "hello world"
    app.close()


def test_demo_runs_on_the_embedded_default(tmp_path: pytest.TempPathFactory) -> None:
    out = subprocess.run(
        ["mainspring", "demo", "--jobs", "50"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "'completed': 50" in out.stdout and "same run True" in out.stdout


def test_signal_rate_limit_and_waits_on(app: ms.App) -> None:
    app.rate_limits.configure("api", allowed=1, period=3600, burst=1)

    @app.machine(name="cli_waiter")
    class Waiter(ms.Machine):
        initial = "wait"

        async def wait(self, ctx: ms.StepContext, state: dict[str, int]) -> ms.Outcome:
            return ms.Await("go", then="end", state=state)

        async def end(self, ctx: ms.StepContext, state: dict[str, int]) -> ms.Outcome:
            return ms.Done(ctx.awaited.payload("go"))

    @app.task(name="cli_limited")
    async def limited() -> None: ...

    waiter = Waiter.start({}, correlation_key="order-1")
    first, second = app.enqueue_many([limited.options(rate_limit="api").call() for _ in range(2)])

    async def work() -> None:
        async with running(app, concurrency=4):
            await first.result_async(timeout=10)
            await app.rate_limits.status_async("api")

            async def parked() -> bool:
                return (await waiter.get_async()).state == "waiting"

            while not await parked():
                await asyncio.sleep(0.02)

    asyncio.run(work())
    listed = json.loads(invoke(app.url, "runs", "list", "--format", "json"))
    waits = {r["id"]: r["waits_on"] for r in listed}
    assert waits[waiter.id] == "signal go" and waits[second.id] == "rate limit api (1 token)"
    explained = json.loads(invoke(app.url, "runs", "explain", second.id, "--format", "json"))
    assert any("bucket 'api' is empty" in r for r in explained["reasons"])
    status = json.loads(invoke(app.url, "rate-limit", "api", "--format", "json"))
    assert status["config"]["burst"] == 1 and status["buckets"][0]["waiting"] == 1
    assert "delivered" in invoke(app.url, "runs", "signal", "order-1", "go", "--key",
                                 "--payload", '{"n": 1}')  # fmt: skip
    result = CliRunner().invoke(main, ["--url", app.url, "runs", "signal", "nope", "go"])
    assert result.exit_code == 1 and "not_found" in result.output

    async def finish() -> object:
        async with running(app, concurrency=4):
            return await waiter.result_async(timeout=10)

    assert asyncio.run(finish()) == {"n": 1}


def test_check_reports_workflows_that_break_replay(tmp_path: Path) -> None:
    (tmp_path / "good_flows.py").write_text(
        "import mainspring as ms\napp = ms.App('sqlite:///x.db')\n"
        "@app.workflow(name='ok')\nasync def ok(wf, input):\n    return wf.now().isoformat()\n"
    )
    (tmp_path / "bad_flows.py").write_text(
        "import time\nimport mainspring as ms\napp = ms.App('sqlite:///x.db')\n"
        "@app.workflow(name='bad')\nasync def bad(wf, input):\n    return time.time()\n"
    )
    run = [sys.executable, "-m", "mainspring", "check", "--format", "json", "--app"]
    good = subprocess.run([*run, "good_flows:app"], cwd=tmp_path, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == {"workflows": ["ok"], "findings": []}
    bad = subprocess.run([*run, "bad_flows:app"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    finding = json.loads(bad.stdout)["findings"][0]
    assert (finding["line"], finding["call"]) == (6, "time.time()")
