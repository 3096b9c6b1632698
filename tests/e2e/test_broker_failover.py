"""Tool calls across a broker failover, end to end: two brokers on one SQLite file (one leads,
one stands by, broker/leadership.py), a real node agent and the SDK given both brokers. The
leader is SIGKILLed while a call runs; the call spikes past its budget as the takeover begins,
another call is asked for at that moment, and a third, granted just before, is started then."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from agentcg.broker.store import Store
from agentcg.clients.cluster import BrokerProcess, LocalCluster, leader_and_standby
from agentcg.clients.sdk import Client, RunResult
from agentcg.v1 import node_pb2, node_pb2_grpc, types_pb2

from ..conftest import wait_until

MiB = 1 << 20


@contextlib.contextmanager
def failover_cluster(
    tmp_path: Path, node_memory: str, args: tuple[str, ...] = ()
) -> Iterator[tuple[BrokerProcess, BrokerProcess, LocalCluster, str]]:
    """Broker a leading, b standing by on one SQLite file, and a real node agent given both:
    (a, b, the cluster, the node's address). Everything is stopped on the way out."""
    brokers: list[BrokerProcess] = []
    cluster = LocalCluster(tmp_path / "cluster", node_memory=node_memory, log_level="INFO")
    cluster.workdir.mkdir()
    try:
        a, b = leader_and_standby(tmp_path, Store.default_url(tmp_path), brokers, args=args)
        cluster.broker_address = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        yield a, b, cluster, cluster.start_node(0)
    finally:
        cluster.stop()
        for broker in brokers:
            broker.stop(signal.SIGKILL)


def test_tool_calls_ride_through_a_broker_failover(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    with failover_cluster(tmp_path, "2G") as (a, b, cluster, _):
        started, go = tmp_path / "started", tmp_path / "go"
        # Waits for `go`, then allocates 150 MiB in a 64 MiB budget.
        spike = (
            "import os, time\n"
            f"open({str(started)!r}, 'w').close()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "b = b'x' * (150 << 20)\n"
        )
        results: dict[str, RunResult] = {}
        with Client(cluster.broker_address, timeout_s=60) as c:
            c.set_tenant("ft", 1024 * MiB)

            def run(name: str, budget: int, argv: list[str]) -> None:
                results[name] = c.run("ft", budget, argv, queue_timeout_ms=30_000)

            spiking = threading.Thread(
                target=run, args=("spike", 64 * MiB, [sys.executable, "-c", spike])
            )
            spiking.start()
            deadline = time.monotonic() + 60
            while not started.exists():
                assert time.monotonic() < deadline and spiking.is_alive(), results
                time.sleep(0.02)

            # Granted by the old leader, started on the node only once it is dead: the node
            # checks the lease with the broker, and that waits for the new leader.
            granted = c.reserve("ft", 16 * MiB)

            def start_granted() -> None:
                results["granted"] = c.exec(granted, ["true"])

            a.stop(signal.SIGKILL)
            go.touch()  # the spike, as the takeover begins: the node pauses it and asks
            threads = [
                threading.Thread(target=run, args=("asked", 32 * MiB, ["true"])),
                threading.Thread(target=start_granted),
                spiking,
            ]
            for t in threads[:2]:
                t.start()
            for t in threads:
                t.join(120)
                assert not t.is_alive()

            # The new leader grew the paused call, admitted the asked one; all three ended.
            assert b.leader_gauge() == 1
            spiked, other = results["spike"], results["asked"]
            assert (spiked.exit_code, spiked.outcome) == (0, "grown"), spiked
            assert spiked.peak_bytes >= 150 * MiB
            assert (other.exit_code, other.outcome) == (0, "completed"), other
            assert results["granted"].exit_code == 0, results["granted"]
            c.release(granted.lease_id)
            for r in (spiked, other, results["granted"]):
                assert c.get_lease(r.lease_id).state == "released"
            assert c.get_tenant("ft").granted_memory_bytes == 0


def test_a_paused_call_held_by_a_leader_that_dies_is_asked_for_again(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    """The leader holds a paused call's growth (no room: WAIT) and is SIGKILLed. The new leader
    never heard the ask; the node sends it again once its stream reaches the new leader, which
    holds it in turn and grows the call when room frees. (Without the ask sent again the node
    would wait out the old leader's 20 s and its own timeout, then kill the call.)"""
    growth_wait = ("--growth-wait-ms", "20000")
    with failover_cluster(tmp_path, "256M", growth_wait) as (a, b, cluster, _):
        results: dict[str, RunResult] = {}
        with Client(cluster.broker_address, timeout_s=60) as c:
            c.set_tenant("ft", 1024 * MiB)
            holder = c.reserve("ft", 222 * MiB)  # 2 MiB left beside a 32 MiB call

            def spike() -> None:
                argv = [sys.executable, "-c", "b = b'x' * (100 << 20)"]
                results["spike"] = c.run("ft", 32 * MiB, argv)

            spiking = threading.Thread(target=spike)
            spiking.start()
            a.wait_log("hold growth of lease", 60)
            a.stop(signal.SIGKILL)
            b.wait_log("hold growth of lease", 15)  # asked again, held again
            c.release(holder.lease_id)  # room frees on the new leader: the call is grown
            spiking.join(60)
            assert not spiking.is_alive()
        spiked = results["spike"]
        assert (spiked.exit_code, spiked.outcome) == (0, "grown"), spiked
        assert spiked.peak_bytes >= 100 * MiB
        assert "asked the broker again after the link to it was lost" in cluster.log("node0")


def test_a_lease_released_after_a_failover_still_stops_its_call_at_once(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    """Which leases a node runs calls under is in the leader's memory only (the node names
    itself when it asks about a lease). After a failover the node, its stream open again, asks
    the new leader about every lease it runs, which fills that leader's table again: a lease
    released there is pushed to the node, and its call, still followed, stops at once."""
    with failover_cluster(tmp_path, "256M") as (a, b, cluster, address):
        with (
            Client(cluster.broker_address, timeout_s=60) as c,
            grpc.insecure_channel(address) as channel,
        ):
            c.set_tenant("ft", 1024 * MiB)
            # Its stream open before the call starts: it asks about no lease then.
            opened = "uplink connected to broker"
            wait_until(lambda: opened in cluster.log("node0"), "the node's stream opened")
            lease = c.reserve("ft", 32 * MiB)
            request = node_pb2.ExecRequest(lease_id=lease.lease_id, argv=["sleep", "600"])
            # Followed: without the push, this stream would run into its deadline.
            events = node_pb2_grpc.NodeAgentStub(channel).Exec(request, timeout=60)
            assert next(events).HasField("started")
            a.stop(signal.SIGKILL)
            asked = "stream to the broker (re)opened: asked it about the lease of every call"
            wait_until(
                lambda: asked in cluster.log("node0"), "the node asked the new leader", timeout_s=30
            )
            c.release(lease.lease_id)
            *_, last = events
            assert last.exited.outcome == types_pb2.OUTCOME_KILLED, last
            assert "lease is released at the broker" in last.exited.reason, last
            # Sent to the node (or held for it until its stream was open at b): b knew it ran
            # the call, which the node told it when it asked again.
            b.wait_log(f"lease {lease.lease_id} tenant ft released: ", 15)
