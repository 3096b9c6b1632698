"""Admission and growth decisions: pure functions of plain data.

Nothing here does I/O, reads a clock or logs: the servicer loads the views, calls a function,
persists what it returns. Every decision carries a machine-readable ``code`` and a human message
that names the object, the limit and what was seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agentcg.quantity import format_bytes

from .model import NodeId, Tenant

__all__ = [
    "MIN_GROWTH_BYTES",
    "Admit",
    "Deny",
    "Grow",
    "NodeView",
    "QuotaLevel",
    "Refuse",
    "decide_growth",
    "decide_reserve",
]

# A growth smaller than this is not worth resuming a paused call for: it would hit the limit
# again at once. Refuse instead (the node then kills the call).
MIN_GROWTH_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class QuotaLevel:
    """One level of the quota hierarchy on the path from a tenant up to its root."""

    tenant: Tenant
    granted_memory_bytes: int  # sum of active budgets in this tenant's whole subtree
    active_calls: int = 0
    granted_cpu_millis: int = 0

    @property
    def free_memory_bytes(self) -> int:
        return max(0, self.tenant.memory_quota_bytes - self.granted_memory_bytes)


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: NodeId
    memory_capacity_bytes: int
    granted_memory_bytes: int
    connected: bool = True
    pressured: bool = False
    intent_memory_bytes: int = 0  # sum of the declared intents of its active leases
    overcommit_ceiling_bytes: int = 0  # bound on that sum; 0: none

    @property
    def free_memory_bytes(self) -> int:
        return max(0, self.memory_capacity_bytes - self.granted_memory_bytes)

    def takes_intent(self, intent_bytes: int) -> bool:
        """Within the overcommit ceiling with ``intent_bytes`` more declared."""
        return (
            not self.overcommit_ceiling_bytes
            or self.intent_memory_bytes + intent_bytes <= self.overcommit_ceiling_bytes
        )


@dataclass(frozen=True, slots=True)
class Admit:
    node_id: NodeId
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class Deny:
    code: str  # tenant_quota|tenant_calls|tenant_cpu|node_capacity|node_overcommit|no_nodes
    message: str
    scope: str  # "tenant:<name>" | "node:<id>" | "cluster"
    largest_memory_bytes_available: int
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class Grow:
    new_memory_bytes: int
    message: str


@dataclass(frozen=True, slots=True)
class Refuse:
    code: str  # "tenant_quota" | "node_capacity" | "lease_inactive"
    message: str


def _tightest(levels: Sequence[QuotaLevel]) -> QuotaLevel:
    return min(levels, key=lambda lv: lv.free_memory_bytes)


def decide_reserve(
    memory_bytes: int,
    levels: Sequence[QuotaLevel],
    nodes: Sequence[NodeView],
    *,
    cpu_millis: int = 0,
    intent_bytes: int = 0,
    retry_after_ms: int = 1000,
) -> Admit | Deny:
    """Admit ``memory_bytes`` (and ``cpu_millis``) if every quota level on the tenant's path and
    one node can hold it.

    ``levels`` runs from the tenant itself up to its root; every level is checked for each
    resource (concurrent calls, CPU, memory), so a child never takes more than any ancestor
    allows. A zero CPU quota or call limit means unlimited. Placement takes the connected,
    unpressured node with the most free memory (spreading spikes rather than packing them)
    among those whose overcommit ceiling still takes ``intent_bytes`` (the declared intent when
    ``memory_bytes`` is a smaller, learned budget).
    """
    assert levels, "levels must include the tenant itself"
    for level in levels:
        t = level.tenant
        if t.max_calls and level.active_calls + 1 > t.max_calls:
            return Deny(
                code="tenant_calls",
                message=(
                    f"tenant {t.name}: concurrent call limit reached "
                    f"({level.active_calls} of {t.max_calls} running)"
                ),
                scope=f"tenant:{t.name}",
                largest_memory_bytes_available=0,
                retry_after_ms=retry_after_ms,
            )
        if t.cpu_quota_millis and level.granted_cpu_millis + cpu_millis > t.cpu_quota_millis:
            free = max(0, t.cpu_quota_millis - level.granted_cpu_millis)
            return Deny(
                code="tenant_cpu",
                message=(
                    f"tenant {t.name}: CPU quota exceeded (asked {cpu_millis} millis, "
                    f"{free} of {t.cpu_quota_millis} free)"
                ),
                scope=f"tenant:{t.name}",
                largest_memory_bytes_available=0,
                retry_after_ms=retry_after_ms,
            )
    for level in levels:
        if memory_bytes > level.free_memory_bytes:
            t = level.tenant
            tight = _tightest(levels)
            return Deny(
                code="tenant_quota",
                message=(
                    f"tenant {t.name}: memory quota exceeded (asked {format_bytes(memory_bytes)}, "
                    f"{format_bytes(level.free_memory_bytes)} of "
                    f"{format_bytes(t.memory_quota_bytes)} free)"
                ),
                scope=f"tenant:{t.name}",
                largest_memory_bytes_available=min(
                    tight.free_memory_bytes, max((n.free_memory_bytes for n in nodes), default=0)
                ),
                retry_after_ms=retry_after_ms,
            )
    intent = max(intent_bytes, memory_bytes)
    usable = [n for n in nodes if n.connected and not n.pressured]
    within = [n for n in usable if n.takes_intent(intent)]
    if usable and not within:
        best_oc = max(usable, key=lambda n: n.overcommit_ceiling_bytes - n.intent_memory_bytes)
        return Deny(
            code="node_overcommit",
            message=(
                f"no node can take {format_bytes(intent)} more declared intent within its "
                f"overcommit ceiling (node {best_oc.node_id}: "
                f"{format_bytes(best_oc.intent_memory_bytes)} of "
                f"{format_bytes(best_oc.overcommit_ceiling_bytes)} declared)"
            ),
            scope=f"node:{best_oc.node_id}",
            largest_memory_bytes_available=min(
                max(0, best_oc.overcommit_ceiling_bytes - best_oc.intent_memory_bytes),
                best_oc.free_memory_bytes,
                _tightest(levels).free_memory_bytes,
            ),
            retry_after_ms=retry_after_ms,
        )
    usable = within
    if not usable:
        return Deny(
            code="no_nodes",
            message="no connected node can take work",
            scope="cluster",
            largest_memory_bytes_available=0,
            retry_after_ms=retry_after_ms,
        )
    best = max(usable, key=lambda n: (n.free_memory_bytes, n.node_id))
    if memory_bytes > best.free_memory_bytes:
        return Deny(
            code="node_capacity",
            message=(
                f"no node has {format_bytes(memory_bytes)} free "
                f"(largest: node {best.node_id} with {format_bytes(best.free_memory_bytes)})"
            ),
            scope=f"node:{best.node_id}",
            largest_memory_bytes_available=min(
                best.free_memory_bytes, _tightest(levels).free_memory_bytes
            ),
            retry_after_ms=retry_after_ms,
        )
    return Admit(node_id=best.node_id, memory_bytes=memory_bytes)


def decide_growth(
    current_bytes: int,
    requested_bytes: int,
    peak_bytes: int,
    levels: Sequence[QuotaLevel],
    node: NodeView,
) -> Grow | Refuse:
    """Grow a paused call's budget towards ``requested_bytes`` from tenant and node headroom.

    Grants what fits (possibly less than asked) when that is at least MIN_GROWTH_BYTES; else
    refuses, naming the budget, the peak seen and the limiting quota or node.
    """
    assert levels, "levels must include the tenant itself"
    want = max(0, requested_bytes - current_bytes)
    tight = _tightest(levels)
    room = min(tight.free_memory_bytes, node.free_memory_bytes)
    grant = min(want, room)
    seen = (
        f"budget {format_bytes(current_bytes)}, peak {format_bytes(peak_bytes)}, "
        f"asked {format_bytes(requested_bytes)}"
    )
    if grant >= MIN_GROWTH_BYTES or (want > 0 and grant == want):
        return Grow(
            new_memory_bytes=current_bytes + grant,
            message=f"grown to {format_bytes(current_bytes + grant)} ({seen})",
        )
    if tight.free_memory_bytes <= node.free_memory_bytes:
        t = tight.tenant
        return Refuse(
            code="tenant_quota",
            message=(
                f"tenant {t.name}: memory quota exhausted ({seen}; quota "
                f"{format_bytes(t.memory_quota_bytes)}, {format_bytes(tight.free_memory_bytes)} free)"
            ),
        )
    return Refuse(
        code="node_capacity",
        message=(
            f"node {node.node_id}: no memory headroom ({seen}; capacity "
            f"{format_bytes(node.memory_capacity_bytes)}, "
            f"{format_bytes(node.free_memory_bytes)} free)"
        ),
    )
