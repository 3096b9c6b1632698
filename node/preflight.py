"""Can this host enforce budgets? ``agentcg preflight`` tries each part the node agent needs, for
real and as the agent uses it, before a platform team turns the agent on across its hosts.

1. ``cgroups``: the driver for this host (v1 or v2, nested under this process's own cgroup as
   the agent's), a call's cgroup made, limited, set to pause at its limit, removed.
   ``moves``: how long moving a started call into its cgroup takes, as the agent does for every
   call; ``thresholds``: how long registering a call's v1 usage threshold takes (the call runs
   once it is in place; v2 has none). Each is a warning when the kernel makes it wait for an RCU
   grace period (~9 ms a call here), naming the remedies: expedited grace periods
   (``rcu_expedited``) for both, cgroup2's ``favordynmods`` for moves (see the README's "What
   agentcg adds to a call").
2. ``memwatch``: the BPF program compiled, loaded and attached, and the usage source it runs
   with (a fallback from the one asked for is a warning: the agent still enforces, with less).
3. ``enforcement``: a real process allocating past its budget in its own cgroup is paused at the
   limit (the kernel), the limit event reaches user space (BPF), the budget is raised, and it
   finishes: the agent's pause -> grow path, timed. Without the first two it is not tried.

Every check cleans up after itself (its cgroups are under ``agentcg-preflight-<pid>``, never a
running agent's).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .cgroup import Cgroup, CgroupDriver, CgroupError, detect_driver
from .monitor import EventKind, MemEvent, MemoryMonitor, MonitorError, UsageSource
from .spawn import spawn_gated

__all__ = [
    "Check",
    "RcuSettings",
    "moves_verdict",
    "rcu_settings",
    "run_preflight",
    "thresholds_verdict",
]

MiB = 1 << 20
BUDGET_BYTES = 32 * MiB
ALLOCATE_BYTES = 64 * MiB  # past the budget: the call must pause there
GROWN_BYTES = 128 * MiB
EVENT_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 30.0
MOVES = 5  # moves timed, and thresholds registered
MOVE_GAP_S = 0.03  # between them, as calls arrive (back to back, they share a grace period)
SLOW_MOVE_MS = 2.0  # a move or a registration slower than this waited for a grace period
RCU_DIR = Path("/sys/kernel")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # "ok" | "warn" (works, with less) | "fail"
    detail: str
    duration_ms: float = 0.0


class _Events:
    """MemEvents from the monitor's poller thread, waited for by kind."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._events: list[MemEvent] = []

    def __call__(self, event: MemEvent) -> None:
        with self._cv:
            self._events.append(event)
            self._cv.notify_all()

    def wait_for(self, cgroup_id: int, kind: EventKind, timeout_s: float) -> MemEvent | None:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for e in self._events:
                    if e.cgroup_id == cgroup_id and e.kind == kind:
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)


def _timed(name: str, run: Callable[[], tuple[str, str]]) -> Check:
    t = time.perf_counter()
    try:
        status, detail = run()
    except (CgroupError, MonitorError, OSError) as exc:
        status, detail = "fail", str(exc)
    return Check(name, status, detail, (time.perf_counter() - t) * 1000)


@contextmanager
def _call_cgroup(driver: CgroupDriver, name: str) -> Iterator[Cgroup]:
    cg = driver.create("preflight", "session", name)
    try:
        yield cg
    finally:
        try:
            driver.kill(cg)
        finally:
            driver.remove(cg)


def _check_cgroups(driver: CgroupDriver) -> tuple[str, str]:
    with _call_cgroup(driver, "limits") as cg:
        driver.set_memory_limit(cg, BUDGET_BYTES)
        driver.set_pause_at_limit(cg, True)
        limit = driver.read_stats(cg).limit_bytes
        if limit is None or limit < BUDGET_BYTES:
            return "fail", f"{cg.path}: a {BUDGET_BYTES >> 20} MiB budget reads back as {limit}"
    return "ok", f"cgroup v{driver.version}; calls under {driver.root.parent}/agentcg-<node id>"


