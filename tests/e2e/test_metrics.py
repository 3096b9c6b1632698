"""Prometheus metrics end to end: a real broker (and node) process started with
``--metrics-listen 127.0.0.1:0``, real operations, the endpoint scraped over HTTP and parsed with
prometheus_client's own parser. Counters are compared before and after each operation."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client, Lease
from agentcg.clients.simnode import SimNode
from agentcg.errors import InvalidArgumentError, NotFoundError, QuotaExceededError
from agentcg.v1 import broker_pb2, types_pb2
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import wait_until

MiB = 1 << 20
METRICS = ("--metrics-listen", "127.0.0.1:0")
SPIKE_ARGV = [sys.executable, "-m", "agentcg.clients.worker", "--curve", "0:210,0.5:0"]


class Scrape:
    """One scrape of an endpoint: sample values by name and labels."""

    def __init__(self, address: str) -> None:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            assert reply.status == 200
            text = reply.read().decode()
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled child not created yet (histograms are made on
        first use). A metric whose family is missing altogether fails."""
        key = (name, frozenset(labels.items()))
        if key in self.samples:
            return self.samples[key]
        family = name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
        assert family in self.families, f"no {name} in the scrape"
        return 0.0


def wait_for(
    address: str, check: Callable[[Scrape], bool], what: str, timeout_s: float = 20
) -> Scrape:
    deadline = time.monotonic() + timeout_s
    while True:
        s = Scrape(address)
        if check(s):
            return s
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- the flag ---------------------------------------------------------------------------------


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("command", ["broker", "node"])
@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:", "127.0.0.1:99999", ":9100"])
def test_a_malformed_metrics_address_is_a_usage_error(
    tmp_path: Path, command: str, address: str
) -> None:
    data = ["--data-dir", str(tmp_path / "b")] if command == "broker" else []
    proc = cli(command, "--metrics-listen", address, *data)
    assert proc.returncode == 2, proc
    assert "--metrics-listen" in proc.stderr and "HOST:PORT" in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()  # refused before anything started


def test_a_metrics_port_in_use_stops_the_broker_with_the_flag_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli(
            "broker",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "b"),
            "--metrics-listen",
            f"127.0.0.1:{port}",
        )
    assert proc.returncode == 2, proc
    assert f"--metrics-listen: cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()  # refused before the database was touched


def test_metrics_are_off_unless_asked_for(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=0, log_level="WARNING") as c:
        assert c.metrics_address("broker") == ""
        assert (tmp_path / "broker.addr").read_text().strip() == c.broker_address


# -- the broker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, SimNode]]:
    workdir = tmp_path_factory.mktemp("metrics-broker")
    with LocalCluster(workdir, nodes=0, broker_args=METRICS, log_level="WARNING") as c:
        with SimNode(c.broker_address, memory_bytes=1 << 34) as node:
            yield c, node


def test_broker_metrics_endpoint_serves_the_live_state(
    broker: tuple[LocalCluster, SimNode],
) -> None:
    cluster, _ = broker
    address = cluster.metrics_address("broker")
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    s = Scrape(address)
    assert s.get("agentcg_broker_node_streams") == 1
    assert s.get("agentcg_broker_nodes_registered") == 1
    assert s.get("process_cpu_seconds_total") > 0  # the process collectors are there too
    # Its start-up state (imports, stubs, the loaded ledger) was frozen once it served
    # (agentcg.heap): a full collection walks only what came after.
    assert s.get("agentcg_gc_frozen_objects") > 10_000


