"""Why is this run not running? The answer, read from the database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mainspring.run import AVAILABLE, RUNNING, SCHEDULED, TERMINAL, WAITING, NodeInfo, Run
from mainspring.store.base import Store


@dataclass
class Explanation:
    """A run and the reasons for its present state, most important first."""

    run: Run
    verdict: str
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"id": self.run.id, "state": self.run.state, "verdict": self.verdict,
                "reasons": self.reasons}  # fmt: skip


def _ago(moment: datetime, now: datetime) -> str:
    seconds = (now - moment).total_seconds()
    if seconds >= 0:
        return f"{seconds:.1f} s ago"
    return f"in {-seconds:.1f} s"


async def explain(store: Store, run: Run, lease_ttl: float) -> Explanation:
    """Explain a run's state: what it waits for, who holds it, or how it ended."""
    now = datetime.now(UTC)
    if run.state in TERMINAL:
        return _terminal(run, now)
    nodes = await store.list_nodes(lease_ttl)
    live = [n for n in nodes if n.alive]
    if run.state == SCHEDULED:
        reasons = []
        if run.attempt and run.error:
            reasons.append(
                f"attempt {run.attempt} of {run.max_attempts} failed: "
                f"{run.error.get('type')}: {run.error.get('message')}; this is the retry"
            )
        reasons.extend(_queue_service(run, live))
        when = f"{run.run_at.isoformat()} ({_ago(run.run_at, now)})"
        return Explanation(run, f"scheduled for later: {when}", reasons)
    if run.state == RUNNING:
        owner = next((n for n in nodes if n.name == run.lease_owner), None)
        health = "alive" if owner and owner.alive else "not heartbeating (presumed dead)"
        verdict = f"running: leased by node {run.lease_owner} ({health})"
        reasons = []
        if run.lease_expires_at:
            if run.lease_expires_at > now:
                reasons.append(f"lease valid until {run.lease_expires_at.isoformat()} "
                               f"({_ago(run.lease_expires_at, now)})")  # fmt: skip
            else:
                reasons.append(
                    f"lease expired {_ago(run.lease_expires_at, now)}; the reaper of any live "
                    "node will make it available again"
                )
        reasons.append(f"attempt {run.attempt} of {run.max_attempts}")
        return Explanation(run, verdict, reasons)
    if run.state == WAITING:
        return _waiting(run, now)
    assert run.state == AVAILABLE
    blockers = _queue_service(run, live)
    if run.rate_limit:
        blockers.extend(await _rate_limit(store, run, now))
    if run.concurrency_key:
        holder = await store.running_with_key(run.concurrency_key)
        if holder is not None:
            blockers.append(
                f"waiting for concurrency key {run.concurrency_key!r}, held by run {holder.id} "
                f"(running on node {holder.lease_owner})"
            )
    status = await store.queue_status(run.queue)
    running = status.counts.get(RUNNING, 0)
    if status.global_limit is not None and running >= status.global_limit:
        blockers.append(
            f"queue {run.queue!r} is at its global limit: "
            f"{running} running of {status.global_limit}"
        )
    serving = [n for n in live if run.queue in n.queues]
    capacity = sum(n.concurrency for n in serving)
    if serving and running >= capacity:
        blockers.append(
            f"every live node serving {run.queue!r} is busy ({running} running, {capacity} slots)"
        )
    ahead = await store.count_ahead(run)
    if blockers:
        return Explanation(run, "available but blocked", [*blockers, f"{ahead} runs ahead of it"])
    return Explanation(
        run,
        "available and ready: a worker will claim it next"
        if ahead == 0
        else f"available and ready: {ahead} runs ahead of it in queue {run.queue!r}",
        [f"priority {run.priority}, waiting since {run.run_at.isoformat()}"],
    )


def _waiting(run: Run, now: datetime) -> Explanation:
    reasons = []
    names = [n for n in run.awaits or [] if not n.startswith("__")]  # not the internal cancel
    if run.kind == "workflow":
        waits = [f"signal {' | '.join(names)}"] if names else []
        verdict = "waiting for " + " or ".join([*waits, "its activities, timers or children"])
        if run.deadline is not None:
            reasons.append(f"next timer at {run.deadline.isoformat()} ({_ago(run.deadline, now)})")
    elif run.awaits is not None:
        verdict = f"waiting for a signal: {', '.join(names)}; then step {run.step!r}"
        if run.deadline is not None:
            reasons.append(f"times out at {run.deadline.isoformat()} ({_ago(run.deadline, now)})")
        else:
            reasons.append("no timeout: it waits until signalled or cancelled")
        if names:
            reasons.append(f"send one with: mainspring runs signal {run.id} {names[0]}")
    elif run.children_pending > 0:
        verdict = (
            f"waiting for {run.children_pending} child run(s) to finish; then step {run.step!r}"
        )
    else:
        verdict = "waiting"
    return Explanation(run, verdict, reasons)


async def _rate_limit(store: Store, run: Run, now: datetime) -> list[str]:
    """Why a rate-limited run is not granted: no configuration, or an empty bucket (until when)."""
    assert run.rate_limit is not None
    name = run.rate_limit.split(":", 1)[0]
    config = (await store.rate_limit_configs()).get(name)
    if config is None:
        return [f"its rate limit {name!r} is not configured: it is held until "
                f"app.rate_limits.configure({name!r}, allowed=..., period=...) runs"]  # fmt: skip
    bucket = next((b for b in await store.rate_limit_status(name) if b.key == run.rate_limit), None)
    tokens = bucket.tokens if bucket else float(config.burst)
    if tokens >= run.weight:
        return []
    wait = (run.weight - tokens) * config.period / config.allowed
    when = now + timedelta(seconds=wait)
    return [
        f"its rate-limit bucket {run.rate_limit!r} is empty: {tokens:.2f} tokens, needs "
        f"{run.weight}; refills {config.allowed} per {config.period:g} s, enough at "
        f"{when.isoformat()} ({_ago(when, now)}) unless runs ahead of it take them"
    ]


def _queue_service(run: Run, live: list[NodeInfo]) -> list[str]:
    serving = [n for n in live if run.queue in n.queues]
    if not serving:
        others = sorted({q for n in live for q in n.queues})
        return [f"no live node serves queue {run.queue!r} (live nodes serve: "
                f"{', '.join(others) if others else 'none — start a worker'})"]  # fmt: skip
    if not any(run.name in n.tasks for n in serving):
        return [f"no live node serving {run.queue!r} knows task {run.name!r}: it will be failed "
                "when claimed unless a node that knows it starts"]  # fmt: skip
    return []


def _terminal(run: Run, now: datetime) -> Explanation:
    when = f" {_ago(run.finished_at, now)}" if run.finished_at else ""
    if run.state == "completed":
        return Explanation(run, f"completed{when} after {run.attempt} attempt(s)")
    error = run.error or {}
    reason = (
        f"{error.get('type', '?')}: {error.get('message', '')}" if error else "no error recorded"
    )
    return Explanation(run, f"{run.state}{when} after {run.attempt} attempt(s)", [reason])
