"""The database writer in its own process (the broker's default).

The group commit itself is the journal's (journal.py). Run on a thread of the broker's process,
that thread needs the GIL after every SQLite statement it steps and for the rows it builds, and
it waits for it behind the event loop: at 1,000 Reserve/s a commit took 0.74 ms against 0.37 ms
with an idle loop, with the same statements (see ``agentcg bench admission``). Here the commit
runs in a child process with an interpreter of its own; the event loop hands it a pickled frame
per loop round over a pipe and reads the outcome back on the same loop (``add_reader``), with
no thread hop and no GIL shared with the writer.

Protocol (both ways, a 4-byte big-endian length then a pickle):
- parent -> child: first ``{"url": ..., "log_level": ..., "epoch": ...}`` (never on the command
  line: the URL may hold a password; ``epoch``: ``Store.fence``), then ``(seq, hold_s,
  [changes, ...])``, one group per submission of the round;
- child -> parent: first ``("ready", frozen)`` once the database is open (``frozen``: the
  start-up objects it moved out of the cycle collector's way, ``agentcg.heap``), then per commit
  ``(seconds, held, [(seq, None | [error | None per group]), ...])``: None when all of a frame's
  groups committed, else each group's error as ``(kind, message)``.

The child reads every frame waiting on its pipe and commits them in one transaction (up to
``MAX_GROUPS`` submissions); a failing batch is retried one submission at a time so that one
caller's bad change fails only that caller. It exits when its stdin closes (the broker closed
the journal) and is killed with its parent (``PR_SET_PDEATHSIG``): after a SIGKILL of the
broker no writer outlives it into the next broker's database. If the child dies, what it had
not acknowledged fails with ``StoreError`` (the decisions are undone in memory; they may or may
not be in the database, as for any commit whose reply was lost), and a new child is started
a second later, off the event loop (until it is ready, submissions fail at once).

Load-aware hold. A commit's cost is mostly fixed (the WAL write and its fdatasync): on 2 cores,
one of 2 decisions cost 269-332 us of CPU against 496-573 us for 16, and that CPU is taken from
the event loop. While the loop has time to spare, the child commits what has arrived at once.
Once the loop is saturated (the journal's ``saturated``), the parent sends ``hold_s``
(``--commit-hold-ms``) with each frame, and the child waits up to that long after a batch's
first frame for ``HOLD_CHANGES`` changes before it commits. Replies then wait up to ``hold_s``
longer, less than a saturated broker's queues already add, and each commit carries several
times the decisions (measured: ~10 instead of ~2, and a quarter more Reserve+Release/s).
"""

from __future__ import annotations

import asyncio
import copyreg
import ctypes
import dataclasses
import fcntl
import io
import logging
import operator
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agentcg.heap import freeze_start_up

from .journal import ChangeSink, Journal, _settle_all, apply_groups
from .metrics import BrokerMetrics
from .model import AuditEntry, Change, Lease, Node, Tenant
from .store import Store, StoreError, StoreFenced, StoreIntegrityError

