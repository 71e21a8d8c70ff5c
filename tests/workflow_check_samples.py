# ruff: noqa: ASYNC210, ASYNC221, ASYNC230, ASYNC250, ASYNC251
"""Workflow functions read (never run) by tests/test_workflow_check.py.

They live in a file of their own so `inspect` can read their source, and
each one exercises one part of the determinism check.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import os.path
import random
import secrets
import socket
import subprocess
import threading
import time
import time as t
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from random import randint
from time import monotonic
from typing import Any

import mainspring as ms

cluster_app = ms.App("sqlite:///never-opened-by-the-check.db")


async def wall_clock(wf: Any, input: Any) -> Any:
    started = time.time()
    stamp = datetime.datetime.now()
    today = date.today()
    await asyncio.sleep(1)
    time.sleep(1)
    return started, stamp, today


async def aliased_imports(wf: Any, input: Any) -> Any:
    return t.time(), monotonic(), randint(1, 6)


async def randomness(wf: Any, input: Any) -> Any:
    return (
        random.random(),
        secrets.token_hex(8),
        uuid.uuid4(),
        uuid.uuid1(),
        os.urandom(8),
    )


async def io_and_environment(wf: Any, data: Any) -> Any:
    import httpx
    import requests

    with open("invoice.json") as f:
        body = f.read()
    home = os.environ["HOME"]
    subprocess.run(["true"], check=True)
    socket.socket()
    requests.get("https://example.com")
    httpx.get("https://example.com")
    urllib.request.urlopen("https://example.com")
    return body, home, os.listdir("."), input()


async def threads(wf: Any, input: Any) -> Any:
    threading.Thread(target=print).start()
    with ThreadPoolExecutor() as pool:
        pool.submit(print)
    return await asyncio.to_thread(print)


async def loop_clock(wf: Any, input: Any) -> Any:
    await asyncio.wait_for(wf.activity(print), 5)
    return await asyncio.wait([wf.activity(print)])


async def cluster(wf: Any, input: Any) -> Any:
    from mainspring import cluster as mc

    await app.kv.put("k", 1)  # type: ignore[name-defined]  # noqa: F821
    await cluster_app.registry.lookup("billing")
    await cluster_app.hub.send("sess-1", {})
    return cluster_app.groups.members("g"), mc.lookup("x")


async def nested(wf: Any, input: Any) -> Any:
    stamp = lambda: time.time()  # noqa: E731

    async def draw() -> float:
        return random.random()

    return stamp, draw, [uuid.uuid4() for _ in range(2)]


async def allowed(wf: Any, input: Any) -> Any:
    results = await asyncio.gather(*(wf.activity(print, c) for c in input["cards"]))
    await asyncio.shield(wf.sleep(60))

    def draw() -> float:
        return random.random()

    picked = wf.side_effect(draw)
    started = wf.side_effect(time.time)
    token = wf.side_effect(lambda: secrets.token_hex(8))
    time_ = wf.now()
    path = os.path.join("invoices", os.path.basename(input["file"]))
    print(urllib.parse.quote(path), wf.random(), wf.uuid4(), time_.isoformat())
    try:
        await wf.wait_signal("approved", timeout=86_400)
    except asyncio.CancelledError:
        await wf.activity(print)
        raise
    return results, picked, started, token, datetime.datetime(2026, 1, 1), uuid.uuid5


async def shadowed(wf: Any, time: Any) -> Any:
    random = wf.random
    return time.time(), random()


async def trusted(wf: Any, input: Any) -> Any:
    return random.Random(input["seed"]).random()  # mainspring: allow


def make_closure_workflow() -> Callable[..., Any]:
    import time as clock

    async def closure_workflow(wf: Any, input: Any) -> Any:
        return clock.monotonic()

    return closure_workflow


def passthrough(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        return await fn(*args)

    return wrapper


@passthrough
async def decorated(wf: Any, input: Any) -> Any:
    return time.time()
