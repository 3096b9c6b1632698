"""The broker's live state in memory: tenants, nodes, active leases and the sums decisions need.

Decisions read it; the same ``Change`` records that go to the database are applied here, so the
ledger and the store never disagree about what a change means. Single-threaded: the broker's
event loop is its only user.
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from .admission import NodeView, QuotaLevel, SessionClaim, SessionKey
from .model import (
    Audit,
    Change,
    DeleteTenant,
    ForgetPeaks,
    Lease,
    LeaseId,
    LeaseState,
    Node,
    NodeId,
    PruneHistory,
    PutLease,
    PutNode,
    PutTenant,
    SessionName,
    Tenant,
    TenantName,
)
from .sizing import WINDOW

__all__ = ["Forget", "Ledger", "RestorePeaks", "Undo"]


@dataclass(frozen=True, slots=True)
class Forget:
    """Undo of a lease that was never durable: drop it from memory (never persisted)."""

    lease_id: LeaseId


@dataclass(frozen=True, slots=True)
class RestorePeaks:
    """Undo of a ``ForgetPeaks`` that was never durable: the peaks as they were (in memory)."""

    tenant: TenantName
    command_class: str
    peaks: tuple[int, ...]
    sessions: bool = False


Undo: TypeAlias = Change | Forget | RestorePeaks


class Ledger:
    def __init__(self, *, overcommit_ratio: float = 0.0) -> None:
        # Sum of declared intents on a node may reach capacity x ratio; 0: no ceiling.
        self.overcommit_ratio = overcommit_ratio
        self.peaks: dict[tuple[TenantName, str], deque[int]] = {}
        # Per (organization, session class): the most recent sessions held at once, newest last.
        self.session_peaks: dict[tuple[TenantName, str], deque[int]] = {}
        self.tenants: dict[TenantName, Tenant] = {}
        self.nodes: dict[NodeId, Node] = {}
        self._connected: set[NodeId] = set()
        self._draining: set[NodeId] = set()  # nodes with a drain deadline
        self._pressured: set[NodeId] = set()
        # The nodes that take work (connected, not pressured, not cordoned) by (free memory, id),
        # ascending, and each one's key in it: placement reads it from the top, so a Reserve
        # costs O(log nodes), not a view of every node (2 ms a Reserve with 1,000 nodes).
        self._by_free: list[tuple[int, NodeId]] = []
        self._free_key: dict[NodeId, tuple[int, NodeId]] = {}
        self.leases: dict[LeaseId, Lease] = {}  # active only
        self.by_key: dict[tuple[TenantName, str], LeaseId] = {}
        self._subtree_bytes: dict[TenantName, int] = defaultdict(int)
        self._subtree_calls: dict[TenantName, int] = defaultdict(int)
        self._subtree_cpu: dict[TenantName, int] = defaultdict(int)
        self._node_bytes: dict[NodeId, int] = defaultdict(int)
        self._node_calls: dict[NodeId, int] = defaultdict(int)
        self._priority_leases: dict[int, int] = {}  # active leases per priority class
        self._node_intent: dict[NodeId, int] = defaultdict(int)
        # Declared sessions per node, and how many active leases each has there.
        self._claims: dict[NodeId, dict[SessionKey, SessionClaim]] = defaultdict(dict)
        self._claim_leases: dict[SessionKey, int] = {}
        self._session_node: dict[SessionKey, NodeId] = {}
        self._session_high: dict[SessionKey, int] = {}  # the most each one has held at once
        # (expires_at_ms, lease_id) of active leases; stale entries are skipped when popped, so
        # finding the due leases costs O(due log n), not a scan of every lease.
        self._expiry: list[tuple[int, LeaseId]] = []

    # -- views for decisions -------------------------------------------------------------------

    def chain(self, name: TenantName) -> list[Tenant]:
        """The tenant and its ancestors, nearest first."""
        out: list[Tenant] = []
        cur: TenantName | None = name
        while cur is not None and cur in self.tenants and len(out) < 64:
            t = self.tenants[cur]
            out.append(t)
            cur = t.parent
        return out

    def chain_names(self, name: str) -> list[str]:
        """The names of the tenant and its ancestors, nearest first; ``[name]`` for a tenant
        this ledger does not know (a caller's scope is checked before the tenant is looked up)."""
        return [t.name for t in self.chain(TenantName(name))] or [name]

    def total_granted_bytes(self) -> int:
        """The budgets of every active lease (O(nodes))."""
        return sum(self._node_bytes.values())

    def total_declared_bytes(self) -> int:
        """What every active lease declared, as the overcommit ceiling counts it: its intent
        (or its budget, grown above it), a declared session's maximum once (O(nodes))."""
        return sum(self._node_intent.values())

    def subtree_names(self, roots: Iterable[str]) -> set[str]:
        """The tenants ``roots`` and every tenant below them (a root this ledger does not
        know, a deleted tenant, stands for itself)."""
        below: dict[str, list[str]] = {}
        for t in self.tenants.values():
            if t.parent is not None:
                below.setdefault(t.parent, []).append(t.name)
        out: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name not in out:
                out.add(name)
                todo.extend(below.get(name, ()))
        return out

    def quota_levels(self, name: TenantName) -> list[QuotaLevel]:
        return [
            QuotaLevel(
                t,
                self._subtree_bytes[t.name],
                self._subtree_calls[t.name],
                self._subtree_cpu[t.name],
            )
            for t in self.chain(name)
        ]

    def node_view(self, node_id: NodeId) -> NodeView:
        n = self.nodes[node_id]
        return NodeView(
            node_id=n.node_id,
            memory_capacity_bytes=n.memory_capacity_bytes,
            granted_memory_bytes=self._node_bytes[n.node_id],
            connected=n.node_id in self.connected,
            pressured=n.node_id in self.pressured,
            cordoned=n.cordoned,
            intent_memory_bytes=self._node_intent[n.node_id],
            overcommit_ceiling_bytes=int(n.memory_capacity_bytes * self.overcommit_ratio),
            claims=MappingProxyType(self._claims[n.node_id]),  # read-only, not copied
        )

    def node_calls(self, node_id: NodeId) -> int:
        """Active leases on the node."""
        return self._node_calls.get(node_id, 0)

    def node_leases(self, node_id: NodeId) -> list[Lease]:
        """The active leases on the node (a walk of every active lease: for drains, not for
        admission)."""
        if not self.node_calls(node_id):
            return []
        return [x for x in self.leases.values() if x.node_id == node_id]

    def node_views(self) -> list[NodeView]:
        """Every registered node, by id."""
        return [self.node_view(nid) for nid in sorted(self.nodes)]

    def placement_views(self, intent_bytes: int) -> list[NodeView]:
        """The nodes that take work, most free memory first, up to the first one whose
        overcommit ceiling takes ``intent_bytes`` more (all of them if none does).

        ``admission.decide_reserve`` decides the same on these as on ``node_views()`` for a
        call outside a declared session: it places on the node with the most free memory among
        those within their ceiling, and looks at the others only to explain a denial when none
        is. Usually one view (no ceiling, or the emptiest node within it); a node full of
        declared intent is passed over at the cost of one view.
        """
        out: list[NodeView] = []
        for _, node_id in reversed(self._by_free):
            view = self.node_view(node_id)
            out.append(view)
            if view.takes_intent(intent_bytes):
                break
        return out

    @property
    def connected(self) -> AbstractSet[NodeId]:
        """Nodes with an open stream (``set_connected``)."""
        return self._connected

    @property
    def draining(self) -> AbstractSet[NodeId]:
        """Nodes with a drain deadline (cordoned, their leases revoked once it passes)."""
        return self._draining

    @property
    def pressured(self) -> AbstractSet[NodeId]:
        """Nodes that reported node pressure and have not recovered (``set_pressured``)."""
        return self._pressured

    def set_connected(self, node_id: NodeId, connected: bool) -> None:
        if connected:
            self._connected.add(node_id)
        else:
            self._connected.discard(node_id)
        self._index_node(node_id)

    def set_pressured(self, node_id: NodeId, pressured: bool) -> None:
        if pressured:
            self._pressured.add(node_id)
        else:
            self._pressured.discard(node_id)
        self._index_node(node_id)

    def _put_node(self, node: Node) -> None:
        self.nodes[node.node_id] = node
        if node.drain_deadline_ms:
            self._draining.add(node.node_id)
        else:
            self._draining.discard(node.node_id)
        self._index_node(node.node_id)

    def _index_node(self, node_id: NodeId) -> None:
        """Put the node where it now belongs in ``_by_free`` (out of it if it takes no work)."""
        old = self._free_key.pop(node_id, None)
        if old is not None:
            del self._by_free[bisect.bisect_left(self._by_free, old)]
        node = self.nodes.get(node_id)
        if (
            node is None
            or node.cordoned
            or node_id not in self._connected
            or node_id in self._pressured
        ):
            return
        key = (max(0, node.memory_capacity_bytes - self._node_bytes[node_id]), node_id)
        bisect.insort(self._by_free, key)
        self._free_key[node_id] = key

    def session_claim(
        self, tenant: TenantName, session: SessionName
    ) -> tuple[NodeId, SessionClaim] | None:
        """The node a declared session's active leases are on and its claim there, if any."""
        key = (tenant, session)
        node = self._session_node.get(key)
        if node is None:
            return None
        return node, self._claims[node][key]

    def granted_bytes(self, name: TenantName) -> int:
        return self._subtree_bytes[name]

    def active_calls(self, name: TenantName) -> int:
        return self._subtree_calls[name]

    def granted_cpu_millis(self, name: TenantName) -> int:
        return self._subtree_cpu[name]

    def observe_peak(self, tenant: TenantName, command_class: str, peak_bytes: int) -> None:
        """Remember a committed peak of (tenant, command class); the newest WINDOW are kept."""
        _remember(self.peaks, (tenant, command_class), peak_bytes)

    def recent_peaks(self, tenant: TenantName, command_class: str) -> tuple[int, ...]:
        return tuple(self.peaks.get((tenant, command_class), ()))

    def last_peak(self, tenant: TenantName, command_class: str) -> int:
        window = self.peaks.get((tenant, command_class))
        return window[-1] if window else 0

    def org(self, name: TenantName) -> TenantName:
        """The tenant's top-level ancestor (itself at the top, or when it is not known)."""
        chain = self.chain(name)
        return chain[-1].name if chain else name

    def observe_session_peak(self, tenant: TenantName, session_class: str, peak_bytes: int) -> None:
        """Remember the most a session of ``session_class`` in ``tenant``'s organization held
        at once; the newest WINDOW per (organization, class) are kept."""
        _remember(self.session_peaks, (self.org(tenant), session_class), peak_bytes)

    def recent_session_peaks(self, tenant: TenantName, session_class: str) -> tuple[int, ...]:
        return tuple(self.session_peaks.get((self.org(tenant), session_class), ()))

    def session_end_peak(self, lease: Lease) -> int:
        """The most ``lease``'s session held at once if ending ``lease`` ends that session (its
        last active lease, of a declared session with a class); 0 otherwise."""
        if not lease.session_class or lease.lease_id not in self.leases:
            return 0
        key = (lease.tenant, lease.session)
        if self._claim_leases.get(key) != 1:
            return 0
        return self._session_high.get(key, 0)

    def lowest_priority(self) -> int | None:
        """The lowest priority class of an active lease (None: no active lease)."""
        return min(self._priority_leases, default=None)

    def due(self, t_ms: int) -> list[Lease]:
        """Active leases whose expiry is at or before ``t_ms`` (left in place)."""
        out: list[Lease] = []
        heap = self._expiry
        while heap and heap[0][0] <= t_ms:
            expires, lid = heapq.heappop(heap)
            lease = self.leases.get(lid)
            if lease is not None and lease.expires_at_ms == expires:
                out.append(lease)
        return out

    def children(self, name: TenantName) -> list[Tenant]:
        return [t for t in self.tenants.values() if t.parent == name]

    # -- changes -------------------------------------------------------------------------------

    def load(
        self, tenants: Iterable[Tenant], nodes: Iterable[Node], leases: Iterable[Lease]
    ) -> None:
        for t in tenants:
            self.tenants[t.name] = t
        for n in nodes:
            self._put_node(n)
        for lease in leases:
            self._put_lease(lease)

    def apply(self, changes: Sequence[Undo]) -> list[Undo]:
        """Apply changes; return the changes that undo them (in the order to apply them)."""
        undo: list[Undo] = []
        for ch in changes:
            if isinstance(ch, PutTenant):
                old = self.tenants.get(ch.tenant.name)
                undo.append(PutTenant(old) if old else DeleteTenant(ch.tenant.name))
                self.tenants[ch.tenant.name] = ch.tenant
            elif isinstance(ch, DeleteTenant):
                old = self.tenants.pop(ch.name, None)
                if old is not None:
                    undo.append(PutTenant(old))
            elif isinstance(ch, PutNode):
                old_node = self.nodes.get(ch.node.node_id)
                self._put_node(ch.node)
                if old_node is not None:
                    undo.append(PutNode(old_node))
            elif isinstance(ch, PutLease):
                prev = self.leases.get(ch.lease.lease_id)
                undo.append(PutLease(prev) if prev else Forget(ch.lease.lease_id))
                self._put_lease(ch.lease)
            elif isinstance(ch, Forget):
                prev = self.leases.get(ch.lease_id)
                if prev is not None:
                    self._drop_lease(prev)
                    self._end_session_high(prev)
                    undo.append(PutLease(prev))
            elif isinstance(ch, ForgetPeaks):
                windows = self.session_peaks if ch.sessions else self.peaks
                peaks = tuple(windows.pop((ch.tenant, ch.command_class), ()))
                undo.append(RestorePeaks(ch.tenant, ch.command_class, peaks, ch.sessions))
            elif isinstance(ch, RestorePeaks):
                windows = self.session_peaks if ch.sessions else self.peaks
                since = windows.pop((ch.tenant, ch.command_class), ())
                for peak in (*ch.peaks, *since):  # with what was learned since
                    _remember(windows, (ch.tenant, ch.command_class), peak)
            elif isinstance(ch, Audit | PruneHistory):
                pass  # the database's history only: nothing live
        undo.reverse()
        return undo

    def _put_lease(self, lease: Lease) -> None:
        prev = self.leases.get(lease.lease_id)
        if prev is not None:
            self._drop_lease(prev)
            if lease.state is not LeaseState.ACTIVE and lease.peak_memory_bytes > 0:
                self.observe_peak(lease.tenant, lease.command_class, lease.peak_memory_bytes)
            if lease.state is not LeaseState.ACTIVE and lease.session_peak_bytes > 0:
                self.observe_session_peak(
                    lease.tenant, lease.session_class, lease.session_peak_bytes
                )
        if lease.state is LeaseState.ACTIVE:
            self.leases[lease.lease_id] = lease
            if prev is None or prev.expires_at_ms != lease.expires_at_ms:
                heapq.heappush(self._expiry, (lease.expires_at_ms, lease.lease_id))
            if lease.idempotency_key:
                self.by_key[(lease.tenant, lease.idempotency_key)] = lease.lease_id
            self._account(lease, +1)
        elif prev is not None and lease.session_max_memory_bytes:
            self._end_session_high(lease)

    def _end_session_high(self, lease: Lease) -> None:
        """Forget the most ``lease``'s session held once it has no active lease left. (Not when
        its last lease is put again, renewed or grown: that drops the claim for a moment.)"""
        key = (lease.tenant, lease.session)
        if key not in self._claim_leases:
            self._session_high.pop(key, None)

    def _drop_lease(self, lease: Lease) -> None:
        del self.leases[lease.lease_id]
        if lease.idempotency_key:
            self.by_key.pop((lease.tenant, lease.idempotency_key), None)
        self._account(lease, -1)

    def _account(self, lease: Lease, sign: int) -> None:
        for t in self.chain(lease.tenant):
            self._subtree_bytes[t.name] += sign * lease.memory_bytes
            self._subtree_calls[t.name] += sign
            self._subtree_cpu[t.name] += sign * lease.cpu_millis
        self._node_bytes[lease.node_id] += sign * lease.memory_bytes
        self._node_calls[lease.node_id] += sign
        count = self._priority_leases.get(lease.priority, 0) + sign
        if count:
            self._priority_leases[lease.priority] = count
        else:
            del self._priority_leases[lease.priority]
        if lease.node_id in self._free_key:
            self._index_node(lease.node_id)
        if lease.session_max_memory_bytes:
            self._account_claim(lease, sign)
        else:
            self._node_intent[lease.node_id] += sign * max(
                lease.intent_memory_bytes, lease.memory_bytes
            )

    def _account_claim(self, lease: Lease, sign: int) -> None:
        """A declared session's intent on its node is its maximum, counted once."""
        key = (lease.tenant, lease.session)
        claims = self._claims[lease.node_id]
        old = claims.get(key)
        if old is None:
            if sign < 0:
                return
            old = SessionClaim(0, 0)
            self._session_node[key] = lease.node_id
        leases = self._claim_leases.get(key, 0) + sign
        if leases <= 0:
            self._node_intent[lease.node_id] -= old.max_bytes
            del claims[key]
            del self._claim_leases[key]
            self._session_node.pop(key, None)
            return
        held = old.held_bytes + sign * lease.memory_bytes
        # The maximum only rises while the session lives, so it never falls below what it holds.
        top = max(old.max_bytes, lease.session_max_memory_bytes, held)
        self._node_intent[lease.node_id] += top - old.max_bytes
        claims[key] = SessionClaim(held, top)
        self._claim_leases[key] = leases
        if held > self._session_high.get(key, 0):
            self._session_high[key] = held


def _remember(
    windows: dict[tuple[TenantName, str], deque[int]], key: tuple[TenantName, str], peak: int
) -> None:
    """Append ``peak`` to ``key``'s window of the newest WINDOW peaks."""
    window = windows.get(key)
    if window is None:
        window = windows[key] = deque(maxlen=WINDOW)
    window.append(peak)
