"""memwatch (bpf/memwatch.bpf.c through agentcg.node.monitor) against real spikes.

Every spike is a real child process that allocates and touches memory inside a real cgroup v1
memcg; the events asserted on come from the kernel's tracepoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.node.monitor import (
    COUNTER_SAMPLE_SHIFT,
    DropCounts,
    EventKind,
    MemoryMonitor,
    UsageSource,
    exit_reports_group_dead,
)
from agentcg.node.spawn import spawn_gated

from ..conftest import kernel_missing
from .kernel_helpers import EventLog, Spawn, wait_until

pytestmark = pytest.mark.kernel

MiB = 1 << 20
LIMIT = 64 * MiB
SOFT = 32 * MiB


def alloc_code(mib: int, *, then: str = "") -> str:
    # bytes * n memsets the buffer: every page is touched and charged.
    return f"import sys, time; b = b'x' * ({mib} << 20); print('allocated', flush=True); {then}"


def test_program_loads_with_empty_maps(monitor: MemoryMonitor) -> None:
    assert monitor.entry_counts() == (0, 0)
    assert monitor.drop_counts() == DropCounts(events=0, pids=0)
    assert monitor.stats(123456789) is None


def test_spike_is_seen_paused_resumed(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("tenant", "session", "call")
    driver.set_memory_limit(cg, LIMIT)
    driver.set_pause_at_limit(cg, True)
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=SOFT, limit_bytes=LIMIT)

    call = spawn(cg, [sys.executable, "-c", alloc_code(150)])

    [limit] = events.wait_for(cid, EventKind.LIMIT)
    assert (limit.pid, limit.cgroup_id, limit.threshold_bytes) == (call.pid, cid, LIMIT)
    assert LIMIT - 4 * MiB < limit.usage_bytes <= LIMIT
    [soft] = events.of(cid, EventKind.SOFT)
    assert soft.pid == call.pid and soft.threshold_bytes == SOFT
    assert SOFT <= soft.usage_bytes < SOFT + MiB
    assert soft.kernel_time_ns < limit.kernel_time_ns
    assert [e.kind for e in events.of(cid)] == [EventKind.EXEC, EventKind.SOFT, EventKind.LIMIT]

    # The call is paused at its limit, not killed.
    wait_until(lambda: driver.read_stats(cg).under_oom, "under_oom")
    assert call.process.poll() is None
    stats = driver.read_stats(cg)
    watched = monitor.stats(cid)
    assert watched is not None
    assert watched.reclaims >= 1
    # Aggregated in-kernel: 3 events reached user space. The counter program looks at one
    # charge in 2**COUNTER_SAMPLE_SHIFT per CPU, the other sources at every update.
    shift = COUNTER_SAMPLE_SHIFT if monitor.usage_source is UsageSource.COUNTER else 0
    assert watched.charge_events > (LIMIT // os.sysconf("SC_PAGE_SIZE") >> shift) // 2
    # The estimate counts pages on the LRU lists; memory.usage_in_bytes adds kernel memory
    # (and reclaim briefly isolates a few pages from the LRU).
    assert 0 <= stats.usage_bytes - watched.usage_bytes < 2 * MiB
    assert 0 <= watched.peak_bytes - watched.usage_bytes < MiB

    # Raising the limit resumes it; it finishes its allocation.
    driver.set_memory_limit(cg, 512 * MiB)
    assert call.process.wait(timeout=30) == 0
    assert call.process.stdout is not None and call.process.stdout.read() == b"allocated\n"
    [exit_event] = events.wait_for(cid, EventKind.EXIT)
    assert exit_event.pid == call.pid
    watched = monitor.stats(cid)
    assert watched is not None and watched.peak_bytes >= 150 * MiB
    assert len(events.of(cid, EventKind.SOFT)) == 1  # still above 90% of soft until the end
    assert len(events.of(cid, EventKind.LIMIT)) == 1  # once per arming
    assert driver.read_stats(cg).oom_kills == 0

    monitor.unwatch(cid)
    assert monitor.entry_counts() == (0, 0)
    assert monitor.drop_counts() == DropCounts(events=0, pids=0)


def test_kill_while_paused(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("call")
    driver.set_memory_limit(cg, LIMIT)
    driver.set_pause_at_limit(cg, True)
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=0, limit_bytes=LIMIT)
    call = spawn(cg, [sys.executable, "-c", alloc_code(150)])
    events.wait_for(cid, EventKind.LIMIT)
    wait_until(lambda: driver.read_stats(cg).under_oom, "under_oom")

    driver.kill(cg)
    assert call.process.wait(timeout=5) == -9
    assert events.of(cid, EventKind.SOFT) == []  # soft threshold disabled
    events.wait_for(cid, EventKind.EXIT)
    driver.remove(cg)
    monitor.unwatch(cid)
    assert monitor.entry_counts() == (0, 0)


def test_rewatch_rearms_and_keeps_usage(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("call")
    driver.set_memory_limit(cg, LIMIT)
    driver.set_pause_at_limit(cg, True)
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=SOFT, limit_bytes=LIMIT)
    call = spawn(cg, [sys.executable, "-c", alloc_code(150)])
    events.wait_for(cid, EventKind.LIMIT)
    wait_until(lambda: driver.read_stats(cg).under_oom, "under_oom")

    # Grow the grant: new thresholds, re-armed; the usage so far is kept.
    monitor.watch(cid, soft_bytes=96 * MiB, limit_bytes=128 * MiB)
    driver.set_memory_limit(cg, 128 * MiB)
    second_limit = events.wait_for(cid, EventKind.LIMIT, count=2)[1]
    assert second_limit.threshold_bytes == 128 * MiB
    assert 124 * MiB < second_limit.usage_bytes <= 128 * MiB
    second_soft = events.wait_for(cid, EventKind.SOFT, count=2)[1]
    assert second_soft.threshold_bytes == 96 * MiB
    assert 96 * MiB <= second_soft.usage_bytes < 97 * MiB
    wait_until(lambda: driver.read_stats(cg).under_oom, "under_oom again")

    driver.set_memory_limit(cg, 512 * MiB)
    assert call.process.wait(timeout=30) == 0
    assert len(events.of(cid, EventKind.LIMIT)) == 2
    monitor.unwatch(cid)


def test_soft_threshold_rearms_below_90_percent(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("call")
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=SOFT, limit_bytes=0)
    # Up past soft, back down (munmap of the buffer), and up again.
    code = alloc_code(40, then="del b; time.sleep(0.05); c = b'y' * (40 << 20)")
    call = spawn(cg, [sys.executable, "-c", code])
    assert call.process.wait(timeout=30) == 0
    events.wait_for(cid, EventKind.EXIT)
    soft = events.of(cid, EventKind.SOFT)
    assert len(soft) == 2
    assert all(e.usage_bytes >= SOFT for e in soft)
    assert events.of(cid, EventKind.LIMIT) == []  # no limit, no reclaim
    monitor.unwatch(cid)


def test_forked_children_are_tracked_in_kernel(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("call")
    driver.set_memory_limit(cg, LIMIT)
    driver.set_pause_at_limit(cg, True)
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=SOFT, limit_bytes=LIMIT)
    # The call starts threads (not tracked separately) and a child process that spikes.
    parent = (
        "import subprocess, sys, threading, time\n"
        "ts = [threading.Thread(target=time.sleep, args=(0.5,)) for _ in range(4)]\n"
        "[t.start() for t in ts]\n"
        f"p = subprocess.Popen([sys.executable, '-c', {alloc_code(150)!r}])\n"
        "print(p.pid, flush=True)\n"
        "sys.exit(p.wait())\n"
    )
    call = spawn(cg, [sys.executable, "-c", parent])
    assert call.process.stdout is not None
    child_pid = int(call.process.stdout.readline())
    assert monitor.entry_counts() == (1, 2)  # the call and its child; no thread entries

    [limit] = events.wait_for(cid, EventKind.LIMIT)
    assert limit.pid == child_pid != call.pid
    assert {e.pid for e in events.of(cid, EventKind.EXEC)} == {call.pid, child_pid}

    driver.kill(cg)
    assert call.process.wait(timeout=5) == -9
    exits = events.wait_for(cid, EventKind.EXIT, count=2)
    assert {e.pid for e in exits} == {call.pid, child_pid}
    assert monitor.entry_counts() == (1, 0)  # exits removed their entries in-kernel
    monitor.unwatch(cid)
    assert monitor.entry_counts() == (0, 0)


def test_oom_kill_without_pause(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("call")
    driver.set_memory_limit(cg, LIMIT)
    driver.set_pause_at_limit(cg, False)
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=SOFT, limit_bytes=LIMIT)
    call = spawn(cg, [sys.executable, "-c", alloc_code(150)])
    [oom] = events.wait_for(cid, EventKind.OOM_KILL)
    assert (oom.pid, oom.cgroup_id, oom.threshold_bytes) == (call.pid, cid, LIMIT)
    assert call.process.wait(timeout=10) == -9
    [limit] = events.of(cid, EventKind.LIMIT)
    assert limit.kernel_time_ns < oom.kernel_time_ns
    events.wait_for(cid, EventKind.EXIT)
    assert driver.read_stats(cg).oom_kills == 1
    monitor.unwatch(cid)


def test_unwatch_removes_every_entry(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    cg = driver.create("call")
    cid = driver.cgroup_id(cg)
    other = driver.create("other")
    other_id = driver.cgroup_id(other)
    monitor.watch(cid, soft_bytes=SOFT, limit_bytes=LIMIT)
    monitor.watch(other_id, soft_bytes=SOFT, limit_bytes=LIMIT)
    sleeper = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    call = spawn(cg, [sys.executable, "-c", sleeper])
    wait_until(lambda: monitor.entry_counts() == (2, 2), "the call and its child in `pids`")
    monitor.add_pid(999_999_999 % (1 << 22), other_id)  # an entry of another watch is kept
    monitor.unwatch(cid)
    assert monitor.stats(cid) is None
    assert monitor.entry_counts() == (1, 1)
    monitor.unwatch(other_id)
    monitor.unwatch(other_id)  # twice is fine
    assert monitor.entry_counts() == (0, 0)
    driver.kill(cg)
    call.process.wait(timeout=5)


@pytest.mark.parametrize("source", list(UsageSource), ids=lambda s: s.name)
def test_usage_estimate_with_page_cache(
    source: UsageSource,
    bcc_available: None,
    driver: CgroupV1Driver,
    events: EventLog,
    tmp_path: Path,
) -> None:
    # 32 MiB of file pages (read back from disk: large folios on ext4/xfs) + 32 MiB of anon.
    data = tmp_path / "data.bin"
    with open(data, "wb") as f:
        f.write(os.urandom(MiB) * 32)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    code = (
        f"import sys, time\nwith open({str(data)!r}, 'rb') as f:\n"
        "    while f.read(1 << 20): pass\n"
        "b = b'x' * (32 << 20); print('ready', flush=True); time.sleep(30)"
    )
    cg = driver.create("call")
    cid = driver.cgroup_id(cg)
    monitor = MemoryMonitor(events, usage_source=source)
    gated = spawn_gated([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        monitor.watch(cid, soft_bytes=0, limit_bytes=0)
        driver.attach(cg, gated.pid)
        monitor.add_pid(gated.pid, cid)
        gated.release()
        assert gated.process.stdout is not None
        assert gated.process.stdout.readline() == b"ready\n"
        usage = driver.read_stats(cg).usage_bytes
        watched = monitor.stats(cid)
        assert watched is not None
        if source in (UsageSource.LRU, UsageSource.COUNTER):
            assert abs(usage - watched.usage_bytes) < 3 * MiB, (usage, watched)
        elif source is UsageSource.NONE:
            assert (watched.usage_bytes, watched.charge_events) == (0, 0)  # no estimate
        else:
            # One PGPGIN per folio: anon (order-0 here) is counted, large file folios are not.
            assert 32 * MiB <= watched.usage_bytes <= usage, (usage, watched)
        driver.kill(cg)
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.communicate()
        monitor.close()


def test_no_usage_source_still_sees_the_limit(
    bcc_available: None, driver: CgroupV1Driver, events: EventLog
) -> None:
    # MW_USAGE_NONE: no per-page tracepoint, but the call hitting its budget is still caught
    # in-kernel (first memcg reclaim of a watched task), and exec/exit are reported.
    cg = driver.create("call")
    driver.set_memory_limit(cg, LIMIT)
    driver.set_pause_at_limit(cg, True)
    cid = driver.cgroup_id(cg)
    with MemoryMonitor(events, usage_source=UsageSource.NONE) as monitor:
        monitor.start()
        monitor.watch(cid, soft_bytes=SOFT, limit_bytes=LIMIT)
        gated = spawn_gated([sys.executable, "-c", alloc_code(150)], stdout=subprocess.PIPE)
        try:
            driver.attach(cg, gated.pid)
            monitor.add_pid(gated.pid, cid)
            gated.release()
            [limit] = events.wait_for(cid, EventKind.LIMIT)
            assert (limit.pid, limit.threshold_bytes) == (gated.pid, LIMIT)
            assert events.of(cid, EventKind.SOFT) == []
            assert [e.kind for e in events.of(cid)] == [EventKind.EXEC, EventKind.LIMIT]
            wait_until(lambda: driver.read_stats(cg).under_oom, "under_oom")
            driver.kill(cg)
            gated.process.wait(timeout=10)
            events.wait_for(cid, EventKind.EXIT)
        finally:
            if gated.process.poll() is None:
                gated.process.kill()
            gated.process.communicate()
            monitor.unwatch(cid)


def test_in_kernel_stop_at_the_threshold(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    # The kernel SIGSTOPs the allocator from inside the charge that crosses stop_bytes: it
    # stops with its usage just past the threshold, and MW_STOPPED marks the stop in effect.
    cg = driver.create("call")
    driver.set_memory_limit(cg, 512 * MiB)  # a backstop, never reached
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=0, limit_bytes=512 * MiB, stop_bytes=LIMIT)
    call = spawn(cg, [sys.executable, "-c", alloc_code(150)])
    [stop] = events.wait_for(cid, EventKind.STOP)
    [stopped] = events.wait_for(cid, EventKind.STOPPED)
    assert stop.pid == stopped.pid == call.pid
    assert stop.threshold_bytes == LIMIT and LIMIT <= stop.usage_bytes < LIMIT + MiB
    assert stop.kernel_time_ns <= stopped.kernel_time_ns
    wait_until(lambda: _state(call.pid) == "T", "the call to be stopped")
    usage = driver.read_stats(cg).usage_bytes
    assert usage < LIMIT + 4 * MiB  # stopped at the threshold, not at the backstop
    # SIGCONT resumes it; the stop does not fire again until re-armed.
    os.kill(call.pid, 18)
    assert call.process.wait(timeout=30) == 0
    assert len(events.of(cid, EventKind.STOP)) == 1


def test_a_process_whose_leader_thread_exits_first_stays_watched(
    driver: CgroupV1Driver, monitor: MemoryMonitor, events: EventLog, spawn: Spawn
) -> None:
    # pthread_exit in main: the process lives on in its other thread. Its entry must stay
    # until that one exits, or its spike is neither stopped nor reported.
    if not exit_reports_group_dead():
        kernel_missing("sched_process_exit has no group_dead field")
    cg = driver.create("call")
    driver.set_memory_limit(cg, 512 * MiB)  # a backstop, never reached
    cid = driver.cgroup_id(cg)
    monitor.watch(cid, soft_bytes=0, limit_bytes=512 * MiB, stop_bytes=LIMIT)
    code = (
        "import ctypes, os, threading, time\n"
        "def spike():\n"
        "    leader = f'/proc/self/task/{os.getpid()}/stat'\n"
        "    while open(leader).read().rsplit(')', 1)[1].split()[0] != 'Z':\n"
        "        time.sleep(0.01)  # until the leader thread has exited\n"
        "    b = b'x' * (150 << 20)  # every page touched\n"
        "threading.Thread(target=spike).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    call = spawn(cg, [sys.executable, "-c", code])
    [stop] = events.wait_for(cid, EventKind.STOP)
    [stopped] = events.wait_for(cid, EventKind.STOPPED)
    assert stop.pid == stopped.pid == call.pid
    assert events.of(cid, EventKind.EXIT) == []  # the leader's exit was not the process's
    assert monitor.entry_counts() == (1, 1)
    os.kill(call.pid, 18)
    assert call.process.wait(timeout=30) == 0
    [exit_event] = events.wait_for(cid, EventKind.EXIT)
    assert exit_event.pid == call.pid
    assert monitor.entry_counts() == (1, 0)
    monitor.unwatch(cid)


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]
