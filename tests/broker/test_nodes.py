"""Operating the nodes (NodeAdmin) through a real broker process on a real database (SQLite and
PostgreSQL): list what each node holds and reports, cordon it (no new leases, the running ones
keep theirs), drain it (leases revoked at a deadline, the node told to stop their calls),
uncordon it; the cordon outlives a node's re-registration and a broker restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from agentcg.broker.store import Store
from agentcg.clients.cluster import LocalCluster, free_port, scrape_metric
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import InvalidArgumentError, NotFoundError, QuotaExceededError
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2

from ..conftest import wait_until

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def cluster(tmp_path: Path, database_url: str) -> Iterator[tuple[LocalCluster, SimNode, SimNode]]:
    """A broker with two simulated nodes: sim-a (8 GiB, where placement goes first) and sim-b
    (4 GiB)."""
    metrics = ("--metrics-listen", "127.0.0.1:0")
    with LocalCluster(
        tmp_path, nodes=0, database_url=database_url, log_level="WARNING", broker_args=metrics
    ) as c:
        with (
            SimNode(c.broker_address, "sim-a", memory_bytes=8 * GiB) as a,
            SimNode(c.broker_address, "sim-b", memory_bytes=4 * GiB) as b,
        ):
            yield c, a, b


def audit_kinds(url: str) -> list[str]:
    store = Store(url)
    try:
        return [e.kind for e in store.audit()]
    finally:
        store.close()


def test_a_cordoned_node_takes_no_new_lease_and_keeps_its_running_ones(
    cluster: tuple[LocalCluster, SimNode, SimNode], database_url: str
) -> None:
    c, _, _ = cluster
    with Client(c.broker_address) as cl:
        cl.set_tenant("t", 16 * GiB)
        first = cl.reserve("t", 512 * MiB, ttl_ms=60_000)
        assert first.node_id == "sim-a"  # the most free memory
        info = cl.cordon_node("sim-a", reason="kernel upgrade")
        assert (info.cordoned, info.cordon_reason, info.state) == (
            True,
            "kernel upgrade",
            "cordoned",
        )
        assert info.active_leases == 1 and info.granted_memory_bytes == 512 * MiB
        assert info.drain_deadline_ms == 0
        # New leases go elsewhere, though sim-a has more free memory.
        assert {cl.reserve("t", 64 * MiB).node_id for _ in range(3)} == {"sim-b"}
        # The running lease on sim-a renews and releases as before.
        assert cl.renew(first.lease_id, ttl_ms=120_000).state == "active"
        assert cl.release(first.lease_id).state == "released"
        # Both cordoned: nothing to place on; a queued ask waits for an uncordon.
        cl.cordon_node("sim-b")
        with pytest.raises(QuotaExceededError) as denied:
            cl.reserve("t", 64 * MiB)
        assert denied.value.code == "no_nodes"
        assert "cordoned" in denied.value.message
        with Client(c.broker_address) as other, ThreadPoolExecutor(1) as pool:
            queued = pool.submit(other.reserve, "t", 64 * MiB, queue_timeout_ms=20_000)
            time.sleep(0.5)
            assert not queued.done()
            back = cl.uncordon_node("sim-a")
            assert (back.cordoned, back.cordon_reason, back.state) == (False, "", "ready")
            assert queued.result(10).node_id == "sim-a"
        nodes = {n.node_id: n for n in cl.list_nodes()}
        assert [nodes["sim-a"].state, nodes["sim-b"].state] == ["ready", "cordoned"]
    kinds = audit_kinds(database_url)
    assert kinds.count("node_cordon") == 2 and kinds.count("node_uncordon") == 1


def test_a_drain_revokes_what_still_runs_at_its_deadline(
    cluster: tuple[LocalCluster, SimNode, SimNode], database_url: str
) -> None:
    c, a, _ = cluster
    with Client(c.broker_address) as cl:
        cl.set_tenant("t", 16 * GiB)
        leases = [cl.reserve("t", 512 * MiB, ttl_ms=600_000) for _ in range(3)]
        assert {x.node_id for x in leases} == {"sim-a"}
        started = time.time()
        info = cl.cordon_node("sim-a", reason="reboot", drain_grace_ms=1_000)
        assert info.state == "draining" and info.active_leases == 3
        assert info.drain_deadline_ms >= started * 1000 + 900
        seen: list[int] = []
        drained = cl.drain_node(
            "sim-a", poll_s=0.1, progress=lambda n: seen.append(n.active_leases)
        )
        assert drained.active_leases == 0 and drained.granted_memory_bytes == 0
        assert seen[0] == 3 and seen[-1] == 0
        assert time.time() - started >= 0.9  # not before the deadline
        for x in leases:
            assert cl.get_lease(x.lease_id).state == "revoked"
        assert cl.get_tenant("t").granted_memory_bytes == 0
        # The node was told to stop each call, naming the drain.
        wait_until(lambda: len(a.decisions) >= 3, "three preempt decisions", timeout_s=15)
        assert {d.lease_id for d in a.decisions} == {x.lease_id for x in leases}
        assert all(d.kind == broker_pb2.DECISION_KIND_PREEMPT for d in a.decisions)
        assert all("drained" in d.reason for d in a.decisions)
        # Still cordoned after the drain: the next lease goes to sim-b.
        assert cl.reserve("t", 64 * MiB).node_id == "sim-b"
    metrics = c.metrics_address("broker")
    assert scrape_metric(metrics, "agentcg_broker_lease_drain_revocations_total") == 3
    assert scrape_metric(metrics, "agentcg_broker_nodes_cordoned") == 1
    assert audit_kinds(database_url).count("drain") == 3


def test_a_lease_whose_call_a_node_runs_is_pushed_to_that_node_when_renewed_or_ended(
    cluster: tuple[LocalCluster, SimNode, SimNode],
) -> None:
    """A node that asked about a lease for its call (GetLeaseRequest.node_id) is sent the lease
    on its stream when a caller renews it, and when a caller releases it (Release,
    ReleaseBatch) or it expires; not when the node itself reported the call finished, and not
    to a node the lease is not placed on."""
    c, a, b = cluster
    with Client(c.broker_address) as cl, grpc.insecure_channel(c.broker_address) as ch:
        stub = broker_pb2_grpc.BrokerStub(ch)

        def ask(lease_id: str, node_id: str) -> types_pb2.Lease:
            return stub.GetLease(broker_pb2.GetLeaseRequest(lease_id=lease_id, node_id=node_id))

        cl.set_tenant("t", 16 * GiB)
        released, batched, finished, elsewhere, unasked = (
            cl.reserve("t", 512 * MiB) for _ in range(5)
        )
        expiring = cl.reserve("t", 512 * MiB, ttl_ms=1_000)
        for x in (released, batched, finished, elsewhere, unasked, expiring):
            assert x.node_id == "sim-a"
        for x in (released, batched, finished, expiring):
            assert ask(x.lease_id, "sim-a").state == types_pb2.LEASE_STATE_ACTIVE
        ask(elsewhere.lease_id, "sim-b")  # not placed there: nothing is pushed to sim-b
        with pytest.raises(grpc.RpcError) as bad:
            ask(unasked.lease_id, "../sim-a")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node_id" in (bad.value.details() or "")

        a.outbox.put(
            broker_pb2.NodeMessage(
                finished=broker_pb2.CallFinished(
                    lease_id=finished.lease_id, exit_code=0, outcome=types_pb2.OUTCOME_COMPLETED
                )
            )
        )
        wait_until(lambda: cl.get_lease(finished.lease_id).state == "released", "finished")
        renewed = cl.renew(released.lease_id, ttl_ms=900_000)
        cl.renew(elsewhere.lease_id, ttl_ms=900_000)
        cl.release(released.lease_id)
        cl.release_batch([batched.lease_id, elsewhere.lease_id, unasked.lease_id])
        wait_until(lambda: len(a.lease_updates) >= 4, "four lease updates", timeout_s=15)
        assert a.lease_updates[0].expires_at_unix_ms == renewed.expires_at_unix_ms
        assert [(x.lease_id, x.state) for x in a.lease_updates] == [
            (released.lease_id, types_pb2.LEASE_STATE_ACTIVE),
            (released.lease_id, types_pb2.LEASE_STATE_RELEASED),
            (batched.lease_id, types_pb2.LEASE_STATE_RELEASED),
            (expiring.lease_id, types_pb2.LEASE_STATE_EXPIRED),
        ]
        assert all(x.as_of_unix_ms > 0 and x.node_id == "sim-a" for x in a.lease_updates)
        assert b.lease_updates == [] and a.decisions == [] and b.decisions == []
    metrics = c.metrics_address("broker")
    updates = "agentcg_broker_lease_updates_total"
    assert scrape_metric(metrics, updates, state="active") == 1
    assert scrape_metric(metrics, updates, state="released") == 2
    assert scrape_metric(metrics, updates, state="expired") == 1


def test_what_a_node_is_told_while_its_stream_is_closed_is_sent_once_it_opens(
    cluster: tuple[LocalCluster, SimNode, SimNode],
) -> None:
    """A lease change meant for a node whose stream is not open (a release, a renewal, a
    revocation by a drain) is held and sent when the stream opens again, the latest per lease.
    A node asks about every lease when it reconnects, but it may ask before the broker has its
    stream (GetLease and Connect are separate calls): a change made between the two reached it
    only at its next check, near the lease's expiry (seen after a failover)."""
    c, a, _ = cluster
    with Client(c.broker_address) as cl, grpc.insecure_channel(c.broker_address) as ch:
        stub = broker_pb2_grpc.BrokerStub(ch)
        cl.set_tenant("t", 16 * GiB)
        released, renewed, revoked = (cl.reserve("t", 512 * MiB) for _ in range(3))
        for x in (released, renewed, revoked):
            assert x.node_id == "sim-a"
            stub.GetLease(broker_pb2.GetLeaseRequest(lease_id=x.lease_id, node_id="sim-a"))
        a.address = f"127.0.0.1:{free_port()}"  # its stream closes; nothing listens there
        wait_until(lambda: cl.get_node("sim-a").state == "disconnected", "sim-a disconnected")
        cl.release(released.lease_id)
        cl.renew(renewed.lease_id, ttl_ms=900_000)
        cl.cordon_node("sim-a", drain_grace_ms=500)  # revokes both leases left, 0.5 s from now
        cl.drain_node("sim-a", poll_s=0.1)
        time.sleep(0.5)
        assert a.lease_updates == [] and a.decisions == []  # no stream to send them on
        a.address = c.broker_address
        wait_until(lambda: len(a.lease_updates) + len(a.decisions) >= 3, "what was held")
        time.sleep(0.5)
        # The renewal was held, then replaced by the revocation of the same lease.
        assert [(x.lease_id, x.state) for x in a.lease_updates] == [
            (released.lease_id, types_pb2.LEASE_STATE_RELEASED)
        ]
        assert sorted((d.lease_id, d.kind) for d in a.decisions) == sorted(
            (x.lease_id, broker_pb2.DECISION_KIND_PREEMPT) for x in (renewed, revoked)
        )
        assert all("drained" in d.reason for d in a.decisions)


