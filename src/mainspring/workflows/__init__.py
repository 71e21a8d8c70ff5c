"""Replay workflows: deterministic async code whose every effect is journaled."""

from mainspring.workflows.replay import ActivityError, NondeterminismError
from mainspring.workflows.workflow import Workflow

__all__ = ["ActivityError", "NondeterminismError", "Workflow"]
