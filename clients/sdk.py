"""The agentcg client SDK: admission, tenants and running tool calls under a lease.

Depends only on the generated stubs and grpcio. Async-first (``AsyncClient``); ``Client`` is a
thin synchronous wrapper that drives the async client on a private event loop thread.
Server errors arrive as ``agentcg.errors`` exceptions (``QuotaExceededError`` for a denial,
carrying what would fit now).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from agentcg.channels import (
    ClientSecurity,
    broker_channel_options,
    broker_interceptors,
    node_channel_options,
)
from agentcg.errors import AgentcgError, QuotaExceededError, UnavailableError
from agentcg.rpcstatus import error_from_rpc
from agentcg.tracecontext import aio_client_interceptors
from agentcg.v1 import broker_pb2, broker_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

__all__ = [
    "OUTCOMES",
    "Action",
    "AsyncClient",
    "AuditPage",
    "AuditRecord",
    "CallStatus",
    "Client",
    "ClientSecurity",
    "Identity",
    "Lease",
    "NodeCalls",
    "NodeInfo",
    "RunResult",
    "SizingProfile",
    "TenantInfo",
    "broker_channel_options",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_AUDIT_PAGE = 1000  # the broker's largest ListAudit page

OUTCOMES = {
    types_pb2.OUTCOME_UNSPECIFIED: "",
    types_pb2.OUTCOME_COMPLETED: "completed",
    types_pb2.OUTCOME_GROWN: "grown",
    types_pb2.OUTCOME_KILLED: "killed",
    types_pb2.OUTCOME_DENIED: "denied",
    types_pb2.OUTCOME_FAILED: "failed",
}
_OUTCOME_PB = {v: k for k, v in OUTCOMES.items()}


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    tenant: str
    session: str
    command_class: str
    node_id: str
    node_address: str
    memory_bytes: int
    epoch: int
    state: str
    expires_at_unix_ms: int
    peak_memory_bytes: int
    outcome: str
    granted_at_unix_ms: int = 0  # on the broker's clock, as the expiry

    @classmethod
    def from_pb(cls, pb: types_pb2.Lease) -> Lease:
        return cls(
            lease_id=pb.lease_id,
            tenant=pb.tenant,
            session=pb.session,
            command_class=pb.command_class,
            node_id=pb.node_id,
            node_address=pb.node_address,
            memory_bytes=pb.budget.memory_bytes,
            epoch=pb.epoch,
            state=types_pb2.LeaseState.Name(pb.state).removeprefix("LEASE_STATE_").lower(),
            expires_at_unix_ms=pb.expires_at_unix_ms,
            peak_memory_bytes=pb.peak_memory_bytes,
            outcome=OUTCOMES.get(pb.outcome, ""),
            granted_at_unix_ms=pb.granted_at_unix_ms,
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a broker takes a caller for (``whoami``)."""

    name: str
    role: str  # client | admin | node
    tenants: tuple[str, ...]  # the roots of its scope; "*": every tenant
    nodes: tuple[str, ...]
    checked: bool  # False: the broker has no access file (everyone may do everything)
    methods: tuple[str, ...]  # the RPCs its role may call (empty when not checked)


@dataclass(frozen=True, slots=True)
class Action:
    """An enforcement action the node took on a call."""

    action_id: str
    action: str  # pause | grow | kill | throttle | ...
    budget_bytes: int
    usage_bytes: int
    reason: str
    reaction_ms: float

    @classmethod
    def from_pb(cls, pb: node_pb2.Enforcement) -> Action:
        return cls(
            action_id=pb.action_id,
            action=pb.action,
            budget_bytes=pb.budget_bytes,
            usage_bytes=pb.usage_bytes,
            reason=pb.reason,
            reaction_ms=pb.reaction_ns / 1e6,
        )


@dataclass(frozen=True, slots=True)
class CallStatus:
    """A tool call running on a node, as the node sees it now."""

    lease_id: str
    tenant: str
    session: str
    command_class: str
    budget_bytes: int
    usage_bytes: int
    peak_bytes: int
    state: str  # running | throttled | paused | held (for its output) | killed
    grown: int
    running_ms: int
    adopted: bool
    recent_actions: tuple[Action, ...]
    output_bytes: int = 0  # disk its output nobody has had yet takes on the node

    @classmethod
    def from_pb(cls, pb: node_pb2.CallStatus) -> CallStatus:
        return cls(
            lease_id=pb.lease_id,
            tenant=pb.tenant,
            session=pb.session,
            command_class=pb.command_class,
            budget_bytes=pb.budget_bytes,
            usage_bytes=pb.usage_bytes,
            peak_bytes=pb.peak_bytes,
            state=pb.state,
            grown=pb.grown,
            running_ms=pb.running_ms,
            adopted=pb.adopted,
            recent_actions=tuple(Action.from_pb(a) for a in pb.recent_actions),
            output_bytes=pb.output_bytes,
        )


