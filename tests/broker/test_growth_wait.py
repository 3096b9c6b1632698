"""A paused call whose growth does not fit waits for room instead of being killed at once
(`--growth-wait-ms`): grown when room frees, and at its deadline something gives way, decided
by the broker once: lower-priority leases preempted, or the call itself killed. A real broker
process on a real database (SQLite and PostgreSQL) and a simulated node on its stream."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import QuotaExceededError
from agentcg.v1 import broker_pb2

MiB = 1 << 20
GROW, KILL, WAIT, PREEMPT = (
    broker_pb2.DECISION_KIND_GROW,
    broker_pb2.DECISION_KIND_KILL,
    broker_pb2.DECISION_KIND_WAIT,
    broker_pb2.DECISION_KIND_PREEMPT,
)


def limit_reached(lease_id: str, requested_bytes: int) -> broker_pb2.NodeMessage:
    return broker_pb2.NodeMessage(
        pressure=broker_pb2.PressureEvent(
            event_id=f"ev-{lease_id}",
            lease_id=lease_id,
            kind=broker_pb2.PRESSURE_KIND_LIMIT_REACHED,
            requested_memory_bytes=requested_bytes,
            action_id=f"act-{lease_id}",
        )
    )


def decisions(node: SimNode, n: int, timeout_s: float = 20) -> list[broker_pb2.Decision]:
    """The first ``n`` decisions down the node's stream, once they came."""
    deadline = time.monotonic() + timeout_s
    while len(node.decisions) < n:
        assert time.monotonic() < deadline, f"decisions so far: {node.decisions}"
        time.sleep(0.02)
    return list(node.decisions[:n])


@contextlib.contextmanager
def running(
    tmp_path: Path, database_url: str, wait_ms: int, node_bytes: int = 100 * MiB
) -> Iterator[tuple[SimNode, Client]]:
    """A broker holding growths up to ``wait_ms``, a simulated node of ``node_bytes`` on its
    stream, and a client."""
    c = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="INFO")
    c.broker_args = ("--growth-wait-ms", str(wait_ms))
    with (
        c,
        SimNode(c.broker_address, memory_bytes=node_bytes) as node,
        Client(c.broker_address) as client,
    ):
        yield node, client


# A 100 MiB node holding 70 + 28 MiB: 2 MiB free, less than a growth worth resuming for.
Setup = Callable[[Client], tuple[str, str]]


def full_node(c: Client) -> tuple[str, str]:
    c.set_tenant("t", 1 << 30)
    big = c.reserve("t", 70 * MiB)
    small = c.reserve("t", 28 * MiB)
    return big.lease_id, small.lease_id


def tenant_at_quota(c: Client) -> tuple[str, str]:
    """The node has room; the tenant's quota (100 MiB) does not."""
    c.set_tenant("t", 100 * MiB)
    big = c.reserve("t", 70 * MiB)
    small = c.reserve("t", 28 * MiB)
    return big.lease_id, small.lease_id


@pytest.mark.parametrize(
    ("setup", "node_bytes", "code"),
    [(full_node, 100 * MiB, "no memory headroom"), (tenant_at_quota, 1 << 30, "quota")],
    ids=["node", "tenant"],
)
def test_a_paused_call_is_grown_when_room_frees(
    tmp_path: Path, database_url: str, setup: Setup, node_bytes: int, code: str
) -> None:
    with running(tmp_path, database_url, 30_000, node_bytes) as (node, client):
        big, small = setup(client)
        node.outbox.put(limit_reached(small, 56 * MiB))
        (wait,) = decisions(node, 1)
        assert (wait.lease_id, wait.kind) == (small, WAIT)
        assert 0 < wait.wait_ms <= 30_000 and code in wait.reason
        assert client.get_lease(small).memory_bytes == 28 * MiB  # nothing granted yet
        client.release(big)  # room frees: the paused call is grown, not killed
        _, grow = decisions(node, 2)
        assert (grow.lease_id, grow.kind, grow.new_budget_bytes) == (small, GROW, 56 * MiB)
        assert grow.epoch == wait.epoch + 1 and grow.event_id == f"ev-{small}"
        assert client.get_lease(small).memory_bytes == 56 * MiB
        (entry,) = [e for e in client.list_audit(lease_id=small).records if e.kind == "grow"]
        assert entry.detail["waited_ms"] > 0


