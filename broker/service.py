"""The broker's gRPC servicers: validate -> load -> decide -> persist -> respond.

Decisions come from ``admission`` (pure); state lives in the ``Ledger``; durability comes from the
``Journal``. Domain errors are raised as ``agentcg.errors`` and turned into status codes in one
place (``_rpc`` below, via ``agentcg.rpcstatus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
from agentcg.access import ANY, OPEN, ROLE_METHODS
from agentcg.errors import (
    AgentcgError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    UnavailableError,
)
from agentcg.gate import current_principal
from agentcg.names import InvalidNameError, validate_name
from agentcg.rpcstatus import to_status
from agentcg.tracecontext import parent_context, traceparent
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2
from opentelemetry import trace
from opentelemetry.context import Context

from .admission import (
    Deny,
    Grow,
    NodeView,
    QuotaLevel,
    Refuse,
    decide_growth,
    decide_reserve,
)
from .fairshare import Candidate, FairQueue, WaitingAsk, choose_victims, growth_victims
from .journal import Journal
from .ledger import Ledger, Undo
from .metrics import BrokerMetrics, BrokerState, ReserveOutcome
from .model import (
    Audit,
    AuditEntry,
    Change,
    DeleteTenant,
    ForgetPeaks,
    Lease,
    LeaseId,
    LeaseState,
    Node,
    NodeId,
    Outcome,
    PruneHistory,
    PutLease,
    PutNode,
    PutTenant,
    SessionName,
    Tenant,
    TenantName,
)
from .sizing import FLOOR_BYTES, MIN_SAMPLES, WINDOW, profile, size_budget, size_session_max
from .store import Store, StoreError, StoreFenced

__all__ = [
    "AuditLogServicer",
    "BrokerCore",
    "BrokerServicer",
    "NodeAdminServicer",
    "NodeGatewayServicer",
    "NodeReport",
    "SizingServicer",
    "TenantAdminServicer",
]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEFAULT_TTL_MS = 10 * 60 * 1000
PRUNE_BATCH = 1000  # rows of each history table deleted per round
MAX_TTL_MS = 24 * 3600 * 1000
HEARTBEAT_INTERVAL_MS = 2000
PRESSURE_HOLD_MS = 2 * HEARTBEAT_INTERVAL_MS
MAX_CORDON_REASON = 256  # characters
HELD_PER_NODE = 1024  # lease changes held for a node whose stream is not open (newest kept)
# A node's capacity, memory bytes (1 PiB) or CPU millis: what is derived from it (the overcommit
# ceiling, sums of leases) must stay within the int64 fields that report it.
MAX_NODE_CAPACITY = 1 << 50
# CPU one call may declare (16,777 cores): CPU is not placed against nodes, so only this keeps
# a tenant's sum of granted CPU (reported as int64) in range.
MAX_CALL_CPU_MILLIS = 1 << 24
AUDIT_PAGE = 100  # entries per ListAudit page by default
MAX_AUDIT_PAGE = 1000

_OUTCOME_TO_MODEL = {
    types_pb2.OUTCOME_UNSPECIFIED: Outcome.UNKNOWN,
    types_pb2.OUTCOME_COMPLETED: Outcome.COMPLETED,
    types_pb2.OUTCOME_GROWN: Outcome.GROWN,
    types_pb2.OUTCOME_KILLED: Outcome.KILLED,
    types_pb2.OUTCOME_DENIED: Outcome.DENIED,
    types_pb2.OUTCOME_FAILED: Outcome.FAILED,
}
_OUTCOME_TO_PB = {v: k for k, v in _OUTCOME_TO_MODEL.items()}
_PRESSURE_KIND_LABEL = {
    broker_pb2.PRESSURE_KIND_SOFT_THRESHOLD: "soft_threshold",
    broker_pb2.PRESSURE_KIND_LIMIT_REACHED: "limit_reached",
    broker_pb2.PRESSURE_KIND_OOM_KILL: "oom_kill",
    broker_pb2.PRESSURE_KIND_NODE: "node",
}
_DECISION_KIND_LABEL = {
    broker_pb2.DECISION_KIND_GROW: "grow",
    broker_pb2.DECISION_KIND_KILL: "kill",
    broker_pb2.DECISION_KIND_PREEMPT: "preempt",
    broker_pb2.DECISION_KIND_WAIT: "wait",
}
_STATE_TO_PB = {
    LeaseState.ACTIVE: types_pb2.LEASE_STATE_ACTIVE,
    LeaseState.RELEASED: types_pb2.LEASE_STATE_RELEASED,
    LeaseState.EXPIRED: types_pb2.LEASE_STATE_EXPIRED,
    LeaseState.REVOKED: types_pb2.LEASE_STATE_REVOKED,
}


class _LeaseIds:
    """Lease ids: 32 hex digits, a random 64-bit prefix drawn at start-up + a counter.

    Unique across restarts (a fresh prefix each time) and far cheaper than uuid4's syscall.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> LeaseId:
        return LeaseId(f"{self._prefix}{next(self._counter):016x}")


_lease_ids = _LeaseIds()


def authorize_tenant(ledger: Ledger, tenant: str, field: str = "tenant") -> None:
    """The caller may act on ``tenant`` (it or an ancestor is in its scope), else raise.

    Checked before the tenant is looked up: a tenant out of scope is refused whether or not it
    exists. Free on a broker without an access file (every caller is ``OPEN``)."""
    p = current_principal()
    if p is OPEN:
        return
    if not p.covers(ledger.chain_names(tenant)):
        raise p.outside_scope(f"{field} {tenant!r}")


def authorize_lease(ledger: Ledger, lease: Lease, *, read: bool = False) -> None:
    """The caller may act on ``lease``: its tenant is in scope, or (``read``) the caller is the
    node it is placed on."""
    p = current_principal()
    if p is OPEN or (read and lease.node_id and p.acts_for_node(lease.node_id)):
        return
    if p.nodes:  # a node's: it reads only the leases placed on it
        raise PermissionDeniedError(
            f"{p.name}: lease {lease.lease_id} is placed on node {lease.node_id!r}, "
            "not on one of its nodes"
        )
    if not p.covers(ledger.chain_names(lease.tenant)):
        raise p.outside_scope(f"lease {lease.lease_id} (tenant {lease.tenant!r})")


def tenants_in_view(ledger: Ledger, tenant: str) -> set[str] | None:
    """The tenants a listing filtered by ``tenant`` ("": none) shows the caller: that tenant's
    subtree (refused unless in scope), else its scope's subtrees; None: every tenant."""
    if tenant:
        authorize_tenant(ledger, tenant)
        return ledger.subtree_names([tenant])
    caller = current_principal()
    return None if ANY in caller.tenants else ledger.subtree_names(caller.tenants)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_VALID_NAMES: set[str] = set()  # names already seen valid (tenants, sessions, classes repeat)


def _name(field: str, value: str, *, allow_empty: bool = False, remember: bool = True) -> str:
    if value in _VALID_NAMES:
        return value
    try:
        valid = validate_name(field, value, allow_empty=allow_empty)
    except InvalidNameError as e:
        raise InvalidArgumentError(field, str(e)) from None
    if valid and remember and len(_VALID_NAMES) < 10_000:
        _VALID_NAMES.add(valid)
    return valid


# host:port as clients dial it: a host name, an IPv4 address or a bracketed IPv6 one.
_ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):([0-9]{1,5})")


def _address(field: str, value: str) -> str:
    match = _ADDRESS_RE.fullmatch(value)
    if match is None or not 0 < int(match.group(2)) < 65536:
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgumentError(field, f"must be host:port (got {shown!r})")
    return value


def _positive(field: str, value: int) -> int:
    if value <= 0:
        raise InvalidArgumentError(field, f"must be > 0 (got {value})")
    return value


def _non_negative(field: str, value: int) -> int:
    if value < 0:
        raise InvalidArgumentError(field, f"must be >= 0 (got {value})")
    return value


# -- conversions ------------------------------------------------------------------------------


def fill_lease_pb(pb: types_pb2.Lease, lease: Lease, node: Node | None) -> types_pb2.Lease:
    """Set ``pb`` (a new message, or one added to a batch reply's repeated field: no copy) to
    ``lease``. Field by field: half the time of the keyword constructor with its two nested
    messages, which shows in a batch of 500 (measured: 3.2 -> 1.6 us per lease)."""
    pb.lease_id = lease.lease_id
    pb.tenant = lease.tenant
    pb.session = lease.session
    pb.command_class = lease.command_class
    pb.node_id = lease.node_id
    pb.node_address = node.address if node else ""
    budget = pb.budget
    budget.memory_bytes = lease.memory_bytes
    budget.cpu_millis = lease.cpu_millis
    pb.intent.memory_bytes = lease.intent_memory_bytes
    pb.epoch = lease.epoch
    pb.state = _STATE_TO_PB[lease.state]
    pb.priority = lease.priority
    pb.granted_at_unix_ms = lease.granted_at_ms
    pb.expires_at_unix_ms = lease.expires_at_ms
    pb.peak_memory_bytes = lease.peak_memory_bytes
    pb.outcome = _OUTCOME_TO_PB[lease.outcome]
    return pb


def _audit(kind: str, lease: Lease | None = None, **detail: object) -> Audit:
    """An audit entry; ``by`` names the principal whose call made it (with an access file)."""
    if by := _caller_name():
        detail["by"] = by
    return Audit(
        AuditEntry(
            at_ms=now_ms(),
            kind=kind,
            tenant=lease.tenant if lease else str(detail.pop("tenant", "")),
            lease_id=lease.lease_id if lease else "",
            node_id=lease.node_id if lease else str(detail.pop("node_id", "")),
            detail=json.dumps(detail, sort_keys=True) if detail else "",
        )
    )


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What a node's last heartbeat to this broker said: measured, not granted."""

    at_ms: int
    used_memory_bytes: int
    running_calls: int


@dataclass(frozen=True, slots=True)
class ReserveAsk:
    """A validated ReserveRequest."""

    tenant: TenantName
    session: SessionName
    command_class: str
    memory_bytes: int
    cpu_millis: int
    priority: int
    ttl_ms: int
    idempotency_key: str
    queue_timeout_ms: int
    session_max_memory_bytes: int = 0
    session_class: str = ""
    by: str = ""  # the principal asking (an access file; its grant's audit entry names it)


def parse_reserve(request: broker_pb2.ReserveRequest, prefix: str = "", by: str = "") -> ReserveAsk:
    """Validate a ReserveRequest; errors name the field (``prefix`` + field name). ``by``: the
    principal asking (read once per RPC, not per item of a batch)."""
    tenant = TenantName(_name(prefix + "tenant", request.tenant))
    session = SessionName(_name(prefix + "session", request.session or "default"))
    command_class = _name(prefix + "command_class", request.command_class or "default")
    memory = _positive(prefix + "intent.memory_bytes", request.intent.memory_bytes)
    cpu = _non_negative(prefix + "intent.cpu_millis", request.intent.cpu_millis)
    if cpu > MAX_CALL_CPU_MILLIS:
        raise InvalidArgumentError(
            prefix + "intent.cpu_millis", f"must be <= {MAX_CALL_CPU_MILLIS} (got {cpu})"
        )
    ttl_ms = _non_negative(prefix + "ttl_ms", request.ttl_ms) or DEFAULT_TTL_MS
    if ttl_ms > MAX_TTL_MS:
        raise InvalidArgumentError(prefix + "ttl_ms", f"must be <= {MAX_TTL_MS} (got {ttl_ms})")
    key = request.idempotency_key
    if len(key) > 128 or not key.isprintable():
        raise InvalidArgumentError(
            prefix + "idempotency_key", "must be at most 128 printable characters"
        )
    session_max = _non_negative(
        prefix + "session_max_memory_bytes", request.session_max_memory_bytes
    )
    session_class = request.session_class
    if session_class:
        session_class = _name(prefix + "session_class", session_class)
    queue_ms = _non_negative(prefix + "queue_timeout_ms", request.queue_timeout_ms)
    if queue_ms > MAX_TTL_MS:
        raise InvalidArgumentError(
            prefix + "queue_timeout_ms", f"must be <= {MAX_TTL_MS} (got {queue_ms})"
        )
    return ReserveAsk(
        tenant=tenant,
        session=session,
        command_class=command_class,
        memory_bytes=memory,
        cpu_millis=cpu,
        priority=request.priority,
        ttl_ms=ttl_ms,
        idempotency_key=request.idempotency_key,
        queue_timeout_ms=queue_ms,
        session_max_memory_bytes=session_max,
        session_class=session_class,
        by=by,
    )


def _caller_name() -> str:
    """The calling principal's name for audit entries; "" without an access file."""
    caller = current_principal()
    return "" if caller is OPEN else caller.name