__all__ = ["ProcessJournal", "main", "spawn", "stop"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_GROUPS = 2048  # submissions per transaction, as the thread journal's ``max_batch``
_LEN = 4
_READ = 1 << 16
_START_TIMEOUT_S = 60.0
_PIPE_BYTES = 1 << 20
HOLD_CHANGES = 64


def _reducer(cls: type, names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    get = operator.attrgetter(*names)
    if len(names) == 1:
        return lambda x: (cls, (get(x),))
    return lambda x: (cls, get(x))


def _reducers() -> dict[type, Any]:
    """Pickle the domain records as their class and field values, rebuilt by their constructor.
    The default for a frozen slots dataclass (``__getstate__``/``__setstate__`` walking
    ``dataclasses.fields`` per object) was half of the writer's CPU under ReserveBatch load; this
    is a quarter of that cost both ways (measured: 500 decisions, 1.47 -> 0.33 ms to pickle,
    1.21 -> 0.37 ms to unpickle)."""
    table: dict[type, Any] = dict(copyreg.dispatch_table)
    for cls in (Tenant, Node, Lease, AuditEntry, *typing.get_args(Change)):
        table[cls] = _reducer(cls, [f.name for f in dataclasses.fields(cls)])
    return table


_DISPATCH = _reducers()


def frame(obj: object) -> bytes:
    out = io.BytesIO()
    out.write(b"\0" * _LEN)
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(obj)
    data = out.getbuffer()
    data[:_LEN] = (len(data) - _LEN).to_bytes(_LEN, "big")
    del data
    return out.getvalue()


class FrameReader:
    """Splits a byte stream into the objects ``frame`` wrote."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        buf = self._buf
        start = 0
        while len(buf) - start >= _LEN:
            size = int.from_bytes(buf[start : start + _LEN], "big")
            end = start + _LEN + size
            if len(buf) < end:
                break
            out.append(pickle.loads(buf[start + _LEN : end]))
            start = end
        if start:
            del buf[:start]
        return out


_KINDS: dict[str, type[StoreError | StoreIntegrityError]] = {
    "integrity": StoreIntegrityError,
    "fenced": StoreFenced,
    "store": StoreError,
}


def _error_of(exc: BaseException) -> tuple[str, str]:
    for kind, cls in _KINDS.items():  # the most specific first
        if isinstance(exc, cls):
            return kind, str(exc)
    return "store", f"{type(exc).__name__}: {exc}"


def _exception(kind: str, message: str) -> StoreError | StoreIntegrityError:
    return _KINDS.get(kind, StoreError)(message)


# -- the child --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _widen(fd: int) -> None:
    """Give a pipe 1 MiB (Linux's default most for anyone): a frame of a 500-decision batch is
    ~67 kB, over the default 64 kB, and a round's frame may hold several batches; each write
    that did not fit waited for the loop to see the pipe writable again."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:  # a lower /proc/sys/fs/pipe-max-size: keep the default
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(fd_in: int, fd_out: int, sink: ChangeSink, reader: FrameReader) -> None:
    """Commit the frames read from ``fd_in`` (``reader`` holds what was read of it so far)
    until it closes; report each commit on ``fd_out``."""
    eof = False
    while not eof:
        frames: list[tuple[int, list[Sequence[Change]]]] = []
        groups = changes = 0
        hold = first = 0.0
        held = False
        while not eof and groups < MAX_GROUPS:
            if frames:
                wait = 0.0
                if hold and changes < HOLD_CHANGES:
                    wait = max(0.0, first + hold - time.perf_counter())
                    held = held or wait > 0
                if not select.select([fd_in], [], [], wait)[0]:
                    break  # commit what has arrived; what comes next waits for the next commit
            data = os.read(fd_in, _READ)
            if not data:
                eof = True
                break
            if not frames:
                first = time.perf_counter()
            for seq, frame_hold, frame_groups in reader.feed(data):
                frames.append((seq, frame_groups))
                groups += len(frame_groups)
                changes += sum(len(g) for g in frame_groups)
                hold = frame_hold  # the newest frame's word
        if not frames:
            break
        started = time.perf_counter()
        errors = apply_groups(sink, [g for _, frame_groups in frames for g in frame_groups])
        seconds = time.perf_counter() - started
        results: list[tuple[int, list[tuple[str, str] | None] | None]] = []
        k = 0
        for seq, frame_groups in frames:
            mine = errors[k : k + len(frame_groups)]
            k += len(frame_groups)
            if any(e is not None for e in mine):
                results.append((seq, [None if e is None else _error_of(e) for e in mine]))
            else:
                results.append((seq, None))
        _write_all(fd_out, frame((seconds, held, results)))


def main() -> int:
    _die_with_parent()
    # The protocol pipe gets a descriptor of its own and fd 1 becomes stderr: a stray print
    # (a library's, say) must not land in the middle of a frame.
    fd_in, fd_out = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    reader = FrameReader()
    config: dict[str, Any] | None = None
    while config is None:
        data = os.read(fd_in, _READ)
        if not data:
            return 0
        got = reader.feed(data)
        if got:
            config = got[0]
    logging.basicConfig(
        level=getattr(logging, config.get("log_level", "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.get("cpu") is not None:
        os.sched_setaffinity(0, {config["cpu"]})  # before the store starts its threads
    store = Store(config["url"])
    if config.get("epoch") is not None:
        store.fence(config["epoch"])
    try:
        store.open_writer()
        # Its imports (SQLAlchemy, Alembic) are ~81,000 objects: a 33 ms full collection,
        # during which no commit runs (agentcg.heap).
        frozen = freeze_start_up()
        _write_all(fd_out, frame(("ready", frozen)))
        serve(fd_in, fd_out, store, reader)
    finally:
        store.close()
    return 0


# -- the parent -------------------------------------------------------------------------------


COMMAND = (sys.executable, "-m", "agentcg.broker.writer")


def spawn(command: Sequence[str] = COMMAND, fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start a writer process. It does its imports (~0.7 s here), then waits for its
    configuration: one started ahead, while the broker stands by or loads its state, is ready
    soon after ``ProcessJournal.start`` hands it that. Always from the event loop's thread:
    ``PR_SET_PDEATHSIG`` fires when the thread that started the child exits, not only the
    process. ``fds``: descriptors it keeps open as long as it lives (the SQLite leadership
    lock's, leadership.FileLock). ``stop`` ends one nothing took (or one already stopped: a
    no-op)."""
    return subprocess.Popen(
        list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=tuple(fds)
    )


class _Ready(typing.NamedTuple):
    """A writer process that reported ready."""

    proc: subprocess.Popen[bytes]
    frozen_objects: int  # its start-up objects moved out of the cycle collector's way


class ProcessJournal(Journal):
    """A journal whose group commits run in a child process (see the module docstring).

    ``store`` is the broker's own store, used here for reads only (``run_in_db``, on one
    thread, after every write submitted before the read is durable); ``url`` is the database
    the child opens for writing. ``hold_s``: how long a commit may be held while the loop is
    saturated (0: never); ``busy_clock``: seconds the loop has been busy, cumulative."""

    def __init__(
        self,
        store: Store,
        url: str,
        *,
        log_level: str = "INFO",
        metrics: BrokerMetrics | None = None,
        hold_s: float = 0.002,
        busy_clock: Callable[[], float] = time.thread_time,
        command: Sequence[str] = COMMAND,
        cpu: int | None = None,
        started: subprocess.Popen[bytes] | None = None,
        epoch: int | None = None,
        fds: Sequence[int] = (),
    ) -> None:
        super().__init__(store, metrics=metrics, busy_clock=busy_clock)
        self._hold_s = hold_s
        self._url = url
        self._command = list(command)
        self._log_level = log_level
        self._cpu = cpu  # the writer process's only CPU (None: any)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader = FrameReader()
        self._out = bytearray()  # not yet taken by the pipe
        self._seq = 0
        self._pending: dict[int, list[tuple[int, asyncio.Future[None]]]] = {}
        self._last: asyncio.Future[None] | None = None  # of the newest submission
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="agentcg-db-read")
        self._closing = False
        self._restarting = False
        # A restart's child, from its start until it is ready (or failed): close() kills it.
        self._launching: subprocess.Popen[bytes] | None = None
        self._started = started  # a writer started ahead (``spawn``): the first one to use
        self._epoch = epoch  # the writer commits only while it leads (``Store.fence``)
        self._fds = tuple(fds)  # every writer holds these (``spawn``)
        self.restarts = 0
        self.writer_frozen_objects = 0  # the running writer's, as it reported when ready; 0: none

    @property
    def writer_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the writer and wait (blocking, at start-up) until its database is open."""
        self._loop = asyncio.get_running_loop()
        started, self._started = self._started, None
        if started is not None and started.poll() is None:
            self._launching = started
        else:
            if started is not None:  # it died waiting
                stop(started)
            started = self._spawn()
        self._attach(self._handshake(started))
        self._start_sampling()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = spawn(self._command, self._fds)
        self._launching = proc
        return proc

    def _handshake(self, proc: subprocess.Popen[bytes]) -> _Ready:
        """Send the writer its configuration and wait until its database is open (blocking: at
        start-up on the loop, at a restart on another thread)."""
        assert proc.stdin is not None and proc.stdout is not None
        try:
            config = {
                "url": self._url,
                "log_level": self._log_level,
                "cpu": self._cpu,
                "epoch": self._epoch,
            }
            _write_all(proc.stdin.fileno(), frame(config))
            frozen = self._await_ready(proc, proc.stdout.fileno())
        except BaseException:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()
            raise
        finally:
            self._launching = None
        return _Ready(proc, frozen)

    def _attach(self, ready: _Ready) -> None:
        """Make a ready writer the one commits go to (on the loop)."""
        proc = ready.proc
        assert proc.stdin is not None and proc.stdout is not None and self._loop is not None
        for fd in (proc.stdin.fileno(), proc.stdout.fileno()):
            os.set_blocking(fd, False)
            _widen(fd)
        self._proc = proc
        self._reader = FrameReader()
        self._loop.add_reader(proc.stdout.fileno(), self._on_readable)
        self.writer_frozen_objects = ready.frozen_objects
        log.info(
            "database writer process %d started (%d start-up objects frozen)",
            proc.pid,
            ready.frozen_objects,
        )

    def _await_ready(self, proc: subprocess.Popen[bytes], fd: int) -> int:
        """The writer's start-up objects frozen, once it reports ready."""
        reader = FrameReader()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise StoreError(f"database writer process not ready in {_START_TIMEOUT_S:.0f} s")
            data = os.read(fd, _READ)
            if not data:
                code = proc.wait()
                raise StoreError(
                    f"database writer process exited with {code} before it was ready "
                    "(its error is in the broker's log)"
                )
            for message in reader.feed(data):
                if isinstance(message, tuple) and message[0] == "ready":
                    return int(message[1])

    # -- writes --

    def submit(self, changes: Sequence[Change]) -> asyncio.Future[None]:
        fut = super().submit(changes)
        if changes:
            self._last = fut
        return fut

    def _flush(self) -> None:
        if not self._round:
            return
        batch, self._round = self._round, []
        if self._proc is None:
            exc = StoreError("database writer process is not running")
            _settle_all([(fut, exc) for _, fut in batch])
            self._restart_soon()
            return
        self._seq += 1
        self._pending[self._seq] = [(len(changes), fut) for changes, fut in batch]
        hold = self._hold_s if self.saturated else 0.0
        self._send(frame((self._seq, hold, [list(changes) for changes, _ in batch])))

    def _send(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        if not self._out:
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:  # the child is gone; its end of the pipe is read as EOF
                return
            data = data[sent:]
            if not data:
                return
            assert self._loop is not None
            self._loop.add_writer(fd, self._on_writable)
        self._out += data

    def _on_writable(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        try:
            sent = os.write(fd, self._out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._out)
        del self._out[:sent]
        if not self._out:
            assert self._loop is not None
            self._loop.remove_writer(fd)

    def _on_readable(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            data = os.read(self._proc.stdout.fileno(), _READ)
        except BlockingIOError:
            return
        if not data:
            self._lost()
            return
        for seconds, held, results in self._reader.feed(data):
            if held:
                self._metrics.commits_held.inc()
            settled: list[tuple[asyncio.Future[None], BaseException | None]] = []
            groups = 0
            failed = False
            for seq, errors in results:
                waiting = self._pending.pop(seq)
                groups += len(waiting)
                for k, (count, fut) in enumerate(waiting):
                    error = None if errors is None else errors[k]
                    if error is None:
                        self.changes += count
                        settled.append((fut, None))
                    else:
                        failed = True
                        settled.append((fut, _exception(*error)))
            if failed:
                self._metrics.commit_failures.inc()
            else:
                self._metrics.commit(seconds, groups)
                self.batches += 1
            _settle_all(settled)

    def _lost(self) -> None:
        """The child exited: fail what it had not acknowledged, then start another one."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None and proc.stdin is not None
        assert self._loop is not None
        self._loop.remove_reader(proc.stdout.fileno())
        if self._out:
            self._loop.remove_writer(proc.stdin.fileno())
            self._out.clear()
        code = proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        self._proc = None
        self.writer_frozen_objects = 0
        exc = StoreError(f"database writer process exited with {code}")
        failed: list[tuple[asyncio.Future[None], BaseException | None]] = [
            (fut, exc) for waiting in self._pending.values() for _, fut in waiting
        ]
        self._pending.clear()
        if failed:
            self._metrics.commit_failures.inc()
        _settle_all(failed)
        if not self._closing:
            self._metrics.writer_exits.inc()
            log.error(
                "database writer process exited with %s; %d pending changes failed",
                code,
                len(failed),
            )
            self._restart_soon()

    def _restart_soon(self) -> None:
        """Start a new writer in 1 s. Its start-up (a new interpreter, the database opened) runs
        on a thread, so that the loop keeps serving meanwhile; what is submitted until it is
        ready fails at once with ``StoreError``, as while no writer runs."""
        assert self._loop is not None
        if self._closing or self._restarting:
            return
        self._restarting = True
        loop = self._loop

        def launched(done: asyncio.Future[_Ready]) -> None:
            self._restarting = False
            if done.cancelled():
                return
            exc = done.exception()
            if exc is None and self._closing:
                stop(done.result().proc)
            elif exc is None:
                self._attach(done.result())
                self.restarts += 1
                self._metrics.writer_restarts.inc()
            elif not self._closing:
                log.error("database writer process could not be restarted: %s", exc)
                self._restart_soon()

        def restart() -> None:
            if self._closing:
                self._restarting = False
                return
            try:
                proc = self._spawn()
            except OSError as e:
                self._restarting = False
                log.error("database writer process could not be restarted: %s", e)
                self._restart_soon()
                return
            loop.run_in_executor(None, self._handshake, proc).add_done_callback(launched)

        loop.call_later(1.0, restart)

    # -- reads --

    async def run_in_db(self, fn: Callable[[], T]) -> T:
        """Run a read on the read thread, once every write submitted before it is durable."""
        self._flush()
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn)

    async def close(self) -> None:
        """Finish every submitted write, then stop the writer process and the read thread."""
        self._flush()
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])
        self._closing = True
        self._stop_sampling()
        launching = self._launching
        if launching is not None:  # a restart's writer not ready yet: its launch fails now
            launching.kill()
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None and proc.stdout is not None and self._loop is not None
            self._loop.remove_reader(proc.stdout.fileno())
            proc.stdin.close()  # EOF: the child finishes and exits
            await self._loop.run_in_executor(None, proc.wait)
            proc.stdout.close()
            self._proc = None
        self.writer_frozen_objects = 0
        self._reads.shutdown(wait=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()  # EOF: a writer exits (ready, or waiting for its configuration)
    proc.wait()
    proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