def test_a_cordon_outlives_re_registration_and_a_broker_restart(
    cluster: tuple[LocalCluster, SimNode, SimNode],
) -> None:
    c, a, b = cluster
    with Client(c.broker_address) as cl:
        cl.cordon_node("sim-a", reason="disk", drain_grace_ms=3_600_000)
        deadline = cl.get_node("sim-a").drain_deadline_ms
    c.stop("broker")
    address = c.start_broker()
    a.address = b.address = address  # the sim nodes connect and register again there
    wait_until(
        lambda: a.connected.is_set() and b.connected.is_set(), "both nodes back", timeout_s=15
    )
    with Client(address) as cl:
        wait_until(lambda: cl.get_node("sim-a").connected, "sim-a registered again", timeout_s=15)
        again = cl.get_node("sim-a")
        assert (again.cordoned, again.cordon_reason) == (True, "disk")
        assert again.drain_deadline_ms == deadline
        cl.set_tenant("t", GiB)
        assert cl.reserve("t", 64 * MiB).node_id == "sim-b"


def test_list_nodes_shows_heartbeats_and_bad_input_changes_nothing(
    cluster: tuple[LocalCluster, SimNode, SimNode],
) -> None:
    c, a, _ = cluster
    a.outbox.put(
        broker_pb2.NodeMessage(
            heartbeat=broker_pb2.Heartbeat(
                used=types_pb2.Resources(memory_bytes=300 * MiB), running_calls=2
            )
        )
    )
    with Client(c.broker_address) as cl:
        wait_until(
            lambda: cl.get_node("sim-a").used_memory_bytes == 300 * MiB,
            "the heartbeat",
            timeout_s=15,
        )
        nodes = cl.list_nodes()
        assert [n.node_id for n in nodes] == ["sim-a", "sim-b"]
        sim_a = nodes[0]
        assert sim_a.running_calls == 2 and sim_a.last_heartbeat_ms > 0
        assert sim_a.memory_capacity_bytes == 8 * GiB and sim_a.connected
        assert sim_a.state == "ready"
        for kwargs, field in [
            ({"node_id": "../etc"}, "node_id"),
            ({"node_id": "sim-a", "reason": "x" * 257}, "reason"),
            ({"node_id": "sim-a", "reason": "bad\nline"}, "reason"),
            ({"node_id": "sim-a", "drain_grace_ms": -1}, "drain_grace_ms"),
            ({"node_id": "sim-a", "drain_grace_ms": 86_400_001}, "drain_grace_ms"),
        ]:
            node_id = str(kwargs.pop("node_id"))
            with pytest.raises(InvalidArgumentError) as bad:
                cl.cordon_node(node_id, **kwargs)  # type: ignore[arg-type]
            assert bad.value.field == field, kwargs
        with pytest.raises(NotFoundError):
            cl.cordon_node("sim-zz")
        with pytest.raises(NotFoundError):
            cl.uncordon_node("sim-zz")
        with pytest.raises(InvalidArgumentError):
            cl.get_node("")
        assert [n.cordoned for n in cl.list_nodes()] == [False, False]
        assert cl.uncordon_node("sim-a").state == "ready"  # uncordoning one in service: a no-op


