"""A process hammering the global limiter (for tests/test_limiter_processes.py).

Environment: MS_URL, MS_RECORDS (JSON-lines file), MS_MODE ("bucket" or "slots"),
MS_SECONDS. Every granted check and every held slot is one appended line.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import mainspring as ms

RATE, BURST, SLOTS = 40, 10, 3


def build(url: str) -> ms.App:
    app = ms.App(url)
    app.rate_limits.configure("shared", allowed=RATE, period=1, burst=BURST)
    app.limiter.semaphore("sem", slots=SLOTS, lease=5)
    return app


def record(path: str, **line: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


async def main() -> None:
    app = build(os.environ["MS_URL"])
    path, mode = os.environ["MS_RECORDS"], os.environ["MS_MODE"]
    until = float(os.environ["MS_UNTIL"])
    while time.time() < float(os.environ["MS_START"]):
        await asyncio.sleep(0.005)
    while time.time() < until:
        if mode == "bucket":
            check = await app.limiter.check_async("shared")
            if check.allowed:
                record(path, event="granted", at=time.time(), pid=os.getpid())
                await asyncio.sleep(0.002)  # a caller does some work between calls
            else:
                await asyncio.sleep(min(check.retry_after, 0.02))
        else:
            async with app.limiter.slot("sem") as slot:
                began = time.time()
                await asyncio.sleep(0.01)
                record(path, event="held", slot=slot.slot, start=began, end=time.time())
    await app.aclose()


if __name__ == "__main__":
    asyncio.run(main())
