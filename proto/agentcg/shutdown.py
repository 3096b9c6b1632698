"""How a server process learns it should stop: SIGTERM or SIGINT sets an event it awaits."""

from __future__ import annotations

import asyncio
import signal

__all__ = ["stop_on_signals"]


def stop_on_signals(stop: asyncio.Event | None = None) -> asyncio.Event:
    """The event (a new one unless given) that SIGTERM and SIGINT set from now on.

    Call it from a composition root, in its running event loop. Where the loop cannot take
    signal handlers (not the main thread: a test serving in a thread), the event is still
    returned, to be set by whoever started the server."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    return stop