@dataclass(frozen=True, slots=True)
class NodeCalls:
    """One node's running calls (`AsyncClient.node_calls`)."""

    node_id: str
    address: str
    capacity_bytes: int
    calls: tuple[CallStatus, ...]


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    parent: str
    memory_quota_bytes: int
    granted_memory_bytes: int
    active_leases: int
    cpu_quota_millis: int = 0  # 0: unlimited
    granted_cpu_millis: int = 0
    max_calls: int = 0  # 0: unlimited
    weight: int = 1

    @classmethod
    def from_pb(cls, pb: broker_pb2.Tenant) -> TenantInfo:
        return cls(
            pb.name,
            pb.parent,
            pb.quota.memory_bytes,
            pb.granted.memory_bytes,
            pb.active_leases,
            cpu_quota_millis=pb.quota.cpu_millis,
            granted_cpu_millis=pb.granted.cpu_millis,
            max_calls=pb.max_calls,
            weight=pb.weight or 1,
        )


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the broker's audit trail (``list_audit``)."""

    id: int
    at_ms: int
    kind: str
    tenant: str
    lease_id: str
    node_id: str
    detail: dict[str, Any]
    by: str  # the principal whose call made it; "": the broker's own decision, or no access file

    @classmethod
    def from_pb(cls, pb: broker_pb2.AuditEntry) -> AuditRecord:
        try:
            detail = json.loads(pb.detail_json) if pb.detail_json else {}
        except ValueError:
            detail = {"text": pb.detail_json}
        return cls(
            pb.id,
            pb.at_ms,
            pb.kind,
            pb.tenant,
            pb.lease_id,
            pb.node_id,
            detail if isinstance(detail, dict) else {"value": detail},
            pb.by,
        )


@dataclass(frozen=True, slots=True)
class AuditPage:
    records: tuple[AuditRecord, ...]  # newest first
    next_before_id: int  # pass as before_id for the next (older) page; 0: no more