@dataclass(frozen=True, slots=True)
class RcuSettings:
    """The host's RCU grace-period knobs (None: not readable here)."""

    expedited: int | None  # /sys/kernel/rcu_expedited: synchronize_rcu() expedited
    normal: int | None  # /sys/kernel/rcu_normal: wins over rcu_expedited (real-time kernels)

    @property
    def text(self) -> str:
        if self.expedited is None:
            return "rcu_expedited not readable"
        if self.expedited and self.normal:
            return "rcu_expedited is 1 but rcu_normal is 1, which wins"
        return f"rcu_expedited is {self.expedited}"


def rcu_settings(root: Path = RCU_DIR) -> RcuSettings:
    def read(name: str) -> int | None:
        try:
            return int((root / name).read_text())
        except (OSError, ValueError):
            return None

    return RcuSettings(read("rcu_expedited"), read("rcu_normal"))


EXPEDITE = (
    "expedited grace periods (echo 1 > /sys/kernel/rcu_expedited, or boot with "
    "rcupdate.rcu_expedited=1) make it ~0.2 ms, at the cost of an interrupt to every busy CPU "
    "per grace period"
)


def moves_verdict(move_ms: float, rcu: RcuSettings) -> tuple[str, str]:
    """The ``moves`` check's status and detail for a median move of ``move_ms``."""
    took = f"moving a call into its cgroup takes {move_ms:.2f} ms (median of {MOVES})"
    if move_ms <= SLOW_MOVE_MS:
        return "ok", took
    return "warn", (
        f"{took}: the kernel makes each move wait for an RCU grace period ({rcu.text}); "
        f"{EXPEDITE}; so does cgroup2 mounted with favordynmods (or the kernel parameter "
        "cgroup_favordynmods=true), ~0.1 ms, at some cost to every fork and exit"
    )


def thresholds_verdict(register_ms: float | None, rcu: RcuSettings) -> tuple[str, str]:
    """The ``thresholds`` check's status and detail for a median registration of
    ``register_ms`` (None: the cgroup version has no usage thresholds)."""
    if register_ms is None:
        return "ok", "no usage thresholds on this cgroup version: calls are watched from the start"
    took = f"registering a call's usage threshold takes {register_ms:.2f} ms (median of {MOVES})"
    if register_ms <= SLOW_MOVE_MS:
        return "ok", took
    return "warn", (
        f"{took}, and a call runs only once it is in place: the kernel waits for an RCU grace "
        f"period for each ({rcu.text}); {EXPEDITE}"
    )


def _check_moves(driver: CgroupDriver) -> tuple[str, str]:
    took_ms = []
    with _call_cgroup(driver, "moves") as cg:
        for _ in range(MOVES):
            gated = spawn_gated(["true"])  # never released: it exits without running
            try:
                time.sleep(MOVE_GAP_S)
                t = time.perf_counter()
                driver.attach(cg, gated.pid)
                took_ms.append((time.perf_counter() - t) * 1000)
            finally:
                gated.abort()
                gated.process.wait()
    return moves_verdict(statistics.median(took_ms), rcu_settings())


def _check_thresholds(driver: CgroupDriver) -> tuple[str, str]:
    took_ms = []
    with _call_cgroup(driver, "thresholds") as cg:
        for _ in range(MOVES):
            time.sleep(MOVE_GAP_S)
            t = time.perf_counter()
            fd = driver.watch_usage(cg, BUDGET_BYTES)
            took_ms.append((time.perf_counter() - t) * 1000)
            if fd is None:
                return thresholds_verdict(None, rcu_settings())
            os.close(fd)
    return thresholds_verdict(statistics.median(took_ms), rcu_settings())


ALLOCATE = (
    "import sys; b = b'x' * {bytes}; sys.stdout.write('done'); sys.stdout.flush()"  # touches all
)


