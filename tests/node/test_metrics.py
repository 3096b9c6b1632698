"""The node's metrics module on a private registry: action counters with their dry-run label,
reaction histograms, and the state read at scrape time from a real (unconnected) uplink and a
drop-counter source."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agentcg.node.metrics import NodeMetrics
from agentcg.node.monitor import DropCounts
from agentcg.node.uplink import Uplink
from agentcg.v1 import broker_pb2
from prometheus_client import CollectorRegistry, generate_latest


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_actions_are_counted_by_kind_and_dry_run() -> None:
    m = NodeMetrics()
    r = m.registry
    m.action("grow", False)
    m.action("grow", False)
    m.action("kill", True)
    m.reaction("grow", 0.0008)
    m.reaction("grow", 0.004)
    m.oom_kills.inc()
    m.call_finished("grown")
    assert value(r, "agentcg_node_actions_total", kind="grow", dry_run="false") == 2
    assert value(r, "agentcg_node_actions_total", kind="kill", dry_run="true") == 1
    assert value(r, "agentcg_node_actions_total", kind="kill", dry_run="false") == 0
    assert value(r, "agentcg_node_reaction_seconds_count", kind="grow") == 2
    assert value(r, "agentcg_node_reaction_seconds_bucket", kind="grow", le="0.001") == 1
    assert value(r, "agentcg_node_reaction_seconds_bucket", kind="grow", le="0.005") == 2
    assert value(r, "agentcg_node_oom_kills_total") == 1
    assert value(r, "agentcg_node_calls_finished_total", outcome="grown") == 1
    assert value(r, "agentcg_node_calls_finished_total", outcome="killed") == 0


@dataclass
class Drops:
    counts: DropCounts
    per_page_attached: bool = False
    readable: bool = True

    def drop_counts(self) -> DropCounts:
        if not self.readable:
            raise RuntimeError("maps gone")
        return self.counts


def test_state_is_read_from_the_uplink_and_the_monitor_at_scrape_time() -> None:
    async def go() -> None:
        m = NodeMetrics()
        r = m.registry
        calls: dict[str, object] = {}
        # A real uplink that never connected (nothing listens on port 1): what it is asked to
        # send waits in its bounded buffer, the oldest dropped and counted.
        uplink = Uplink(
            "127.0.0.1:1",
            broker_pb2.RegisterNodeRequest(node_id="n1"),
            lambda d: asyncio.sleep(0),
            broker_pb2.Heartbeat,
            buffer_size=2,
        )
        drops = Drops(DropCounts(events=3, pids=1, malformed=0), per_page_attached=True)
        m.track(lambda: len(calls), uplink, drops)
        try:
            assert value(r, "agentcg_node_uplink_connected") == 0
            assert value(r, "agentcg_node_uplink_buffered_events") == 0
            for _ in range(3):
                uplink.send(broker_pb2.NodeMessage(heartbeat=broker_pb2.Heartbeat()))
            calls["l1"] = object()
            assert value(r, "agentcg_node_uplink_buffered_events") == 2
            assert value(r, "agentcg_node_uplink_dropped_events_total") == 1
            assert value(r, "agentcg_node_calls_running") == 1
            assert value(r, "agentcg_node_bpf_ringbuf_drops_total") == 3
            assert value(r, "agentcg_node_bpf_pid_map_drops_total") == 1
            assert value(r, "agentcg_node_bpf_malformed_events_total") == 0
            assert value(r, "agentcg_node_bpf_per_page_attached") == 1
            drops.counts = DropCounts(events=5, pids=1)
            assert value(r, "agentcg_node_bpf_ringbuf_drops_total") == 5
            # A monitor that is closing: its counters are left out, the rest is served.
            drops.readable = False
            text = generate_latest(r).decode()
            assert "agentcg_node_bpf_ringbuf_drops_total" not in text
            assert "agentcg_node_uplink_dropped_events_total 1.0" in text
        finally:
            await uplink.close()

    asyncio.run(go())


def test_a_kind_added_later_is_counted_not_refused() -> None:
    m = NodeMetrics()
    m.action("evict", False)
    m.reaction("evict", 0.002)
    m.call_finished("unknown")
    r = m.registry
    assert value(r, "agentcg_node_actions_total", kind="evict", dry_run="false") == 1
    assert value(r, "agentcg_node_reaction_seconds_count", kind="evict") == 1
    assert value(r, "agentcg_node_calls_finished_total", outcome="unknown") == 1