def test_reserve_outcomes_latency_leases_and_commits(
    broker: tuple[LocalCluster, SimNode],
) -> None:
    cluster, _ = broker
    address = cluster.metrics_address("broker")
    total = "agentcg_broker_reserve_total"
    before = Scrape(address)
    with Client(cluster.broker_address) as c:
        c.set_tenant("acme", 100 * MiB)
        first = c.reserve("acme", 64 * MiB)
        with pytest.raises(QuotaExceededError):
            c.reserve("acme", 64 * MiB)  # 36 MiB left
        with pytest.raises(InvalidArgumentError):
            c.reserve("acme", 0)
        with pytest.raises(NotFoundError):
            c.reserve("nobody-here", MiB)
        keyed = c.reserve("acme", 8 * MiB, idempotency_key="k1")
        again = c.reserve("acme", 8 * MiB, idempotency_key="k1")
        assert again.lease_id == keyed.lease_id
        during = Scrape(address)
        c.release(first.lease_id)
    after = Scrape(address)

    def delta(name: str, **labels: str) -> float:
        return during.get(name, **labels) - before.get(name, **labels)

    assert delta(total, rpc="Reserve", outcome="granted") == 2
    assert delta(total, rpc="Reserve", outcome="denied") == 1
    assert delta(total, rpc="Reserve", outcome="invalid_argument") == 1
    assert delta(total, rpc="Reserve", outcome="unknown_tenant") == 1
    assert delta(total, rpc="Reserve", outcome="replayed") == 1
    assert delta(total, rpc="Reserve", outcome="timed_out") == 0
    latency = "agentcg_broker_admission_seconds_count"
    assert delta(latency, rpc="Reserve", outcome="granted") == 2
    assert delta(latency, rpc="Reserve", outcome="denied") == 1
    # The tenant, the two grants: three decisions made durable (denials write nothing).
    assert delta("agentcg_broker_journal_commit_decisions_sum") == 3
    assert delta("agentcg_broker_journal_commit_seconds_count") >= 1
    assert during.get("agentcg_broker_db_wal_bytes") > 0  # the broker's SQLite WAL file
    assert (
        during.get("agentcg_broker_active_leases") == before.get("agentcg_broker_active_leases") + 2
    )
    assert during.get("agentcg_broker_org_active_leases", org="acme") == 2
    assert during.get("agentcg_broker_org_granted_memory_bytes", org="acme") == 72 * MiB
    # Released: one lease fewer, counted.
    assert after.get("agentcg_broker_org_active_leases", org="acme") == 1
    assert (
        after.get("agentcg_broker_lease_releases_total")
        - during.get("agentcg_broker_lease_releases_total")
        == 1
    )


def test_queue_waiters_queued_grants_and_timeouts(broker: tuple[LocalCluster, SimNode]) -> None:
    cluster, _ = broker
    address = cluster.metrics_address("broker")
    total = "agentcg_broker_reserve_total"
    before = Scrape(address)
    with Client(cluster.broker_address) as c, Client(cluster.broker_address) as waiting:
        c.set_tenant("queued", 100 * MiB)
        held = c.reserve("queued", 64 * MiB)
        got: list[Lease] = []
        waiter = threading.Thread(
            target=lambda: got.append(waiting.reserve("queued", 64 * MiB, queue_timeout_ms=30_000))
        )
        waiter.start()
        try:
            wait_for(address, lambda s: s.get("agentcg_broker_queue_waiters") == 1, "a waiter")
        finally:
            c.release(held.lease_id)
            waiter.join(30)
        assert got, "the queued Reserve was not admitted"
        with pytest.raises(QuotaExceededError):
            c.reserve("queued", 64 * MiB, queue_timeout_ms=100)  # 64 of 100 MiB held
        c.release(got[0].lease_id)
    after = Scrape(address)
    assert after.get("agentcg_broker_queue_waiters") == 0
    assert (
        after.get(total, rpc="Reserve", outcome="queued_granted")
        - before.get(total, rpc="Reserve", outcome="queued_granted")
        == 1
    )
    assert (
        after.get(total, rpc="Reserve", outcome="timed_out")
        - before.get(total, rpc="Reserve", outcome="timed_out")
        == 1
    )
    assert after.get(total, rpc="Reserve", outcome="denied") == before.get(
        total, rpc="Reserve", outcome="denied"
    )


def test_reserve_batch_counts_each_ask(broker: tuple[LocalCluster, SimNode]) -> None:
    cluster, _ = broker
    address = cluster.metrics_address("broker")
    total = "agentcg_broker_reserve_total"

    def ask(memory: int) -> broker_pb2.ReserveRequest:
        return broker_pb2.ReserveRequest(
            tenant="batch", intent=types_pb2.Resources(memory_bytes=memory)
        )

    before = Scrape(address)
    with Client(cluster.broker_address) as c:
        c.set_tenant("batch", 40 * MiB)
        got = c.reserve_batch([ask(16 * MiB), ask(16 * MiB), ask(16 * MiB)])
        with pytest.raises(InvalidArgumentError):
            c.reserve_batch([ask(MiB), ask(0)])  # refused whole: both asks counted
        released = c.release_batch([x.lease_id for x in got if isinstance(x, Lease)])
    after = Scrape(address)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta(total, rpc="ReserveBatch", outcome="granted") == 2
    assert delta(total, rpc="ReserveBatch", outcome="denied") == 1
    assert delta(total, rpc="ReserveBatch", outcome="invalid_argument") == 2
    latency = "agentcg_broker_admission_seconds_count"
    assert delta(latency, rpc="ReserveBatch", outcome="answered") == 1
    assert delta(latency, rpc="ReserveBatch", outcome="invalid_argument") == 1
    assert delta("agentcg_broker_lease_releases_total") == len(released) == 2


