"""The node agent's Prometheus metrics, all in one place (names ``agentcg_node_*``).

The composition root makes one ``NodeMetrics`` on the process's registry and hands it to the
agent; an agent built without one gets a private registry, which nobody scrapes. Counters and
histograms are updated where an action is taken (a few per tool call, never per BPF event).
State the agent, the uplink and the BPF monitor already keep (calls running, the uplink's buffer
and drops, the ring-buffer and pid-map drop counters in BPF maps) is read at scrape time by
``NodeStateCollector``, from the scraping thread: every read there is of a length, a flag or an
integer (atomic under the GIL) or a BPF map lookup (a syscall).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from agentcg.refusals import access_refusals
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .monitor import DropCounts

__all__ = [
    "ACTION_KINDS",
    "REACTION_BUCKETS_S",
    "DropSource",
    "NodeMetrics",
    "NodeStateCollector",
    "UplinkState",
]

log = logging.getLogger(__name__)

# Enforcement actions, as named in the log, the span and the ExecEvent: "stop" is a call stopped
# on the node's own authority (its lease expired, was revoked or preempted); "wait" a paused
# call the broker keeps paused while it waits for room; "hold" and "release" a call frozen while
# its spooled output is above the node's limit, and let go.
ACTION_KINDS = (
    "throttle",
    "unthrottle",
    "pause",
    "wait",
    "grow",
    "resume",
    "kill",
    "stop",
    "hold",
    "release",
)
# Spike -> action in effect: the goal is p99 <= 5 ms; a kill after the broker timeout takes s.
REACTION_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
CALL_OUTCOMES = ("completed", "grown", "killed")


class UplinkState(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def buffered(self) -> int: ...

    @property
    def dropped(self) -> int: ...


class DropSource(Protocol):
    def drop_counts(self) -> DropCounts: ...

    @property
    def per_page_attached(self) -> bool: ...


class NodeStateCollector(Collector):
    """Gauges and counters read at scrape time from the agent, its uplink and its monitor."""

    def __init__(
        self,
        calls_running: Callable[[], int],
        uplink: UplinkState,
        monitor: DropSource | None,
    ) -> None:
        self._calls_running = calls_running
        self._uplink = uplink
        self._monitor = monitor

    def collect(self) -> Iterable[Metric]:
        p = "agentcg_node_"
        uplink = self._uplink
        out: list[Metric] = [
            GaugeMetricFamily(
                p + "calls_running", "Tool calls running on the node", value=self._calls_running()
            ),
            GaugeMetricFamily(
                p + "uplink_connected",
                "1 while the stream to the broker is open",
                value=int(uplink.connected),
            ),
            GaugeMetricFamily(
                p + "uplink_buffered_events",
                "Messages to the broker waiting in the uplink's buffer",
                value=uplink.buffered,
            ),
            CounterMetricFamily(
                p + "uplink_dropped_events",
                "Messages to the broker dropped because the uplink's buffer was full",
                value=uplink.dropped,
            ),
        ]
        if self._monitor is None:
            return out
        try:
            drops = self._monitor.drop_counts()
            attached = self._monitor.per_page_attached
        except Exception:  # the monitor is closing: its maps are gone
            log.debug("metrics: monitor counters not readable", exc_info=True)
            return out
        out += [
            CounterMetricFamily(
                p + "bpf_ringbuf_drops",
                "Events the BPF program could not send (ring buffer full)",
                value=drops.events,
            ),
            CounterMetricFamily(
                p + "bpf_pid_map_drops",
                "Forked tasks the BPF program could not track (pid map full)",
                value=drops.pids,
            ),
            CounterMetricFamily(
                p + "bpf_malformed_events",
                "Ring-buffer records user space could not decode",
                value=drops.malformed,
            ),
            GaugeMetricFamily(
                p + "bpf_per_page_attached",
                "1 while the per-page memcg program is attached (some call is near its budget)",
                value=int(attached),
            ),
        ]
        return out


class NodeMetrics:
    """The node's counters and histograms. Label children are bound here, once."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "agentcg_node_"
        self._action_family = Counter(
            p + "actions",
            "Enforcement actions by kind, and whether dry run (logged, not applied)",
            ["kind", "dry_run"],
            registry=r,
        )
        self._actions = {
            (kind, dry): self._action_family.labels(kind, str(dry).lower())
            for kind in ACTION_KINDS
            for dry in (False, True)
        }
        self._reaction_family = Histogram(
            p + "reaction_seconds",
            "From the kernel's event to the action in effect, by action kind",
            ["kind"],
            registry=r,
            buckets=REACTION_BUCKETS_S,
        )
        self._reaction = {kind: self._reaction_family.labels(kind) for kind in ACTION_KINDS}
        self.oom_kills = Counter(
            p + "oom_kills", "Kernel OOM kills seen in the node's calls (BPF oom event)", registry=r
        )
        self._finished_family = Counter(
            p + "calls_finished", "Tool calls that ended, by outcome", ["outcome"], registry=r
        )
        self._finished = {o: self._finished_family.labels(o) for o in CALL_OUTCOMES}
        self.calls_started = Counter(
            p + "calls_started", "Tool calls started or attached", registry=r
        )
        self.access_refused = access_refusals(r, p)
        self._pause_notice_family = Counter(
            p + "pause_notices",
            "Kernel notices of a call's task waiting at its limit (v1) that found nothing "
            "asking for it, by what the node did: ask the broker (its LIMIT report lost or not "
            "handled yet), or wake it (still waiting below a raised limit)",
            ["action"],
            registry=r,
        )
        self._pause_notices = {a: self._pause_notice_family.labels(a) for a in ("ask", "wake")}
        self.output_flushed_bytes = Counter(
            p + "output_flushed_bytes",
            "Calls' output written to disk and dropped from their memory when it was what took "
            "them to their limit or kept them throttled (the node's estimate of it), in bytes",
            registry=r,
        )

    # A kind or outcome not bound above (one added to the agent later) gets its child on first
    # use rather than failing the enforcement path that counts it.

    def action(self, kind: str, dry_run: bool) -> None:
        child = self._actions.get((kind, dry_run))
        if child is None:
            child = self._actions[(kind, dry_run)] = self._action_family.labels(
                kind, str(dry_run).lower()
            )
        child.inc()

    def pause_notice(self, action: str) -> None:
        self._pause_notices[action].inc()

    def reaction(self, kind: str, seconds: float) -> None:
        child = self._reaction.get(kind)
        if child is None:
            child = self._reaction[kind] = self._reaction_family.labels(kind)
        child.observe(seconds)

    def call_finished(self, outcome: str) -> None:
        child = self._finished.get(outcome)
        if child is None:
            child = self._finished[outcome] = self._finished_family.labels(outcome)
        child.inc()

    def track(
        self,
        calls_running: Callable[[], int],
        uplink: UplinkState,
        monitor: DropSource | None = None,
    ) -> None:
        """Serve the state of the agent, its uplink and its monitor (read at each scrape)."""
        self.registry.register(NodeStateCollector(calls_running, uplink, monitor))
