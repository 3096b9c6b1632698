"""Taking a real node out of service: broker and node agent as real processes, the tool call a
real process in its own cgroup. A cordoned node gets no new call; a drain with a grace stops
the one still running there when the grace is over (only that call), and `agentcg nodes drain`
returns once the node runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client

MiB = 1 << 20
NODE_ID = f"n0-{os.getpid()}"  # LocalCluster's first node
# Holds ~20 MB for 60 s: still running when the drain's grace is over.
LONG_ARGV = [sys.executable, "-m", "agentcg.clients.worker", "--curve", "0:20,60:20"]


def cli(cluster: LocalCluster, *args: str, argv: tuple[str, ...] = ()) -> list[str]:
    """``agentcg ARGS --broker B [-- ARGV]``."""
    broker = ["--broker", cluster.broker_address]
    return [
        sys.executable,
        "-m",
        "agentcg.clients.cli",
        *args,
        *broker,
        *(("--", *argv) if argv else ()),
    ]


def agentcg_run(cluster: LocalCluster, memory: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(cluster, "run", "--tenant", "t", "--memory", memory, argv=argv),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_drain_stops_only_what_still_runs_after_its_grace(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    with LocalCluster(tmp_path, node_memory="1G") as c, Client(c.broker_address) as client:
        client.set_tenant("t", 512 * MiB)
        running = subprocess.Popen(
            cli(c, "run", "--tenant", "t", "--memory", "64M", "--json", argv=tuple(LONG_ARGV)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not any(call.lease_id for n in client.nodes_calls() for call in n.calls):
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the call did not start"
            time.sleep(0.1)
        [lease] = client.list_leases(tenant="t")
        assert lease.node_id == NODE_ID

        # Cordoned: a new call is denied (nowhere else to go), the running one goes on.
        assert client.cordon_node(NODE_ID, reason="kernel upgrade").active_leases == 1
        denied = agentcg_run(c, "16M", "true")
        assert denied.returncode == 75, denied.stderr  # EX_TEMPFAIL: admission denied
        assert "cordoned" in denied.stderr
        assert running.poll() is None

        # The node's heartbeat reports what the call's cgroup uses (measured, ~20 MB).
        deadline = time.monotonic() + 15
        while client.get_node(NODE_ID).used_memory_bytes < 10 * MiB:
            assert time.monotonic() < deadline, client.get_node(NODE_ID)
            time.sleep(0.2)

        started = time.monotonic()
        drain = subprocess.run(
            cli(c, "nodes", "drain", NODE_ID, "--grace-s", "1"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert drain.returncode == 0, drain.stderr
        assert f"node {NODE_ID} drained" in drain.stdout
        assert time.monotonic() - started >= 0.9
        out, err = running.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["outcome"] == "killed", (result, err)
        assert "drained" in result["reason"]
        assert client.get_lease(lease.lease_id).state == "revoked"
        node = client.get_node(NODE_ID)
        assert (node.state, node.active_leases, node.granted_memory_bytes) == ("draining", 0, 0)
        assert c.procs["node0"].poll() is None  # only the call was stopped

        # Back in service: the next call runs there.
        client.uncordon_node(NODE_ID)
        ok = agentcg_run(c, "16M", "true")
        assert ok.returncode == 0, ok.stderr