def test_the_nodes_commands(cluster: tuple[LocalCluster, SimNode, SimNode]) -> None:
    """`agentcg nodes list|cordon|drain|uncordon` and `agentcg lease list --node` against the
    broker (the CLI over the SDK)."""
    c, _, _ = cluster

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        """``agentcg ARGS --broker B``."""
        return subprocess.run(
            [sys.executable, "-m", "agentcg.clients.cli", *args, "--broker", c.broker_address],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )

    with Client(c.broker_address) as cl:
        cl.set_tenant("t", 16 * GiB)
        lease = cl.reserve("t", 256 * MiB)
        assert lease.node_id == "sim-a"
        listed = json.loads(cli("nodes", "list", "--json").stdout)["nodes"]
        assert [(n["node_id"], n["state"], n["active_leases"]) for n in listed] == [
            ("sim-a", "ready", 1),
            ("sim-b", "ready", 0),
        ]
        assert lease.lease_id[:12] in cli("lease", "list", "--node", "sim-a").stdout
        assert lease.lease_id[:12] not in cli("lease", "list", "--node", "sim-b").stdout
        out = cli("nodes", "cordon", "sim-b", "--reason", "maintenance")
        assert out.returncode == 0 and "cordoned" in out.stdout
        table = cli("nodes", "list").stdout
        assert "maintenance" in table and "cordoned" in table
        # A drain that cannot finish in time: exit 1, the node stays cordoned.
        out = cli("nodes", "drain", "sim-a", "--timeout-s", "0.5")
        assert out.returncode == 1 and "still has 1 active leases" in out.stderr
        assert cl.get_node("sim-a").cordoned and cl.get_lease(lease.lease_id).state == "active"
        # With a grace, the broker revokes the lease and the drain finishes.
        out = cli("nodes", "drain", "sim-a", "--grace-s", "0.5")
        assert out.returncode == 0, out.stderr
        assert "drained" in out.stdout
        assert cl.get_lease(lease.lease_id).state == "revoked"
        out = cli("nodes", "uncordon", "sim-a")
        assert out.returncode == 0 and "uncordoned" in out.stdout
        assert cl.get_node("sim-a").state == "ready"
        bad = cli("nodes", "cordon", "no/such")
        assert bad.returncode == 2 and "node_id" in bad.stderr