def test_pressure_events_and_decisions_sent_to_the_node(
    broker: tuple[LocalCluster, SimNode],
) -> None:
    cluster, node = broker
    address = cluster.metrics_address("broker")
    before = Scrape(address)
    with Client(cluster.broker_address) as c:
        c.set_tenant("spiky", 1024 * MiB)
        lease = c.reserve("spiky", 64 * MiB)
        sent = len(node.decisions)
        node.outbox.put(
            broker_pb2.NodeMessage(
                pressure=broker_pb2.PressureEvent(
                    event_id="e1",
                    lease_id=lease.lease_id,
                    epoch=lease.epoch,
                    kind=broker_pb2.PRESSURE_KIND_LIMIT_REACHED,
                    usage_bytes=64 * MiB,
                    budget_bytes=64 * MiB,
                    peak_bytes=64 * MiB,
                    requested_memory_bytes=128 * MiB,
                )
            )
        )
        node.outbox.put(
            broker_pb2.NodeMessage(
                pressure=broker_pb2.PressureEvent(
                    event_id="e2",
                    lease_id=lease.lease_id,
                    kind=broker_pb2.PRESSURE_KIND_SOFT_THRESHOLD,
                )
            )
        )
        deadline = time.monotonic() + 20
        while len(node.decisions) == sent:
            assert time.monotonic() < deadline, "no decision came down the stream"
            time.sleep(0.02)
        assert node.decisions[sent].kind == broker_pb2.DECISION_KIND_GROW
        after = wait_for(
            address,
            lambda s: (
                s.get("agentcg_broker_pressure_events_total", kind="soft_threshold")
                > before.get("agentcg_broker_pressure_events_total", kind="soft_threshold")
            ),
            "the soft-threshold event",
        )
        c.release(lease.lease_id)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("agentcg_broker_pressure_events_total", kind="limit_reached") == 1
    assert delta("agentcg_broker_pressure_events_total", kind="soft_threshold") == 1
    assert delta("agentcg_broker_pressure_events_total", kind="oom_kill") == 0
    assert delta("agentcg_broker_decisions_total", kind="grow") == 1
    assert delta("agentcg_broker_decisions_total", kind="kill") == 0


def test_preemption_is_counted_and_sent(broker: tuple[LocalCluster, SimNode]) -> None:
    cluster, node = broker
    address = cluster.metrics_address("broker")
    before = Scrape(address)
    with Client(cluster.broker_address) as c:
        c.set_tenant("prio", 64 * MiB)
        low = c.reserve("prio", 48 * MiB, priority=0)
        high = c.reserve("prio", 48 * MiB, priority=5, queue_timeout_ms=20_000)
        assert c.get_lease(low.lease_id).state == "revoked"
        c.release(high.lease_id)
    after = wait_for(
        address,
        lambda s: (
            s.get("agentcg_broker_decisions_total", kind="preempt")
            > before.get("agentcg_broker_decisions_total", kind="preempt")
        ),
        "the preempt decision",
    )

    def preempted() -> list[str]:  # as the node received them (on its own thread)
        return [d.lease_id for d in node.decisions if d.kind == broker_pb2.DECISION_KIND_PREEMPT]

    wait_until(lambda: low.lease_id in preempted(), "the preempt decision at the node")
    assert preempted()[-1] == low.lease_id
    assert (
        after.get("agentcg_broker_lease_preemptions_total")
        - before.get("agentcg_broker_lease_preemptions_total")
        == 1
    )
    assert (
        after.get("agentcg_broker_decisions_total", kind="preempt")
        - before.get("agentcg_broker_decisions_total", kind="preempt")
        == 1
    )


def test_lease_expiry_is_counted(broker: tuple[LocalCluster, SimNode]) -> None:
    cluster, _ = broker
    address = cluster.metrics_address("broker")
    before = Scrape(address)
    with Client(cluster.broker_address) as c:
        c.set_tenant("brief", 64 * MiB)
        lease = c.reserve("brief", MiB, ttl_ms=1)
        after = wait_for(
            address,
            lambda s: (
                s.get("agentcg_broker_lease_expiries_total")
                > before.get("agentcg_broker_lease_expiries_total")
            ),
            "the reaper to expire the lease",
        )
        assert c.get_lease(lease.lease_id).state == "expired"
    assert (
        after.get("agentcg_broker_lease_expiries_total")
        - before.get("agentcg_broker_lease_expiries_total")
        == 1
    )
    assert after.get("agentcg_broker_org_active_leases", org="brief") == 0


# -- the node ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, cgroup_write: Path, bcc_available: None
) -> Iterator[LocalCluster]:
    with LocalCluster(
        tmp_path_factory.mktemp("metrics-node"),
        node_memory="1G",
        broker_args=METRICS,
        node_args=METRICS,
    ) as c:
        yield c
    left = [p.name for p in cgroup_write.iterdir() if p.is_dir() and p.name.startswith("agentcg-n")]
    assert left == [], f"cgroups left behind: {left}"


def node_delta(before: Scrape, after: Scrape) -> Callable[..., float]:
    return lambda name, **labels: after.get(name, **labels) - before.get(name, **labels)


