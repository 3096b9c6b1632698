"""Durable writes with group commit.

Every decision's changes must be durable before its reply. Concurrent decisions hand their
changes to the journal; one database thread takes everything queued, commits it in ONE
transaction, then wakes every waiter with one hop back to the event loop. Under load this turns
N fsyncs into one; at low load a lone change costs one queue put and one loop wake-up (no
executor).

Hand-offs to the database thread happen once per event-loop round, not once per decision: the
changes submitted while the loop works through its ready callbacks (every RPC whose data came in
together) are put on the queue as one item at the end of that round. A put per decision woke
the database thread for the first one, which then took the GIL back from the loop mid-round and
committed a batch of one or two while the rest of the round's decisions waited for the next.

The journal also samples how busy the event loop is (``busy_clock``, every ``SAMPLE_S``): the
loop is ``saturated`` from ``BUSY`` of a window on, until it falls under ``IDLE``. The writer
process holds commits for more decisions while it is (writer.py); the gauge
``loop_busy_ratio`` shows it with either writer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .metrics import BrokerMetrics
from .model import Change

__all__ = ["ChangeSink", "Journal", "apply_groups"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()
SAMPLE_S = 0.05
BUSY = 0.9  # the loop's busy share from which it counts as saturated ...
IDLE = 0.75  # ... until it falls under this


class ChangeSink(Protocol):
    def apply(self, changes: Sequence[Change]) -> None: ...


class _Read:
    __slots__ = ("fn", "fut")

    def __init__(self, fn: Callable[[], Any], fut: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.fut = fut


class Journal:
    def __init__(
        self,
        sink: ChangeSink,
        *,
        max_batch: int = 2048,
        metrics: BrokerMetrics | None = None,
        busy_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        """``busy_clock``: seconds the event loop has been busy, cumulative (the default, the
        loop thread's CPU time, misses the time it waited for a CPU; the broker's
        ``TimedSelector.busy_s`` does not)."""
        self._sink = sink
        self._max_batch = max_batch
        self._metrics = metrics or BrokerMetrics()
        # (changes, future) to write, _Read to run, or _STOP; FIFO, so a read runs after every
        # write queued before it.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.changes = 0
        # Submitted this loop round, put on the queue by _flush at its end.
        self._round: list[tuple[Sequence[Change], asyncio.Future[None]]] = []
        self._busy_clock = busy_clock
        self._sampled = (0.0, 0.0)  # (monotonic, busy_clock()) at the last sample
        self._sampler: asyncio.TimerHandle | None = None
        self.saturated = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="agentcg-db", daemon=True)
        self._thread.start()
        self._start_sampling()

    def _start_sampling(self) -> None:
        assert self._loop is not None
        self._sampled = (time.monotonic(), self._busy_clock())
        self._sampler = self._loop.call_later(SAMPLE_S, self._sample)

    def _sample(self) -> None:
        """How busy the loop was since the last sample: the gauge, and ``saturated``."""
        assert self._loop is not None
        now, busy_s = time.monotonic(), self._busy_clock()
        busy = (busy_s - self._sampled[1]) / max(1e-9, now - self._sampled[0])
        self._sampled = (now, busy_s)
        self._metrics.loop_busy.set(busy)
        if busy >= BUSY:
            self.saturated = True
        elif busy < IDLE:
            self.saturated = False
        self._sampler = self._loop.call_later(SAMPLE_S, self._sample)

    def _stop_sampling(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None

    async def run_in_db(self, fn: Callable[[], T]) -> T:
        """Run a read on the database thread (ordered after every write queued before it)."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._flush()  # after the writes submitted before it
        self._queue.put(_Read(fn, fut))
        return await fut

    async def commit(self, changes: Sequence[Change]) -> None:
        """Return once ``changes`` are durable; raise the sink's error if the batch failed."""
        if changes:
            await self.submit(changes)

    def submit(self, changes: Sequence[Change]) -> asyncio.Future[None]:
        """Queue ``changes``; the future resolves once they are durable (or fails with the
        sink's error). Cancelling the future does not withdraw the changes."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if not changes:
            fut.set_result(None)
            return fut
        if not self._round:
            loop.call_soon(self._flush)
        self._round.append((changes, fut))
        return fut

    def _flush(self) -> None:
        if self._round:
            self._queue.put(self._round)
            self._round = []

    # -- the database thread -------------------------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is _STOP:
                return
            if isinstance(item, _Read):
                self._read(item)
                continue
            batch = list(item)  # one loop round's submissions
            pending: Any = None
            while len(batch) < self._max_batch:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or isinstance(nxt, _Read):
                    pending = nxt  # after this batch, in order
                    break
                batch.extend(nxt)
            self._write(batch)
            if pending is _STOP:
                return
            if pending is not None:
                self._read(pending)

    def _write(self, batch: list[tuple[Sequence[Change], asyncio.Future[None]]]) -> None:
        started = time.perf_counter()
        errors = apply_groups(self._sink, [changes for changes, _ in batch])
        if any(e is not None for e in errors):
            self._metrics.commit_failures.inc()
        else:
            self._metrics.commit(time.perf_counter() - started, len(batch))
            self.batches += 1
            self.changes += sum(len(changes) for changes, _ in batch)
        self._settle([(fut, exc) for (_, fut), exc in zip(batch, errors, strict=True)])

    def _read(self, item: _Read) -> None:
        try:
            value = item.fn()
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            self._call_soon(_fail, item.fut, exc)
        else:
            self._call_soon(_succeed, item.fut, value)

    def _settle(self, results: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
        self._call_soon(_settle_all, results)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    async def close(self) -> None:
        """Finish every queued write and read, then stop the database thread."""
        self._stop_sampling()
        if self._thread is not None:
            self._flush()
            self._queue.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            await asyncio.sleep(0)  # let the last settlements run
            self._thread = None


def apply_groups(sink: ChangeSink, groups: Sequence[Sequence[Change]]) -> list[Exception | None]:
    """Commit ``groups`` (one per submission) in one transaction; if that fails, commit each
    alone, so that one caller's bad change fails only that caller. Each group's error or None.
    """
    try:
        sink.apply([c for changes in groups for c in changes])
    except Exception as exc:  # noqa: BLE001 - handed to the waiters
        log.error("journal: commit of %d submissions failed: %s", len(groups), exc)
        if len(groups) == 1:
            return [exc]
    else:
        return [None] * len(groups)
    errors: list[Exception | None] = []
    for changes in groups:
        try:
            sink.apply(changes)
        except Exception as one:  # noqa: BLE001
            errors.append(one)
        else:
            errors.append(None)
    return errors


def _settle_all(results: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for fut, exc in results:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _succeed(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