def test_at_its_deadline_the_paused_call_gives_way(tmp_path: Path, database_url: str) -> None:
    """Nothing frees and nothing of lower priority holds the node: the call is killed, once,
    with the reason and how long it waited; the other lease is untouched."""
    with running(tmp_path, database_url, 400) as (node, client):
        big, small = full_node(client)
        node.outbox.put(limit_reached(small, 56 * MiB))
        wait, kill = decisions(node, 2)
        assert (wait.kind, kill.lease_id, kill.kind) == (WAIT, small, KILL)
        assert "no memory headroom" in kill.reason and "ms for room" in kill.reason
        time.sleep(0.3)
        assert len(node.decisions) == 2  # decided once
        assert client.get_lease(big).state == "active"
        kills = [e for e in client.list_audit(lease_id=small).records if e.kind == "kill"]
        assert len(kills) == 1 and kills[0].detail["waited_ms"] >= 400


def test_at_its_deadline_lower_priority_work_gives_way(tmp_path: Path, database_url: str) -> None:
    """The paused call has the higher priority: the lease holding the room is preempted
    (revoked, its node told first) and the paused call grown into it."""
    with running(tmp_path, database_url, 400) as (node, client):
        client.set_tenant("t", 1 << 30)
        low = client.reserve("t", 70 * MiB, priority=0)
        high = client.reserve("t", 28 * MiB, priority=5)
        node.outbox.put(limit_reached(high.lease_id, 56 * MiB))
        wait, preempt, grow = decisions(node, 3)
        assert wait.kind == WAIT
        assert (preempt.lease_id, preempt.kind) == (low.lease_id, PREEMPT)
        assert (grow.lease_id, grow.kind, grow.new_budget_bytes) == (high.lease_id, GROW, 56 * MiB)
        assert client.get_lease(low.lease_id).state == "revoked"
        assert client.get_lease(high.lease_id).memory_bytes == 56 * MiB


def test_a_call_that_ends_while_it_waits_gets_no_decision(
    tmp_path: Path, database_url: str
) -> None:
    # The release must reach the broker before the growth's deadline: 1.5 s, on a busy host too.
    with running(tmp_path, database_url, 1500) as (node, client):
        _, small = full_node(client)
        node.outbox.put(limit_reached(small, 56 * MiB))
        decisions(node, 1)
        client.release(small)
        time.sleep(2.0)  # past its deadline
        assert [d.kind for d in node.decisions] == [WAIT]


def test_with_no_wait_a_growth_that_does_not_fit_kills_at_once(
    tmp_path: Path, database_url: str
) -> None:
    with running(tmp_path, database_url, 0) as (node, client):
        _, small = full_node(client)
        node.outbox.put(limit_reached(small, 56 * MiB))
        (kill,) = decisions(node, 1)
        assert (kill.lease_id, kill.kind) == (small, KILL) and "waited" not in kill.reason


def test_an_ask_made_again_after_its_grant_gets_the_same_grant_and_changes_nothing(
    tmp_path: Path, database_url: str
) -> None:
    """A node asks again when the answer was lost (a broken stream, a leader that died): the
    lease keeps its budget and epoch, and the audit trail its one grow."""
    with running(tmp_path, database_url, 0, 1 << 30) as (node, client):
        client.set_tenant("t", 1 << 30)
        lease = client.reserve("t", 28 * MiB).lease_id
        node.outbox.put(limit_reached(lease, 56 * MiB))
        (grow,) = decisions(node, 1)
        assert (grow.kind, grow.new_budget_bytes) == (GROW, 56 * MiB)
        node.outbox.put(limit_reached(lease, 56 * MiB))  # the same ask, sent again
        _, again = decisions(node, 2)
        assert (again.kind, again.new_budget_bytes, again.epoch) == (GROW, 56 * MiB, grow.epoch)
        assert again.event_id == grow.event_id and "already granted" in again.reason
        after = client.get_lease(lease)
        assert (after.memory_bytes, after.epoch) == (56 * MiB, grow.epoch)
        kinds = [e.kind for e in client.list_audit(lease_id=lease).records]
        assert kinds.count("grow") == 1, kinds