@dataclass(frozen=True, slots=True)
class SizingProfile:
    """What the broker learned of one (tenant, command class) from committed peaks
    (``list_sizing``): with ``learned``, its Reserves are granted ``p95_bytes``, never above
    their intent; ``budget_bytes`` is what the intent asked about gets now."""

    tenant: str
    command_class: str
    samples: int
    learned: bool
    p50_bytes: int
    p95_bytes: int
    max_bytes: int
    last_peak_bytes: int
    budget_bytes: int

    @classmethod
    def from_pb(cls, pb: broker_pb2.SizingProfile) -> SizingProfile:
        return cls(
            pb.tenant,
            pb.command_class,
            pb.samples,
            pb.learned,
            pb.p50_bytes,
            pb.p95_bytes,
            pb.max_bytes,
            pb.last_peak_bytes,
            pb.budget_bytes,
        )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A registered node as the broker sees it (``list_nodes``)."""

    node_id: str
    address: str
    memory_capacity_bytes: int
    granted_memory_bytes: int
    active_leases: int
    connected: bool
    pressured: bool
    cordoned: bool
    cordon_reason: str = ""
    cordoned_at_ms: int = 0
    drain_deadline_ms: int = 0  # 0: no deadline
    cpu_capacity_millis: int = 0
    declared_intent_bytes: int = 0
    overcommit_ceiling_bytes: int = 0  # 0: none
    registered_at_ms: int = 0
    # From the node's last heartbeat (0 before the first): measured, not granted.
    last_heartbeat_ms: int = 0
    used_memory_bytes: int = 0
    running_calls: int = 0

    @property
    def state(self) -> str:
        """``ready``, ``pressured``, ``disconnected``, ``cordoned`` or ``draining``."""
        if self.drain_deadline_ms:
            return "draining"
        if self.cordoned:
            return "cordoned"
        if not self.connected:
            return "disconnected"
        return "pressured" if self.pressured else "ready"

    @classmethod
    def from_pb(cls, pb: broker_pb2.NodeStatus) -> NodeInfo:
        return cls(
            pb.node_id,
            pb.address,
            pb.capacity.memory_bytes,
            pb.granted_memory_bytes,
            pb.active_leases,
            pb.connected,
            pb.pressured,
            pb.cordoned,
            cordon_reason=pb.cordon_reason,
            cordoned_at_ms=pb.cordoned_at_ms,
            drain_deadline_ms=pb.drain_deadline_ms,
            cpu_capacity_millis=pb.capacity.cpu_millis,
            declared_intent_bytes=pb.declared_intent_bytes,
            overcommit_ceiling_bytes=pb.overcommit_ceiling_bytes,
            registered_at_ms=pb.registered_at_ms,
            last_heartbeat_ms=pb.last_heartbeat_ms,
            used_memory_bytes=pb.used_memory_bytes,
            running_calls=pb.running_calls,
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state}


@dataclass(frozen=True, slots=True)
class RunResult:
    exit_code: int
    outcome: str  # completed | grown | killed | denied | failed
    peak_bytes: int
    budget_bytes: int
    reason: str
    lease_id: str = ""
    node_id: str = ""
    actions: tuple[str, ...] = ()  # enforcement actions seen, in order ("pause", "grow", ...)
    reactions_ns: tuple[int, ...] = ()
    decisions_ns: tuple[int, ...] = ()  # kernel event -> broker decision on the node
    # (action, in-kernel event -> action in effect) for every action the node timed
    timed_actions: tuple[tuple[str, int], ...] = ()
    admission_s: float = 0.0  # how long the Reserve took (queueing included), in ``run``

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "outcome": self.outcome,
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget_bytes,
            "reason": self.reason,
            "lease_id": self.lease_id,
            "node_id": self.node_id,
        }


OutputSink = Callable[[int, bytes], None]  # (1 stdout | 2 stderr, data)


def _new_key() -> str:
    return uuid.uuid4().hex


def _keyed(request: broker_pb2.ReserveRequest) -> broker_pb2.ReserveRequest:
    """``request`` if it has an idempotency key, else a copy with a new one."""
    if request.idempotency_key:
        return request
    keyed = broker_pb2.ReserveRequest()
    keyed.CopyFrom(request)
    keyed.idempotency_key = _new_key()
    return keyed


class _Following:
    """What a caller has of one Exec'd call so far: whether it started, how much of its output
    (the offsets a Resume goes on from), the enforcement actions seen."""

    def __init__(self, lease: Lease, on_output: OutputSink | None) -> None:
        self.lease = lease
        self.on_output = on_output
        self.started = False
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.actions: list[str] = []
        self.actions_seen = 0  # the last action's seq + 1 (a Resume is sent the ones after)
        self.reactions: list[int] = []
        self.decisions: list[int] = []
        self.timed: list[tuple[str, int]] = []

    async def consume(self, stream: AsyncIterable[node_pb2.ExecEvent]) -> RunResult | None:
        """Read one Exec or Resume stream; the result once Exited came, None if it ended first."""
        async for ev in stream:
            kind = ev.WhichOneof("body")
            if kind == "started":
                self.started = True
            elif kind == "output":
                if ev.output.stream == node_pb2.Output.STREAM_STDERR:
                    self.stderr_bytes += len(ev.output.data)
                else:
                    self.stdout_bytes += len(ev.output.data)
                if self.on_output is not None:
                    self.on_output(int(ev.output.stream), ev.output.data)
            elif kind == "enforcement":
                self.actions_seen = max(self.actions_seen, ev.enforcement.seq + 1)
                self.actions.append(ev.enforcement.action)
                if ev.enforcement.reaction_ns:
                    self.reactions.append(ev.enforcement.reaction_ns)
                    self.timed.append((ev.enforcement.action, ev.enforcement.reaction_ns))
                if ev.enforcement.decision_ns:
                    self.decisions.append(ev.enforcement.decision_ns)
            elif kind == "exited":
                x = ev.exited
                return RunResult(
                    exit_code=x.exit_code,
                    outcome=OUTCOMES.get(x.outcome, ""),
                    peak_bytes=x.peak_bytes,
                    budget_bytes=x.budget_bytes,
                    reason=x.reason,
                    lease_id=self.lease.lease_id,
                    node_id=self.lease.node_id,
                    actions=tuple(self.actions),
                    reactions_ns=tuple(self.reactions),
                    decisions_ns=tuple(self.decisions),
                    timed_actions=tuple(self.timed),
                )
        return None


@dataclass(frozen=True, slots=True)
class _BrokerStubs:
    channel: grpc.aio.Channel
    broker: broker_pb2_grpc.BrokerAsyncStub
    admin: broker_pb2_grpc.TenantAdminAsyncStub
    node_admin: broker_pb2_grpc.NodeAdminAsyncStub
    audit: broker_pb2_grpc.AuditLogAsyncStub
    sizing: broker_pb2_grpc.SizingAsyncStub


class AsyncClient:
    """One channel to the broker, plus a channel per node address used by ``run``.

    ``security`` (TLS files, a bearer token; default plaintext, no token) applies to the broker
    and to the nodes alike; ``ClientSecurity.from_env()`` reads it from AGENTCG_* variables.
    When its files change (a renewed client certificate, a rotated token file; looked at, at
    most once every ``ROTATION_CHECK_S``), the next call makes the channels anew with them;
    calls in flight finish on the old ones (closed after up to ``RETIRED_GRACE_S``).

    Tracing: every RPC carries the caller's OpenTelemetry context (a span current when a method
    is called is the parent of its client span), so a tool call's Reserve, its run on the node,
    the node's enforcement actions and the broker's decisions on them are one trace. Without a
    tracer provider set up nothing is recorded or sent."""

    ROTATION_CHECK_S = 1.0
    RETIRED_GRACE_S = 3600.0
    NODE_LOOKUP_S = 1.0

    def __init__(
        self, broker: str, *, timeout_s: float = 10.0, security: ClientSecurity | None = None
    ) -> None:
        self._security = security or ClientSecurity()
        self._target = broker
        self._nodes: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeAgentAsyncStub]] = {}
        # The broker's answer to "where is node N now", by node id: (asked at, answer), shared
        # by the calls that follow calls on that node again (``_node_address``).
        self._node_lookups: dict[str, tuple[float, asyncio.Future[str]]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._giving_back: set[asyncio.Task[None]] = set()  # see ``_give_back``
        self._timeout_s = timeout_s
        self._files = self._security.files_version()
        self._checked_at = time.monotonic()
        # Tracing outermost: a call sent again after a broker restart is one client span.
        # Kept across the channels made anew at rotation (whether the broker was reached).
        self._interceptors = [*aio_client_interceptors(), *broker_interceptors(broker)]
        self._stubs = self._open()

    def _open(self) -> _BrokerStubs:
        ch = self._security.aio_channel(
            self._target,
            options=broker_channel_options(self._target),
            interceptors=self._interceptors,
        )
        return _BrokerStubs(
            ch,
            broker_pb2_grpc.BrokerStub(ch),
            broker_pb2_grpc.TenantAdminStub(ch),
            broker_pb2_grpc.NodeAdminStub(ch),
            broker_pb2_grpc.AuditLogStub(ch),
            broker_pb2_grpc.SizingStub(ch),
        )

    def _current(self) -> _BrokerStubs:
        """The broker's stubs, made anew if the credential files changed."""
        now = time.monotonic()
        if now - self._checked_at >= self.ROTATION_CHECK_S:
            self._checked_at = now
            files = self._security.files_version()
            if files != self._files:
                try:
                    fresh = self._open()
                except (OSError, ValueError) as exc:  # caught mid-rename: the next check
                    log.warning("credential files changed but cannot be read yet: %s", exc)
                    return self._stubs
                retired = [self._stubs.channel, *(ch for ch, _ in self._nodes.values())]
                self._files, self._stubs, self._nodes = files, fresh, {}
                for ch in retired:
                    task = asyncio.ensure_future(ch.close(self.RETIRED_GRACE_S))
                    self._retiring.add(task)
                    task.add_done_callback(self._retiring.discard)
        return self._stubs

    @property
    def _broker(self) -> broker_pb2_grpc.BrokerAsyncStub:
        return self._current().broker

    @property
    def _admin(self) -> broker_pb2_grpc.TenantAdminAsyncStub:
        return self._current().admin

    @property
    def _node_admin(self) -> broker_pb2_grpc.NodeAdminAsyncStub:
        return self._current().node_admin

    @property
    def _audit(self) -> broker_pb2_grpc.AuditLogAsyncStub:
        return self._current().audit

    @property
    def _sizing(self) -> broker_pb2_grpc.SizingAsyncStub:
        return self._current().sizing

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._giving_back:  # a lease a cancelled Reserve may hold goes back first
            await asyncio.wait(self._giving_back, timeout=self._timeout_s)
        for ch, _ in self._nodes.values():
            await ch.close()
        self._nodes.clear()
        await self._stubs.channel.close()
        for task in list(self._retiring):
            task.cancel()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    # -- admission ----------------------------------------------------------------------------

    async def reserve(
        self,
        tenant: str,
        memory_bytes: int,
        *,
        session: str = "default",
        command_class: str = "default",
        priority: int = 0,
        ttl_ms: int = 0,
        idempotency_key: str = "",
        expected_duration_ms: int = 0,
        cpu_millis: int = 0,
        queue_timeout_ms: int = 0,
        session_max_bytes: int = 0,
        session_class: str = "",
    ) -> Lease:
        """Admit one tool call. With ``queue_timeout_ms`` the broker waits up to that long for
        capacity (by priority, then arrival) before it denies. ``session_max_bytes`` declares
        the most the whole session will hold at once: the broker then keeps it on one node and
        admits its leases only in an order in which every declared session there can finish.
        ``session_class`` names the kind of session: once sessions of that class have ended in
        the tenant's organization, a new one is declared at what they held at most (their 95th
        percentile, or the broker's ``--session-percentile``; never above ``session_max_bytes``).

        Without an ``idempotency_key`` the SDK makes one: a Reserve sent again (after a leader
        change or a broker restart, ``agentcg.channels``) then gets the lease the first attempt
        got, never a second. Such a Reserve cancelled in flight gives back what it may have been
        granted (``_give_back``); one with a key of the caller's is the caller's to ask again."""
        request = broker_pb2.ReserveRequest(
            tenant=tenant,
            session=session,
            command_class=command_class,
            intent=types_pb2.Resources(memory_bytes=memory_bytes, cpu_millis=cpu_millis),
            priority=priority,
            ttl_ms=ttl_ms,
            idempotency_key=idempotency_key or _new_key(),
            expected_duration_ms=expected_duration_ms,
            queue_timeout_ms=queue_timeout_ms,
            session_max_memory_bytes=session_max_bytes,
            session_class=session_class,
        )
        try:
            reply = await self._call(
                self._broker.Reserve(request, timeout=self._timeout_s + queue_timeout_ms / 1000)
            )
        except asyncio.CancelledError:
            if not idempotency_key:
                self._give_back(request)
            raise
        return Lease.from_pb(reply.lease)

    def _give_back(self, request: broker_pb2.ReserveRequest) -> None:
        """A Reserve cancelled in flight (a caller's timeout, Ctrl-C) may have been granted, its
        reply lost with it: the lease would hold its budget until its TTL ran out, with nobody
        to release it. Ask once more with the same key, without queueing, and release what
        that gets: the lease the first one was granted (one key, one lease), or a new one at
        once. A denial: nothing was granted. ``close`` waits for it."""
        request.queue_timeout_ms = 0

        async def give_back() -> None:
            try:
                got = await self._broker.Reserve(request, timeout=self._timeout_s)
                await self._broker.Release(
                    broker_pb2.ReleaseRequest(
                        lease_id=got.lease.lease_id, outcome=types_pb2.OUTCOME_FAILED
                    ),
                    timeout=self._timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    log.warning("cannot give back a cancelled Reserve's lease: %s", exc.code())

        task = asyncio.ensure_future(give_back())
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def release(self, lease_id: str, *, peak_bytes: int = 0, outcome: str = "") -> Lease:
        reply = await self._call(
            self._broker.Release(
                broker_pb2.ReleaseRequest(
                    lease_id=lease_id,
                    peak_memory_bytes=peak_bytes,
                    outcome=_OUTCOME_PB.get(outcome, types_pb2.OUTCOME_UNSPECIFIED),
                ),
                timeout=self._timeout_s,
            )
        )
        return Lease.from_pb(reply.lease)

    async def renew(self, lease_id: str, ttl_ms: int = 0) -> Lease:
        reply = await self._call(
            self._broker.Renew(
                broker_pb2.RenewRequest(lease_id=lease_id, ttl_ms=ttl_ms), timeout=self._timeout_s
            )
        )
        return Lease.from_pb(reply.lease)

    async def get_lease(self, lease_id: str) -> Lease:
        pb = await self._call(
            self._broker.GetLease(
                broker_pb2.GetLeaseRequest(lease_id=lease_id), timeout=self._timeout_s
            )
        )
        return Lease.from_pb(pb)

    async def list_leases(
        self, *, tenant: str = "", node_id: str = "", include_inactive: bool = False
    ) -> list[Lease]:
        reply = await self._call(
            self._broker.ListLeases(
                broker_pb2.ListLeasesRequest(
                    tenant=tenant, node_id=node_id, include_inactive=include_inactive
                ),
                timeout=self._timeout_s,
            )
        )
        return [Lease.from_pb(x) for x in reply.leases]

    async def reserve_batch(
        self, requests: Sequence[broker_pb2.ReserveRequest]
    ) -> list[Lease | QuotaExceededError]:
        """Many admissions in one durable round trip: a Lease or the denial, per request. A
        request without an idempotency key is sent with a new one (see ``reserve``)."""
        reply = await self._call(
            self._broker.ReserveBatch(
                broker_pb2.ReserveBatchRequest(requests=[_keyed(r) for r in requests]),
                timeout=self._timeout_s,
            )
        )
        out: list[Lease | QuotaExceededError] = []
        for r in reply.results:
            if r.HasField("lease"):
                out.append(Lease.from_pb(r.lease))
            else:
                d = r.denial
                out.append(
                    QuotaExceededError(
                        d.message,
                        code=d.code,
                        scope=d.hint.limiting_scope,
                        largest_memory_bytes_available=d.hint.largest_memory_bytes_available,
                        retry_after_ms=d.hint.retry_after_ms,
                        last_peak_memory_bytes=d.hint.last_peak_memory_bytes,
                    )
                )
        return out

    async def release_batch(self, lease_ids: Sequence[str]) -> list[Lease]:
        """Release many leases in one durable round trip (idempotent per lease)."""
        reply = await self._call(
            self._broker.ReleaseBatch(
                broker_pb2.ReleaseBatchRequest(
                    requests=[broker_pb2.ReleaseRequest(lease_id=x) for x in lease_ids]
                ),
                timeout=self._timeout_s,
            )
        )
        return [Lease.from_pb(x) for x in reply.leases]

    async def ping(self) -> None:
        await self._call(self._broker.Ping(broker_pb2.PingRequest(), timeout=self._timeout_s))

    async def whoami(self) -> Identity:
        """Who the broker takes this client for (the principal of its token), and its rights."""
        reply = await self._call(
            self._broker.WhoAmI(broker_pb2.WhoAmIRequest(), timeout=self._timeout_s)
        )
        return Identity(
            name=reply.name,
            role=reply.role,
            tenants=tuple(reply.tenants),
            nodes=tuple(reply.nodes),
            checked=reply.checked,
            methods=tuple(reply.methods),
        )

    # -- tenants ------------------------------------------------------------------------------

    async def set_tenant(
        self,
        name: str,
        memory_bytes: int,
        *,
        parent: str = "",
        cpu_millis: int = 0,
        max_calls: int = 0,
        weight: int = 0,
    ) -> TenantInfo:
        """Create or update a tenant: quotas per resource (0 CPU / calls: unlimited), checked
        at this level for its whole subtree; ``weight`` (0: 1) is its fair share."""
        pb = await self._call(
            self._admin.SetTenant(
                broker_pb2.SetTenantRequest(
                    name=name,
                    parent=parent,
                    quota=types_pb2.Resources(memory_bytes=memory_bytes, cpu_millis=cpu_millis),
                    max_calls=max_calls,
                    weight=weight,
                ),
                timeout=self._timeout_s,
            )
        )
        return TenantInfo.from_pb(pb)

    async def get_tenant(self, name: str) -> TenantInfo:
        pb = await self._call(
            self._admin.GetTenant(broker_pb2.GetTenantRequest(name=name), timeout=self._timeout_s)
        )
        return TenantInfo.from_pb(pb)

    async def list_tenants(self) -> list[TenantInfo]:
        reply = await self._call(
            self._admin.ListTenants(broker_pb2.ListTenantsRequest(), timeout=self._timeout_s)
        )
        return [TenantInfo.from_pb(t) for t in reply.tenants]

    async def delete_tenant(self, name: str) -> None:
        await self._call(
            self._admin.DeleteTenant(
                broker_pb2.DeleteTenantRequest(name=name), timeout=self._timeout_s
            )
        )

    # -- the audit trail -----------------------------------------------------------------------

    async def list_audit(
        self,
        *,
        tenant: str = "",
        node_id: str = "",
        lease_id: str = "",
        kind: str = "",
        since_ms: int = 0,
        before_id: int = 0,
        limit: int = 0,
    ) -> AuditPage:
        """One page of audit entries, newest first: of ``tenant`` and its subtree, a node, a
        lease, a kind, since a time (unix ms); ``before_id`` (an earlier page's
        ``next_before_id``) for older ones; ``limit`` 0: 100, at most 1,000. A page may hold
        fewer than ``limit``, even none, and still have a next one (``read_audit`` walks
        them)."""
        reply = await self._call(
            self._audit.ListAudit(
                broker_pb2.ListAuditRequest(
                    tenant=tenant,
                    node_id=node_id,
                    lease_id=lease_id,
                    kind=kind,
                    since_ms=since_ms,
                    before_id=before_id,
                    limit=limit,
                ),
                timeout=self._timeout_s,
            )
        )
        return AuditPage(tuple(AuditRecord.from_pb(e) for e in reply.entries), reply.next_before_id)

    async def read_audit(
        self,
        *,
        tenant: str = "",
        node_id: str = "",
        lease_id: str = "",
        kind: str = "",
        since_ms: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """The newest ``limit`` audit entries that match (``list_audit``'s filters), newest
        first, from as many pages as it takes: a page without ``lease_id`` reads a bounded
        slice of the trail, so it can come back short, or empty, with more below."""
        out: list[AuditRecord] = []
        before = 0
        while len(out) < limit:
            page = await self.list_audit(
                tenant=tenant,
                node_id=node_id,
                lease_id=lease_id,
                kind=kind,
                since_ms=since_ms,
                before_id=before,
                limit=min(MAX_AUDIT_PAGE, limit - len(out)),
            )
            out.extend(page.records)
            before = page.next_before_id
            if not before:
                break
        return out

    # -- sizing (what was learned from measurements) --------------------------------------------

    async def list_sizing(
        self, *, tenant: str = "", command_class: str = "", intent_memory_bytes: int = 0
    ) -> list[SizingProfile]:
        """What the broker learned per (tenant, command class), by tenant then class: of
        ``tenant`` and its subtree (default: every tenant in the caller's scope), of one class;
        with ``intent_memory_bytes``, each profile's ``budget_bytes`` is what a Reserve
        declaring it would be granted now."""
        reply = await self._call(
            self._sizing.ListProfiles(
                broker_pb2.ListProfilesRequest(
                    tenant=tenant,
                    command_class=command_class,
                    intent_memory_bytes=intent_memory_bytes,
                ),
                timeout=self._timeout_s,
            )
        )
        return [SizingProfile.from_pb(p) for p in reply.profiles]

    async def list_session_sizing(
        self, *, tenant: str = "", intent_memory_bytes: int = 0
    ) -> list[SizingProfile]:
        """What the broker learned per (organization, session class): ``tenant`` is the
        organization, ``command_class`` the session class, the peaks the most each recent
        session held at once; of the organizations of ``tenant`` and its subtree (default:
        every tenant in the caller's scope); with ``intent_memory_bytes``, each one's
        ``budget_bytes`` is the maximum a new session declaring it is declared at."""
        reply = await self._call(
            self._sizing.ListProfiles(
                broker_pb2.ListProfilesRequest(
                    tenant=tenant, intent_memory_bytes=intent_memory_bytes
                ),
                timeout=self._timeout_s,
            )
        )
        return [SizingProfile.from_pb(p) for p in reply.sessions]

    async def forget_sizing(self, tenant: str, command_class: str = "") -> list[SizingProfile]:
        """Make the broker forget what it learned of ``tenant``'s ``command_class`` (default:
        every class of it); its Reserves get their intent until enough new peaks. Returns the
        profiles as they were (admin role)."""
        reply = await self._call(
            self._sizing.ForgetProfile(
                broker_pb2.ForgetProfileRequest(tenant=tenant, command_class=command_class),
                timeout=self._timeout_s,
            )
        )
        return [SizingProfile.from_pb(p) for p in reply.forgotten]

    async def forget_session_sizing(
        self, organization: str, session_class: str = ""
    ) -> list[SizingProfile]:
        """Make the broker forget what the sessions of ``organization`` (a top-level tenant)
        of ``session_class`` (default: every session class of it) held; its new sessions of
        the class are declared at what they declare until enough more have ended. Returns the
        profiles as they were (``tenant`` the organization, ``command_class`` the session
        class; admin role)."""
        reply = await self._call(
            self._sizing.ForgetSessionProfile(
                broker_pb2.ForgetSessionProfileRequest(
                    organization=organization, session_class=session_class
                ),
                timeout=self._timeout_s,
            )
        )
        return [SizingProfile.from_pb(p) for p in reply.forgotten]

    # -- nodes (operating them) ---------------------------------------------------------------

    async def list_nodes(self) -> list[NodeInfo]:
        reply = await self._call(
            self._node_admin.ListNodes(broker_pb2.ListNodesRequest(), timeout=self._timeout_s)
        )
        return [NodeInfo.from_pb(n) for n in reply.nodes]

    async def get_node(self, node_id: str) -> NodeInfo:
        pb = await self._call(
            self._node_admin.GetNode(
                broker_pb2.GetNodeRequest(node_id=node_id), timeout=self._timeout_s
            )
        )
        return NodeInfo.from_pb(pb)

    async def cordon_node(
        self, node_id: str, *, reason: str = "", drain_grace_ms: int = 0
    ) -> NodeInfo:
        """No new leases on the node; with ``drain_grace_ms`` > 0 the broker also revokes the
        leases still active there that long from now (their calls are stopped)."""
        pb = await self._call(
            self._node_admin.CordonNode(
                broker_pb2.CordonNodeRequest(
                    node_id=node_id, reason=reason, drain_grace_ms=drain_grace_ms
                ),
                timeout=self._timeout_s,
            )
        )
        return NodeInfo.from_pb(pb)

    async def uncordon_node(self, node_id: str) -> NodeInfo:
        pb = await self._call(
            self._node_admin.UncordonNode(
                broker_pb2.UncordonNodeRequest(node_id=node_id), timeout=self._timeout_s
            )
        )
        return NodeInfo.from_pb(pb)

    async def drain_node(
        self,
        node_id: str,
        *,
        reason: str = "",
        drain_grace_ms: int = 0,
        poll_s: float = 0.5,
        progress: Callable[[NodeInfo], None] | None = None,
    ) -> NodeInfo:
        """Cordon the node and wait until no lease is active on it (with ``drain_grace_ms``,
        the broker revokes what still runs then). Cancel it to stop waiting; the node stays
        cordoned."""
        info = await self.cordon_node(node_id, reason=reason, drain_grace_ms=drain_grace_ms)
        while True:
            if progress is not None:
                progress(info)
            if not info.active_leases:
                return info
            await asyncio.sleep(poll_s)
            info = await self.get_node(node_id)

    # -- running a tool call ------------------------------------------------------------------

    def _node(self, address: str) -> node_pb2_grpc.NodeAgentAsyncStub:
        self._current()  # credentials rotated: the node channels too
        if address not in self._nodes:
            ch = self._security.aio_channel(
                address, options=node_channel_options(), interceptors=aio_client_interceptors()
            )
            self._nodes[address] = (ch, node_pb2_grpc.NodeAgentStub(ch))
        return self._nodes[address][1]

    async def node_calls(self, address: str, *, tenant: str = "") -> NodeCalls:
        """The tool calls running on the node agent at `address` now (read-only)."""
        request = node_pb2.ListCallsRequest(tenant=tenant)
        try:
            reply = await self._node(address).ListCalls(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return NodeCalls(
            node_id=reply.node_id,
            address=address,
            capacity_bytes=reply.capacity_bytes,
            calls=tuple(CallStatus.from_pb(c) for c in reply.calls),
        )

    async def nodes_calls(self, *, tenant: str = "") -> list[NodeCalls]:
        """Every node with an active lease at the broker, and its running calls."""
        leases = await self.list_leases(tenant=tenant)
        addresses = sorted({x.node_address for x in leases if x.node_address})
        return [await self.node_calls(a, tenant=tenant) for a in addresses]

    async def attach(self, lease: Lease, pid: int) -> str:
        """Move an existing process into the lease's call cgroup on its node; its cgroup path."""
        request = node_pb2.AttachRequest(lease_id=lease.lease_id, pid=pid)
        try:
            reply = await self._node(lease.node_address).Attach(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return str(reply.cgroup_path)

    async def exec(
        self,
        lease: Lease,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        on_output: OutputSink | None = None,
        resume_timeout_s: float = 60.0,
    ) -> RunResult:
        """Run ``argv`` on the lease's node; returns when the call has exited.

        If the stream breaks once the call has started (the node agent restarted with
        ``--keep-calls``, the connection dropped), the call runs on and this follows it again
        (the node's Resume) at the lease's node address, for up to ``resume_timeout_s``:
        output already received is not delivered twice, and the call is not started again."""
        following = _Following(lease, on_output)
        stream = self._node(lease.node_address).Exec(
            node_pb2.ExecRequest(
                lease_id=lease.lease_id,
                argv=list(argv),
                env=dict(env or {}),
                cwd=cwd,
                capture_output=on_output is not None,
            )
        )
        try:
            result = await following.consume(stream)
        except grpc.aio.AioRpcError as exc:
            if not following.started or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise error_from_rpc(exc) from None
            result = None
            broke = f"{exc.code().name}: {exc.details()}"
        else:
            broke = "stream ended without an exit status"
        if result is not None:
            return result
        if not following.started:
            raise AgentcgError(f"node {lease.node_id}: {broke}")
        return await self._resume(following, broke, resume_timeout_s)

    async def _resume(self, following: _Following, broke: str, timeout_s: float) -> RunResult:
        """Follow the call again (Resume) until it ends, trying for up to ``timeout_s``."""
        lease = following.lease
        deadline = time.monotonic() + timeout_s
        wait_s = 0.1
        address = lease.node_address
        while True:
            log.info("call %s on node %s: %s; resuming", lease.lease_id, lease.node_id, broke)
            address = await self._node_address(lease, address)
            stream = self._node(address).Resume(
                node_pb2.ResumeRequest(
                    lease_id=lease.lease_id,
                    stdout_offset=following.stdout_bytes,
                    stderr_offset=following.stderr_bytes,
                    actions_seen=following.actions_seen,
                )
            )
            try:
                result = await following.consume(stream)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(exc) from None
                broke = f"{exc.code().name}: {exc.details()}"
            else:
                if result is not None:
                    return result
                broke = "stream ended without an exit status"
            if time.monotonic() + wait_s > deadline:
                raise UnavailableError(
                    f"node {lease.node_id}: call {lease.lease_id} not followed again within "
                    f"{timeout_s:g} s ({broke})"
                )
            # Jittered: the calls a node restart broke do not all come back at the same instant.
            await asyncio.sleep(wait_s * random.uniform(0.5, 1.0))
            wait_s = min(wait_s * 2, 1.0)

    async def _node_address(self, lease: Lease, known: str) -> str:
        """The address of the lease's node as the broker has it now (a restarted agent may
        listen elsewhere); ``known`` if the broker cannot say. The calls of this client that
        follow calls on one node again share one lookup per ``NODE_LOOKUP_S``: a thousand calls
        broken by one agent restart ask the broker about once a second, not a thousand times."""
        now = time.monotonic()
        cached = self._node_lookups.get(lease.node_id)
        if cached is None or now - cached[0] >= self.NODE_LOOKUP_S:
            lookup = asyncio.ensure_future(self.get_lease(lease.lease_id))
            answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            def settle(done: asyncio.Future[Lease]) -> None:
                failed = done.cancelled() or done.exception() is not None
                answer.set_result("" if failed else done.result().node_address)

            lookup.add_done_callback(settle)
            cached = (now, answer)
            self._node_lookups[lease.node_id] = cached
        return await asyncio.shield(cached[1]) or known

    async def _keep_renewed(self, lease: Lease, ttl_ms: int) -> None:
        """Renew the lease at a third of its TTL for as long as the call runs (a long pytest
        must not outlive its lease: the node stops calls whose lease expired). Each renewal
        asks for the TTL the Reserve asked for (0: the broker's default); the TTL it was
        granted is read on the broker's clock alone (expiry less grant time). Not the time
        left by this host's clock: one ahead of the broker's, and every round trip, would
        shorten each renewal's TTL, down to the floor."""
        period_s = max(1000, lease.expires_at_unix_ms - lease.granted_at_unix_ms) / 3000
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.renew(lease.lease_id, ttl_ms)
            except AgentcgError:
                return  # released, or the broker is gone: the node decides what happens

    async def run(
        self,
        tenant: str,
        memory_bytes: int,
        argv: Sequence[str],
        *,
        session: str = "default",
        command_class: str = "default",
        priority: int = 0,
        ttl_ms: int = 0,
        env: Mapping[str, str] | None = None,
        cwd: str = "",
        on_output: OutputSink | None = None,
        queue_timeout_ms: int = 0,
        session_max_bytes: int = 0,
        session_class: str = "",
        resume_timeout_s: float = 60.0,
    ) -> RunResult:
        """Reserve (waiting up to ``queue_timeout_ms`` for room), run on the chosen node
        (renewing the lease while it runs, following the call again for up to
        ``resume_timeout_s`` if the node agent restarts: ``exec``), release. A denial is a
        result, not an exception."""
        asked = time.monotonic()
        try:
            lease = await self.reserve(
                tenant,
                memory_bytes,
                session=session,
                command_class=command_class,
                priority=priority,
                ttl_ms=ttl_ms,
                queue_timeout_ms=queue_timeout_ms,
                session_max_bytes=session_max_bytes,
                session_class=session_class,
            )
        except QuotaExceededError as exc:
            return RunResult(
                exit_code=1, outcome="denied", peak_bytes=0, budget_bytes=0, reason=exc.message
            )
        admission_s = time.monotonic() - asked
        result: RunResult | None = None
        keepalive = asyncio.create_task(self._keep_renewed(lease, ttl_ms))
        try:
            result = await self.exec(
                lease,
                argv,
                env=env,
                cwd=cwd,
                on_output=on_output,
                resume_timeout_s=resume_timeout_s,
            )
            return dataclasses.replace(result, admission_s=admission_s)
        finally:
            keepalive.cancel()
            # The node releases on exit too; this covers a call that never started. Idempotent.
            await asyncio.shield(
                self.release(
                    lease.lease_id,
                    peak_bytes=result.peak_bytes if result else 0,
                    outcome=result.outcome if result else "failed",
                )
            )


class Client:
    """Synchronous wrapper: the same methods as AsyncClient, blocking.

    A method interrupted while it waits (Ctrl-C: KeyboardInterrupt) stops its coroutine too, and
    waits up to the client's timeout for that coroutine's own clean-up, as ``asyncio.run`` does
    for its main task: an interrupted ``run`` releases its lease (and its node stops the call)."""

    def __init__(
        self, broker: str, *, timeout_s: float = 10.0, security: ClientSecurity | None = None
    ) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._async = self._run(_make_async(broker, timeout_s, security))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        ended = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def settled(task: asyncio.Task[T]) -> None:
            if not task.cancelled():
                task.exception()  # retrieved: an interrupted caller no longer asks for it
            ended.set()

        def start() -> None:
            task = self._loop.create_task(coro)
            task.add_done_callback(settled)
            tasks.append(task)

        self._loop.call_soon_threadsafe(start)
        try:
            ended.wait()
        except BaseException:
            # Interrupted here: stop the coroutine and wait for its clean-up. The loop runs its
            # callbacks in order, so the task exists when the cancel runs; a task cancelled
            # before its first step ends at once (nothing of it ran, nothing to clean up).
            self._loop.call_soon_threadsafe(lambda: tasks[0].cancel())
            ended.wait(self._timeout_s)
            raise
        return tasks[0].result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._async, name)
        if not asyncio.iscoroutinefunction(method):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(method(*args, **kwargs))

        call.__name__ = name
        call.__doc__ = method.__doc__
        return call


async def _make_async(
    broker: str, timeout_s: float, security: ClientSecurity | None
) -> AsyncClient:
    return AsyncClient(broker, timeout_s=timeout_s, security=security)
