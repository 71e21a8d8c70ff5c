"""How a child moves when its node is no longer its owner (a node joined, or drains).

Both strategies carry the state the old owner's `handover()` returns to the new
owner's `init(args, handover)`; they differ in order. Children of a node that
died are not migrated: they restart on their new owners from their last
handover or checkpoint state.
"""

from __future__ import annotations

from dataclasses import dataclass

from mainspring.errors import ConfigError


@dataclass(frozen=True)
class ColdSwap:
    """Stop on the old node (after `handover()`), then start on the new one with that
    state. Messages sent meanwhile wait in the durable mailbox. `handover=False` starts
    the new instance from the last checkpoint instead (required with Replication)."""

    handover: bool = True
    state_query_timeout: float = 5.0


@dataclass(frozen=True)
class HotSwap:
    """Start the new instance, deliver the old one's state, then stop the old one: the
    ownership moves in one statement, so the child is never without an owner. The old
    instance keeps handling messages until its state is taken; `handover()` gets
    `state_query_timeout` seconds (else the last checkpoint goes over). The delivered
    state stays stored, so a new owner restarted within `state_ttl` gets it again."""

    state_ttl: float = 30.0
    state_query_timeout: float = 5.0
    handover: bool = True

    def __post_init__(self) -> None:
        if self.state_ttl <= 0 or self.state_query_timeout <= 0:
            raise ConfigError("HotSwap state_ttl and state_query_timeout must be > 0 seconds")


Migration = ColdSwap | HotSwap