def _denial_pb(d: Deny, last_peak_bytes: int = 0) -> broker_pb2.Denial:
    return broker_pb2.Denial(
        code=d.code,
        message=d.message,
        hint=types_pb2.AdmissionHint(
            largest_memory_bytes_available=d.largest_memory_bytes_available,
            retry_after_ms=d.retry_after_ms,
            last_peak_memory_bytes=last_peak_bytes,
            limiting_scope=d.scope,
        ),
    )


# -- the application core -------------------------------------------------------------------


# Denials that come from the asking session's own declared maximum (admission.is_safe and the
# overcommit ceiling for a new declared session): the queue passes over them.
OWN_CLAIM_DENIALS = frozenset({"node_unsafe", "session_admission"})
QUEUE_FULL = "queue_full"  # the denial code of an ask refused a place in a full queue
_TENANT_SCOPE = "tenant:"  # a denial's scope when a tenant's quota holds the ask back


@dataclass(eq=False, slots=True)
class _Waiter:
    seq: int
    ask: ReserveAsk
    deny: Deny  # why it does not fit (the latest try)
    admitted: asyncio.Future[Lease]
    callers: int = 0  # RPCs waiting on it: the first ask and retries with its idempotency key

    @property
    def key(self) -> tuple[TenantName, str] | None:
        return (self.ask.tenant, self.ask.idempotency_key) if self.ask.idempotency_key else None

    @property
    def view(self) -> WaitingAsk:
        return WaitingAsk(self.seq, self.ask.tenant, self.ask.priority, self.ask.memory_bytes)


@dataclass(eq=False, slots=True)
class _GrowthAsk:
    """A paused call's ask to grow (a node's LIMIT_REACHED pressure event). One that does not
    fit waits in ``BrokerCore.growth_waits`` while its call stays paused on its node."""

    seq: int  # arrival order
    node_id: NodeId
    lease_id: LeaseId
    requested_bytes: int
    peak_bytes: int
    event_id: str
    action_id: str
    since_ms: int  # when the node first asked
    parent: Context | None  # the node's pause span: the decision continues the call's trace
    refuse: Refuse | None = None  # why it does not fit (the latest try)
    timer: asyncio.TimerHandle | None = None  # its deadline


