"""Node behaviour end to end (broker and node as real subprocesses, real cgroups, real BPF):
attach an existing process into a call cgroup through the SDK; SIGKILL the node agent and start
it again: it re-adopts the attached call and keeps enforcing it (the broker grows it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path, cgroup_write: Path, bcc_available: None) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster", node_memory="2G", log_level="INFO") as c:
        yield c
    left = [p.name for p in cgroup_write.iterdir() if p.name == f"agentcg-n0-{os.getpid()}"]
    assert left == [], f"cgroups left behind: {left}"


def spike_after(go: Path) -> subprocess.Popen[bytes]:
    """A process the node did not start: waits for `go`, then allocates 150 MiB and exits."""
    code = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "b = b'x' * (150 << 20)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def wait_gone(path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while path.exists():
        assert time.monotonic() < deadline, f"{path} still there"
        time.sleep(0.05)


def test_attach_then_node_restart_keeps_enforcing(cluster: LocalCluster, tmp_path: Path) -> None:
    go = tmp_path / "go"
    proc = spike_after(go)
    try:
        with Client(cluster.broker_address) as client:
            client.set_tenant("att", 1024 * MiB)
            lease = client.reserve("att", 64 * MiB, session="s1")
            cgroup_path = Path(client.attach(lease, proc.pid))
            assert cgroup_path.name == lease.lease_id
            assert str(proc.pid) in (cgroup_path / "cgroup.procs").read_text().split()

            # The node agent dies without cleaning up; a new one starts with the same id.
            cluster.stop("node0", sig=signal.SIGKILL)
            assert proc.poll() is None and cgroup_path.is_dir()
            cluster.start_node(0)
            assert "re-adopted 1 running call" in cluster.log("node0")

            # The spike hits the 64 MiB budget: caught, paused, grown by the broker.
            go.touch()
            assert proc.wait(timeout=60) == 0
            wait_gone(cgroup_path)
            log = cluster.log("node0")
            assert f"adopt call {lease.lease_id}" in log and "grow call" in log
            after = client.get_lease(lease.lease_id)
            assert after.state == "released" and after.peak_memory_bytes >= 150 * MiB
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
