"""Run ids: UUIDv7 strings made by the client, so a handle exists before the database answers.

UUIDv7 sorts by creation time, which keeps the primary-key index append-mostly
and lets listings page by id.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

_lock = threading.Lock()
_last = [0, 0]  # last unix ms, last 12-bit counter
_buffer = b""
_offset = 0


def _format(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _v7(unix_ms: int, random80: int) -> str:
    rand_a = (random80 >> 62) & 0xFFF
    rand_b = random80 & ((1 << 62) - 1)
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= rand_a << 64
    value |= 0b10 << 62
    value |= rand_b
    return _format(value)


def uuid7() -> str:
    """A new UUIDv7 (RFC 9562): ids made by one process sort in the order they were made.

    Within one millisecond the 12-bit rand_a field counts up (RFC 9562 method 1).
    Random bits come from os.urandom, read 4 KiB at a time (one system call per
    400 ids, not one per id: enqueue makes an id per run).
    """
    global _buffer, _offset
    with _lock:
        if _offset + 10 > len(_buffer):
            _buffer, _offset = os.urandom(4000), 0
        rand = int.from_bytes(_buffer[_offset : _offset + 10], "big")
        _offset += 10
        now = time.time_ns() // 1_000_000
        if now <= _last[0]:
            now, counter = _last[0], _last[1] + 1
            if counter > 0xFFF:
                now, counter = now + 1, 0
        else:
            counter = (rand >> 62) & 0x7FF  # random start, leaving room to count up
        _last[0], _last[1] = now, counter
    h = "%032x" % (
        ((now & 0xFFFFFFFFFFFF) << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62)
        | (rand & 0x3FFFFFFFFFFFFFFF)
    )  # fmt: skip
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_for(unix_seconds: float, *parts: str) -> str:
    """A deterministic UUIDv7 for a moment and a key.

    Every node computes the same id for the same (moment, key), so an insert
    of it is idempotent across the cluster (periodic ticks use this).
    """
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=10).digest()
    return _v7(int(unix_seconds * 1000), int.from_bytes(digest, "big"))