def test_a_limit_held_by_the_paused_call_alone_is_decided_at_once(
    tmp_path: Path, database_url: str
) -> None:
    """Waiting frees nothing when no other lease holds part of the limit: killed at once."""
    with running(tmp_path, database_url, 30_000, 1 << 30) as (node, client):
        client.set_tenant("t", 30 * MiB)
        only = client.reserve("t", 28 * MiB)
        node.outbox.put(limit_reached(only.lease_id, 56 * MiB))
        (kill,) = decisions(node, 1)
        assert (kill.lease_id, kill.kind) == (only.lease_id, KILL) and "quota" in kill.reason


def test_room_a_paused_call_waits_for_is_kept_from_new_calls(
    tmp_path: Path, database_url: str
) -> None:
    """Held by its tenant's quota, the paused call still needs room on its node when that
    frees: another tenant's new call of no higher priority does not take it (denied, saying
    why); one of higher priority may (it could preempt the paused call anyway)."""
    with running(tmp_path, database_url, 30_000, 200 * MiB) as (node, client):
        big, small = tenant_at_quota(client)  # node: 98 of 200 MiB granted
        client.set_tenant("u", 1 << 30)
        node.outbox.put(limit_reached(small, 56 * MiB))  # 28 MiB more wanted
        (wait,) = decisions(node, 1)
        assert wait.kind == WAIT
        with pytest.raises(QuotaExceededError) as denied:
            client.reserve("u", 90 * MiB)  # 102 MiB free, 28 of it kept
        assert denied.value.code == "node_capacity"
        assert "28.0 MiB kept for paused calls" in str(denied.value)
        assert denied.value.largest_memory_bytes_available == 74 * MiB
        assert client.reserve("u", 70 * MiB).memory_bytes == 70 * MiB  # what is not kept
        client.release(big)  # its tenant's quota frees: the room on its node is still there
        _, grow = decisions(node, 2)
        assert (grow.lease_id, grow.kind, grow.new_budget_bytes) == (small, GROW, 56 * MiB)


def test_a_higher_priority_call_may_take_the_room_kept(tmp_path: Path, database_url: str) -> None:
    with running(tmp_path, database_url, 30_000, 200 * MiB) as (node, client):
        _, small = tenant_at_quota(client)
        client.set_tenant("u", 1 << 30)
        node.outbox.put(limit_reached(small, 56 * MiB))
        decisions(node, 1)
        assert client.reserve("u", 90 * MiB, priority=5).memory_bytes == 90 * MiB


def test_a_queued_call_gets_the_room_once_the_paused_call_is_decided(
    tmp_path: Path, database_url: str
) -> None:
    """The paused call is killed at its deadline (its call still holds its budget until the
    node ends it): the room kept for it goes to the call queued behind it at once."""
    # The queued call must be waiting before the paused one's deadline: 1.5 s, on a busy host.
    with running(tmp_path, database_url, 1500, 200 * MiB) as (node, client):
        _, small = tenant_at_quota(client)
        client.set_tenant("u", 1 << 30)
        node.outbox.put(limit_reached(small, 56 * MiB))
        decisions(node, 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.reserve, "u", 90 * MiB, queue_timeout_ms=8_000)
            time.sleep(0.2)
            assert not queued.done()
            _, kill = decisions(node, 2)
            assert (kill.lease_id, kill.kind) == (small, KILL)
            lease = queued.result(timeout=6)
        assert lease.memory_bytes == 90 * MiB
        assert client.get_lease(small).state == "active"  # until its node ends the call