def _check_enforcement(driver: CgroupDriver, monitor: MemoryMonitor, events: _Events) -> Check:
    """A real allocation past its budget: paused, seen in-kernel, grown, finished."""

    def run() -> tuple[str, str]:
        with _call_cgroup(driver, "spike") as cg:
            driver.set_memory_limit(cg, BUDGET_BYTES)
            driver.set_pause_at_limit(cg, True)
            cid = driver.cgroup_id(cg)
            monitor.watch(cid, soft_bytes=0, limit_bytes=BUDGET_BYTES)
            argv = [sys.executable, "-c", ALLOCATE.format(bytes=ALLOCATE_BYTES)]
            gated = spawn_gated(argv, stdout=subprocess.PIPE)
            try:
                driver.attach(cg, gated.pid)
                monitor.add_pid(gated.pid, cid)
                started = time.monotonic_ns()
                gated.release()
                limit = events.wait_for(cid, EventKind.LIMIT, EVENT_TIMEOUT_S)
                budget = (
                    f"a {ALLOCATE_BYTES >> 20} MiB allocation under a "
                    f"{BUDGET_BYTES >> 20} MiB budget"
                )
                if limit is None:
                    return "fail", f"{budget}: no limit event within {EVENT_TIMEOUT_S:.0f} s"
                seen_ms = (limit.kernel_time_ns - started) / 1e6
                if driver.version == 2:  # memory.high only slows it: the agent freezes it
                    driver.set_frozen(cg, True)
                if gated.process.poll() is not None:
                    return "fail", f"{budget}: ended ({gated.process.returncode}), not paused"
                oom_kills = driver.read_stats(cg).oom_kills
                driver.set_memory_limit(cg, GROWN_BYTES)
                if driver.version == 2:
                    driver.set_frozen(cg, False)
                try:
                    code = gated.process.wait(EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    return "fail", f"{budget}: still paused {EXIT_TIMEOUT_S:.0f} s after growing"
                if code != 0 or oom_kills:
                    return "fail", f"{budget}: exit {code}, {oom_kills} OOM kill(s)"
                return "ok", (
                    f"{budget}: paused at the limit, limit event {seen_ms:.0f} ms after start, "
                    f"resumed when grown to {GROWN_BYTES >> 20} MiB, exit 0"
                )
            finally:
                if gated.process.poll() is None:
                    gated.abort()
                    gated.process.kill()
                gated.process.communicate()
                monitor.unwatch(cid)

    return _timed("enforcement", run)


def run_preflight(usage_source: UsageSource = UsageSource.COUNTER) -> list[Check]:
    """The host's checks, in order (see the module's docstring)."""
    checks: list[Check] = []
    driver: CgroupDriver | None = None
    try:
        driver = detect_driver(f"agentcg-preflight-{os.getpid()}")
    except CgroupError as exc:
        checks.append(Check("cgroups", "fail", str(exc)))
    if driver is not None:
        found = driver
        checks.append(_timed("cgroups", lambda: _check_cgroups(found)))
        checks.append(_timed("moves", lambda: _check_moves(found)))
        checks.append(_timed("thresholds", lambda: _check_thresholds(found)))
    events = _Events()
    monitor: MemoryMonitor | None = None
    t = time.perf_counter()
    try:
        monitor = MemoryMonitor(events, usage_source=usage_source)
    except (MonitorError, OSError) as exc:
        checks.append(Check("memwatch", "fail", str(exc), (time.perf_counter() - t) * 1000))
    else:
        took_ms = (time.perf_counter() - t) * 1000
        got = monitor.usage_source
        if got is usage_source:
            checks.append(Check("memwatch", "ok", f"loaded; usage source {got.name}", took_ms))
        else:
            checks.append(
                Check(
                    "memwatch",
                    "warn",
                    f"loaded with usage source {got.name}, not {usage_source.name} (fewer "
                    "in-kernel measurements; the log says why)",
                    took_ms,
                )
            )
    try:
        if driver is None or monitor is None or any(c.status == "fail" for c in checks):
            checks.append(Check("enforcement", "fail", "not tried: cgroups or memwatch failed"))
        else:
            monitor.start()
            checks.append(_check_enforcement(driver, monitor, events))
    finally:
        if monitor is not None:
            monitor.close()
        if driver is not None:
            driver.clear()
    return checks
