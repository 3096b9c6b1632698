"""Telling a service manager how the process is doing: systemd's notification protocol
(``sd_notify(3)``), for ``Type=notify`` units with ``WatchdogSec=``.

systemd names a datagram socket in ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace); the process sends it ``READY=1`` once it does its job, ``STATUS=...`` (shown by
``systemctl status``), ``STOPPING=1`` when it begins to stop, and, when the unit sets
``WatchdogSec=`` (``WATCHDOG_USEC``), ``WATCHDOG=1`` more often than that: a process whose
event loop stops turning stops sending them and is killed and restarted.

``ServiceNotifier.from_env`` takes the variables out of the environment, as
``sd_notify(unset_environment=1)`` does, so that no child (the broker's database writer, a
node's tool calls) speaks for the service. Without ``NOTIFY_SOCKET`` every method does nothing.
A send never blocks and never raises: the service goes on if the manager does not listen, and
what its full queue refuses is sent again from the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import MutableMapping

__all__ = ["ServiceNotifier"]

log = logging.getLogger(__name__)

RETRY_S = 0.05  # how soon a notification the manager's full queue refused is sent again


class ServiceNotifier:
    def __init__(self, address: str | None = None, watchdog_usec: int = 0) -> None:
        """``address``: the ``NOTIFY_SOCKET`` value (None: notify nobody); ``watchdog_usec``:
        the manager's watchdog timeout (0: none)."""
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failed = False
        self._pending: collections.deque[bytes] = collections.deque()  # refused, in order
        self._shown = address or ""
        self.watchdog_usec = watchdog_usec if address else 0
        if not address:
            return
        if address.startswith("@"):  # the abstract namespace
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        else:  # vsock:..., a relative path: not ours to guess
            log.warning("NOTIFY_SOCKET %r is not a unix socket path: not notifying", address)
            self.watchdog_usec = 0
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> ServiceNotifier:
        """The notifier the service manager asked for in ``environ`` (default: this
        process's), whose notification variables are removed from it."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        usec_text = env.pop("WATCHDOG_USEC", "")
        pid_text = env.pop("WATCHDOG_PID", "")
        usec = int(usec_text) if usec_text.isdigit() else 0
        if pid_text and pid_text != str(os.getpid()):
            usec = 0  # the watchdog is another process's
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the manager's timeout; None: no watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec and self.enabled else None

    def notify(self, **fields: str | int) -> None:
        """Send ``KEY=value`` lines (``ready=1`` -> ``READY=1``). A state change the manager's
        full queue refuses is sent again, in order, from the running event loop (as
        libsystemd's blocking send would, without blocking the loop); a watchdog ping is
        not (the next one follows)."""
        if self._sock is None:
            return
        message = "\n".join(  # one line per field: a newline in a value would start a key
            f"{key.upper()}={' '.join(str(value).splitlines())}" for key, value in fields.items()
        ).encode()
        ping = set(fields) == {"watchdog"}
        if self._pending:  # behind what waits already (a ping then is of no use)
            if not ping:
                self._pending.append(message)
        elif not self._send(message) and not ping:
            self._pending.append(message)
            self._flush_later()

    def _send(self, message: bytes) -> bool:
        assert self._sock is not None and self._address is not None
        try:
            self._sock.sendto(message, self._address)
        except BlockingIOError:  # the manager's queue is full: it reads it soon
            return False
        except OSError as exc:  # not listening: the service goes on
            if not self._failed:
                log.warning("notifying the service manager at %s failed: %s", self._shown, exc)
            self._failed = True
            return True  # dropped, not retried
        self._failed = False
        return True

    def _flush_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to retry from
            log.warning(
                "service manager's queue full: %d notification(s) dropped", len(self._pending)
            )
            self._pending.clear()
            return
        loop.call_later(RETRY_S, self._flush)

    def _flush(self) -> None:
        while self._pending and self._sock is not None:
            if not self._send(self._pending[0]):
                self._flush_later()
                return
            self._pending.popleft()

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status)

    def status(self, status: str) -> None:
        self.notify(status=status)

    def stopping(self, status: str) -> None:
        self.notify(stopping=1, status=status)

    async def keep_alive(self) -> None:
        """Send ``WATCHDOG=1`` every ``watchdog_interval_s`` from the running event loop, until
        cancelled (returns at once without a watchdog): a stuck loop stops the pings."""
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        while True:
            self.notify(watchdog=1)
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
