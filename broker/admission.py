"""Admission and growth decisions: pure functions of plain data.

Nothing here does I/O, reads a clock or logs: the servicer loads the views, calls a function,
persists what it returns. Every decision carries a machine-readable ``code`` and a human message
that names the object, the limit and what was seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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
    "SessionClaim",
    "SessionKey",
    "decide_growth",
    "decide_reserve",
    "growth_limit",
    "is_safe",
]

SessionKey = tuple[str, str]  # (tenant, session)

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
    # Kept for paused calls in its subtree that wait to grow (a new call does not take it).
    held_memory_bytes: int = 0

    @property
    def free_memory_bytes(self) -> int:
        return max(
            0, self.tenant.memory_quota_bytes - self.granted_memory_bytes - self.held_memory_bytes
        )


@dataclass(frozen=True, slots=True)
class SessionClaim:
    """A session that declared the most it will hold at once on its node."""

    held_bytes: int  # its active budgets together
    max_bytes: int  # its declared maximum (never below what it holds)

    @property
    def need_bytes(self) -> int:
        return max(0, self.max_bytes - self.held_bytes)


def is_safe(free_bytes: int, claims: Iterable[SessionClaim]) -> bool:
    """Can every declared session still reach its maximum, one after another? (Dijkstra's
    banker's algorithm for one resource.)

    With no swap, sessions that each hold memory and wait for more can wait on each other
    forever: pausing is only safe while some order lets each finish. Taking the sessions in
    increasing order of what they still need is the best order for one resource (each one that
    finishes gives back what it held, so the free memory only grows along it); the state is
    safe iff every session's need fits in the memory free when its turn comes.
    """
    for need, held in sorted((c.need_bytes, c.held_bytes) for c in claims):
        if need > free_bytes:
            return False
        free_bytes += held
    return True


def claims_after(
    claims: Mapping[SessionKey, SessionClaim], key: SessionKey, add_bytes: int, max_bytes: int
) -> list[SessionClaim]:
    """The claims once session ``key`` holds ``add_bytes`` more (declaring ``max_bytes``)."""
    old = claims.get(key, SessionClaim(0, 0))
    held = old.held_bytes + add_bytes
    new = SessionClaim(held, max(old.max_bytes, max_bytes, held))
    return [new, *(c for k, c in claims.items() if k != key)]


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: NodeId
    memory_capacity_bytes: int
    granted_memory_bytes: int
    connected: bool = True
    pressured: bool = False
    cordoned: bool = False  # taken out of service by an operator: no new leases
    intent_memory_bytes: int = 0  # sum of the declared intents of its active leases
    overcommit_ceiling_bytes: int = 0  # bound on that sum; 0: none
    # Sessions on this node that declared their maximum (their intent is that maximum).
    claims: Mapping[SessionKey, SessionClaim] = field(default_factory=dict)
    # Kept for paused calls on this node that wait to grow (a new call does not take it).
    held_memory_bytes: int = 0

    @property
    def free_memory_bytes(self) -> int:
        return max(
            0, self.memory_capacity_bytes - self.granted_memory_bytes - self.held_memory_bytes
        )

    @property
    def takes_work(self) -> bool:
        """Connected, not pressured, not cordoned: new leases may go there."""
        return self.connected and not self.pressured and not self.cordoned

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
    # tenant_quota|tenant_calls|tenant_cpu|node_capacity|node_overcommit|no_nodes|node_unsafe|
    # session_admission (the last two depend on the asking session's own claim: see ``is_safe``)
    code: str
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
    code: str  # "tenant_quota" | "node_capacity" | "node_unsafe" | "lease_inactive"
    message: str
    scope: str = ""  # what limits it: "tenant:<name>" or "node:<id>" (as Deny.scope)


def _no_nodes(retry_after_ms: int) -> Deny:
    return Deny(
        code="no_nodes",
        message="no connected node can take work (none, or all under pressure or cordoned)",
        scope="cluster",
        largest_memory_bytes_available=0,
        retry_after_ms=retry_after_ms,
    )


def _tightest(levels: Sequence[QuotaLevel]) -> QuotaLevel:
    return min(levels, key=lambda lv: lv.free_memory_bytes)


def _held_text(view: QuotaLevel | NodeView) -> str:
    """What a denial adds when room is kept for paused calls."""
    held = view.held_memory_bytes
    return f"; {format_bytes(held)} kept for paused calls waiting to grow" if held else ""


def growth_limit(levels: Sequence[QuotaLevel], node: NodeView) -> str:
    """What limits a growth on ``node``: "tenant:<name>" (the tightest quota level) or
    "node:<id>" (``Refuse.scope``)."""
    tight = _tightest(levels)
    if tight.free_memory_bytes <= node.free_memory_bytes:
        return f"tenant:{tight.tenant.name}"
    return f"node:{node.node_id}"


def decide_reserve(
    memory_bytes: int,
    levels: Sequence[QuotaLevel],
    nodes: Sequence[NodeView],
    *,
    cpu_millis: int = 0,
    intent_bytes: int = 0,
    retry_after_ms: int = 1000,
    session: SessionKey | None = None,
    session_max_bytes: int = 0,
    session_node: NodeId | None = None,
    started_sessions_waiting: int = 0,
) -> Admit | Deny:
    """Admit ``memory_bytes`` (and ``cpu_millis``) if every quota level on the tenant's path and
    one node can hold it.

    ``levels`` runs from the tenant itself up to its root; every level is checked for each
    resource (concurrent calls, CPU, memory), so a child never takes more than any ancestor
    allows. A zero CPU quota or call limit means unlimited. Placement takes the connected,
    unpressured, uncordoned node with the most free memory (spreading spikes rather than packing them)
    among those whose overcommit ceiling still takes ``intent_bytes`` (the declared intent when
    ``memory_bytes`` is a smaller, learned budget). Memory kept for paused calls that wait to
    grow (``held_memory_bytes`` of a level or node) is not free for it.

    A ``session`` that declared its maximum (``session_max_bytes``), or already holds declared
    leases on ``session_node``, is placed by ``_place_declared`` instead: it stays on its node,
    counts its maximum (not each lease's intent) against the overcommit ceiling, and is admitted
    only if ``is_safe`` still holds afterwards. A new declared session also waits while
    ``started_sessions_waiting`` declared sessions that already run wait for memory: work in
    progress comes before new work (the least progress held up).
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
    usable = [n for n in nodes if n.takes_work]
    for level in levels:
        if memory_bytes > level.free_memory_bytes:
            t = level.tenant
            tight = _tightest(levels)
            return Deny(
                code="tenant_quota",
                message=(
                    f"tenant {t.name}: memory quota exceeded (asked {format_bytes(memory_bytes)}, "
                    f"{format_bytes(level.free_memory_bytes)} of "
                    f"{format_bytes(t.memory_quota_bytes)} free{_held_text(level)})"
                ),
                scope=f"tenant:{t.name}",
                # What would fit now: a node that takes no work holds nothing for it.
                largest_memory_bytes_available=min(
                    tight.free_memory_bytes, max((n.free_memory_bytes for n in usable), default=0)
                ),
                retry_after_ms=retry_after_ms,
            )
    if session is not None and (session_max_bytes > 0 or session_node is not None):
        if session_node is None and started_sessions_waiting:
            return Deny(
                code="session_admission",
                message=(
                    f"session {session[0]}/{session[1]} waits to start: "
                    f"{started_sessions_waiting} running sessions are waiting for memory"
                ),
                scope="cluster",
                largest_memory_bytes_available=0,
                retry_after_ms=retry_after_ms,
            )
        return _place_declared(
            memory_bytes, levels, usable, session, session_max_bytes, session_node, retry_after_ms
        )
    intent = max(intent_bytes, memory_bytes)
    within = [n for n in usable if n.takes_intent(intent)]
    if usable and not within:
        best_oc = max(
            usable, key=lambda n: (n.overcommit_ceiling_bytes - n.intent_memory_bytes, n.node_id)
        )
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
        return _no_nodes(retry_after_ms)
    best = max(usable, key=lambda n: (n.free_memory_bytes, n.node_id))
    if memory_bytes > best.free_memory_bytes:
        return Deny(
            code="node_capacity",
            message=(
                f"no node has {format_bytes(memory_bytes)} free "
                f"(largest: node {best.node_id} with {format_bytes(best.free_memory_bytes)}"
                f"{_held_text(best)})"
            ),
            scope=f"node:{best.node_id}",
            largest_memory_bytes_available=min(
                best.free_memory_bytes, _tightest(levels).free_memory_bytes
            ),
            retry_after_ms=retry_after_ms,
        )
    return Admit(node_id=best.node_id, memory_bytes=memory_bytes)


def _place_declared(
    memory_bytes: int,
    levels: Sequence[QuotaLevel],
    usable: Sequence[NodeView],
    session: SessionKey,
    session_max_bytes: int,
    session_node: NodeId | None,
    retry_after_ms: int,
) -> Admit | Deny:
    """Placement for a session with a declared maximum (quota levels already checked)."""
    name = f"session {session[0]}/{session[1]}"
    quota_free = _tightest(levels).free_memory_bytes
    if session_node is not None:
        usable = [n for n in usable if n.node_id == session_node]
        if not usable:
            return Deny(
                code="no_nodes",
                message=f"{name} lives on node {session_node}, which is not taking work now",
                scope=f"node:{session_node}",
                largest_memory_bytes_available=0,
                retry_after_ms=retry_after_ms,
            )
    if not usable:
        return _no_nodes(retry_after_ms)

    def added_intent(n: NodeView) -> int:
        old = n.claims.get(session)
        held = (old.held_bytes if old else 0) + memory_bytes
        new_max = max(session_max_bytes, held, old.max_bytes if old else 0)
        return new_max - (old.max_bytes if old else 0)

    # The ceiling holds back new sessions only: a running one may always ask again (is_safe
    # decides), also past its declared maximum.
    within = [n for n in usable if session in n.claims or n.takes_intent(added_intent(n))]
    if not within:
        n = usable[0]
        return Deny(
            code="session_admission",
            message=(
                f"{name}: no node can take its declared maximum "
                f"{format_bytes(max(session_max_bytes, memory_bytes))} within the overcommit "
                f"ceiling (node {n.node_id}: {format_bytes(n.intent_memory_bytes)} of "
                f"{format_bytes(n.overcommit_ceiling_bytes)} declared)"
            ),
            scope=f"node:{n.node_id}",
            largest_memory_bytes_available=0,
            retry_after_ms=retry_after_ms,
        )
    fits = [n for n in within if memory_bytes <= n.free_memory_bytes]
    if not fits:
        best = max(within, key=lambda n: (n.free_memory_bytes, n.node_id))
        return Deny(
            code="node_capacity",
            message=(
                f"no node has {format_bytes(memory_bytes)} free for {name} "
                f"(largest: node {best.node_id} with {format_bytes(best.free_memory_bytes)}"
                f"{_held_text(best)})"
            ),
            scope=f"node:{best.node_id}",
            largest_memory_bytes_available=min(best.free_memory_bytes, quota_free),
            retry_after_ms=retry_after_ms,
        )
    safe = [
        n
        for n in fits
        if is_safe(
            n.free_memory_bytes - memory_bytes,
            claims_after(n.claims, session, memory_bytes, session_max_bytes),
        )
    ]
    if not safe:
        n = fits[0]
        return Deny(
            code="node_unsafe",
            message=(
                f"node {n.node_id}: {format_bytes(memory_bytes)} more for {name} could leave "
                f"its {len(n.claims)} declared sessions waiting on each other "
                f"({format_bytes(n.free_memory_bytes)} free; waits until one finishes)"
            ),
            scope=f"node:{n.node_id}",
            largest_memory_bytes_available=0,
            retry_after_ms=retry_after_ms,
        )
    best = max(safe, key=lambda n: (n.free_memory_bytes, n.node_id))
    return Admit(node_id=best.node_id, memory_bytes=memory_bytes)


def decide_growth(
    current_bytes: int,
    requested_bytes: int,
    peak_bytes: int,
    levels: Sequence[QuotaLevel],
    node: NodeView,
    session: SessionKey | None = None,
) -> Grow | Refuse:
    """Grow a paused call's budget towards ``requested_bytes`` from tenant and node headroom.

    Grants what fits (possibly less than asked) when that is at least MIN_GROWTH_BYTES; else
    refuses, naming the budget, the peak seen and the limiting quota or node. A call of a
    declared ``session`` (in ``node.claims``) grows only while ``is_safe`` holds afterwards.
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
    if not want:
        # Already granted: an ask sent again whose first answer was lost (the node asks again
        # after its link to the broker broke) gets the budget it was given.
        return Grow(new_memory_bytes=current_bytes, message=f"already granted ({seen})")
    claimed = session is not None and session in node.claims
    if claimed and grant > 0:
        assert session is not None
        if not is_safe(
            node.free_memory_bytes - grant, claims_after(node.claims, session, grant, 0)
        ):
            return Refuse(
                code="node_unsafe",
                scope=f"node:{node.node_id}",
                message=(
                    f"node {node.node_id}: growing session {session[0]}/{session[1]} by "
                    f"{format_bytes(grant)} could leave its declared sessions waiting on each "
                    f"other ({seen})"
                ),
            )
    if grant >= MIN_GROWTH_BYTES or (want > 0 and grant == want):
        return Grow(
            new_memory_bytes=current_bytes + grant,
            message=f"grown to {format_bytes(current_bytes + grant)} ({seen})",
        )
    scope = growth_limit(levels, node)
    if scope.startswith("tenant:"):
        t = tight.tenant
        return Refuse(
            code="tenant_quota",
            scope=scope,
            message=(
                f"tenant {t.name}: memory quota exhausted ({seen}; quota "
                f"{format_bytes(t.memory_quota_bytes)}, {format_bytes(tight.free_memory_bytes)} free)"
            ),
        )
    return Refuse(
        code="node_capacity",
        scope=scope,
        message=(
            f"node {node.node_id}: no memory headroom ({seen}; capacity "
            f"{format_bytes(node.memory_capacity_bytes)}, "
            f"{format_bytes(node.free_memory_bytes)} free)"
        ),
    )
