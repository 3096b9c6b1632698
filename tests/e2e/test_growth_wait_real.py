"""Time-shifting a spike instead of killing it, for real: a node with no room left, one call
holding most of it for a moment, another spiking past its budget. The spiking call waits,
paused by the kernel at its limit, until the first one ends, and is then grown; with the wait
off (`--growth-wait-ms 0`) the same spike is killed. Real broker and node processes, real
cgroups and BPF."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client, RunResult

MiB = 1 << 20


def _worker(curve: str) -> list[str]:
    return [sys.executable, "-m", "agentcg.clients.worker", "--curve", curve]


@pytest.mark.parametrize(("wait_ms", "outcome"), [(5_000, "grown"), (0, "killed")])
def test_a_spike_waits_for_room_instead_of_being_killed(
    tmp_path: Path, cgroup_write: Path, bcc_available: None, wait_ms: int, outcome: str
) -> None:
    cluster = LocalCluster(tmp_path, node_memory="256M")
    cluster.broker_args = ("--growth-wait-ms", str(wait_ms))
    with cluster, Client(cluster.broker_address, timeout_s=60) as c:
        c.set_tenant("t", 1 << 30)
        # 200 of the node's 256 MiB, held ~150 MB for 1.5 s.
        holder = c.reserve("t", 200 * MiB, command_class="holder")
        held: dict[str, RunResult] = {}
        running = threading.Thread(
            target=lambda: held.setdefault("r", c.exec(holder, _worker("0:150,1.5:0")))
        )
        running.start()
        try:
            # 48 MiB, spiking to ~120 MB at once: paused at its budget, the node out of room.
            spiked = c.run("t", 48 * MiB, _worker("0:120,0.5:0"), command_class="spike")
        finally:
            running.join(60)
        assert held["r"].outcome == "completed", held["r"]
        assert spiked.outcome == outcome, spiked
        assert "pause" in spiked.actions
        if outcome == "grown":
            assert spiked.exit_code == 0 and spiked.budget_bytes >= 120 * 10**6
            # The caller saw it kept paused, then grown.
            waited = spiked.actions.index("wait")
            assert "grow" in spiked.actions[waited:], spiked.actions
        else:
            assert "no memory headroom" in spiked.reason
