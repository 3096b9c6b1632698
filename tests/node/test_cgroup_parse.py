"""Pure parsers of cgroup and /proc files, against fixture files (oomd's fixtures/ pattern)."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.node.cgroup import (
    CgroupError,
    OomControl,
    current_cgroup_dir,
    detect_driver,
    parse_cgroup_procs,
    parse_int,
    parse_memory_limit,
    parse_mountinfo,
    parse_oom_control,
    parse_proc_cgroup,
)

# A hybrid host like ours: v1 memory/cpu/pids..., v2 at /sys/fs/cgroup/unified.
HYBRID_PROC_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/c0f3686f5266c367c7985e0d3e380b68
1:cpu:/
0::/
"""
HYBRID_MOUNTINFO = """\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# A container: joint cpu,cpuacct hierarchy, its own cgroup bind-mounted as the mount root,
# optional fields before the separator, and a mount point with an escaped space.
CONTAINER_PROC_CGROUP = """\
12:cpu,cpuacct:/docker/abc
11:memory:/docker/abc/inner
"""
CONTAINER_MOUNTINFO = (
    "700 600 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid shared:9 master:2 - cgroup "
    "cgroup rw,cpu,cpuacct\n"
    "701 600 0:41 /docker/abc /sys/fs/cgroup/my\\040memory rw - cgroup cgroup rw,memory\n"
)


def write_fixture(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n", OomControl(False, False, 0)),
        ("oom_kill_disable 1\nunder_oom 1\noom_kill 3\n", OomControl(True, True, 3)),
        ("oom_kill_disable 1\nunder_oom 0\n", OomControl(True, False, 0)),  # kernels < 4.13
        ("", OomControl(False, False, 0)),
    ],
)
def test_parse_oom_control(tmp_path: Path, text: str, expected: OomControl) -> None:
    path = write_fixture(tmp_path, "memory.oom_control", text)
    assert parse_oom_control(path.read_text()) == expected


def test_parse_oom_control_rejects_garbage() -> None:
    with pytest.raises(CgroupError, match="memory.oom_control"):
        parse_oom_control("under_oom\n")
    with pytest.raises(CgroupError, match="under_oom"):
        parse_oom_control("under_oom yes\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("67108864\n", 67108864),
        ("0\n", 0),
        ("9223372036854771712\n", None),  # v1 "no limit" (PAGE_COUNTER_MAX pages)
        ("max\n", None),  # v2
    ],
)
def test_parse_memory_limit(tmp_path: Path, text: str, expected: int | None) -> None:
    path = write_fixture(tmp_path, "memory.limit_in_bytes", text)
    assert parse_memory_limit(path.read_text()) == expected


def test_parse_int_names_the_value() -> None:
    assert parse_int(" 42\n") == 42
    with pytest.raises(CgroupError, match="usage: expected an integer, got 'lots'"):
        parse_int("lots\n", what="usage")


def test_parse_cgroup_procs(tmp_path: Path) -> None:
    assert parse_cgroup_procs(write_fixture(tmp_path, "a", "12\n345\n").read_text()) == (12, 345)
    assert parse_cgroup_procs(write_fixture(tmp_path, "b", "").read_text()) == ()


def test_parse_proc_cgroup_hybrid(tmp_path: Path) -> None:
    text = write_fixture(tmp_path, "cgroup", HYBRID_PROC_CGROUP).read_text()
    assert parse_proc_cgroup(text) == {
        "name=systemd": "/",
        "pids": "/",
        "memory": "/process_api/c0f3686f5266c367c7985e0d3e380b68",
        "cpu": "/",
        "": "/",
    }


def test_parse_proc_cgroup_joint_controllers() -> None:
    parsed = parse_proc_cgroup(CONTAINER_PROC_CGROUP)
    assert parsed["cpu"] == parsed["cpuacct"] == "/docker/abc"


def test_parse_proc_cgroup_rejects_malformed() -> None:
    with pytest.raises(CgroupError, match="malformed"):
        parse_proc_cgroup("4-memory-/x\n")


def test_parse_mountinfo_hybrid(tmp_path: Path) -> None:
    text = write_fixture(tmp_path, "mountinfo", HYBRID_MOUNTINFO).read_text()
    mounts = parse_mountinfo(text)
    assert mounts["memory"] == (Path("/sys/fs/cgroup/memory"), "/")
    assert mounts["cpu"] == (Path("/sys/fs/cgroup/cpu"), "/")
    assert mounts["pids"] == (Path("/sys/fs/cgroup/pids"), "/")
    assert "name=systemd" in mounts
    assert "rw" not in mounts and "" not in mounts  # options, and cgroup2, are not controllers


def test_parse_mountinfo_container() -> None:
    mounts = parse_mountinfo(CONTAINER_MOUNTINFO)
    assert mounts["cpu"] == mounts["cpuacct"] == (Path("/sys/fs/cgroup/cpu,cpuacct"), "/docker/abc")
    assert mounts["memory"] == (Path("/sys/fs/cgroup/my memory"), "/docker/abc")


def test_current_cgroup_dir_hybrid() -> None:
    kw = {"proc_cgroup": HYBRID_PROC_CGROUP, "mountinfo": HYBRID_MOUNTINFO}
    assert current_cgroup_dir("memory", **kw) == Path(
        "/sys/fs/cgroup/memory/process_api/c0f3686f5266c367c7985e0d3e380b68"
    )
    assert current_cgroup_dir("cpu", **kw) == Path("/sys/fs/cgroup/cpu")
    assert current_cgroup_dir("freezer", **kw) is None  # not mounted in the fixture


def test_current_cgroup_dir_strips_the_mount_root() -> None:
    kw = {"proc_cgroup": CONTAINER_PROC_CGROUP, "mountinfo": CONTAINER_MOUNTINFO}
    assert current_cgroup_dir("cpu", **kw) == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert current_cgroup_dir("memory", **kw) == Path("/sys/fs/cgroup/my memory/inner")


def test_detect_driver_v2(tmp_path: Path) -> None:
    write_fixture(tmp_path, "cgroup.controllers", "cpuset cpu io memory pids\n")
    write_fixture(tmp_path, "cgroup.subtree_control", "\n")
    driver = detect_driver("agentcg", cgroup_fs=tmp_path)
    assert (driver.version, driver.root) == (2, tmp_path / "agentcg")


def test_detect_driver_without_cgroups(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no cgroup v1 memory hierarchy or cgroup v2 root"):
        detect_driver("agentcg", cgroup_fs=tmp_path)
