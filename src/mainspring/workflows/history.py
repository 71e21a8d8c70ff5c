"""A workflow's journal: the commands its code issued and what became of them, in order.

Every effect of workflow code goes through the context and becomes a numbered
command (`cmd`). A command event records the command when it is first issued;
a resolution event records its result when the workflow observes it. Replay
re-runs the code against the journal: each command it issues must match the
recorded one with the same number, and resolutions are delivered in recorded
order, so the code takes the same path without re-running any effect.
"""

from __future__ import annotations

from typing import Final

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