def test_the_node_agent_froze_its_start_up_state(cluster: LocalCluster) -> None:
    """Its imports, bcc's state and the BPF program's are out of the cycle collector's way
    (agentcg.heap): a full collection would otherwise stop enforcement for tens of ms."""
    assert Scrape(cluster.metrics_address("node0")).get("agentcg_gc_frozen_objects") > 10_000


def test_node_counts_a_grown_spike(cluster: LocalCluster) -> None:
    node = cluster.metrics_address("node0")
    broker = cluster.metrics_address("broker")
    assert node and broker
    before, broker_before = Scrape(node), Scrape(broker)
    assert before.get("agentcg_node_uplink_connected") == 1
    assert broker_before.get("agentcg_broker_node_streams") == 1
    with Client(cluster.broker_address) as c:
        c.set_tenant("rich", 1024 * MiB)
        result = c.run("rich", 64 * MiB, SPIKE_ARGV)
    assert result.outcome == "grown", result
    after, broker_after = Scrape(node), Scrape(broker)
    delta = node_delta(before, after)
    seen = Counter(result.actions)
    assert seen["grow"] >= 1
    for kind in ("throttle", "unthrottle", "pause", "grow", "resume", "kill"):
        assert delta("agentcg_node_actions_total", kind=kind, dry_run="false") == seen[kind], kind
    timed = Counter(kind for kind, _ in result.timed_actions)
    assert delta("agentcg_node_reaction_seconds_count", kind="grow") == timed["grow"] >= 1
    assert delta("agentcg_node_calls_started_total") == 1
    assert delta("agentcg_node_calls_finished_total", outcome="grown") == 1
    assert after.get("agentcg_node_calls_running") == 0
    assert after.get("agentcg_node_uplink_buffered_events") >= 0
    assert after.get("agentcg_node_uplink_dropped_events_total") == 0
    assert after.get("agentcg_node_bpf_ringbuf_drops_total") >= 0
    assert after.get("agentcg_node_bpf_pid_map_drops_total") >= 0
    # The broker's side of the same growths: each was asked for and sent down the stream.
    broker_delta = node_delta(broker_before, broker_after)
    assert (
        broker_delta("agentcg_broker_pressure_events_total", kind="limit_reached") >= seen["grow"]
    )
    assert broker_delta("agentcg_broker_decisions_total", kind="grow") >= seen["grow"]


def test_node_counts_a_killed_spike(cluster: LocalCluster) -> None:
    node = cluster.metrics_address("node0")
    before = Scrape(node)
    with Client(cluster.broker_address) as c:
        c.set_tenant("poor", 96 * MiB)
        result = c.run("poor", 64 * MiB, SPIKE_ARGV)
    assert result.outcome == "killed", result
    after = Scrape(node)
    delta = node_delta(before, after)
    seen = Counter(result.actions)
    assert seen["kill"] == 1
    for kind in ("throttle", "unthrottle", "pause", "grow", "resume", "kill"):
        assert delta("agentcg_node_actions_total", kind=kind, dry_run="false") == seen[kind], kind
    assert delta("agentcg_node_reaction_seconds_count", kind="kill") == 1
    assert delta("agentcg_node_calls_finished_total", outcome="killed") == 1
    assert delta("agentcg_node_oom_kills_total") == 0  # the node killed it, not the kernel


def test_dry_run_node_counts_its_actions_and_the_kernels_oom_kill(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    """A dry-run node applies nothing (not even pause at the limit): the kernel OOM-kills the
    spike; the actions it would have taken are counted with dry_run="true"."""
    with LocalCluster(
        tmp_path, node_memory="1G", node_args=(*METRICS, "--dry-run"), log_level="WARNING"
    ) as c:
        node = c.metrics_address("node0")
        before = Scrape(node)
        with Client(c.broker_address) as client:
            client.set_tenant("dry", 96 * MiB)
            result = client.run("dry", 64 * MiB, SPIKE_ARGV)
        assert result.exit_code != 0, result
        after = wait_for(
            node, lambda s: s.get("agentcg_node_oom_kills_total") >= 1, "the OOM kill event"
        )
    delta = node_delta(before, after)
    assert delta("agentcg_node_oom_kills_total") >= 1
    dry = sum(
        delta("agentcg_node_actions_total", kind=k, dry_run="true")
        for k in ("throttle", "pause", "grow", "kill", "resume", "unthrottle")
    )
    applied = sum(
        delta("agentcg_node_actions_total", kind=k, dry_run="false")
        for k in ("throttle", "pause", "grow", "kill", "resume", "unthrottle")
    )
    assert dry == len(result.actions) >= 1 and applied == 0
    left = [p.name for p in cgroup_write.iterdir() if p.is_dir() and p.name.startswith("agentcg-n")]
    assert left == [], f"cgroups left behind: {left}"
