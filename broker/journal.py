"""Durable writes with group commit.

Every decision's changes must be durable before its reply. Concurrent decisions hand their
changes to the journal; one writer takes everything queued, commits it in ONE transaction on a
dedicated database thread, then wakes every waiter. Under load this turns N fsyncs into one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from .model import Change

__all__ = ["ChangeSink", "Journal"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class ChangeSink(Protocol):
    def apply(self, changes: Sequence[Change]) -> None: ...


class Journal:
    def __init__(self, sink: ChangeSink, *, max_batch: int = 2048) -> None:
        self._sink = sink
        self._max_batch = max_batch
        self._pending: list[tuple[Sequence[Change], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentcg-db")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.changes = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal")

    async def run_in_db(self, fn: Callable[[], T]) -> T:
        """Run a read on the database thread (ordered after every write queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn)

    async def commit(self, changes: Sequence[Change]) -> None:
        """Return once ``changes`` are durable; raise the sink's error if the batch failed."""
        if changes:
            await self.submit(changes)

    def submit(self, changes: Sequence[Change]) -> asyncio.Future[None]:
        """Queue ``changes``; the future resolves once they are durable (or fails with the
        sink's error). Cancelling the future does not withdraw the changes."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not changes:
            fut.set_result(None)
            return fut
        self._pending.append((changes, fut))
        self._wakeup.set()
        return fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                flat: list[Change] = [c for changes, _ in batch for c in changes]
                try:
                    await loop.run_in_executor(self._db, self._sink.apply, flat)
                except Exception as exc:  # noqa: BLE001 - handed to the waiters
                    log.error("journal: commit of %d changes failed: %s", len(flat), exc)
                    if len(batch) > 1:
                        # One caller's bad change must not fail the others: commit each alone.
                        for changes, fut in batch:
                            try:
                                await loop.run_in_executor(self._db, self._sink.apply, changes)
                            except Exception as one:  # noqa: BLE001
                                if not fut.done():
                                    fut.set_exception(one)
                            else:
                                if not fut.done():
                                    fut.set_result(None)
                        continue
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                self.changes += len(flat)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    async def close(self) -> None:
        if self._task is not None:
            # Let queued commits finish first.
            while self._pending:
                await asyncio.sleep(0.005)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._db.shutdown(wait=True)
