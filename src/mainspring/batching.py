"""Group commit for enqueues: concurrent enqueues of one process share one INSERT.

Each durable INSERT waits for the database's fsync. When many coroutines (or
threads, through the sync client) enqueue at once, the ones that arrive while
an INSERT is in flight are written together by the next one, so throughput
grows with concurrency instead of being capped at one fsync per run. A lone
enqueue is written at once: no timer, no added latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mainspring.run import NewRun
from mainspring.store.base import Store


class InsertBatcher:
    """Writes the runs of concurrent `insert` calls in as few statements as possible."""

    def __init__(self, store: Store, max_batch: int = 5000) -> None:
        self.store = store
        self.max_batch = max_batch
        self._lock = asyncio.Lock()
        self._pending: list[tuple[Sequence[NewRun], asyncio.Future[dict[str, str]]]] = []

    async def insert(self, runs: Sequence[NewRun]) -> dict[str, str]:
        """Insert runs, maybe with other callers'; returns {requested id: actual id}."""
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._pending.append((runs, future))
        async with self._lock:
            if not future.done():
                await self._flush()
        return future.result()

    async def _flush(self) -> None:
        batch: list[tuple[Sequence[NewRun], asyncio.Future[dict[str, str]]]] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
            entry = self._pending.pop(0)
            batch.append(entry)
            size += len(entry[0])
        try:
            result = await self.store.insert_runs([run for runs, _ in batch for run in runs])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _, future in batch:
            if not future.done():
                future.set_result(result)
