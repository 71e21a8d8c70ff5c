"""Named engine events with handlers a user can attach.

Events: run.enqueued, run.claimed, run.completed, run.failed, run.retried,
run.cancelled, run.lease_lost, run.released, run.step, run.waiting,
run.heartbeat_timeout (an attempt failed for going silent), run.reused (a run
completed with the output of its idempotency key's completed run),
signal.sent, rate_limit.throttled, rate_limit.unknown, workflow.unknown_version,
workflow.cache_hit / workflow.cache_miss (reason) / workflow.cache_evicted,
node.up, node.down, node.loop_crashed; assets: asset.materialized, asset.failed,
scatter.start/complete/failed/cancel/instance_complete/instance_fail/gather_ready,
gate.create/signal/timeout/timeout_retry/cancel,
rate_limit.check/wait/slot_acquired/slot_released; the cluster's
hub.partitioned, hub.nodes_down, process.crashed, process.failed.
A handler receives (event_name, metadata dict). A handler that raises is
logged and never breaks the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mainspring.telemetry")

Handler = Callable[[str, dict[str, Any]], None]

EVENTS = (
    "run.enqueued",
    "run.claimed",
    "run.completed",
    "run.failed",
    "run.retried",
    "run.cancelled",
    "run.lease_lost",
    "run.released",
    "run.step",
    "run.waiting",
    "run.heartbeat_timeout",
    "run.reused",
    "signal.sent",
    "rate_limit.throttled",
    "rate_limit.unknown",
    "workflow.unknown_version",
    "workflow.cache_hit",
    "workflow.cache_miss",
    "workflow.cache_evicted",
    "node.up",
    "node.down",
    "node.loop_crashed",
    # assets (mainspring.assets)
    "asset.materialized",
    "asset.failed",
    "scatter.start",
    "scatter.complete",
    "scatter.failed",
    "scatter.cancel",
    "scatter.instance_complete",
    "scatter.instance_fail",
    "scatter.gather_ready",
    "gate.create",
    "gate.signal",
    "gate.timeout",
    "gate.timeout_retry",
    "gate.cancel",
    "rate_limit.check",
    "rate_limit.wait",
    "rate_limit.slot_acquired",
    "rate_limit.slot_released",
    "hub.partitioned",
    "hub.nodes_down",
    "process.crashed",
    "process.failed",
)


class Telemetry:
    """A registry of event handlers; `emit` costs one dict lookup when nobody listens."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}

    def attach(self, event: str, handler: Handler) -> Callable[[], None]:
        """Call `handler(event, metadata)` on each `event` ("*": every event).

        Returns a function that detaches the handler.
        """
        if event != "*" and event not in EVENTS:
            raise ValueError(
                f"unknown telemetry event {event!r}; known events: {', '.join(EVENTS)}"
            )
        self._handlers.setdefault(event, []).append(handler)

        def detach() -> None:
            handlers = self._handlers.get(event, [])
            if handler in handlers:
                handlers.remove(handler)

        return detach

    def listening(self, event: str) -> bool:
        return bool(self._handlers.get(event) or self._handlers.get("*"))

    def emit(self, event: str, **metadata: Any) -> None:
        handlers = self._handlers.get(event)
        star = self._handlers.get("*")
        if not handlers and not star:
            return
        for handler in (handlers or []) + (star or []):
            try:
                handler(event, metadata)
            except Exception:
                log.exception("telemetry handler %r failed on %s; ignored", handler, event)
