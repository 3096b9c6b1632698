"""One serving broker per database; the others stand by.

A broker admits against the quota tree and the active leases it holds in memory (ledger.py),
loaded from the database when it starts. Two brokers serving one database would each admit up
to every quota, and neither would see the other's tenants. So a broker takes the database's
leadership lock before it loads its state, and holds it for as long as it serves:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection of its
  own, keyed by the database and the schema (two deployments in two schemas do not exclude each
  other). The server frees it when that session ends: the broker died, or its connection was
  cut.
- SQLite: ``flock`` on ``<database file>.lock``, held by the broker and its writer process;
  the kernel frees it once both have exited.
- An in-memory SQLite database is the process's own: no lock.

A broker that finds the lock held stands by. It does not listen: a load balancer, or a gRPC
client given every broker's address (``ipv4:A:port,B:port``), goes to the one that does. It
tries the lock again every ``RETRY_S`` and serves its metrics with ``agentcg_broker_leader`` 0.
Once it holds the lock it loads the state at once, and sees everything the previous leader
committed: no commit of that leader's can follow the load (SQLite: the lock outlives its
writer process; PostgreSQL: the epoch, below).

PostgreSQL's lock can be lost while the broker that held it lives on (its connection was cut,
or the process was frozen): that broker does not know yet, and its writer may still commit.
So there the broker also takes the database's leadership epoch before it loads the state
(``Store.lead``: one more than the last leader's) and its writer commits only while the epoch
is still its own (``Store.fence``: every write transaction reads it ``FOR SHARE`` first). An
old leader's commit then either ends before the new leader loads, or fails: a fencing token,
not a wait long enough for the old leader to have noticed.

Losing the lock is fail-stop, as in Kubernetes' leader election: a broker whose lock connection
fails its check (every ``CHECK_S``, answered within ``CHECK_TIMEOUT_S``; ``Watchdog``, on
threads of its own, not on the event loop) exits at once with ``LOST_EXIT_CODE``, and its
writer process with it (``PR_SET_PDEATHSIG``, writer.py); its supervisor starts it again, as a
standby. Until it has exited its commits fail (the epoch), and so its decisions.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url

from .store import Store, StoreError, create_store_engine

__all__ = ["LOST_EXIT_CODE", "LeaderLock", "Watchdog", "acquire", "lock_for"]

log = logging.getLogger(__name__)

RETRY_S = 0.1  # a standby's tries: a try_advisory_lock round trip, or a flock, each
CHECK_S = 0.5
CHECK_TIMEOUT_S = 1.0
LOST_EXIT_CODE = 3


class LeaderLock(Protocol):
    watched: bool  # can be lost while this process lives: check it (Watchdog)

    def describe(self) -> str: ...
    def try_acquire(self) -> bool: ...
    def check(self) -> None:
        """Raise if the lock may no longer be held."""

    def child_fds(self) -> tuple[int, ...]:
        """Descriptors to hand the broker's writer process: while it holds them the lock stays
        held, even once the broker itself has died."""

    def close(self) -> None: ...


class FileLock:
    """``flock`` on a file next to the SQLite database. The lock belongs to the open file, and
    the broker's writer process holds that file too (``child_fds``): the kernel frees the lock
    once both have exited, so no commit of an old leader's can follow a new leader's load."""

    watched = False

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"take the leadership lock: cannot open {path}: {e.strerror}") from e

    def describe(self) -> str:
        return str(self.path)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def check(self) -> None:
        pass  # held until this process closes it or exits

    def child_fds(self) -> tuple[int, ...]:
        return (self._fd,)

    def close(self) -> None:
        os.close(self._fd)


class AdvisoryLock:
    """A PostgreSQL session advisory lock on a connection of its own (autocommit: it never
    holds a transaction open)."""

    watched = True
    KEY = "hashtextextended('agentcg-broker:' || current_database() || ':' || current_schema(), 0)"

    def __init__(self, url: str) -> None:
        self._engine = create_store_engine(url)
        self._shown = make_url(url).render_as_string(hide_password=True).split("@")[-1]
        self._conn: Any = None
        self._reached = False  # the database answered once
        self._unreachable = False  # since the last try: logged once per outage

    def describe(self) -> str:
        return f"the advisory lock of {self._shown}"

    def _cursor(self) -> Any:
        if self._conn is None:
            raw = self._engine.raw_connection()
            raw.driver_connection.autocommit = True  # type: ignore[union-attr]
            # Named after this process: an operator (or a test) can find the lock's session.
            raw.driver_connection.execute(  # type: ignore[union-attr]
                f"SET application_name = 'agentcg-broker-leader-{os.getpid()}'"
            )
            self._conn = raw
        return self._conn.cursor()

    def try_acquire(self) -> bool:
        try:
            cur = self._cursor()
            cur.execute(f"SELECT pg_try_advisory_lock({self.KEY})")
            held = bool(cur.fetchone()[0])
        except (sa_exc.DBAPIError, self._engine.dialect.loaded_dbapi.Error) as e:
            self._drop()
            reason = getattr(e, "orig", None) or e
            if not self._reached:  # a wrong URL or a database down at start: say so and stop
                raise StoreError(
                    f"take the leadership lock: database {self._shown} unavailable: {reason}"
                ) from e
            # It was there: a standby waits it out (a new connection at the next try).
            if not self._unreachable:
                log.warning("leadership lock: database %s unreachable: %s", self._shown, reason)
                self._unreachable = True
            return False
        if self._unreachable:
            log.warning("leadership lock: database %s reachable again", self._shown)
            self._unreachable = False
        self._reached = True
        return held

    def child_fds(self) -> tuple[int, ...]:
        return ()  # a server session: the epoch fences the writer instead (Store.fence)

    def check(self) -> None:
        # The same session still there (a lost one would have freed the lock): a round trip on
        # it, never a reconnect.
        assert self._conn is not None
        cur = self._conn.cursor()
        cur.execute("SELECT 1")
        cur.fetchone()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
            except Exception:  # noqa: BLE001 - gone anyway
                pass
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - the session ends with it either way
                log.debug("closing the leadership connection failed", exc_info=True)
            self._conn = None
        self._engine.dispose()


def lock_for(url: str) -> LeaderLock | None:
    """The leadership lock of the database at ``url``; None for an in-memory SQLite one."""
    if Store.in_memory(url):
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        return FileLock(Path(f"{parsed.database}.lock"))
    return AdvisoryLock(url)


async def acquire(lock: LeaderLock, on_standby: Callable[[], None] | None = None) -> None:
    """Wait until this broker holds ``lock``; ``on_standby`` runs once if it has to wait."""
    standing_by = False
    while not await asyncio.to_thread(lock.try_acquire):
        if not standing_by:
            standing_by = True
            log.warning(
                "standing by: another broker holds %s; trying again every %.1f s",
                lock.describe(),
                RETRY_S,
            )
            if on_standby is not None:
                on_standby()
        await asyncio.sleep(RETRY_S)
    log.info("holding %s; loading the state", lock.describe())


class Watchdog:
    """``with Watchdog(lock, lost):`` checks ``lock`` (if ``lock.watched``) every ``CHECK_S`` on
    a thread of its own (the event loop may be busy), and calls ``lost(reason)`` once when a
    check fails or none has succeeded for ``CHECK_S + CHECK_TIMEOUT_S`` (a check that hangs on a
    dead connection), from a second thread."""

    def __init__(self, lock: LeaderLock, lost: Callable[[str], None]) -> None:
        self._lock = lock
        self._lost = lost
        self._stop = threading.Event()
        self._ok_at = time.monotonic()
        self._fired = threading.Lock()
        self._threads = [
            threading.Thread(target=self._check, name="agentcg-leader-check", daemon=True),
            threading.Thread(target=self._deadline, name="agentcg-leader-deadline", daemon=True),
        ]

    def __enter__(self) -> Watchdog:
        if self._lock.watched:  # a lock nothing else can take away needs no watching
            for t in self._threads:
                t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _fire(self, reason: str) -> None:
        if not self._stop.is_set() and self._fired.acquire(blocking=False):
            self._lost(reason)

    def _check(self) -> None:
        while not self._stop.wait(CHECK_S):
            try:
                self._lock.check()
            except Exception as exc:  # noqa: BLE001 - any failure: the lock may be gone
                self._fire(f"{type(exc).__name__}: {exc}")
                return
            self._ok_at = time.monotonic()

    def _deadline(self) -> None:
        while not self._stop.wait(CHECK_S / 5):
            late = time.monotonic() - self._ok_at
            if late > CHECK_S + CHECK_TIMEOUT_S:
                self._fire(f"no check answered for {late:.1f} s")
                return