class BrokerCore:
    """State + durability shared by the servicers: commit = apply to the ledger, make durable,
    roll the ledger back if the database refused."""

    def __init__(
        self,
        store: Store,
        journal: Journal,
        ledger: Ledger,
        metrics: BrokerMetrics | None = None,
        on_fenced: Callable[[str], None] | None = None,
        *,
        max_queued: int = 0,
        max_queued_per_tenant: int = 0,
        growth_wait_ms: int = 0,
        session_percentile: int = 95,
    ) -> None:
        self.store = store
        # New sessions of a class are declared at this percentile of what earlier ones held.
        self.session_percentile = session_percentile
        self.journal = journal
        self.ledger = ledger
        self.metrics = metrics or BrokerMetrics()
        # Called when a commit found another broker leading (StoreFenced): this one must stop.
        self.on_fenced = on_fenced
        # Per connected node, what its stream sends; None ends the stream.
        self.node_queues: dict[NodeId, asyncio.Queue[broker_pb2.BrokerMessage | None]] = {}
        # Active leases whose node asked about them for a call it runs (GetLeaseRequest.node_id):
        # their renewals and their end are pushed to that node (``tell_renewed``,
        # ``tell_ended``). Not persisted: a node asks about every lease again when its stream to
        # a (new) broker opens.
        self.running: dict[LeaseId, NodeId] = {}
        # What the broker told no node because its stream was not open (a pushed lease, a
        # revocation), the latest per lease, at most HELD_PER_NODE a node: sent once it opens.
        # A node asks about every lease when it reconnects, but it may ask before this broker
        # has its stream (GetLease and Connect are separate calls), and a change made between
        # the two would otherwise wait for its next check, near the lease's expiry.
        self.held: dict[NodeId, dict[LeaseId, broker_pb2.BrokerMessage]] = {}
        # Leases applied to the ledger whose commit has not finished yet: a retried Reserve
        # with the same idempotency key waits on this before it answers (never replies with a
        # grant that is not durable). Resolves True once durable, False if the commit failed.
        self.not_durable: dict[LeaseId, asyncio.Future[bool]] = {}
        # Reserves waiting for capacity (queue_timeout_ms > 0), in arrival order.
        self.waiters: dict[int, _Waiter] = {}
        # The same waiters by (tenant, idempotency key): a retry joins the queued first ask.
        self.waiting_keys: dict[tuple[TenantName, str], _Waiter] = {}
        # Bounds on the waiters, in all and per tenant (0: none): every release walks them.
        self.max_queued = max_queued
        self.max_queued_per_tenant = max_queued_per_tenant
        self._tenant_waiters: Counter[TenantName] = Counter()
        # The tenants whose quotas alone hold back every waiter, as the last round found them
        # (None: unknown, or some waiter waits for shared capacity): a lease that ends outside
        # their chains cannot let anyone in, and starts no round (``kick``).
        self._held_by: frozenset[TenantName] | None = frozenset()
        self._seq = itertools.count()
        self._pump_scheduled = False
        self._background: set[asyncio.Task[None]] = set()
        self.pressured_until: dict[NodeId, int] = {}
        self.node_reports: dict[NodeId, NodeReport] = {}
        # Paused calls whose growth did not fit, by lease: held up to growth_wait_ms (0: a
        # growth that does not fit kills the call at once) for room to free.
        self.growth_wait_ms = growth_wait_ms
        self.growth_waits: dict[LeaseId, _GrowthAsk] = {}
        self.growth_seq = itertools.count()
        self._growth_scheduled = False

    async def commit(self, changes: list[Change]) -> None:
        await self.commit_applied(changes, self.ledger.apply(changes))

    async def commit_applied(
        self,
        changes: list[Change],
        undo: list[Undo],
        new_leases: Sequence[Lease] = (),
    ) -> None:
        """Make ``changes`` (already applied to the ledger, ``undo`` reverts them) durable.

        ``new_leases`` are the grants among them: those with an idempotency key are marked not
        durable until the commit ends (a retry finds only those, through ``ledger.by_key``).
        """
        durable: asyncio.Future[bool] | None = None
        keyed = [le.lease_id for le in new_leases if le.idempotency_key]
        if keyed:
            durable = asyncio.get_running_loop().create_future()
            for lid in keyed:
                self.not_durable[lid] = durable
        inner = self.journal.submit(changes)

        def settled(task: asyncio.Future[None]) -> None:
            # Runs before any awaiter of ``inner`` resumes, also when the caller went away.
            failed = task.cancelled() or task.exception() is not None
            if failed:
                self.ledger.apply(undo)
            for lid in keyed:
                self.not_durable.pop(lid, None)
            if durable is not None:
                durable.set_result(not failed)

        inner.add_done_callback(settled)
        try:
            # Shielded: a caller that goes away does not stop a commit already queued.
            await asyncio.shield(inner)
        except StoreError as exc:
            if isinstance(exc, StoreFenced) and self.on_fenced is not None:
                self.on_fenced(str(exc))
            raise UnavailableError(f"database: could not persist the decision ({exc})") from exc

    async def prune_history(self, keep_ms: int) -> None:
        """Delete one batch of the history older than ``keep_ms`` (ended leases and audit
        entries; active leases stay, whatever their age)."""
        await self.commit([PruneHistory(now_ms() - keep_ms, PRUNE_BATCH)])

    async def existing_grant(self, tenant: TenantName, key: str) -> Lease | None:
        """The durable active lease a retried Reserve with this idempotency key gets, if any."""
        while key:
            lid = self.ledger.by_key.get((tenant, key))
            if lid is None:
                return None
            pending = self.not_durable.get(lid)
            if pending is None:
                return self.ledger.leases.get(lid)
            if await asyncio.shield(pending):
                return self.ledger.leases.get(lid)
            # The first attempt's commit failed and was undone: decide afresh.
        return None

    def lease_pb(self, lease: Lease, into: types_pb2.Lease | None = None) -> types_pb2.Lease:
        """``lease`` as a message: a new one, or ``into`` set to it."""
        pb = types_pb2.Lease() if into is None else into
        return fill_lease_pb(pb, lease, self.ledger.nodes.get(lease.node_id))

    async def find_lease(self, lease_id: str, *, field: str = "lease_id") -> Lease:
        lid = LeaseId(_name(field, lease_id, remember=False))
        lease = self.ledger.leases.get(lid)
        if lease is None:
            lease = await self.journal.run_in_db(lambda: self.store.get_lease(lid))
        if lease is None:
            raise NotFoundError("lease", lid, field=field)
        return lease

    def decide_reserve(self, ask: ReserveAsk, t_ms: int) -> tuple[Lease, list[Change]] | Deny:
        """Decide one admission on the ledger as it is now (nothing applied)."""
        ledger = self.ledger
        claim = ledger.session_claim(ask.tenant, ask.session)
        session_node = None
        session_max = ask.session_max_memory_bytes
        if claim is None and ask.session_class:  # a new session of a class: its learned maximum
            session_max = size_session_max(
                session_max,
                ledger.recent_session_peaks(ask.tenant, ask.session_class),
                self.session_percentile,
            )
        if claim is None and not session_max:
            budget = size_budget(
                ask.memory_bytes, ledger.recent_peaks(ask.tenant, ask.command_class)
            )
        else:
            # A declared session: its maximum is what admission keeps room for (is_safe), so
            # its calls get their intent (no learned undersizing to grow back from while
            # paused), and every lease of it carries the claim.
            budget = ask.memory_bytes
            if claim is not None:
                session_node, held = claim
                if ask.session_class:  # sized when it began: not what each call declares
                    session_max = 0
                session_max = max(session_max, held.max_bytes, held.held_bytes + budget)
        if session_node is not None:  # its leases stay on its node
            nodes = [ledger.node_view(session_node)] if session_node in ledger.nodes else []
        elif session_max or self.growth_waits:
            # A new declared session: is_safe on every node. Room kept for paused calls: the
            # node with the most free memory may not be the first by granted memory.
            nodes = ledger.node_views()
        else:
            nodes = ledger.placement_views(max(ask.memory_bytes, budget))
        levels, nodes = self.keep_for_growth(ask.priority, ledger.quota_levels(ask.tenant), nodes)
        decision = decide_reserve(
            budget,
            levels,
            nodes,
            cpu_millis=ask.cpu_millis,
            intent_bytes=ask.memory_bytes,
            session=(ask.tenant, ask.session),
            session_max_bytes=session_max,
            session_node=session_node,
            started_sessions_waiting=self._started_sessions_waiting() if session_max else 0,
        )
        if isinstance(decision, Deny):
            return decision
        lease = Lease(
            lease_id=_lease_ids.next(),
            tenant=ask.tenant,
            session=ask.session,
            command_class=ask.command_class,
            node_id=decision.node_id,
            memory_bytes=decision.memory_bytes,
            intent_memory_bytes=ask.memory_bytes,
            cpu_millis=ask.cpu_millis,
            priority=ask.priority,
            granted_at_ms=t_ms,
            expires_at_ms=t_ms + ask.ttl_ms,
            idempotency_key=ask.idempotency_key,
            session_max_memory_bytes=session_max,
            session_class=ask.session_class,
        )
        audit = Audit(
            AuditEntry(
                at_ms=t_ms,
                kind="reserve",
                tenant=lease.tenant,
                lease_id=lease.lease_id,
                node_id=lease.node_id,
                detail=(
                    f'{{"intent_bytes": {ask.memory_bytes}, "memory_bytes": {lease.memory_bytes}'
                    + (f', "session_max_bytes": {session_max}' if ask.session_class else "")
                    + (f', "by": {json.dumps(ask.by)}}}' if ask.by else "}")
                ),
            )
        )
        return lease, [PutLease(lease), audit]

    def keep_for_growth(
        self, priority: int, levels: list[QuotaLevel], nodes: list[NodeView]
    ) -> tuple[list[QuotaLevel], list[NodeView]]:
        """``levels`` and ``nodes`` as a new call of ``priority`` sees them: the memory that
        paused calls of at least that priority wait for (``growth_waits``) is kept for them, on
        their nodes and at every level of their tenants' chains. Work in progress comes before
        new work; a call of higher priority may take it, as it could preempt them."""
        if not self.growth_waits:  # the usual case, on every admission: nothing kept
            return levels, nodes
        ledger = self.ledger
        by_node: Counter[NodeId] = Counter()
        by_tenant: Counter[str] = Counter()
        for ask in self.growth_waits.values():
            lease = ledger.leases.get(ask.lease_id)
            if lease is None or lease.priority < priority:
                continue
            want = ask.requested_bytes - lease.memory_bytes
            if want > 0:
                by_node[lease.node_id] += want
                for name in ledger.chain_names(lease.tenant):
                    by_tenant[name] += want
        if not by_node:
            return levels, nodes
        return (
            [replace(lv, held_memory_bytes=by_tenant[lv.tenant.name]) for lv in levels],
            [replace(n, held_memory_bytes=by_node[n.node_id]) for n in nodes],
        )

    def _started_sessions_waiting(self) -> int:
        """Queued asks of declared sessions that already hold leases."""
        claim = self.ledger.session_claim
        return sum(
            1
            for w in self.waiters.values()
            if (w.ask.session_max_memory_bytes or w.ask.session_class)
            and claim(w.ask.tenant, w.ask.session) is not None
        )

    def ended(
        self, lease: Lease, state: LeaseState, t_ms: int, *, peak_bytes: int, outcome: Outcome
    ) -> Lease:
        """``lease`` ended at ``t_ms``; if that ends its session (of a class), with the most the
        session held at once, which later sessions of the class are sized from."""
        # Spelled out rather than dataclasses.replace, which walks the fields by name: this runs
        # for every release (a third of a ReleaseBatch's own CPU went to replace).
        return Lease(
            lease_id=lease.lease_id,
            tenant=lease.tenant,
            session=lease.session,
            command_class=lease.command_class,
            node_id=lease.node_id,
            memory_bytes=lease.memory_bytes,
            intent_memory_bytes=lease.intent_memory_bytes,
            granted_at_ms=lease.granted_at_ms,
            expires_at_ms=lease.expires_at_ms,
            state=state,
            epoch=lease.epoch,
            priority=lease.priority,
            cpu_millis=lease.cpu_millis,
            idempotency_key=lease.idempotency_key,
            ended_at_ms=t_ms,
            peak_memory_bytes=max(lease.peak_memory_bytes, peak_bytes),
            outcome=outcome if outcome is not Outcome.UNKNOWN else lease.outcome,
            session_max_memory_bytes=lease.session_max_memory_bytes,
            session_class=lease.session_class,
            session_peak_bytes=self.ledger.session_end_peak(lease) if lease.session_class else 0,
        )

    @staticmethod
    def end_changes(ended: Lease, kind: str, peak_bytes: int, by: str = "") -> list[Change]:
        """The changes that end a lease (``by``: the principal whose call ended it)."""
        named = f', "by": {json.dumps(by)}' if by else ""
        return [
            PutLease(ended),
            Audit(
                AuditEntry(
                    at_ms=ended.ended_at_ms or 0,
                    kind=kind,
                    tenant=ended.tenant,
                    lease_id=ended.lease_id,
                    node_id=ended.node_id,
                    detail=(
                        f'{{"outcome": "{ended.outcome.value}", "peak_bytes": {peak_bytes}{named}}}'
                    ),
                )
            ),
        ]

    async def end_lease(
        self,
        lease: Lease,
        state: LeaseState,
        *,
        peak_bytes: int,
        outcome: Outcome,
        kind: str,
        by: str = "",
    ) -> Lease:
        ended = self.ended(lease, state, now_ms(), peak_bytes=peak_bytes, outcome=outcome)
        await self.commit(self.end_changes(ended, kind, peak_bytes, by))
        self.tell_ended(ended)
        if state is LeaseState.EXPIRED:
            self.metrics.lease_expiries.inc()
        elif state is LeaseState.RELEASED:
            self.metrics.lease_releases.inc()
        self.kick([lease.tenant])
        log.info(
            "%s lease %s tenant %s budget %d peak %d outcome %s",
            kind,
            lease.lease_id,
            lease.tenant,
            lease.memory_bytes,
            peak_bytes,
            ended.outcome.value,
        )
        return ended

    def tell_renewed(self, renewed: Lease) -> None:
        """Push a renewal (durable) of a lease whose node runs its call: the node counts the
        new expiry from now on. Else it learns of it only when it asks, near the expiry it knew,
        and a broker that cannot be reached just then (a restart, a failover) would have the
        call stopped as expired although its caller renewed it."""
        node_id = self.running.get(renewed.lease_id)
        if node_id is not None:
            self._push_lease(node_id, renewed)

    def _push_lease(self, node_id: NodeId, lease: Lease) -> bool:
        """Queue ``lease`` (LeaseUpdate) on the node's stream; False if it has none open (then
        it is held until it has: ``send_held``)."""
        pb = self.lease_pb(lease)
        pb.as_of_unix_ms = now_ms()
        message = broker_pb2.BrokerMessage(lease=broker_pb2.LeaseUpdate(lease=pb))
        return self._send_or_hold(node_id, lease.lease_id, message)

    def _send_or_hold(
        self, node_id: NodeId, lease_id: LeaseId, message: broker_pb2.BrokerMessage
    ) -> bool:
        """Queue a lease's ``message`` on the node's stream (True), or hold it, in place of what
        was held for that lease, until the node's stream opens (False)."""
        if self._send(node_id, message):
            return True
        held = self.held.setdefault(node_id, {})
        held.pop(lease_id, None)
        held[lease_id] = message
        if len(held) > HELD_PER_NODE:
            del held[next(iter(held))]
        return False

    def _send(self, node_id: NodeId, message: broker_pb2.BrokerMessage) -> bool:
        """Queue ``message`` on the node's stream; False if it has none open."""
        queue = self.node_queues.get(node_id)
        if queue is None:
            return False
        queue.put_nowait(message)
        self._count_sent(message)
        return True

    def _count_sent(self, message: broker_pb2.BrokerMessage) -> None:
        if message.HasField("lease"):
            state = types_pb2.LeaseState.Name(message.lease.lease.state)
            self.metrics.lease_update_sent(state.removeprefix("LEASE_STATE_").lower())
        else:
            self.metrics.decision_sent(_DECISION_KIND_LABEL[message.decision.kind])

    def send_held(self, node_id: NodeId) -> int:
        """Queue what was held for ``node_id`` on its stream, now open; how many."""
        held = self.held.pop(node_id, {})
        for message in held.values():
            self._send(node_id, message)
        return len(held)

    def tell_ended(self, ended: Lease) -> None:
        """Push the end (durable) of a lease whose node runs its call on that node's stream: the
        node stops the call now, not at its next lease check, which for a call its caller still
        follows is only near the lease's expiry. The broker has already given the budget to
        others. A node with no stream open asks about every lease once it has one again.

        The call may have just ended: a caller's release can reach the broker before its node's
        CallFinished (11 of 200 SDK ``run`` calls here), and the node has nothing to stop then.
        The caller's word (the outcome it reports) is not taken for the call being over: a
        tenant could release a call that runs on and have its budget back."""
        node_id = self.running.pop(ended.lease_id, None)
        if node_id is None:
            return
        log.info(
            "lease %s tenant %s %s: %s node %s, which asked about it for a call",
            ended.lease_id,
            ended.tenant,
            ended.state.value,
            "sent to" if self._push_lease(node_id, ended) else "held until its stream opens for",
            node_id,
        )

    # -- the queue (order and preemption: fairshare.py) ------------------------------------------

    async def wait_for_capacity(self, ask: ReserveAsk, deny: Deny) -> Lease:
        """Queue ``ask`` until it is admitted (returns the durable lease) or its deadline passes
        (raises QuotaExceededError with the last reason it did not fit)."""
        waiter = self.queued(ask)
        if waiter is None:
            self._check_room(ask, deny)
            waiter = _Waiter(next(self._seq), ask, deny, asyncio.get_running_loop().create_future())
            self.waiters[waiter.seq] = waiter
            self._tenant_waiters[ask.tenant] += 1
            if waiter.key is not None:
                self.waiting_keys[waiter.key] = waiter
            lowest = self.ledger.lowest_priority()
            if (
                self._held_by is not None
                and deny.scope.startswith(_TENANT_SCOPE)
                and (lowest is None or lowest >= ask.priority)  # nothing it could preempt
            ):
                # Denied just now by its own tenant's quota, and the others are held alike: a
                # round would deny them all again.
                self._held_by |= {TenantName(deny.scope.removeprefix(_TENANT_SCOPE))}
            else:
                self.kick()
        waiter.callers += 1
        try:
            await asyncio.wait({waiter.admitted}, timeout=ask.queue_timeout_ms / 1000)
        finally:
            waiter.callers -= 1
            picked = waiter.seq not in self.waiters
            if not picked and not waiter.callers:  # the last caller gave up: leave the queue
                self._unqueue(waiter)
        if not picked:
            # What fits now, not in the round it was last tried in: grants start no round, and
            # a round can be skipped (kick), so that round's node room may be long gone.
            fresh = self.decide_reserve(ask, now_ms())
            d = fresh if isinstance(fresh, Deny) else waiter.deny
            raise QuotaExceededError(
                f"{d.message} (waited {ask.queue_timeout_ms} ms in the queue)",
                code=d.code,
                scope=d.scope,
                largest_memory_bytes_available=d.largest_memory_bytes_available,
                retry_after_ms=d.retry_after_ms,
                last_peak_memory_bytes=self.ledger.last_peak(ask.tenant, ask.command_class),
            )
        return await waiter.admitted  # picked: durable (or failed) soon

    def queued(self, ask: ReserveAsk) -> _Waiter | None:
        """The queued ask a Reserve with the same idempotency key joins, if any."""
        if not ask.idempotency_key:
            return None
        return self.waiting_keys.get((ask.tenant, ask.idempotency_key))

    def _check_room(self, ask: ReserveAsk, deny: Deny) -> None:
        """Refuse to queue ``ask`` (QuotaExceededError, code queue_full) when the queue, or its
        tenant's part of it, is at its bound."""
        tenant_waiting = self._tenant_waiters[ask.tenant]
        if self.max_queued_per_tenant and tenant_waiting >= self.max_queued_per_tenant:
            full, scope = (
                f"tenant {ask.tenant} has {tenant_waiting} Reserves waiting "
                f"(at most {self.max_queued_per_tenant})",
                f"tenant:{ask.tenant}",
            )
        elif self.max_queued and len(self.waiters) >= self.max_queued:
            full, scope = (
                f"the queue holds {len(self.waiters)} Reserves (at most {self.max_queued})",
                "cluster",
            )
        else:
            return
        raise QuotaExceededError(
            f"{deny.message}; not queued: {full}",
            code=QUEUE_FULL,
            scope=scope,
            largest_memory_bytes_available=deny.largest_memory_bytes_available,
            retry_after_ms=deny.retry_after_ms,
            last_peak_memory_bytes=self.ledger.last_peak(ask.tenant, ask.command_class),
        )

    def _unqueue(self, waiter: _Waiter) -> None:
        if self.waiters.pop(waiter.seq, None) is not None:
            left = self._tenant_waiters[waiter.ask.tenant] - 1
            if left:
                self._tenant_waiters[waiter.ask.tenant] = left
            else:
                del self._tenant_waiters[waiter.ask.tenant]
        if waiter.key is not None and self.waiting_keys.get(waiter.key) is waiter:
            del self.waiting_keys[waiter.key]

    def kick(self, freed: Iterable[TenantName] | None = None) -> None:
        """Capacity may have freed: try the queue once the current callback is done.

        ``freed``: only leases of these tenants ended (their chains' quotas and their nodes
        have more room). When the last round left only waiters held back by their own tenants'
        quotas, and none of those tenants is in a freed chain, no round runs: it would deny
        every waiter again, at a cost that grows with the queue.
        """
        if self.growth_waits and not self._growth_scheduled:
            # Before the queue's round (call_soon runs in order): paused calls first, they
            # hold work in progress that waits for room.
            self._growth_scheduled = True
            asyncio.get_running_loop().call_soon(self._grow_waiting)
        if not self.waiters or self._pump_scheduled:
            return
        held_by = self._held_by
        if freed is not None and held_by is not None:
            chain_names = self.ledger.chain_names
            if all(held_by.isdisjoint(chain_names(t)) for t in set(freed)):
                return
        self._pump_scheduled = True
        asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        self.metrics.queue_rounds.inc()
        ledger = self.ledger
        t = now_ms()
        changes: list[Change] = []
        undo: list[Undo] = []
        admitted: list[tuple[_Waiter, Lease]] = []
        preempted: list[Lease] = []
        views = [w.view for w in self.waiters.values()]
        tenants = {v.tenant for v in views}
        order = FairQueue(
            views,
            {name: ledger.granted_bytes(name) for name in tenants},
            {name: ledger.tenants[name].weight for name in tenants if name in ledger.tenants},
        )
        candidates: list[Candidate] | None = None  # for preemption, while the ledger is unchanged
        # Asks outside a declared session passed over for their own tenant's quota, while the
        # ledger is unchanged: an equal ask is decided alike (1,000 waiters at a tenant's quota
        # are mostly the same few asks).
        passed: dict[tuple[TenantName, str, int, int, int], Deny] = {}
        stopped = False  # at a shared limit, before every waiter was tried
        while (nxt := order.pop()) is not None:
            waiter = self.waiters[nxt.seq]
            ask = waiter.ask
            if ask.tenant not in ledger.tenants:  # deleted while waiting
                continue
            same: tuple[TenantName, str, int, int, int] | None = None
            if (
                not ask.session_max_memory_bytes
                and not ask.session_class
                and not ledger.session_claim(ask.tenant, ask.session)
            ):
                same = (
                    ask.tenant,
                    ask.command_class,
                    ask.memory_bytes,
                    ask.cpu_millis,
                    ask.priority,
                )
                if same in passed:
                    waiter.deny = passed[same]
                    continue
            decision = self.decide_reserve(ask, t)
            victims: list[Lease] = []
            lowest = ledger.lowest_priority()
            if isinstance(decision, Deny) and lowest is not None and lowest < ask.priority:
                if candidates is None:  # only once a lower priority class holds leases
                    candidates = self._candidates()
                victims = self._victims(ask, candidates)
            if victims:
                candidates = None
                passed.clear()
                preempted.extend(self._revoke(victims, t, changes, undo))
                for tenant in order.tenants:  # the revoked leases' holdings are free now
                    order.hold(tenant, ledger.granted_bytes(tenant))
                decision = self.decide_reserve(ask, t)
            if isinstance(decision, Deny):
                waiter.deny = decision
                if decision.scope == f"tenant:{ask.tenant}" or decision.code in OWN_CLAIM_DENIALS:
                    # Only its own quota, or its own session's declared maximum, holds it: an
                    # ask after it may still go (it blocks no one).
                    if same is not None and decision.scope == f"tenant:{ask.tenant}":
                        passed[same] = decision
                    continue
                stopped = True
                break  # shared capacity: no backfill past it
            lease, ch = decision
            undo[:0] = ledger.apply(ch)
            changes.extend(ch)
            self._unqueue(waiter)
            admitted.append((waiter, lease))
            candidates = None  # the ledger changed: built again if needed
            passed.clear()
            for tenant in order.tenants:  # this grant moved their holdings
                order.hold(tenant, ledger.granted_bytes(tenant))
        self._held_by = None
        if not (stopped or changes):
            # Every waiter was tried on this ledger and none got in: what holds each back now.
            scopes = {w.deny.scope for w in self.waiters.values()}
            if all(sc.startswith(_TENANT_SCOPE) for sc in scopes):
                self._held_by = frozenset(
                    TenantName(sc.removeprefix(_TENANT_SCOPE)) for sc in scopes
                )
        if changes:
            task = asyncio.get_running_loop().create_task(
                self._commit_queue(changes, undo, admitted, preempted)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _revoke(
        self, victims: list[Lease], t_ms: int, changes: list[Change], undo: list[Undo]
    ) -> list[Lease]:
        """Revoke ``victims`` in the ledger (preempted), adding the changes and their undo;
        the revoked leases."""
        revoked = []
        for victim in victims:
            ended = self.ended(
                victim, LeaseState.REVOKED, t_ms, peak_bytes=0, outcome=Outcome.KILLED
            )
            ch = self.end_changes(ended, "preempt", 0)
            undo[:0] = self.ledger.apply(ch)
            changes.extend(ch)
            revoked.append(ended)
        return revoked

    def _candidates(self) -> list[Candidate]:
        """Every active lease as a preemption candidate."""
        ledger = self.ledger
        chains: dict[TenantName, frozenset[TenantName]] = {}
        out: list[Candidate] = []
        for x in ledger.leases.values():
            chain = chains.get(x.tenant)
            if chain is None:
                chain = chains[x.tenant] = frozenset(t.name for t in ledger.chain(x.tenant))
            out.append(
                Candidate(
                    lease_id=x.lease_id,
                    priority=x.priority,
                    granted_at_ms=x.granted_at_ms,
                    memory_bytes=x.memory_bytes,
                    cpu_millis=x.cpu_millis,
                    node_id=x.node_id,
                    chain=chain,
                )
            )
        return out

    def _victims(self, ask: ReserveAsk, candidates: list[Candidate]) -> list[Lease]:
        """The leases to revoke for ``ask`` (none: preemption would not let it in)."""
        ledger = self.ledger
        levels, nodes = self.keep_for_growth(
            ask.priority, ledger.quota_levels(ask.tenant), ledger.node_views()
        )
        chosen = choose_victims(
            ask.memory_bytes,
            ask.priority,
            levels,
            nodes,
            candidates,
            cpu_millis=ask.cpu_millis,
        )
        return [ledger.leases[c.lease_id] for c in chosen or ()]

    async def _commit_queue(
        self,
        changes: list[Change],
        undo: list[Undo],
        admitted: list[tuple[_Waiter, Lease]],
        preempted: list[Lease],
    ) -> None:
        try:
            await self.commit_applied(changes, undo, [lease for _, lease in admitted])
        except Exception as exc:  # noqa: BLE001 - handed to the waiters
            for waiter, _ in admitted:
                if not waiter.admitted.done():
                    waiter.admitted.set_exception(exc)
            return
        self._send_preemptions(preempted, "higher-priority work")
        for waiter, lease in admitted:
            if not waiter.admitted.done():
                waiter.admitted.set_result(lease)
        if preempted:
            self.kick()

    # -- paused calls waiting to grow ------------------------------------------------------------

    def decide_growth(self, ask: _GrowthAsk, lease: Lease) -> Grow | Refuse:
        ledger = self.ledger
        return decide_growth(
            lease.memory_bytes,
            ask.requested_bytes,
            ask.peak_bytes,
            ledger.quota_levels(lease.tenant),
            ledger.node_view(ask.node_id),
            (lease.tenant, lease.session),
        )

    def growth_outcome(
        self, ask: _GrowthAsk, lease: Lease, result: Grow | Refuse, decision_id: str
    ) -> tuple[list[Change], broker_pb2.Decision]:
        """The changes and the node's decision for ``result`` (in the current span): the lease
        grown, or the call killed."""
        span = trace.get_current_span()
        waited_ms = now_ms() - ask.since_ms if ask.refuse is not None else 0
        waited = {"waited_ms": waited_ms} if waited_ms else {}
        if isinstance(result, Grow):
            span.set_attribute("agentcg.decision", "grow")
            changes: list[Change] = []
            grown = lease
            if result.new_memory_bytes == lease.memory_bytes:
                # Asked again for what the lease already has (the answer to the first ask was
                # lost with a broken stream or a leader that died): the same grant, and nothing
                # changes (no new epoch, no audit entry).
                log.info(
                    "grow lease %s tenant %s: already %d (action %s)",
                    lease.lease_id,
                    lease.tenant,
                    lease.memory_bytes,
                    ask.action_id,
                )
            else:
                grown = replace(lease, memory_bytes=result.new_memory_bytes, epoch=lease.epoch + 1)
                log.info(
                    "grow lease %s tenant %s %d -> %d (action %s)%s",
                    lease.lease_id,
                    lease.tenant,
                    lease.memory_bytes,
                    grown.memory_bytes,
                    ask.action_id,
                    f" after waiting {waited_ms} ms" if waited_ms else "",
                )
                changes = [
                    PutLease(grown),
                    _audit(
                        "grow",
                        grown,
                        from_bytes=lease.memory_bytes,
                        to_bytes=grown.memory_bytes,
                        action_id=ask.action_id,
                        **waited,
                    ),
                ]
            return changes, broker_pb2.Decision(
                decision_id=decision_id,
                lease_id=lease.lease_id,
                event_id=ask.event_id,
                kind=broker_pb2.DECISION_KIND_GROW,
                new_budget_bytes=grown.memory_bytes,
                epoch=grown.epoch,
                reason=result.message,
                traceparent=traceparent(),
            )
        reason = result.message + (f"; waited {waited_ms} ms for room" if waited_ms else "")
        span.set_attribute("agentcg.decision", "kill")
        span.set_attribute("agentcg.reason", result.code)
        log.info("kill lease %s: %s (action %s)", lease.lease_id, reason, ask.action_id)
        changes = [
            _audit(
                "kill", lease, code=result.code, reason=reason, action_id=ask.action_id, **waited
            )
        ]
        return changes, broker_pb2.Decision(
            decision_id=decision_id,
            lease_id=lease.lease_id,
            event_id=ask.event_id,
            kind=broker_pb2.DECISION_KIND_KILL,
            epoch=lease.epoch,
            reason=reason,
            traceparent=traceparent(),
        )

    def room_may_free(self, refuse: Refuse) -> bool:
        """Whether waiting can help the growth ``refuse`` refused: another active lease holds
        part of what limits it (it may end). A quota or node held by the paused call alone frees
        nothing by waiting: it is decided at once, as with no wait."""
        kind, _, name = refuse.scope.partition(":")
        if kind == "tenant":
            return self.ledger.active_calls(TenantName(name)) > 1
        if kind == "node":
            return self.ledger.node_calls(NodeId(name)) > 1
        return True

    def hold_growth(self, ask: _GrowthAsk, refuse: Refuse) -> int:
        """Hold ``ask`` until room frees (``kick``) or ``growth_wait_ms`` after it was first
        made; the ms left. The same call asking again (its node's notice of a task still
        waiting at its limit) keeps its place and deadline."""
        held = self.growth_waits.get(ask.lease_id)
        if held is not None and held.node_id == ask.node_id:
            held.requested_bytes = max(held.requested_bytes, ask.requested_bytes)
            held.peak_bytes = max(held.peak_bytes, ask.peak_bytes)
            held.refuse = refuse
            # The answer goes to the node's latest pause (a new one after a partial growth).
            held.event_id, held.action_id, held.parent = ask.event_id, ask.action_id, ask.parent
            return max(0, held.since_ms + self.growth_wait_ms - now_ms())
        if held is not None:
            self._drop_growth(held)
        ask.refuse = refuse
        ask.timer = asyncio.get_running_loop().call_later(
            self.growth_wait_ms / 1000, self._growth_deadline, ask
        )
        self.growth_waits[ask.lease_id] = ask
        return self.growth_wait_ms

    def forget_growth(self, lease_id: LeaseId) -> None:
        """The held growth of ``lease_id``, if any, is decided otherwise."""
        if (held := self.growth_waits.get(lease_id)) is not None:
            self._drop_growth(held)

    def _drop_growth(self, ask: _GrowthAsk) -> None:
        if self.growth_waits.get(ask.lease_id) is ask:
            del self.growth_waits[ask.lease_id]
            self.kick()  # the room kept for it (keep_for_growth) is open to queued asks again
        if ask.timer is not None:
            ask.timer.cancel()

    def _grow_waiting(self) -> None:
        """Room may have freed: grow the paused calls that fit now, by priority then
        arrival (each grant applied before the next is decided)."""
        self._growth_scheduled = False
        ledger = self.ledger

        def order(a: _GrowthAsk) -> tuple[int, int]:
            lease = ledger.leases.get(a.lease_id)
            return (-(lease.priority if lease else 0), a.seq)

        for ask in sorted(self.growth_waits.values(), key=order):
            self._settle_growth(ask, at_deadline=False)

    def _growth_deadline(self, ask: _GrowthAsk) -> None:
        ask.timer = None
        if self.growth_waits.get(ask.lease_id) is ask:
            self._settle_growth(ask, at_deadline=True)

    def _settle_growth(self, ask: _GrowthAsk, *, at_deadline: bool) -> None:
        """Grow ``ask``'s call if it fits now. At its deadline something gives way, decided
        here once: leases of lower priority that make room (``fairshare.growth_victims``), or
        else the paused call itself is killed."""
        ledger = self.ledger
        lease = ledger.leases.get(ask.lease_id)
        if lease is None or lease.node_id != ask.node_id or ask.node_id not in self.node_queues:
            self._drop_growth(ask)  # ended, revoked, or its node gone: nobody to answer
            return
        result = self.decide_growth(ask, lease)
        victims: list[Lease] = []
        if isinstance(result, Refuse):
            ask.refuse = result
            if not at_deadline:
                return
            if result.code in ("tenant_quota", "node_capacity"):
                chosen = growth_victims(
                    lease.memory_bytes,
                    ask.requested_bytes,
                    lease.priority,
                    ledger.quota_levels(lease.tenant),
                    ledger.node_view(ask.node_id),
                    self._candidates(),
                )
                victims = [ledger.leases[c.lease_id] for c in chosen or ()]
        self._drop_growth(ask)
        changes: list[Change] = []
        undo: list[Undo] = []
        t = now_ms()
        revoked = self._revoke(victims, t, changes, undo)
        if revoked:
            result = self.decide_growth(ask, lease)  # with the victims' room
        with tracer.start_as_current_span("agentcg.growth", context=ask.parent) as span:
            span.set_attribute("agentcg.lease_id", lease.lease_id)
            span.set_attribute("agentcg.action_id", ask.action_id)
            span.set_attribute("agentcg.tenant", lease.tenant)
            span.set_attribute("agentcg.waited_ms", t - ask.since_ms)
            span.set_attribute("agentcg.preempted", len(revoked))
            ch, decision = self.growth_outcome(ask, lease, result, uuid.uuid4().hex[:16])
        undo[:0] = ledger.apply(ch)
        changes.extend(ch)
        task = asyncio.get_running_loop().create_task(
            self._commit_growth(changes, undo, ask.node_id, decision, revoked)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _commit_growth(
        self,
        changes: list[Change],
        undo: list[Undo],
        node_id: NodeId,
        decision: broker_pb2.Decision,
        revoked: list[Lease],
    ) -> None:
        try:
            await self.commit_applied(changes, undo)
        except Exception as exc:  # noqa: BLE001 - the node's own deadline applies its rule
            log.warning("lease %s: growth decision not persisted: %s", decision.lease_id, exc)
            return
        self._send_preemptions(revoked, "a paused call of higher priority to grow")
        self.send_decision(node_id, decision)
        if revoked:
            self.kick()

    def _send_preemptions(self, revoked: list[Lease], what: str) -> None:
        """Tell the nodes of leases revoked (durably) to make room for ``what``."""
        self.metrics.lease_preemptions.inc(len(revoked))
        for lease in revoked:
            log.info(
                "preempt lease %s tenant %s priority %d node %s for %s",
                lease.lease_id,
                lease.tenant,
                lease.priority,
                lease.node_id,
                what,
            )
            self.send_revocation(
                lease,
                f"lease {lease.lease_id}: preempted for {what} (priority {lease.priority})",
            )

    def send_revocation(self, lease: Lease, reason: str) -> bool:
        """Tell the node of a lease already revoked (durably) to stop its call; held until
        its stream opens if it has none open (False)."""
        self.running.pop(lease.lease_id, None)
        decision = broker_pb2.Decision(
            decision_id=uuid.uuid4().hex[:16],
            lease_id=lease.lease_id,
            kind=broker_pb2.DECISION_KIND_PREEMPT,
            epoch=lease.epoch,
            reason=reason,
        )
        message = broker_pb2.BrokerMessage(decision=decision)
        return self._send_or_hold(lease.node_id, lease.lease_id, message)

    def send_decision(self, node_id: NodeId, decision: broker_pb2.Decision) -> bool:
        """Queue ``decision`` on the node's stream; False if the node has none open."""
        return self._send(node_id, broker_pb2.BrokerMessage(decision=decision))

    def state(self, max_orgs: int = 50) -> BrokerState:
        """The live state behind the gauges (on the event loop: it walks the tenants). Active
        leases and granted memory per top-level tenant, for the ``max_orgs`` busiest; the rest
        are summed under ``_other`` (a name no tenant can have), so the label stays bounded."""
        ledger = self.ledger
        orgs = sorted(
            (t.name for t in ledger.tenants.values() if t.parent is None),
            key=lambda name: (-ledger.active_calls(name), name),
        )
        calls: dict[str, int] = {org: ledger.active_calls(org) for org in orgs[:max_orgs]}
        granted: dict[str, int] = {org: ledger.granted_bytes(org) for org in orgs[:max_orgs]}
        if len(orgs) > max_orgs:
            calls["_other"] = sum(ledger.active_calls(org) for org in orgs[max_orgs:])
            granted["_other"] = sum(ledger.granted_bytes(org) for org in orgs[max_orgs:])
        return BrokerState(
            active_leases=len(ledger.leases),
            queue_waiters=len(self.waiters),
            growth_waiters=len(self.growth_waits),
            nodes_registered=len(ledger.nodes),
            node_streams=len(self.node_queues),
            nodes_pressured=len(ledger.pressured),
            tenants=len(ledger.tenants),
            nodes_cordoned=sum(1 for n in ledger.nodes.values() if n.cordoned),
            granted_memory_bytes=ledger.total_granted_bytes(),
            declared_memory_bytes=ledger.total_declared_bytes(),
            org_active_leases=calls,
            org_granted_bytes=granted,
        )

    def recover_nodes(self, t_ms: int) -> None:
        """Nodes whose last node-pressure report is PRESSURE_HOLD_MS old take work again."""
        for node_id, until in list(self.pressured_until.items()):
            if until <= t_ms:
                del self.pressured_until[node_id]
                self.ledger.set_pressured(node_id, False)
                log.info("node %s recovered: admitting to it again", node_id)
                self.kick()

    async def revoke_drained(self) -> int:
        """Revoke the leases still active on nodes whose drain deadline passed (the node stops
        their calls as for a preemption); returns how many."""
        ledger = self.ledger
        t = now_ms()
        changes: list[Change] = []
        undo: list[Undo] = []
        revoked: list[Lease] = []
        for node_id in sorted(ledger.draining):
            if ledger.nodes[node_id].drain_deadline_ms > t:
                continue
            for lease in ledger.node_leases(node_id):
                ended = self.ended(
                    lease, LeaseState.REVOKED, t, peak_bytes=0, outcome=Outcome.KILLED
                )
                ch = self.end_changes(ended, "drain", 0)
                undo[:0] = ledger.apply(ch)  # one by one, as _revoke
                changes += ch
                revoked.append(ended)
        if not revoked:
            return 0
        await self.commit_applied(changes, undo)
        self.metrics.lease_drain_revocations.inc(len(revoked))
        for lease in revoked:
            log.info(
                "drain: revoke lease %s tenant %s on node %s (its drain deadline passed)",
                lease.lease_id,
                lease.tenant,
                lease.node_id,
            )
            self.send_revocation(
                lease, f"lease {lease.lease_id}: node {lease.node_id} drained (deadline passed)"
            )
        self.kick()
        return len(revoked)

    async def expire_due(self) -> int:
        """Expire every active lease whose TTL passed, revoke those of drained nodes; returns
        how many expired."""
        self.recover_nodes(now_ms())
        await self.revoke_drained()
        due = self.ledger.due(now_ms())
        # Leases that ended on a path that tells no node (none should): not kept for ever.
        for lease_id in [x for x in self.running if x not in self.ledger.leases]:
            del self.running[lease_id]
        for lease in due:
            if self.ledger.leases.get(lease.lease_id) is lease:
                await self.end_lease(
                    lease, LeaseState.EXPIRED, peak_bytes=0, outcome=Outcome.UNKNOWN, kind="expire"
                )
        return len(due)


M = TypeVar("M")
Q = TypeVar("Q")
S = TypeVar("S")


def _rpc(
    fn: Callable[[S, Q, grpc.aio.ServicerContext[Q, M]], Awaitable[M]],
) -> Callable[[S, Q, grpc.aio.ServicerContext[Q, M]], Awaitable[M]]:
    """Turn domain errors into gRPC status; anything else into a generic INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Q, context: grpc.aio.ServicerContext[Q, M]) -> M:
        try:
            return await fn(self, request, context)
        except AgentcgError as exc:
            log.info("%s: %s: %s", fn.__name__, type(exc).__name__, exc.message)
            trace.get_current_span().set_attribute("agentcg.error", exc.message)
            await context.abort_with_status(to_status(exc))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            log.exception("%s: internal error", fn.__name__)
            trace.get_current_span().record_exception(exc)
            await context.abort_with_status(to_status(exc))
        raise AssertionError("unreachable")  # abort_with_status raises

    return wrapper


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def _failed_outcome(exc: BaseException, queued: bool) -> ReserveOutcome:
    """The outcome label of an admission ask that ended in ``exc``."""
    if isinstance(exc, QuotaExceededError):
        if exc.code == QUEUE_FULL:
            return ReserveOutcome.QUEUE_FULL
        return ReserveOutcome.TIMED_OUT if queued else ReserveOutcome.DENIED
    if isinstance(exc, InvalidArgumentError):
        return ReserveOutcome.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return ReserveOutcome.UNKNOWN_TENANT
    if isinstance(exc, PermissionDeniedError):
        return ReserveOutcome.PERMISSION_DENIED
    if isinstance(exc, UnavailableError):
        return ReserveOutcome.UNAVAILABLE
    if isinstance(exc, asyncio.CancelledError):
        return ReserveOutcome.CANCELLED
    return ReserveOutcome.INTERNAL


class BrokerServicer(broker_pb2_grpc.BrokerServicer):
    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    @_rpc
    async def Reserve(
        self,
        request: broker_pb2.ReserveRequest,
        context: grpc.aio.ServicerContext[broker_pb2.ReserveRequest, broker_pb2.ReserveResponse],
    ) -> broker_pb2.ReserveResponse:
        started = time.perf_counter()
        metrics = self.core.metrics
        try:
            response, outcome = await self._reserve(request)
        except BaseException as exc:
            # With a queue timeout every denial waits in the queue first: a quota error is then
            # a deadline that passed.
            outcome = _failed_outcome(exc, request.queue_timeout_ms > 0)
            raise
        finally:
            metrics.reserve("Reserve", outcome)
            metrics.admission("Reserve", outcome, time.perf_counter() - started)
        return response

    async def _reserve(
        self, request: broker_pb2.ReserveRequest
    ) -> tuple[broker_pb2.ReserveResponse, ReserveOutcome]:
        core = self.core
        ask = parse_reserve(request, by=_caller_name())  # validate
        authorize_tenant(core.ledger, ask.tenant)
        if ask.tenant not in core.ledger.tenants:
            raise NotFoundError("tenant", ask.tenant, field="tenant")
        if ask.idempotency_key:  # load
            existing = await core.existing_grant(ask.tenant, ask.idempotency_key)
            if existing is not None:
                return (
                    broker_pb2.ReserveResponse(lease=core.lease_pb(existing)),
                    ReserveOutcome.REPLAYED,
                )
            waiting = core.queued(ask)
            if waiting is not None:  # a retry of a queued ask: wait with it for the same lease
                lease = await core.wait_for_capacity(ask, waiting.deny)
                return (
                    broker_pb2.ReserveResponse(lease=core.lease_pb(lease)),
                    ReserveOutcome.QUEUED_GRANTED,
                )
        # The admission span is a child of the RPC's: when that one is not sampled neither is
        # this one (ParentBased), so do not pay for creating and entering a non-recording span.
        admission_span = (
            tracer.start_as_current_span("agentcg.admission")
            if trace.get_current_span().is_recording()
            else _NO_SPAN
        )
        with admission_span as span:
            recording = span.is_recording()  # not sampled: skip building the attributes
            if recording:
                span.set_attribute("agentcg.tenant", ask.tenant)
                span.set_attribute("agentcg.memory_bytes", ask.memory_bytes)
            decision = core.decide_reserve(ask, now_ms())  # decide
            if isinstance(decision, Deny) and ask.queue_timeout_ms > 0:
                span.set_attribute("agentcg.decision", "queue")
                lease = await core.wait_for_capacity(ask, decision)
                span.set_attribute("agentcg.lease_id", lease.lease_id)
                return (
                    broker_pb2.ReserveResponse(lease=core.lease_pb(lease)),
                    ReserveOutcome.QUEUED_GRANTED,
                )
            if isinstance(decision, Deny):
                span.set_attribute("agentcg.decision", "deny")
                span.set_attribute("agentcg.reason", decision.code)
                raise QuotaExceededError(
                    decision.message,
                    code=decision.code,
                    scope=decision.scope,
                    largest_memory_bytes_available=decision.largest_memory_bytes_available,
                    retry_after_ms=decision.retry_after_ms,
                    last_peak_memory_bytes=core.ledger.last_peak(ask.tenant, ask.command_class),
                )
            lease, changes = decision
            if recording:
                span.set_attribute("agentcg.decision", "admit")
                span.set_attribute("agentcg.lease_id", lease.lease_id)
            undo = core.ledger.apply(changes)
            await core.commit_applied(changes, undo, [lease])  # persist
        log.info(
            "reserve lease %s tenant %s node %s budget %d",
            lease.lease_id,
            lease.tenant,
            lease.node_id,
            lease.memory_bytes,
        )
        return broker_pb2.ReserveResponse(lease=core.lease_pb(lease)), ReserveOutcome.GRANTED

    @_rpc
    async def ReserveBatch(
        self,
        request: broker_pb2.ReserveBatchRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ReserveBatchRequest, broker_pb2.ReserveBatchResponse
        ],
    ) -> broker_pb2.ReserveBatchResponse:
        started = time.perf_counter()
        metrics = self.core.metrics
        outcome = "answered"  # each ask has its own answer (counted in _reserve_batch)
        try:
            return await self._reserve_batch(request)
        except BaseException as exc:
            # Refused whole: every ask in it got this answer.
            failed = _failed_outcome(exc, queued=False)
            metrics.reserve("ReserveBatch", failed, len(request.requests))
            outcome = failed.value
            raise
        finally:
            metrics.admission("ReserveBatch", outcome, time.perf_counter() - started)

    async def _reserve_batch(
        self, request: broker_pb2.ReserveBatchRequest
    ) -> broker_pb2.ReserveBatchResponse:
        core = self.core
        ledger = core.ledger
        by = _caller_name()
        asks = [parse_reserve(r, f"requests[{i}].", by) for i, r in enumerate(request.requests)]
        for i, ask in enumerate(asks):
            authorize_tenant(ledger, ask.tenant, f"requests[{i}].tenant")
            if ask.tenant not in ledger.tenants:
                raise NotFoundError("tenant", ask.tenant, field=f"requests[{i}].tenant")
        results: list[Lease | broker_pb2.Denial] = []
        changes: list[Change] = []
        undo: list[Undo] = []
        new: list[Lease] = []
        replayed = 0
        t = now_ms()
        for ask in asks:
            existing = (
                await core.existing_grant(ask.tenant, ask.idempotency_key)
                if ask.idempotency_key
                else None
            )
            if existing is not None:
                results.append(existing)
                replayed += 1
                continue
            waiting = core.queued(ask)
            if waiting is not None:  # queued by a Reserve with this key: no second lease
                results.append(
                    _denial_pb(waiting.deny, ledger.last_peak(ask.tenant, ask.command_class))
                )
                continue
            decision = core.decide_reserve(ask, t)
            if isinstance(decision, Deny):
                results.append(
                    _denial_pb(decision, ledger.last_peak(ask.tenant, ask.command_class))
                )
                continue
            lease, lease_changes = decision
            undo[:0] = ledger.apply(lease_changes)  # later grants see earlier ones
            changes.extend(lease_changes)
            new.append(lease)
            results.append(lease)
        if changes:
            await core.commit_applied(changes, undo, new)
        metrics = core.metrics
        metrics.reserve("ReserveBatch", ReserveOutcome.GRANTED, len(new))
        metrics.reserve("ReserveBatch", ReserveOutcome.REPLAYED, replayed)
        metrics.reserve("ReserveBatch", ReserveOutcome.DENIED, len(asks) - len(new) - replayed)
        log.info("reserve batch: %d asked, %d granted", len(asks), len(new))
        response = broker_pb2.ReserveBatchResponse()
        add = response.results.add
        for r in results:
            if isinstance(r, broker_pb2.Denial):
                add(denial=r)
            else:
                core.lease_pb(r, into=add().lease)
        return response

    @_rpc
    async def ReleaseBatch(
        self,
        request: broker_pb2.ReleaseBatchRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ReleaseBatchRequest, broker_pb2.ReleaseBatchResponse
        ],
    ) -> broker_pb2.ReleaseBatchResponse:
        core = self.core
        by = _caller_name()
        for i, r in enumerate(request.requests):
            _non_negative(f"requests[{i}].peak_memory_bytes", r.peak_memory_bytes)
            if r.outcome not in _OUTCOME_TO_MODEL:
                raise InvalidArgumentError(f"requests[{i}].outcome", f"unknown outcome {r.outcome}")
        leases = [
            await core.find_lease(r.lease_id, field=f"requests[{i}].lease_id")
            for i, r in enumerate(request.requests)
        ]
        for lease in leases:
            authorize_lease(core.ledger, lease)
        out: list[Lease] = []
        changes: list[Change] = []
        undo: list[Undo] = []
        ended_here: dict[LeaseId, Lease] = {}
        released = 0
        t = now_ms()
        for r, lease in zip(request.requests, leases, strict=True):
            current = core.ledger.leases.get(lease.lease_id)
            if current is None:  # already ended (before, or earlier in this batch): idempotent
                out.append(ended_here.get(lease.lease_id, lease))
                continue
            ended = core.ended(
                current,
                LeaseState.RELEASED,
                t,
                peak_bytes=r.peak_memory_bytes,
                outcome=_OUTCOME_TO_MODEL[r.outcome],
            )
            ch = core.end_changes(ended, "release", r.peak_memory_bytes, by)
            # Applied one by one: the next release of the same session sees this one gone.
            undo[:0] = core.ledger.apply(ch)
            changes.extend(ch)
            out.append(ended)
            ended_here[ended.lease_id] = ended
            released += 1
        if changes:
            await core.commit_applied(changes, undo)
            core.metrics.lease_releases.inc(released)
            core.kick([x.tenant for x in out])
            if core.running:
                for ended in ended_here.values():
                    core.tell_ended(ended)
        response = broker_pb2.ReleaseBatchResponse()
        add = response.leases.add
        for x in out:
            core.lease_pb(x, into=add())
        return response

    @_rpc
    async def Release(
        self,
        request: broker_pb2.ReleaseRequest,
        context: grpc.aio.ServicerContext[broker_pb2.ReleaseRequest, broker_pb2.ReleaseResponse],
    ) -> broker_pb2.ReleaseResponse:
        _non_negative("peak_memory_bytes", request.peak_memory_bytes)
        if request.outcome not in _OUTCOME_TO_MODEL:
            raise InvalidArgumentError("outcome", f"unknown outcome {request.outcome}")
        lease = await self.core.find_lease(request.lease_id)
        authorize_lease(self.core.ledger, lease)
        if lease.state is LeaseState.ACTIVE:
            lease = await self.core.end_lease(
                lease,
                LeaseState.RELEASED,
                peak_bytes=request.peak_memory_bytes,
                outcome=_OUTCOME_TO_MODEL[request.outcome],
                kind="release",
                by=_caller_name(),
            )
        return broker_pb2.ReleaseResponse(lease=self.core.lease_pb(lease))

    @_rpc
    async def Renew(
        self,
        request: broker_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[broker_pb2.RenewRequest, broker_pb2.RenewResponse],
    ) -> broker_pb2.RenewResponse:
        ttl_ms = _non_negative("ttl_ms", request.ttl_ms) or DEFAULT_TTL_MS
        if ttl_ms > MAX_TTL_MS:
            raise InvalidArgumentError("ttl_ms", f"must be <= {MAX_TTL_MS} (got {ttl_ms})")
        lease = await self.core.find_lease(request.lease_id)
        authorize_lease(self.core.ledger, lease)
        if lease.state is not LeaseState.ACTIVE:
            raise FailedPreconditionError(
                f"lease {lease.lease_id}: cannot renew, it is {lease.state.value}"
            )
        renewed = replace(lease, expires_at_ms=now_ms() + ttl_ms)
        await self.core.commit([PutLease(renewed)])
        self.core.tell_renewed(renewed)
        return broker_pb2.RenewResponse(lease=self.core.lease_pb(renewed))

    @_rpc
    async def GetLease(
        self,
        request: broker_pb2.GetLeaseRequest,
        context: grpc.aio.ServicerContext[broker_pb2.GetLeaseRequest, types_pb2.Lease],
    ) -> types_pb2.Lease:
        ledger = self.core.ledger
        node_id = _name("node_id", request.node_id, allow_empty=True, remember=False)
        lease = await self.core.find_lease(request.lease_id)
        authorize_lease(ledger, lease, read=True)
        if node_id and node_id == lease.node_id and lease.state is LeaseState.ACTIVE:
            self.core.running[lease.lease_id] = NodeId(node_id)
        pb = self.core.lease_pb(lease)
        pb.tenant_ancestors.extend(ledger.chain_names(lease.tenant)[1:])
        pb.as_of_unix_ms = now_ms()
        return pb

    @_rpc
    async def ListLeases(
        self,
        request: broker_pb2.ListLeasesRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ListLeasesRequest, broker_pb2.ListLeasesResponse
        ],
    ) -> broker_pb2.ListLeasesResponse:
        tenant = _name("tenant", request.tenant, allow_empty=True)
        node_id = _name("node_id", request.node_id, allow_empty=True)
        limit = _non_negative("limit", request.limit) or 1000
        ledger = self.core.ledger
        caller = current_principal()
        scope: set[str] | None = None  # every tenant's
        if tenant:
            authorize_tenant(ledger, tenant)
        elif caller is not OPEN and ANY not in caller.tenants:  # the tenants in its scope
            scope = {name for name in ledger.tenants if caller.covers(ledger.chain_names(name))}
        store = self.core.store
        leases = await self.core.journal.run_in_db(
            lambda: store.list_leases(
                tenant=tenant,
                node_id=node_id,
                include_inactive=request.include_inactive,
                limit=limit,
                tenants=scope,
            )
        )
        return broker_pb2.ListLeasesResponse(leases=[self.core.lease_pb(x) for x in leases])

    async def Ping(
        self,
        request: broker_pb2.PingRequest,
        context: grpc.aio.ServicerContext[broker_pb2.PingRequest, broker_pb2.PingResponse],
    ) -> broker_pb2.PingResponse:
        return broker_pb2.PingResponse()

    async def WhoAmI(
        self,
        request: broker_pb2.WhoAmIRequest,
        context: grpc.aio.ServicerContext[broker_pb2.WhoAmIRequest, broker_pb2.WhoAmIResponse],
    ) -> broker_pb2.WhoAmIResponse:
        p = current_principal()
        return broker_pb2.WhoAmIResponse(
            name=p.name,
            role=p.role.value,
            tenants=sorted(p.tenants),
            nodes=sorted(p.nodes),
            checked=p is not OPEN,
            methods=sorted(ROLE_METHODS[p.role]) if p is not OPEN else [],
        )


class TenantAdminServicer(broker_pb2_grpc.TenantAdminServicer):
    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    def _tenant_pb(self, t: Tenant) -> broker_pb2.Tenant:
        ledger = self.core.ledger
        return broker_pb2.Tenant(
            name=t.name,
            parent=t.parent or "",
            quota=types_pb2.Resources(
                memory_bytes=t.memory_quota_bytes, cpu_millis=t.cpu_quota_millis
            ),
            granted=types_pb2.Resources(
                memory_bytes=ledger.granted_bytes(t.name),
                cpu_millis=ledger.granted_cpu_millis(t.name),
            ),
            active_leases=ledger.active_calls(t.name),
            max_calls=t.max_calls,
            weight=t.weight,
        )

    def _authorize_manage(self, parent: TenantName | None, field: str) -> None:
        """The caller may set or delete tenants under ``parent`` (None: top-level tenants)."""
        p = current_principal()
        if p is OPEN:
            return
        parents = self.core.ledger.chain_names(parent) if parent else []
        if not p.manages(parents):
            where = f"tenants under {parent!r}" if parent else "top-level tenants"
            raise p.outside_scope(f"{field}: managing {where}")

    def _get(self, name: str, field: str = "name") -> Tenant:
        t = self.core.ledger.tenants.get(TenantName(_name(field, name)))
        if t is None:
            raise NotFoundError("tenant", name, field=field)
        return t

    @_rpc
    async def SetTenant(
        self,
        request: broker_pb2.SetTenantRequest,
        context: grpc.aio.ServicerContext[broker_pb2.SetTenantRequest, broker_pb2.Tenant],
    ) -> broker_pb2.Tenant:
        name = TenantName(_name("name", request.name))
        parent_s = _name("parent", request.parent, allow_empty=True)
        memory = _positive("quota.memory_bytes", request.quota.memory_bytes)
        cpu = _non_negative("quota.cpu_millis", request.quota.cpu_millis)
        max_calls = _non_negative("max_calls", request.max_calls)
        weight = _non_negative("weight", request.weight) or 1
        if weight > 1000:
            raise InvalidArgumentError("weight", f"must be <= 1000 (got {weight})")
        ledger = self.core.ledger
        parent = TenantName(parent_s) if parent_s else None
        self._authorize_manage(parent, "parent")
        old = ledger.tenants.get(name)
        if old is not None and old.parent != parent:  # moved: from its old place as well
            self._authorize_manage(old.parent, "name")
        if parent is not None:
            self._get(parent, "parent")
            if name in [t.name for t in ledger.chain(parent)]:
                raise InvalidArgumentError("parent", f"{parent} is {name} or below it: a cycle")
        if old is not None and old.parent != parent and ledger.active_calls(name):
            raise FailedPreconditionError(
                f"tenant {name}: cannot move to another parent with {ledger.active_calls(name)} "
                "active leases"
            )
        tenant = Tenant(
            name=name,
            parent=parent,
            memory_quota_bytes=memory,
            cpu_quota_millis=cpu,
            max_calls=max_calls,
            weight=weight,
        )
        await self.core.commit(
            [
                PutTenant(tenant),
                _audit(
                    "tenant_set",
                    tenant=name,
                    parent=parent or "",
                    memory_quota_bytes=memory,
                    cpu_quota_millis=cpu,
                    max_calls=max_calls,
                    weight=weight,
                ),
            ]
        )
        self.core.kick()
        log.info(
            "tenant %s set: memory %d cpu %d calls %d weight %d parent %s",
            name,
            memory,
            cpu,
            max_calls,
            weight,
            parent,
        )
        return self._tenant_pb(tenant)

    @_rpc
    async def GetTenant(
        self,
        request: broker_pb2.GetTenantRequest,
        context: grpc.aio.ServicerContext[broker_pb2.GetTenantRequest, broker_pb2.Tenant],
    ) -> broker_pb2.Tenant:
        authorize_tenant(self.core.ledger, _name("name", request.name), "name")
        return self._tenant_pb(self._get(request.name))

    @_rpc
    async def ListTenants(
        self,
        request: broker_pb2.ListTenantsRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ListTenantsRequest, broker_pb2.ListTenantsResponse
        ],
    ) -> broker_pb2.ListTenantsResponse:
        ledger = self.core.ledger
        caller = current_principal()
        tenants = sorted(
            (
                t
                for t in ledger.tenants.values()
                if caller is OPEN or caller.covers(ledger.chain_names(t.name))
            ),
            key=lambda t: t.name,
        )
        return broker_pb2.ListTenantsResponse(tenants=[self._tenant_pb(t) for t in tenants])

    @_rpc
    async def DeleteTenant(
        self,
        request: broker_pb2.DeleteTenantRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.DeleteTenantRequest, broker_pb2.DeleteTenantResponse
        ],
    ) -> broker_pb2.DeleteTenantResponse:
        authorize_tenant(self.core.ledger, _name("name", request.name), "name")
        t = self._get(request.name)
        self._authorize_manage(t.parent, "name")
        ledger = self.core.ledger
        if ledger.children(t.name):
            raise FailedPreconditionError(f"tenant {t.name}: has child tenants; delete them first")
        if ledger.active_calls(t.name):
            raise FailedPreconditionError(
                f"tenant {t.name}: has {ledger.active_calls(t.name)} active leases"
            )
        await self.core.commit([DeleteTenant(t.name), _audit("tenant_delete", tenant=t.name)])
        return broker_pb2.DeleteTenantResponse()


class NodeAdminServicer(broker_pb2_grpc.NodeAdminServicer):
    """Operating the nodes: list them, cordon (no new leases), drain (a cordon with a deadline
    for what still runs there), uncordon."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    def _status_pb(self, node: Node) -> broker_pb2.NodeStatus:
        core = self.core
        view = core.ledger.node_view(node.node_id)
        report = core.node_reports.get(node.node_id)
        return broker_pb2.NodeStatus(
            node_id=node.node_id,
            address=node.address,
            capacity=types_pb2.Resources(
                memory_bytes=node.memory_capacity_bytes, cpu_millis=node.cpu_capacity_millis
            ),
            granted_memory_bytes=view.granted_memory_bytes,
            active_leases=core.ledger.node_calls(node.node_id),
            declared_intent_bytes=view.intent_memory_bytes,
            overcommit_ceiling_bytes=view.overcommit_ceiling_bytes,
            connected=view.connected,
            pressured=view.pressured,
            cordoned=node.cordoned,
            cordon_reason=node.cordon_reason,
            cordoned_at_ms=node.cordoned_at_ms,
            drain_deadline_ms=node.drain_deadline_ms,
            registered_at_ms=node.registered_at_ms,
            last_heartbeat_ms=report.at_ms if report else 0,
            used_memory_bytes=report.used_memory_bytes if report else 0,
            running_calls=report.running_calls if report else 0,
        )

    def _get(self, node_id: str) -> Node:
        node = self.core.ledger.nodes.get(NodeId(_name("node_id", node_id)))
        if node is None:
            raise NotFoundError("node", node_id, field="node_id")
        return node

    @staticmethod
    def _authorize_cordon() -> None:
        """Cordoning moves every tenant's work: only an admin of every tenant ("*") may."""
        caller = current_principal()
        if ANY not in caller.tenants:
            raise caller.outside_scope('cordoning a node (it runs every tenant\'s calls: "*")')

    @_rpc
    async def ListNodes(
        self,
        request: broker_pb2.ListNodesRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ListNodesRequest, broker_pb2.ListNodesResponse
        ],
    ) -> broker_pb2.ListNodesResponse:
        ledger = self.core.ledger
        return broker_pb2.ListNodesResponse(
            nodes=[self._status_pb(ledger.nodes[nid]) for nid in sorted(ledger.nodes)]
        )

    @_rpc
    async def GetNode(
        self,
        request: broker_pb2.GetNodeRequest,
        context: grpc.aio.ServicerContext[broker_pb2.GetNodeRequest, broker_pb2.NodeStatus],
    ) -> broker_pb2.NodeStatus:
        return self._status_pb(self._get(request.node_id))

    @_rpc
    async def CordonNode(
        self,
        request: broker_pb2.CordonNodeRequest,
        context: grpc.aio.ServicerContext[broker_pb2.CordonNodeRequest, broker_pb2.NodeStatus],
    ) -> broker_pb2.NodeStatus:
        node_id = _name("node_id", request.node_id)
        reason = request.reason
        if len(reason) > MAX_CORDON_REASON or not reason.isprintable():
            raise InvalidArgumentError(
                "reason",
                f"at most {MAX_CORDON_REASON} printable characters (got {len(reason)})",
            )
        grace_ms = _non_negative("drain_grace_ms", request.drain_grace_ms)
        if grace_ms > MAX_TTL_MS:
            raise InvalidArgumentError("drain_grace_ms", f"must be <= {MAX_TTL_MS} (24 h)")
        self._authorize_cordon()
        node = self._get(node_id)
        t = now_ms()
        cordoned = replace(
            node,
            cordoned_at_ms=node.cordoned_at_ms or t,
            cordon_reason=reason or node.cordon_reason,
            # A new grace sets the deadline anew (sooner or later); none keeps a drain's.
            drain_deadline_ms=t + grace_ms if grace_ms else node.drain_deadline_ms,
        )
        await self.core.commit(
            [
                PutNode(cordoned),
                _audit(
                    "node_cordon",
                    node_id=node.node_id,
                    reason=cordoned.cordon_reason,
                    drain_deadline_ms=cordoned.drain_deadline_ms,
                ),
            ]
        )
        log.info(
            "node %s cordoned (%s): no new leases; %d active%s",
            node.node_id,
            cordoned.cordon_reason or "no reason given",
            self.core.ledger.node_calls(node.node_id),
            f", revoked in {grace_ms} ms if still running" if grace_ms else "",
        )
        return self._status_pb(cordoned)

    @_rpc
    async def UncordonNode(
        self,
        request: broker_pb2.UncordonNodeRequest,
        context: grpc.aio.ServicerContext[broker_pb2.UncordonNodeRequest, broker_pb2.NodeStatus],
    ) -> broker_pb2.NodeStatus:
        node_id = _name("node_id", request.node_id)
        self._authorize_cordon()
        node = self._get(node_id)
        if not node.cordoned:
            return self._status_pb(node)
        back = replace(node, cordoned_at_ms=0, cordon_reason="", drain_deadline_ms=0)
        await self.core.commit([PutNode(back), _audit("node_uncordon", node_id=node.node_id)])
        self.core.kick()  # queued asks may fit there
        log.info("node %s uncordoned: taking new leases again", node.node_id)
        return self._status_pb(back)


def _audit_pb(entry_id: int, e: AuditEntry) -> broker_pb2.AuditEntry:
    by = ""
    if '"by"' in e.detail:
        with contextlib.suppress(ValueError):
            detail = json.loads(e.detail)
            by = str(detail.get("by", "")) if isinstance(detail, dict) else ""
    return broker_pb2.AuditEntry(
        id=entry_id,
        at_ms=e.at_ms,
        kind=e.kind,
        tenant=e.tenant,
        lease_id=e.lease_id,
        node_id=e.node_id,
        detail_json=e.detail,
        by=by,
    )


class AuditLogServicer(broker_pb2_grpc.AuditLogServicer):
    """The audit trail, read from the database (on its read thread), newest first."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    @_rpc
    async def ListAudit(
        self,
        request: broker_pb2.ListAuditRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ListAuditRequest, broker_pb2.ListAuditResponse
        ],
    ) -> broker_pb2.ListAuditResponse:
        tenant = _name("tenant", request.tenant, allow_empty=True, remember=False)
        node_id = _name("node_id", request.node_id, allow_empty=True, remember=False)
        lease_id = _name("lease_id", request.lease_id, allow_empty=True, remember=False)
        kind = _name("kind", request.kind, allow_empty=True, remember=False)
        since_ms = _non_negative("since_ms", request.since_ms)
        before_id = _non_negative("before_id", request.before_id)
        limit = _non_negative("limit", request.limit) or AUDIT_PAGE
        if limit > MAX_AUDIT_PAGE:
            raise InvalidArgumentError("limit", f"must be <= {MAX_AUDIT_PAGE} (got {limit})")
        # None: any tenant, and entries of none (a node's, an admin of every tenant's only).
        tenants = tenants_in_view(self.core.ledger, tenant)
        store = self.core.store
        page = await self.core.journal.run_in_db(
            lambda: store.list_audit(
                tenants=None if tenants is None else sorted(tenants),
                node_id=node_id,
                lease_id=lease_id,
                kind=kind,
                since_ms=since_ms,
                before_id=before_id,
                limit=limit,
            )
        )
        return broker_pb2.ListAuditResponse(
            entries=[_audit_pb(i, e) for i, e in page.entries],
            next_before_id=page.next_before_id,
        )


def _profile_pb(
    tenant: str,
    command_class: str,
    peaks: Sequence[int],
    intent_bytes: int = 0,
    *,
    session_percentile: int = 0,
) -> broker_pb2.SizingProfile:
    """A learned profile; with ``session_percentile``, of a session class (its budget the
    maximum a new session declaring ``intent_bytes`` is declared at)."""
    p = profile(peaks, intent_bytes)
    if session_percentile:
        declared = size_session_max(intent_bytes, peaks, session_percentile) if intent_bytes else 0
        p = replace(p, budget_bytes=declared)
    return broker_pb2.SizingProfile(
        tenant=tenant,
        command_class=command_class,
        samples=p.samples,
        learned=p.learned,
        p50_bytes=p.p50_bytes,
        p95_bytes=p.p95_bytes,
        max_bytes=p.max_bytes,
        last_peak_bytes=p.last_peak_bytes,
        budget_bytes=p.budget_bytes,
    )


class SizingServicer(broker_pb2_grpc.SizingServicer):
    """What sizing learned per (tenant, command class), read from the ledger; forgetting it."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    @_rpc
    async def ListProfiles(
        self,
        request: broker_pb2.ListProfilesRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ListProfilesRequest, broker_pb2.ListProfilesResponse
        ],
    ) -> broker_pb2.ListProfilesResponse:
        tenant = _name("tenant", request.tenant, allow_empty=True, remember=False)
        command_class = _name(
            "command_class", request.command_class, allow_empty=True, remember=False
        )
        intent = _non_negative("intent_memory_bytes", request.intent_memory_bytes)
        ledger = self.core.ledger
        tenants = tenants_in_view(ledger, tenant)
        keys = sorted(
            key
            for key in ledger.peaks
            if (tenants is None or key[0] in tenants)
            and (not command_class or key[1] == command_class)
        )
        orgs = None if tenants is None else {ledger.org(TenantName(t)) for t in tenants}
        session_keys = sorted(k for k in ledger.session_peaks if orgs is None or k[0] in orgs)
        return broker_pb2.ListProfilesResponse(
            profiles=[_profile_pb(t, c, ledger.recent_peaks(t, c), intent) for t, c in keys],
            sessions=[
                _profile_pb(
                    o,
                    c,
                    tuple(ledger.session_peaks[o, c]),
                    intent,
                    session_percentile=self.core.session_percentile,
                )
                for o, c in session_keys
            ],
            min_samples=MIN_SAMPLES,
            window=WINDOW,
            floor_bytes=FLOOR_BYTES,
        )

    @_rpc
    async def ForgetProfile(
        self,
        request: broker_pb2.ForgetProfileRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ForgetProfileRequest, broker_pb2.ForgetProfileResponse
        ],
    ) -> broker_pb2.ForgetProfileResponse:
        tenant = TenantName(_name("tenant", request.tenant, remember=False))
        command_class = _name(
            "command_class", request.command_class, allow_empty=True, remember=False
        )
        ledger = self.core.ledger
        authorize_tenant(ledger, tenant)
        learned = sorted(c for t, c in ledger.peaks if t == tenant)
        if tenant not in ledger.tenants and not learned:
            raise NotFoundError("tenant", tenant)
        classes = [command_class] if command_class else learned
        forgotten = [_profile_pb(tenant, c, ledger.recent_peaks(tenant, c)) for c in classes]
        return await self._forget(tenant, forgotten, sessions=False)

    @_rpc
    async def ForgetSessionProfile(
        self,
        request: broker_pb2.ForgetSessionProfileRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.ForgetSessionProfileRequest, broker_pb2.ForgetProfileResponse
        ],
    ) -> broker_pb2.ForgetProfileResponse:
        org = TenantName(_name("organization", request.organization, remember=False))
        session_class = _name(
            "session_class", request.session_class, allow_empty=True, remember=False
        )
        ledger = self.core.ledger
        authorize_tenant(ledger, org)
        if ledger.org(org) != org:
            raise InvalidArgumentError(
                "organization",
                f"tenant {org} is not an organization: session classes are learned per "
                f"organization, and its organization is {ledger.org(org)}",
            )
        learned = sorted(c for o, c in ledger.session_peaks if o == org)
        if org not in ledger.tenants and not learned:
            raise NotFoundError("tenant", org)
        classes = [session_class] if session_class else learned
        forgotten = [
            _profile_pb(
                org,
                c,
                ledger.recent_session_peaks(org, c),
                session_percentile=self.core.session_percentile,
            )
            for c in classes
        ]
        return await self._forget(org, forgotten, sessions=True)

    async def _forget(
        self, owner: TenantName, forgotten: list[broker_pb2.SizingProfile], *, sessions: bool
    ) -> broker_pb2.ForgetProfileResponse:
        """Forget ``forgotten`` (the command classes of tenant ``owner``, or with ``sessions``
        the session classes of organization ``owner``): durable, audited, logged."""
        t = now_ms()
        kind, key = ("session_class", "session") if sessions else ("command_class", "command")
        changes: list[Change] = []
        for pb in forgotten:
            changes.append(ForgetPeaks(owner, pb.command_class, t, sessions=sessions))
            detail = {kind: pb.command_class, "samples": pb.samples, "p95_bytes": pb.p95_bytes}
            changes.append(_audit("sizing_forget", None, tenant=owner, **detail))
        if changes:
            await self.core.commit(changes)
        for pb in forgotten:
            log.info(
                "sizing: %s %s %s class %s forgotten (%d peaks, p95 %d): sized from what is "
                "declared until %d more",
                "organization" if sessions else "tenant",
                owner,
                key,
                pb.command_class,
                pb.samples,
                pb.p95_bytes,
                MIN_SAMPLES,
            )
        return broker_pb2.ForgetProfileResponse(forgotten=forgotten)


