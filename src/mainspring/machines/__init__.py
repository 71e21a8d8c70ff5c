"""Durable state machines: steps whose state is committed before the next one runs."""

from mainspring.machines.machine import ChildRun, ChildSpec, Machine, StepContext
from mainspring.machines.outcomes import Await, Done, Next, Outcome, Retry, Spawn, Stop

__all__ = [
    "Await",
    "ChildRun",
    "ChildSpec",
    "Done",
    "Machine",
    "Next",
    "Outcome",
    "Retry",
    "Spawn",
    "StepContext",
    "Stop",
]
