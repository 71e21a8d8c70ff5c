"""Run ids: valid UUIDv7, ordered within a process, deterministic per periodic tick."""

from __future__ import annotations

import uuid

from mainspring.ids import uuid7, uuid7_for


def test_ids_are_version_7_and_sort_in_creation_order() -> None:
    ids = [uuid7() for _ in range(20_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_tick_ids_are_the_same_on_every_node_and_differ_by_tick_and_name() -> None:
    a = uuid7_for(1_700_000_000.0, "periodic", "report")
    assert a == uuid7_for(1_700_000_000.0, "periodic", "report")
    assert a != uuid7_for(1_700_000_060.0, "periodic", "report")
    assert a != uuid7_for(1_700_000_000.0, "periodic", "cleanup")
    assert uuid.UUID(a).version == 7
