"""CgroupV1Driver against the real cgroup v1 hierarchies of this host."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentcg.names import InvalidNameError
from agentcg.node.cgroup import Cgroup, CgroupError, CgroupV1Driver, read_label, set_label
from agentcg.node.spawn import spawn_gated

from ..conftest import kernel_missing

pytestmark = pytest.mark.kernel


def cgroup_lines(pid: int) -> dict[str, str]:
    result = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            result[c] = path
    return result


def test_lifecycle_create_limit_attach_stats_kill_remove(driver: CgroupV1Driver) -> None:
    assert driver.version == 1
    assert "memory" in driver.controllers
    cg = driver.create("tenant-a", "session-1", "call-1")
    assert cg.rel == ("tenant-a", "session-1", "call-1")
    assert cg.path == driver.root / "tenant-a" / "session-1" / "call-1"
    assert driver.create("tenant-a", "session-1", "call-1") == cg  # idempotent
    assert driver.children() == ["tenant-a"]
    assert driver.children(driver.create("tenant-a")) == ["session-1"]
    for path in driver.paths(cg).values():
        assert path.is_dir()

    driver.set_memory_limit(cg, 64 << 20)
    driver.set_pause_at_limit(cg, True)
    if "cpu" in driver.controllers:
        driver.set_cpu(cg, weight=50, quota_millis=500)
        driver.set_cpu(cg)  # back to defaults: weight 100, no quota
    if "pids" in driver.controllers:
        driver.set_pids_max(cg, 32)
        driver.set_pids_max(cg, None)

    gated = spawn_gated(["sleep", "30"])
    try:
        driver.attach(cg, gated.pid)
        gated.release()
        lines = cgroup_lines(gated.pid)
        for controller, path in driver.paths(cg).items():
            assert path.name == "call-1"
            assert lines[controller].endswith("/".join(cg.rel)), (controller, lines)
        stats = driver.read_stats(cg)
        assert stats.pids == (gated.pid,)
        assert stats.limit_bytes == 64 << 20
        assert stats.under_oom is False and stats.oom_kills == 0
        assert 0 <= stats.usage_bytes <= stats.peak_bytes <= 64 << 20

        driver.kill(cg)
        assert gated.process.wait(timeout=5) == -9  # killed, not merely exited
        assert driver.read_stats(cg).pids == ()
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.wait()

    driver.set_memory_limit(cg, None)
    assert driver.read_stats(cg).limit_bytes is None
    driver.remove(cg)
    assert not any(p.exists() for p in driver.paths(cg).values())
    driver.remove(cg)  # already gone is fine
    assert driver.children(driver.create("tenant-a")) == ["session-1"]


def test_cgroup_id_is_the_memcg_inode(driver: CgroupV1Driver) -> None:
    cg = driver.create("call")
    assert driver.cgroup_id(cg) == os.stat(cg.path).st_ino


def test_a_label_lives_with_its_cgroup(driver: CgroupV1Driver) -> None:
    cg = driver.create("call")
    assert read_label(cg, "traceparent") == ""
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    set_label(cg, "traceparent", value)
    assert read_label(cg, "traceparent") == value
    assert os.getxattr(cg.path, "trusted.agentcg.traceparent") == value.encode()
    driver.remove(cg)
    assert read_label(driver.create("call"), "traceparent") == ""  # a new cgroup: none
    never_made = Cgroup(rel=("gone",), path=driver.root / "gone")
    with pytest.raises(CgroupError, match="cannot set label traceparent"):
        set_label(never_made, "traceparent", value)
    assert read_label(never_made, "traceparent") == ""


def test_names_are_validated_before_touching_the_fs(driver: CgroupV1Driver) -> None:
    for bad in ("..", "a/b", "", "-x", "memory.limit_in_bytes/.."):
        with pytest.raises(InvalidNameError):
            driver.create("ok", bad)
    assert not driver.root.exists()
    with pytest.raises(InvalidNameError):
        CgroupV1Driver("../escape")


def test_remove_refuses_a_busy_cgroup(driver: CgroupV1Driver) -> None:
    session = driver.create("tenant", "session")
    call = driver.create("tenant", "session", "call")
    gated = spawn_gated(["sleep", "30"])
    try:
        driver.attach(call, gated.pid)
        gated.release()
        with pytest.raises(CgroupError, match="still has tasks"):
            driver.remove(session)
        driver.kill(session)  # kills the subtree
        assert gated.process.wait(timeout=5) == -9
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.wait()
    driver.remove(session)  # removes the empty child too
    assert driver.children(driver.create("tenant")) == []


def test_kill_reaches_forked_children(driver: CgroupV1Driver) -> None:
    cg = driver.create("call")
    gated = spawn_gated(["sh", "-c", "sleep 30 & sleep 30 & wait"], stdout=subprocess.DEVNULL)
    try:
        driver.attach(cg, gated.pid)
        gated.release()
        deadline = time.monotonic() + 5
        while len(driver.read_stats(cg).pids) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(driver.read_stats(cg).pids) == 3
        driver.kill(cg)
        assert driver.read_stats(cg).pids == ()
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.wait()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_freeze_and_thaw(driver: CgroupV1Driver) -> None:
    if "freezer" not in driver.controllers:
        with pytest.raises(CgroupError, match="freezer controller is not available"):
            driver.set_frozen(driver.create("call"), True)
        return
    cg = driver.create("call")
    gated = spawn_gated(["sh", "-c", "while :; do :; done"])
    try:
        driver.attach(cg, gated.pid)
        gated.release()
        driver.set_frozen(cg, True)
        before = cpu_ticks(gated.pid)
        time.sleep(0.2)
        assert cpu_ticks(gated.pid) == before
        driver.set_frozen(cg, False)
        time.sleep(0.2)
        assert cpu_ticks(gated.pid) > before
        driver.set_frozen(cg, True)
        driver.kill(cg)  # a frozen task dies only once thawed: kill thaws
        assert gated.process.wait(timeout=5) == -9
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.wait()


def test_a_task_held_at_its_limit_is_not_frozen_and_the_cgroup_is_left_thawed(
    driver: CgroupV1Driver,
) -> None:
    # The v1 freezer cannot freeze a task waiting at the memory limit (oom_kill_disable): it
    # would stay FREEZING until the limit is raised, and a node that then forgot to thaw it
    # would leave the call frozen for good.
    if "freezer" not in driver.controllers:
        kernel_missing("no v1 freezer controller for this process")
    cg = driver.create("call")
    driver.set_memory_limit(cg, 32 << 20)
    driver.set_pause_at_limit(cg, True)
    code = "b = bytearray(96 << 20); print('done', flush=True)"
    gated = spawn_gated([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        driver.attach(cg, gated.pid)
        gated.release()
        deadline = time.monotonic() + 10
        while not driver.read_stats(cg).under_oom:
            assert time.monotonic() < deadline, "the task never waited at its limit"
            time.sleep(0.005)
        with pytest.raises(CgroupError, match="waits at the memory limit"):
            driver.set_frozen(cg, True)
        assert (driver.paths(cg)["freezer"] / "freezer.state").read_text().strip() == "THAWED"
        # Raising the limit lets it finish: it was never left frozen.
        driver.set_memory_limit(cg, 256 << 20)
        out, _ = gated.process.communicate(timeout=30)
        assert (gated.process.returncode, out) == (0, b"done\n")
    finally:
        if gated.process.poll() is None:
            driver.kill(cg)  # thaws too: a task caught frozen dies only once thawed
        gated.process.wait()


def test_wake_paused_makes_a_task_waiting_at_its_limit_charge_again(
    driver: CgroupV1Driver,
) -> None:
    # The kernel wakes the tasks waiting at a v1 limit only when the limit is raised (or the OOM
    # killer re-enabled). wake_paused raises it a page: the waiting task tries its charge again
    # (a failed charge counts in memory.failcnt), fails at the limit and waits again.
    cg = driver.create("call")
    driver.set_memory_limit(cg, 32 << 20)
    driver.set_pause_at_limit(cg, True)
    failcnt = driver.paths(cg)["memory"] / "memory.failcnt"
    gated = spawn_gated([sys.executable, "-c", "b = bytearray(96 << 20)"])
    try:
        driver.attach(cg, gated.pid)
        gated.release()
        deadline = time.monotonic() + 10
        while not driver.read_stats(cg).under_oom:
            assert time.monotonic() < deadline, "the task never waited at its limit"
            time.sleep(0.005)
        waiting = int(failcnt.read_text())
        time.sleep(0.2)
        assert int(failcnt.read_text()) == waiting  # asleep: no charge tried
        driver.wake_paused(cg)
        deadline = time.monotonic() + 10
        while int(failcnt.read_text()) == waiting:
            assert time.monotonic() < deadline, "wake_paused did not wake the waiting task"
            time.sleep(0.005)
        deadline = time.monotonic() + 10
        while not driver.read_stats(cg).under_oom:
            assert time.monotonic() < deadline, "the woken task did not wait at its limit again"
            time.sleep(0.005)
        # Put back, or left a page higher if the woken task charged that page first.
        assert driver.read_stats(cg).limit_bytes in (32 << 20, (32 << 20) + mmap.PAGESIZE)
        assert gated.process.poll() is None
    finally:
        driver.kill(cg)
        gated.process.wait()


def test_lowering_the_limit_below_usage_is_an_error_not_a_kill(driver: CgroupV1Driver) -> None:
    cg = driver.create("call")
    code = "import time; b = b'x' * (32 << 20); print('ok', flush=True); time.sleep(30)"
    gated = spawn_gated(["python3", "-c", code], stdout=subprocess.PIPE)
    try:
        driver.attach(cg, gated.pid)
        driver.set_pause_at_limit(cg, True)
        gated.release()
        assert gated.process.stdout is not None
        assert gated.process.stdout.readline() == b"ok\n"
        with pytest.raises(CgroupError, match="memory.limit_in_bytes"):
            driver.set_memory_limit(cg, 1 << 20)
        assert gated.process.poll() is None
        driver.kill(cg)
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.communicate()


def test_clear_kills_and_removes_leftovers(driver: CgroupV1Driver) -> None:
    assert driver.clear() == 0  # nothing there yet
    driver.create("t1", "s1", "c1")
    driver.create("t1", "s2")
    busy = driver.create("t2", "s1", "c1")
    gated = spawn_gated(["sleep", "30"])
    try:
        driver.attach(busy, gated.pid)
        gated.release()
        # A restarted agent finds these: 7 cgroups below the root, one with a live task.
        assert driver.clear() == 7
        assert gated.process.wait(timeout=5) == -9
    finally:
        if gated.process.poll() is None:
            gated.process.kill()
        gated.process.wait()
    assert not any(p.exists() for p in driver.paths().values())
    assert driver.children() == []


def test_usage_threshold_and_pause_notifications(driver: CgroupV1Driver) -> None:
    # The kernel's own v1 notifications, as eventfds: usage crossing a threshold (either way),
    # and a task paused at the limit (oom_kill_disable).
    import select

    cg = driver.create("call")
    driver.set_memory_limit(cg, 48 << 20)
    driver.set_pause_at_limit(cg, True)
    usage_fd = driver.watch_usage(cg, 16 << 20)
    pause_fd = driver.watch_pause(cg)
    assert usage_fd is not None and pause_fd is not None
    code = "import time\nb = bytearray(8 << 20)\ntime.sleep(2)\nc = bytearray(64 << 20)\n"
    gated = spawn_gated([sys.executable, "-c", code])
    try:
        driver.attach(cg, gated.pid)
        gated.release()
        assert select.select([usage_fd, pause_fd], [], [], 1.0)[0] == []  # 8 MiB: below both
        assert select.select([usage_fd], [], [], 10)[0] == [usage_fd]
        assert os.eventfd_read(usage_fd) >= 1
        assert select.select([pause_fd], [], [], 10)[0] == [pause_fd]  # 72 MiB > 48 MiB limit
        assert driver.read_stats(cg).under_oom is True
    finally:
        os.close(usage_fd)
        os.close(pause_fd)
        driver.kill(cg)
        gated.process.wait()
    with pytest.raises(ValueError):
        driver.watch_usage(cg, 0)
