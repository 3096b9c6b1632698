"""Helpers of the kernel tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest
from agentcg.node.cgroup import Cgroup
from agentcg.node.monitor import EventKind, MemEvent
from agentcg.node.spawn import GatedProcess

from ..conftest import wait_until

__all__ = ["wait_until"]  # the shared one, for the kernel tests that import it from here

Spawn = Callable[[Cgroup, Sequence[str]], GatedProcess]


class EventLog:
    """Collects MemEvents from the poller thread, with the local arrival time."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._events: list[tuple[int, MemEvent]] = []

    def __call__(self, event: MemEvent) -> None:
        arrived_ns = time.monotonic_ns()
        with self._cv:
            self._events.append((arrived_ns, event))
            self._cv.notify_all()

    def of(self, cgroup_id: int, kind: EventKind | None = None) -> list[MemEvent]:
        with self._cv:
            return [
                e
                for _, e in self._events
                if e.cgroup_id == cgroup_id and (kind is None or e.kind == kind)
            ]

    def arrivals(self) -> list[tuple[int, MemEvent]]:
        with self._cv:
            return list(self._events)

    def wait_for(
        self, cgroup_id: int, kind: EventKind, *, count: int = 1, timeout_s: float = 10.0
    ) -> list[MemEvent]:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while len(found := self.of(cgroup_id, kind)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(
                        f"no {count} {kind.name} event(s) for cgroup {cgroup_id} in {timeout_s}s;"
                        f" seen: {self.of(cgroup_id)}"
                    )
                self._cv.wait(left)
            return found
