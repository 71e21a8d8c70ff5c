"""Signal gates: signed tokens, exactly-once resume, timeouts, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

import mainspring as ms
from helpers import aio, eventually, running
from mainspring.assets import GateClosed, GateExpired, InvalidToken
from mainspring.assets.gates import sign, verify
from mainspring.assets.http import gate_app


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAINSPRING_SECRET", "test-secret")
    monkeypatch.setenv("MAINSPRING_GATE_URL", "http://127.0.0.1:9/")


def approval_pipeline(app: ms.App, gate: ms.Gate) -> tuple[Any, list[str], list[Any]]:
    urls: list[str] = []
    resumed: list[Any] = []

    @app.asset
    def summary(ctx: ms.AssetContext) -> dict[str, int]:
        return {"total": 3}

    @app.asset(deps=[summary], gate=gate)
    async def approved(ctx: ms.AssetContext, summary: dict[str, int]) -> Any:
        urls.append(ctx.gate.url)
        decision = await ctx.gate.wait()
        resumed.append(decision)
        return {"total": summary["total"], "decision": decision}

    return approved, urls, resumed


async def parked(app: ms.App, handle: ms.RunHandle, urls: list[str], count: int = 1) -> str:
    async def waiting() -> bool:
        gates = await app.gates.list_async("waiting")
        if len(urls) < count or len(gates) != 1:
            return False
        return (await app.get_run_async(gates[0].run_id)).state == "waiting"  # parked

    await eventually(waiting, timeout=20)
    return urls[-1].rsplit("/", 1)[1]


@aio
async def test_a_gate_parks_the_asset_and_its_signal_resumes_it_once(app: ms.App) -> None:
    approved, urls, resumed = approval_pipeline(app, ms.Gate(timeout=600))
    events: list[str] = []
    app.telemetry.attach("*", lambda name, meta: events.append(name))
    async with running(app, concurrency=10):
        handle = await app.assets.materialize_async(approved)
        token = await parked(app, handle, urls)
        assert urls[0] == f"http://127.0.0.1:9/gates/{token}"
        compute = [r for r in await app.list_runs_async(name="mainspring.assets.materialize")
                   if r.state == "waiting"]  # fmt: skip
        assert len(compute) == 1 and compute[0].lease_owner is None  # holding nothing

        # forged and expired tokens change nothing
        run_id, rnd, expiry, signature = token.split(".")
        gate_id = verify(token).gate_id
        with pytest.raises(InvalidToken):
            await app.gates.signal_async(f"{run_id}.{rnd}.{expiry}.{signature[:-2]}xx", True)
        with pytest.raises(InvalidToken):
            await app.gates.signal_async(f"{run_id}.{rnd}.{int(expiry) + 99}.{signature}", True)
        with pytest.raises(InvalidToken):
            await app.gates.signal_async(f"{run_id}.1.{expiry}.{signature}", True)  # other round
        with pytest.raises(InvalidToken, match="malformed"):
            await app.gates.signal_async("garbage", True)
        with pytest.raises(GateExpired):
            await app.gates.signal_async(sign(run_id, 0, time.time() - 1), True)
        assert (await app.gates.get_async(gate_id)).status == "waiting"

        # a good token delivered twice at the same moment: one resume
        outcomes = await asyncio.gather(
            app.gates.signal_async(token, {"by": "ops"}),
            app.gates.signal_async(token, {"by": "ops"}),
            return_exceptions=True,
        )
        assert sum(isinstance(o, GateClosed) for o in outcomes) == 1, outcomes
        assert sum(isinstance(o, ms.assets.GateSignal) for o in outcomes) == 1
        result = await handle.result_async(timeout=20)
        with pytest.raises(GateClosed, match="already signaled"):  # a replay
            await app.gates.signal_async(token, {"by": "ops"})
    assert resumed == [{"by": "ops"}]
    assert await app.assets.value_async(approved) == {"total": 3, "decision": {"by": "ops"}}
    assert result["asset"] == "approved"
    gate = await app.gates.get_async(gate_id)
    assert (gate.status, gate.payload) == ("signaled", {"by": "ops"})
    for name in ("gate.create", "gate.signal"):
        assert name in events


@aio
async def test_a_gate_timeout_fails_the_materialization_on_another_node(app: ms.App) -> None:
    approved, urls, _ = approval_pipeline(app, ms.Gate(timeout=1.0))
    async with running(app, concurrency=10, name="opener"):
        handle = await app.assets.materialize_async(approved)
        token = await parked(app, handle, urls)
    # the node that opened the gate is gone; another node fires the timeout
    async with running(app, concurrency=10, name="other"):
        with pytest.raises(ms.RunFailed, match="gate of asset approved timed out"):
            await handle.result_async(timeout=20)
    with pytest.raises(GateExpired):
        await app.gates.signal_async(token, True)
    history = await app.assets.materializations_async(approved)
    assert [m.status for m in history] == ["failed"]


@aio
async def test_a_backoff_timeout_renotifies_with_a_fresh_token(app: ms.App) -> None:
    gate = ms.Gate(timeout=0.5, on_timeout=ms.Backoff.constant(30.0), max_timeouts=2)
    approved, urls, resumed = approval_pipeline(app, gate)
    events: list[str] = []
    app.telemetry.attach("gate.timeout_retry", lambda name, meta: events.append(name))
    async with running(app, concurrency=10):
        handle = await app.assets.materialize_async(approved)
        first = await parked(app, handle, urls)
        await eventually(lambda: _at_least(urls, 2), timeout=20)
        second = await parked(app, handle, urls, count=2)
        assert first != second and events == ["gate.timeout_retry"]
        with pytest.raises(GateExpired):
            await app.gates.signal_async(first, "late")  # the first round timed out
        await app.gates.signal_async(second, "yes")
        await handle.result_async(timeout=20)
    assert resumed == ["yes"]


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


@aio
async def test_the_http_endpoint_resumes_the_gate_and_refuses_bad_tokens(app: ms.App) -> None:
    approved, urls, _ = approval_pipeline(app, ms.Gate(timeout=600))
    transport = httpx.ASGITransport(app=gate_app(app))
    async with (
        running(app, concurrency=10),
        httpx.AsyncClient(transport=transport, base_url="http://gates") as http,
    ):
        handle = await app.assets.materialize_async(approved)
        token = await parked(app, handle, urls)
        assert (await http.post(f"/gates/{token[:-3]}abc", json=True)).status_code == 403
        assert (await http.post(f"/gates/{token}", content=b"{not json")).status_code == 400
        ok = await http.post(f"/gates/{token}", json={"approved": True})
        assert ok.status_code == 200 and ok.json()["status"] == "signaled"
        again = await http.post(f"/gates/{token}", json={"approved": True})
        assert again.status_code == 409
        await handle.result_async(timeout=20)
        assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await app.assets.value_async(approved))["decision"] == {"approved": True}


@aio
async def test_the_sweeper_cancels_gates_of_finished_runs(app: ms.App) -> None:
    approved, urls, _ = approval_pipeline(app, ms.Gate(timeout=600))
    async with running(app, concurrency=10):
        handle = await app.assets.materialize_async(approved)
        token = await parked(app, handle, urls)
        await app.cancel_async(handle.id)
        swept = await app.gates.sweep_async()
    assert [g.status for g in swept] == ["cancelled"]
    with pytest.raises(GateClosed, match="cancelled"):
        await app.gates.signal_async(token, True)


@aio
async def test_a_signal_that_comes_before_the_asset_parks_is_kept(app: ms.App) -> None:
    @app.asset(gate=ms.Gate(timeout=600))
    async def quick(ctx: ms.AssetContext) -> Any:
        if not ctx.gate.resumed:  # the reviewer answers before the asset has parked
            await ctx.app.gates.signal_async(ctx.gate.token, "early")
        return await ctx.gate.wait()

    async with running(app, concurrency=10):
        await (await app.assets.materialize_async(quick)).result_async(timeout=20)
    assert await app.assets.value_async(quick) == "early"
    gates = await app.gates.list_async(None)
    assert [(g.status, g.asset) for g in gates] == [("signaled", "quick")]


def test_gates_need_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAINSPRING_SECRET")
    with pytest.raises(ms.ConfigError, match="MAINSPRING_SECRET"):
        sign("r", 0, time.time() + 10)
