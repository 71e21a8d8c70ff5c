"""Hooks: handlers called with one dict at points of the hub's life.

Register with `app.hub.hooks.register("post_node_join", handler, priority=0)`;
higher priority runs first; a handler may be sync or async; a failing handler
is logged and never breaks the hub.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mainspring.errors import ConfigError

log = logging.getLogger("mainspring.cluster")

HOOKS = frozenset(
    {
        "pre_node_join", "post_node_join", "pre_node_leave", "post_node_leave",
        "child_registered", "child_unregistered", "pre_redistribution", "post_redistribution",
        "migration_completed", "handover_delivered", "children_forwarded", "child_pid_updated",
        "post_children_start",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Hook:
    id: str
    fn: Callable[[dict[str, Any]], Any]
    priority: int


class Hooks:
    """The hub's hook handlers by hook name."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Hook]] = {}

    def register(
        self,
        name: str,
        fn: Callable[[dict[str, Any]], Any],
        *,
        priority: int = 0,
        id: str | None = None,
    ) -> str:
        """Call `fn(data)` at hook `name`; returns the handler id (for `cancel`)."""
        if name not in HOOKS:
            raise ConfigError(f"unknown hook {name!r}; hooks are: {', '.join(sorted(HOOKS))}")
        hook = Hook(id or uuid.uuid4().hex, fn, priority)
        handlers = self._handlers.setdefault(name, [])
        handlers.append(hook)
        handlers.sort(key=lambda h: -h.priority)
        return hook.id

    def cancel(self, name: str, id: str) -> None:
        """Remove a handler."""
        self._handlers[name] = [h for h in self._handlers.get(name, []) if h.id != id]

    def wanted(self, name: str) -> bool:
        return bool(self._handlers.get(name))

    async def dispatch(self, name: str, data: dict[str, Any]) -> None:
        for hook in self._handlers.get(name, ()):
            try:
                result = hook.fn(data)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("hook %s handler %s failed", name, hook.id)