def _authorize_node(node_id: str) -> None:
    caller = current_principal()
    if not caller.acts_for_node(node_id):
        nodes = ", ".join(sorted(caller.nodes)) or "none"
        raise PermissionDeniedError(
            f"{caller.name}: may not act as node {node_id!r} (its nodes: {nodes})"
        )


class NodeGatewayServicer(broker_pb2_grpc.NodeGatewayServicer):
    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    @_rpc
    async def RegisterNode(
        self,
        request: broker_pb2.RegisterNodeRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.RegisterNodeRequest, broker_pb2.RegisterNodeResponse
        ],
    ) -> broker_pb2.RegisterNodeResponse:
        node_id = NodeId(_name("node_id", request.node_id))
        _authorize_node(node_id)
        address = _address("address", request.address)
        memory = _positive("capacity.memory_bytes", request.capacity.memory_bytes)
        cpu = _non_negative("capacity.cpu_millis", request.capacity.cpu_millis)
        for field, value in (("capacity.memory_bytes", memory), ("capacity.cpu_millis", cpu)):
            if value > MAX_NODE_CAPACITY:
                raise InvalidArgumentError(field, f"must be <= {MAX_NODE_CAPACITY} (got {value})")
        node = Node(
            node_id=node_id,
            address=address,
            memory_capacity_bytes=memory,
            cpu_capacity_millis=cpu,
            registered_at_ms=now_ms(),
        )
        old = self.core.ledger.nodes.get(node_id)
        if old is not None and old.cordoned:  # an operator's cordon outlives a node restart
            node = replace(
                node,
                cordoned_at_ms=old.cordoned_at_ms,
                cordon_reason=old.cordon_reason,
                drain_deadline_ms=old.drain_deadline_ms,
            )
        await self.core.commit(
            [PutNode(node), _audit("node_register", node_id=node_id, memory_bytes=memory)]
        )
        log.info(
            "node %s registered at %s with %d bytes%s",
            node_id,
            request.address,
            memory,
            " (cordoned: no new leases)" if node.cordoned else "",
        )
        return broker_pb2.RegisterNodeResponse(
            node_id=node_id, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS
        )

    async def Connect(
        self,
        request_iterator: AsyncIterator[broker_pb2.NodeMessage],
        context: grpc.aio.ServicerContext[broker_pb2.NodeMessage, broker_pb2.BrokerMessage],
    ) -> AsyncIterator[broker_pb2.BrokerMessage]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "hello: first message must be hello"
            )
            return
        node_id = NodeId(first.hello.node_id)
        caller = current_principal()
        if not caller.acts_for_node(node_id):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.name}: may not connect as node {node_id!r}",
            )
            return
        ledger = self.core.ledger
        if node_id not in ledger.nodes:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {node_id!r} is not registered; call RegisterNode first",
            )
            return
        queue: asyncio.Queue[broker_pb2.BrokerMessage | None] = asyncio.Queue()
        self.core.node_queues[node_id] = queue
        ledger.set_connected(node_id, True)
        self.core.kick()
        log.info("node %s connected", node_id)
        if held := self.core.send_held(node_id):
            log.info(
                "node %s: sent %d lease changes made while its stream was closed", node_id, held
            )
        reader = asyncio.create_task(self._read(node_id, request_iterator, queue))
        # The node's side ended (or its reader failed): None ends the stream after what is
        # queued. One task per stream, not one per message sent plus an asyncio.wait: a
        # connected node holds ~77 objects the cycle collector walks, most of them gRPC's.
        reader.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            reader.cancel()
            if self.core.node_queues.get(node_id) is queue:
                del self.core.node_queues[node_id]
                ledger.set_connected(node_id, False)
                log.info("node %s disconnected", node_id)

    async def _read(
        self,
        node_id: NodeId,
        messages: AsyncIterator[broker_pb2.NodeMessage],
        queue: asyncio.Queue[broker_pb2.BrokerMessage | None],
    ) -> None:
        metrics = self.core.metrics
        async for msg in messages:
            try:
                kind = msg.WhichOneof("body")
                if kind == "pressure":
                    metrics.pressure_event(_PRESSURE_KIND_LABEL.get(msg.pressure.kind, ""))
                    reply = await self.on_pressure(node_id, msg.pressure)
                    if reply is not None:
                        queue.put_nowait(broker_pb2.BrokerMessage(decision=reply))
                        metrics.decision_sent(_DECISION_KIND_LABEL[reply.kind])
                elif kind == "finished":
                    await self.on_finished(msg.finished)
                elif kind == "heartbeat":
                    hb = msg.heartbeat
                    self.core.node_reports[node_id] = NodeReport(
                        now_ms(), hb.used.memory_bytes, hb.running_calls
                    )
                elif kind == "action":
                    a = msg.action
                    log.info(
                        "node %s action %s lease %s kind %s budget %d reaction %.3f ms%s",
                        node_id,
                        a.action_id,
                        a.lease_id,
                        broker_pb2.ActionKind.Name(a.kind),
                        a.budget_bytes,
                        a.reaction_ns / 1e6,
                        " (dry run)" if a.dry_run else "",
                    )
            except AgentcgError as exc:
                log.warning("node %s: message refused: %s", node_id, exc.message)
            except Exception:
                log.exception("node %s: failed to handle a message", node_id)

    async def on_pressure(
        self, node_id: NodeId, ev: broker_pb2.PressureEvent
    ) -> broker_pb2.Decision | None:
        if ev.kind == broker_pb2.PRESSURE_KIND_NODE:
            # No admission to a pressured node until it recovers: it counts as recovered once
            # it has reported no node pressure for PRESSURE_HOLD_MS (each event extends it).
            ledger = self.core.ledger
            if node_id not in ledger.pressured:
                log.info("node %s under pressure: no admission to it until it recovers", node_id)
            ledger.set_pressured(node_id, True)
            self.core.pressured_until[node_id] = now_ms() + PRESSURE_HOLD_MS
            return None
        if ev.kind != broker_pb2.PRESSURE_KIND_LIMIT_REACHED:
            log.debug("node %s pressure %s lease %s", node_id, ev.kind, ev.lease_id)
            return None
        ledger = self.core.ledger
        # The node's pause is the parent: the call's trace goes on through the broker and back.
        parent = parent_context(ev.traceparent)
        with tracer.start_as_current_span("agentcg.growth", context=parent) as span:
            span.set_attribute("agentcg.lease_id", ev.lease_id)
            span.set_attribute("agentcg.action_id", ev.action_id)
            lease = ledger.leases.get(LeaseId(ev.lease_id))
            decision_id = uuid.uuid4().hex[:16]
            if lease is None or lease.node_id != node_id:
                if await self._held_elsewhere(node_id, ev.lease_id):
                    return None
                span.set_attribute("agentcg.decision", "kill")
                return broker_pb2.Decision(
                    decision_id=decision_id,
                    lease_id=ev.lease_id,
                    event_id=ev.event_id,
                    kind=broker_pb2.DECISION_KIND_KILL,
                    reason=f"lease {ev.lease_id}: not active on node {node_id}",
                    traceparent=traceparent(),
                )
            ask = _GrowthAsk(
                next(self.core.growth_seq),
                node_id,
                lease.lease_id,
                ev.requested_memory_bytes,
                ev.peak_bytes,
                ev.event_id,
                ev.action_id,
                now_ms(),
                parent,
            )
            result = self.core.decide_growth(ask, lease)
            span.set_attribute("agentcg.tenant", lease.tenant)
            if (
                isinstance(result, Refuse)
                and self.core.growth_wait_ms > 0
                and self.core.room_may_free(result)
            ):
                # Time-shifting: the call stays paused while the broker waits for room.
                left_ms = self.core.hold_growth(ask, result)
                span.set_attribute("agentcg.decision", "wait")
                span.set_attribute("agentcg.reason", result.code)
                log.info(
                    "hold growth of lease %s tenant %s for up to %d ms: %s (action %s)",
                    lease.lease_id,
                    lease.tenant,
                    left_ms,
                    result.message,
                    ev.action_id,
                )
                return broker_pb2.Decision(
                    decision_id=decision_id,
                    lease_id=lease.lease_id,
                    event_id=ev.event_id,
                    kind=broker_pb2.DECISION_KIND_WAIT,
                    epoch=lease.epoch,
                    reason=result.message,
                    wait_ms=left_ms,
                    traceparent=traceparent(),
                )
            self.core.forget_growth(lease.lease_id)  # decided now: no longer held, if it was
            changes, decision = self.core.growth_outcome(ask, lease, result, decision_id)
            await self.core.commit(changes)
            return decision

    async def _held_elsewhere(self, node_id: NodeId, lease_id: str) -> bool:
        """Whether a lease this broker does not hold active on ``node_id`` is so in the
        database, or the database cannot tell: then this broker's state is behind (it lost the
        leadership and has not noticed yet; a new leader granted the lease) and it must not
        tell the node to kill the call. It decides nothing; the node waits for its broker's
        answer up to its own deadline. Only a lease the database does not hold active there
        is killed."""
        try:
            stored = await self.core.find_lease(lease_id)
        except (NotFoundError, InvalidArgumentError):
            return False
        except Exception as exc:  # noqa: BLE001 - the database did not answer: do not kill
            log.warning(
                "lease %s: not in this broker's state, database unreadable (%s)", lease_id, exc
            )
            return True
        if stored.state is LeaseState.ACTIVE and stored.node_id == node_id:
            log.warning(
                "lease %s is active on node %s in the database but not in this broker's state: "
                "it no longer leads; no decision",
                lease_id,
                node_id,
            )
            return True
        return False

    async def on_finished(self, fin: broker_pb2.CallFinished) -> None:
        self.core.running.pop(LeaseId(fin.lease_id), None)  # the node knows its call ended
        lease = self.core.ledger.leases.get(LeaseId(fin.lease_id))
        if lease is None:
            return  # already released by the client
        await self.core.end_lease(
            lease,
            LeaseState.RELEASED,
            peak_bytes=fin.peak_memory_bytes,
            outcome=_OUTCOME_TO_MODEL.get(fin.outcome, Outcome.UNKNOWN),
            kind="release",
        )
