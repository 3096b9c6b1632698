"""Overcommit from measurements: the pure sizing rule, the node ceiling, and learning from
committed peaks through a real broker (budgets, hints, and a restart that keeps what it learned)."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.broker.admission import Admit, Deny, NodeView, QuotaLevel, decide_reserve
from agentcg.broker.model import NodeId, Tenant, TenantName
from agentcg.broker.sizing import FLOOR_BYTES, MIN_SAMPLES, p95, size_budget
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import QuotaExceededError
from hypothesis import given
from hypothesis import strategies as st

MiB = 1 << 20


def test_p95_nearest_rank() -> None:
    assert p95([5]) == 5
    assert p95(list(range(1, 101))) == 95
    assert p95([1, 2, 3, 4, 100]) == 100


@pytest.mark.parametrize(
    ("intent", "peaks", "budget"),
    [
        (64 * MiB, [], 64 * MiB),  # nothing learned: the intent
        (64 * MiB, [10 * MiB] * (MIN_SAMPLES - 1), 64 * MiB),  # too few samples
        (64 * MiB, [10 * MiB] * MIN_SAMPLES, 10 * MiB),  # learned p95
        (64 * MiB, [100 * MiB] * MIN_SAMPLES, 64 * MiB),  # never above the intent
        (64 * MiB, [1 * MiB] * MIN_SAMPLES, FLOOR_BYTES),  # never below the floor
    ],
)
def test_size_budget(intent: int, peaks: list[int], budget: int) -> None:
    assert size_budget(intent, peaks) == budget


@given(intent=st.integers(1, 1 << 36), peaks=st.lists(st.integers(1, 1 << 36), max_size=80))
def test_budget_never_above_intent(intent: int, peaks: list[int]) -> None:
    assert 0 < size_budget(intent, peaks) <= intent


def test_overcommit_ceiling_bounds_declared_intent() -> None:
    levels = [QuotaLevel(Tenant(TenantName("t"), 1 << 40), 0)]
    node = NodeView(
        NodeId("n"),
        1024 * MiB,
        100 * MiB,
        intent_memory_bytes=1400 * MiB,
        overcommit_ceiling_bytes=1536 * MiB,
    )
    assert isinstance(decide_reserve(32 * MiB, levels, [node], intent_bytes=128 * MiB), Admit)
    d = decide_reserve(32 * MiB, levels, [node], intent_bytes=256 * MiB)
    assert isinstance(d, Deny) and d.code == "node_overcommit"
    assert d.largest_memory_bytes_available == 136 * MiB


def test_learns_from_committed_peaks_and_hints_denials(tmp_path: Path, database_url: str) -> None:
    cluster = LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING")
    with cluster:
        with (
            SimNode(cluster.broker_address, memory_bytes=1 << 34) as node,
            Client(cluster.broker_address) as c,
        ):
            c.set_tenant("t", 256 * MiB)
            for _ in range(MIN_SAMPLES):
                lease = c.reserve("t", 64 * MiB, command_class="pytest")
                assert lease.memory_bytes == 64 * MiB
                c.release(lease.lease_id, peak_bytes=12 * MiB, outcome="completed")
            sized = c.reserve("t", 64 * MiB, command_class="pytest")
            assert sized.memory_bytes == 12 * MiB  # the learned p95, not the intent
            other = c.reserve("t", 64 * MiB, command_class="pip")
            assert other.memory_bytes == 64 * MiB  # another class learned nothing
            filler = c.reserve("t", 176 * MiB, command_class="pip")  # 4 MiB left
            with pytest.raises(QuotaExceededError) as denied:
                c.reserve("t", 64 * MiB, command_class="pytest")
            hint = denied.value
            assert hint.last_peak_memory_bytes == 12 * MiB
            assert hint.largest_memory_bytes_available == 4 * MiB
            assert hint.retry_after_ms > 0
            c.release_batch([sized.lease_id, other.lease_id, filler.lease_id])
            # A restarted broker sizes from what the database holds.
            cluster.stop("broker")
            node.address = cluster.start_broker()
            assert node.connected.wait(30)
            with Client(cluster.broker_address) as again:
                assert again.reserve("t", 64 * MiB, command_class="pytest").memory_bytes == 12 * MiB
