"""The cgroup v2 driver on a real v2 kernel (inside the VM: the script runs in the v2 root)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.node.cgroup import CgroupV2Driver, read_label, set_label
from agentcg.node.monitor import UsageSource, supported_usage_source
from agentcg.node.spawn import GatedProcess, spawn_gated

MiB = 1 << 20
V2 = Path("/sys/fs/cgroup")
TRACEFS = Path("/sys/kernel/tracing")


@pytest.fixture
def driver() -> Iterator[CgroupV2Driver]:
    d = CgroupV2Driver(f"agentcg-vm-{uuid.uuid4().hex[:8]}", base=V2)
    try:
        yield d
    finally:
        d.clear()
        assert not d.root.exists()


@pytest.fixture
def procs() -> Iterator[list[GatedProcess]]:
    started: list[GatedProcess] = []
    try:
        yield started
    finally:
        for g in started:
            g.abort()
            if g.process.poll() is None:
                g.process.kill()
            g.process.communicate()


def start(driver: CgroupV2Driver, cg, argv: list[str], procs: list[GatedProcess]) -> GatedProcess:  # type: ignore[no-untyped-def]
    g = spawn_gated(argv, stdout=subprocess.PIPE)
    procs.append(g)
    driver.attach(cg, g.pid)
    g.release()
    return g


def wait_until(predicate, what: str, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_kernel_is_v2_with_controllers() -> None:
    assert {"memory", "cpu", "pids"} <= set((V2 / "cgroup.controllers").read_text().split())
    assert Path("/proc/pressure/memory").exists()


def test_lifecycle_limits_freeze_kill(driver: CgroupV2Driver, procs: list[GatedProcess]) -> None:
    cg = driver.create("t", "s", "c")
    assert driver.cgroup_id(cg) == os.stat(cg.path).st_ino
    driver.set_memory_limit(cg, 64 * MiB)
    driver.set_cpu(cg, weight=200, quota_millis=500)
    driver.set_pids_max(cg, 32)
    assert (cg.path / "memory.max").read_text().strip() == str(64 * MiB)
    assert (cg.path / "cpu.weight").read_text().strip() == "200"
    assert (cg.path / "cpu.max").read_text().strip() == "50000 100000"
    assert (cg.path / "pids.max").read_text().strip() == "32"
    set_label(cg, "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert read_label(cg, "traceparent").endswith("-b7ad6b7169203331-01")  # kept on v2 too
    g = start(driver, cg, ["sleep", "300"], procs)
    wait_until(lambda: driver.read_stats(cg).pids == (g.pid,), "the call in its cgroup")
    driver.set_frozen(cg, True)
    assert "frozen 1" in (cg.path / "cgroup.events").read_text()
    driver.set_frozen(cg, False)
    assert "frozen 0" in (cg.path / "cgroup.events").read_text()
    driver.set_frozen(cg, True)
    driver.kill(cg)  # cgroup.kill: frozen tasks die too
    assert g.process.wait(timeout=10) == -9
    driver.remove(cg)
    assert not cg.path.exists()
    assert driver.children() == ["t"]


def test_oom_kill_at_memory_max(driver: CgroupV2Driver, procs: list[GatedProcess]) -> None:
    cg = driver.create("t", "s", "oom")
    driver.set_memory_limit(cg, 64 * MiB)
    g = start(driver, cg, [sys.executable, "-c", "b = b'x' * (200 << 20)"], procs)
    assert g.process.wait(timeout=120) == -9
    assert driver.read_stats(cg).oom_kills >= 1


def test_pause_at_limit_then_grow(driver: CgroupV2Driver, procs: list[GatedProcess]) -> None:
    # The budget is memory.high: the call stalls there (the reclaim that the node's BPF program
    # sees as its limit event), memory.max is the backstop; growing resumes it.
    cg = driver.create("t", "s", "pause")
    driver.set_memory_limit(cg, 64 * MiB)
    driver.set_pause_at_limit(cg, True)
    assert (cg.path / "memory.high").read_text().strip() == str(64 * MiB)
    assert (cg.path / "memory.max").read_text().strip() == str(80 * MiB)
    reclaim = TRACEFS / "events/vmscan/mm_vmscan_memcg_reclaim_begin/enable"
    reclaim.write_text("1")
    try:
        g = start(
            driver,
            cg,
            [sys.executable, "-c", "b = b'x' * (150 << 20); print('done', flush=True)"],
            procs,
        )
        wait_until(lambda: driver.read_stats(cg).under_oom, "the call to stall at its budget")
        wait_until(
            lambda: f"-{g.pid} " in (TRACEFS / "trace").read_text(),
            "the call's memcg reclaim in the trace (the limit event memwatch keys on)",
        )
    finally:
        reclaim.write_text("0")
    assert g.process.poll() is None  # stalled, not killed
    stats = driver.read_stats(cg)
    assert stats.limit_bytes == 64 * MiB and stats.usage_bytes < 80 * MiB
    driver.set_frozen(cg, True)  # the node's pause while it asks the broker
    driver.set_memory_limit(cg, 256 * MiB)
    driver.set_frozen(cg, False)
    assert g.process.wait(timeout=120) == 0
    assert g.process.stdout is not None and g.process.stdout.read() == b"done\n"
    assert driver.read_stats(cg).peak_bytes >= 150 * MiB


def test_pids_max_is_enforced(driver: CgroupV2Driver, procs: list[GatedProcess]) -> None:
    cg = driver.create("t", "s", "pids")
    driver.set_pids_max(cg, 4)
    code = (
        "import subprocess\nok = 0\nps = []\n"
        "for _ in range(8):\n"
        "    try:\n        ps.append(subprocess.Popen(['sleep', '5'])); ok += 1\n"
        "    except OSError:\n        pass\n"
        "print(ok, flush=True)\n"
        "[p.kill() for p in ps]\n"
    )
    g = start(driver, cg, [sys.executable, "-c", code], procs)
    assert g.process.wait(timeout=60) == 0
    assert g.process.stdout is not None
    assert int(g.process.stdout.read()) == 3  # 4 tasks: python + 3 children
    assert int((cg.path / "pids.events").read_text().split()[1]) >= 1


def test_usage_tracepoints_on_this_kernel() -> None:
    # 6.12 has vmscan's memcg reclaim tracepoints but not the memcg/ ones (newer): the monitor
    # runs with MW_USAGE_NONE here (limit, OOM, exec, exit; no in-kernel usage estimate).
    assert (TRACEFS / "events/vmscan/mm_vmscan_memcg_reclaim_begin").is_dir()
    assert (TRACEFS / "events/oom/mark_victim").is_dir()
    has_memcg = (TRACEFS / "events/memcg").is_dir()
    expected = UsageSource.LRU if has_memcg else UsageSource.NONE
    assert supported_usage_source(UsageSource.LRU, TRACEFS) is expected
    # The default (raw tracepoint + BTF offsets) degrades the same way, never fails.
    counter = supported_usage_source(UsageSource.COUNTER, TRACEFS)
    assert counter in ((UsageSource.COUNTER, UsageSource.LRU) if has_memcg else (UsageSource.NONE,))
    print(f"kernel {os.uname().release}: memcg tracepoints {'present' if has_memcg else 'absent'}")


_DELEGATED_AGENT = """
import os, sys
from pathlib import Path
unit = Path(sys.argv[1])
(unit / "cgroup.procs").write_text(str(os.getpid()))  # where systemd starts the main process
from agentcg.node.cgroup import CgroupV2Driver
d = CgroupV2Driver("agentcg-n1")  # rooted at its own cgroup: the unit's
cg = d.create("t", "s", "c")
d.set_memory_limit(cg, 64 << 20)
print(Path("/proc/self/cgroup").read_text().strip())
print(d.root)
print((cg.path / "memory.max").read_text().strip())
d.clear()
"""


def test_an_agent_in_a_delegated_unit_moves_itself_into_a_leaf() -> None:
    """As systemd starts `agentcg node` in a unit with Delegate=yes: the agent's process sits in
    the unit's cgroup, which must hold no process to delegate controllers to the calls' cgroups
    (v2's rule). The driver moves it into a leaf and manages the calls beside it."""
    unit = V2 / f"agentcg-node-{uuid.uuid4().hex[:8]}.service"
    unit.mkdir()
    try:
        # What Delegate=yes does above the unit: its controllers are enabled for it.
        (V2 / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        done = subprocess.run(
            [sys.executable, "-c", _DELEGATED_AGENT, str(unit)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        own, root, limit = done.stdout.split()
        assert own == f"0::/{unit.name}/_agent"
        assert root == str(unit / "agentcg-n1")
        assert limit == str(64 * MiB)
        assert "memory" in (unit / "cgroup.subtree_control").read_text().split()
    finally:
        for leftover in (unit / "agentcg-n1", unit / "_agent", unit):
            if leftover.exists():
                leftover.rmdir()


def test_preflight_passes_on_a_v2_host() -> None:
    """`agentcg preflight` as a platform team runs it on a v2 host: the v2 driver, the BPF
    monitor compiled and loaded on this kernel (bcc against the headers scripts/setup-vm.sh
    links), and a real allocation past its budget seen in-kernel, frozen, grown, finished."""
    done = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "preflight", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    print(json.dumps(report, indent=1))
    assert checks["cgroups"]["status"] == "ok" and "cgroup v2" in checks["cgroups"]["detail"]
    # 6.12 has no memcg usage tracepoints: the monitor runs with less, and says so.
    assert checks["memwatch"]["status"] in ("ok", "warn"), checks["memwatch"]
    enforcement = checks["enforcement"]
    assert enforcement["status"] == "ok", enforcement
    assert "paused at the limit" in enforcement["detail"]
    assert enforcement["detail"].endswith("exit 0")
    assert done.returncode == 0, done.stderr


def vm_cluster(tmp_path: Path, *node_args: str) -> LocalCluster:
    """A broker and a node agent as processes, with time for bcc to compile under qemu."""
    return LocalCluster(
        tmp_path / "cluster",
        node_memory="1G",
        log_level="INFO",
        ready_timeout_s=300,
        # The VM's root file system is the host's, read-only: no /var/lib/agentcg.
        node_args=(*node_args, "--spool-dir", str(tmp_path / "spool")),
    )


@pytest.mark.timeout(900)  # under qemu without KVM: ~3 minutes (processes start, bcc compiles)
def test_tool_calls_are_grown_or_killed_alone_on_v2(tmp_path: Path) -> None:
    """The whole path on a v2 host: a broker (SQLite) and a node agent as processes, the BPF
    monitor loaded on this kernel, and `Client.run` of calls spiking past their budgets. One
    is paused at its budget, grown by the broker from its tenant's headroom, and finishes; one
    whose tenant has no headroom is killed, alone: the other tenant's call finishes."""
    spike = "b = b'x' * ({} << 20)"
    with vm_cluster(tmp_path) as cluster, Client(cluster.broker_address, timeout_s=300) as client:
        client.set_tenant("rich", 512 * MiB)
        client.set_tenant("poor", 40 * MiB)
        grown = client.run("rich", 32 * MiB, [sys.executable, "-c", spike.format(100)])
        killed = client.run("poor", 32 * MiB, [sys.executable, "-c", spike.format(200)])
        node_log = cluster.log("node0")
    print(grown, killed, sep="\n")
    assert "(v2)" in node_log, node_log[-2000:]
    assert (grown.exit_code, grown.outcome) == (0, "grown"), grown
    assert grown.peak_bytes >= 100 * MiB and grown.budget_bytes > 32 * MiB
    assert killed.outcome == "killed" and killed.exit_code != 0, killed
    assert "quota" in killed.reason, killed


@pytest.mark.timeout(900)
def test_an_execd_call_outlives_its_node_agent_on_v2(tmp_path: Path) -> None:
    """A node agent SIGKILLed on a v2 host while a call runs under `Client.run`: the new agent
    re-adopts the call's v2 cgroup and the SDK follows it again (Resume): every output line
    once, the call's own exit code, the call run once (tests/e2e/test_exec_resume.py on v1)."""
    from tests.e2e.test_exec_resume import LINES, Caller, assert_whole_run

    with (
        vm_cluster(tmp_path, "--keep-calls") as cluster,
        Client(cluster.broker_address, timeout_s=300) as client,
    ):
        client.set_tenant("rs", 512 * MiB)
        caller = Caller(client, tmp_path, resume_timeout_s=300)  # bcc compiles slowly here
        caller.wait_output(LINES // 2, timeout_s=300)
        cluster.stop("node0", sig=signal.SIGKILL)
        cluster.start_node(0)
        (tmp_path / "go").touch()
        result = caller.finish(timeout_s=300)
        node_log = cluster.log("node0")
    print(result)
    assert "(v2)" in node_log and "re-adopted 1 running call" in node_log, node_log[-3000:]
    assert_whole_run(caller, result, tmp_path)
