"""A workflow's journal: the commands its code issued and what became of them, in order.

Every effect of workflow code goes through the context and becomes a numbered
command (`cmd`). A command event records the command when it is first issued;
a resolution event records its result when the workflow observes it. Replay
re-runs the code against the journal: each command it issues must match the
recorded one with the same number, and resolutions are delivered in recorded
order, so the code takes the same path without re-running any effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mainspring import payload

if TYPE_CHECKING:
    from mainspring.store.base import EventRow

# command events (data: {"cmd": n, ...})
ACTIVITY: Final = "activity_scheduled"  # name, child
CHILD: Final = "child_started"  # name, child
TIMER: Final = "timer_started"  # fire_at (unix seconds)
WAIT_SIGNAL: Final = "signal_awaited"  # name, deadline (unix seconds or null)
VALUE: Final = "value_recorded"  # what ("now", "random", "uuid4", "side_effect"), value
PATCH: Final = "patch_recorded"  # patch
LOG: Final = "log"  # message

# resolution events (data: {"cmd": n, ...})
ACTIVITY_DONE: Final = "activity_done"  # ok, value | error
CHILD_DONE: Final = "child_done"  # ok, value | error
TIMER_FIRED: Final = "timer_fired"
SIGNAL_RECEIVED: Final = "signal_received"  # name, payload, signal
SIGNAL_TIMED_OUT: Final = "signal_timed_out"

CANCEL_REQUESTED: Final = "cancel_requested"  # signal: app.cancel reached the workflow

# app.cancel(workflow) sends this signal; the workflow sees asyncio.CancelledError.
CANCEL_SIGNAL: Final = "__cancel__"

# the run itself
STARTED: Final = "started"  # input, version
FINISHED: Final = "finished"  # ok, value | error
CONTINUED: Final = "continued_as_new"  # next

COMMANDS: Final = frozenset({ACTIVITY, CHILD, TIMER, WAIT_SIGNAL, VALUE, PATCH, LOG})
RESOLUTIONS: Final = frozenset(
    {ACTIVITY_DONE, CHILD_DONE, TIMER_FIRED, SIGNAL_RECEIVED, SIGNAL_TIMED_OUT, CANCEL_REQUESTED}
)


def reset_journal(journal: list[EventRow], to_event: int) -> list[tuple[int, str, str]]:
    """The journal a reset run starts from: entries up to `to_event`, renumbered, without
    the commands that had no result by then (the new run issues those again)."""
    kept = [e for e in journal if e.seq <= to_event]
    resolved = {e.data.get("cmd") for e in kept if e.kind in RESOLUTIONS}
    waiting = (ACTIVITY, CHILD, TIMER, WAIT_SIGNAL)
    kept = [e for e in kept if not (e.kind in waiting and e.data.get("cmd") not in resolved)]
    kept = [e for e in kept if e.kind != CANCEL_REQUESTED]
    return [(i, e.kind, payload.dumps(e.data)) for i, e in enumerate(kept, start=1)]
