"""The cgroup v2 driver's file writes and reads, against a fixture tree under tmp_path (the real
kernel is exercised in tests/vm, inside a qemu VM with a v2 kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.node.cgroup import (
    Cgroup,
    CgroupError,
    CgroupV2Driver,
    format_cpu_max,
    parse_cgroup_v2_path,
    parse_v2_mount,
)

MiB = 1 << 20
CALL_FILES = {
    "cgroup.controllers": "memory cpu pids\n",
    "cgroup.subtree_control": "\n",
    "cgroup.procs": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.freeze": "0\n",
    "memory.max": "max\n",
    "memory.high": "max\n",
    "memory.current": "0\n",
    "memory.peak": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "cpu.weight": "100\n",
    "cpu.max": "max 100000\n",
    "pids.max": "max\n",
}


def fake_cgroup(path: Path, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (CALL_FILES | files).items():
        (path / name).write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    base = fake_cgroup(tmp_path / "base", **{"cgroup.controllers": "cpuset cpu io memory pids\n"})
    for rel in ("agentcg", "agentcg/t", "agentcg/t/s", "agentcg/t/s/c"):
        fake_cgroup(base / rel)
    return base


def read(path: Path) -> str:
    return path.read_text().strip()


def test_create_delegates_controllers_at_every_level_above_the_call(tree: Path) -> None:
    d = CgroupV2Driver("agentcg", base=tree)
    assert d.controllers == ("memory", "cpu", "pids")
    assert read(tree / "cgroup.subtree_control") == "+memory +cpu +pids"
    cg = d.create("t", "s", "c")
    assert cg == Cgroup(rel=("t", "s", "c"), path=tree / "agentcg/t/s/c")
    for rel in ("agentcg", "agentcg/t", "agentcg/t/s"):
        assert read(tree / rel / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert read(tree / "agentcg/t/s/c/cgroup.subtree_control") == ""  # the leaf holds tasks


def test_memory_limit_and_pause_at_limit(tree: Path) -> None:
    d = CgroupV2Driver("agentcg", base=tree)
    cg = d.create("t", "s", "c")
    d.set_memory_limit(cg, 64 * MiB)
    assert (read(cg.path / "memory.max"), read(cg.path / "memory.high")) == (str(64 * MiB), "max")
    # Pause at limit: the budget becomes memory.high, memory.max a backstop above it.
    d.set_pause_at_limit(cg, True)
    assert read(cg.path / "memory.high") == str(64 * MiB)
    assert read(cg.path / "memory.max") == str(80 * MiB)  # + max(25%, 16 MiB)
    (cg.path / "memory.current").write_text(f"{64 * MiB}\n")
    stats = d.read_stats(cg)
    assert stats.limit_bytes == 64 * MiB and stats.under_oom
    # Growing moves both.
    d.set_memory_limit(cg, 256 * MiB)
    assert read(cg.path / "memory.high") == str(256 * MiB)
    assert read(cg.path / "memory.max") == str(320 * MiB)
    # A throttle below the budget, then lifted: back to the pause point, not to none.
    d.set_memory_throttle(cg, 200 * MiB)
    assert d.read_memory_throttle(cg) == 200 * MiB
    d.set_memory_throttle(cg, None)
    assert d.read_memory_throttle(cg) == 256 * MiB
    d.set_pause_at_limit(cg, False)
    assert (read(cg.path / "memory.max"), read(cg.path / "memory.high")) == (str(256 * MiB), "max")
    d.set_memory_limit(cg, None)
    assert read(cg.path / "memory.max") == "max"


def test_small_budgets_get_the_minimum_backstop(tree: Path) -> None:
    d = CgroupV2Driver("agentcg", base=tree)
    cg = d.create("t", "s", "c")
    d.set_memory_limit(cg, 8 * MiB)
    d.set_pause_at_limit(cg, True)
    assert read(cg.path / "memory.max") == str(24 * MiB)
    assert d.read_stats(cg).limit_bytes == 8 * MiB


def test_cpu_and_pids(tree: Path) -> None:
    d = CgroupV2Driver("agentcg", base=tree)
    cg = d.create("t", "s", "c")
    d.set_cpu(cg, weight=250, quota_millis=1500)
    assert (read(cg.path / "cpu.weight"), read(cg.path / "cpu.max")) == ("250", "150000 100000")
    d.set_cpu(cg)
    assert (read(cg.path / "cpu.weight"), read(cg.path / "cpu.max")) == ("100", "max 100000")
    d.set_pids_max(cg, 64)
    assert read(cg.path / "pids.max") == "64"
    d.set_pids_max(cg, None)
    assert read(cg.path / "pids.max") == "max"
    with pytest.raises(ValueError, match="cpu weight"):
        d.set_cpu(cg, weight=0)
    assert format_cpu_max(0 + 1) == "1000 100000"  # at least 1 ms per period


def test_freeze_and_stats(tree: Path) -> None:
    d = CgroupV2Driver("agentcg", base=tree)
    cg = d.create("t", "s", "c")
    (cg.path / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # as the kernel will
    d.set_frozen(cg, True)
    assert read(cg.path / "cgroup.freeze") == "1"
    (cg.path / "cgroup.procs").write_text("12\n34\n")
    (cg.path / "memory.current").write_text("1000\n")
    (cg.path / "memory.peak").write_text("5000\n")
    (cg.path / "memory.events").write_text("low 0\nhigh 3\nmax 1\noom 1\noom_kill 1\n")
    stats = d.read_stats(cg)
    assert (stats.usage_bytes, stats.peak_bytes, stats.oom_kills, stats.pids) == (
        1000,
        5000,
        1,
        (12, 34),
    )
    assert stats.limit_bytes is None and not stats.under_oom


def test_memory_controller_required(tmp_path: Path) -> None:
    base = fake_cgroup(tmp_path / "base", **{"cgroup.controllers": "cpu pids\n"})
    with pytest.raises(CgroupError, match="memory controller is not available"):
        CgroupV2Driver("agentcg", base=base)
    with pytest.raises(CgroupError, match="not a cgroup v2 directory"):
        CgroupV2Driver("agentcg", base=tmp_path)


def test_names_validated(tree: Path) -> None:
    d = CgroupV2Driver("agentcg", base=tree)
    with pytest.raises(Exception, match="cgroup"):
        d.create("..", "x")


def test_v2_parsers() -> None:
    assert parse_cgroup_v2_path("0::/user.slice/x.scope\n") == "/user.slice/x.scope"
    assert parse_cgroup_v2_path("4:memory:/a\n") is None
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "23 1 0:21 / /sys rw - sysfs sysfs rw\n"
    )
    assert parse_v2_mount(mountinfo) == Path("/sys/fs/cgroup")
    assert parse_v2_mount("23 1 0:21 / /sys rw - sysfs sysfs rw\n") is None


@pytest.mark.parametrize("budget", [64 * MiB, 100 * MiB + 4096, 7 * MiB])
def test_a_new_driver_reads_a_pausing_call_an_earlier_agent_set_up(tree: Path, budget: int) -> None:
    """An agent restarted while calls run: its driver never set them up, yet it reads their
    budget (memory.high), not the backstop, and turning pause at limit on changes nothing (it
    once raised the budget by the backstop's 25% at each re-adoption)."""
    first = CgroupV2Driver("agentcg", base=tree)
    cg = first.create("t", "s", "c")
    first.set_memory_limit(cg, budget)
    first.set_pause_at_limit(cg, True)
    files = (read(cg.path / "memory.high"), read(cg.path / "memory.max"))
    assert files[0] == str(budget) and int(files[1]) > budget
    again = CgroupV2Driver("agentcg", base=tree)
    assert again.read_stats(cg).limit_bytes == budget
    again.set_pause_at_limit(cg, True)
    assert (read(cg.path / "memory.high"), read(cg.path / "memory.max")) == files
    # Throttled below its budget when the agent died: still its budget, and lifting the
    # throttle goes back to it.
    (cg.path / "memory.high").write_text(f"{budget // 2}\n")
    third = CgroupV2Driver("agentcg", base=tree)
    assert abs(third.read_stats(cg).limit_bytes - budget) <= 1  # type: ignore[operator]
    third.set_memory_throttle(cg, None)
    assert abs(int(read(cg.path / "memory.high")) - budget) <= 1


def test_a_new_driver_leaves_a_call_that_does_not_pause_as_it_is(tree: Path) -> None:
    first = CgroupV2Driver("agentcg", base=tree)
    cg = first.create("t", "s", "c")
    first.set_memory_limit(cg, 64 * MiB)  # dry run: memory.max is the budget, no pause
    again = CgroupV2Driver("agentcg", base=tree)
    assert again.read_stats(cg).limit_bytes == 64 * MiB
    assert read(cg.path / "memory.high") == "max"
