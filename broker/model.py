"""The broker's domain records: plain frozen data, no I/O.

The broker keeps the live state in memory (decisions are made on it), and persists every change
as one of the ``Change`` records below, in one transaction, before it replies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType, TypeAlias

__all__ = [
    "Audit",
    "AuditEntry",
    "Change",
    "DeleteTenant",
    "ForgetPeaks",
    "Lease",
    "LeaseId",
    "LeaseState",
    "Node",
    "NodeId",
    "Outcome",
    "PruneHistory",
    "PutLease",
    "PutNode",
    "PutTenant",
    "SessionName",
    "Tenant",
    "TenantName",
]

TenantName = NewType("TenantName", str)
SessionName = NewType("SessionName", str)
LeaseId = NewType("LeaseId", str)
NodeId = NewType("NodeId", str)


class LeaseState(enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Outcome(enum.Enum):
    UNKNOWN = ""
    COMPLETED = "completed"
    GROWN = "grown"
    KILLED = "killed"
    DENIED = "denied"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: TenantName
    memory_quota_bytes: int
    parent: TenantName | None = None
    cpu_quota_millis: int = 0  # 0: unlimited
    max_calls: int = 0  # concurrent calls in the subtree; 0: unlimited
    weight: int = 1  # fair-share weight between siblings under contention


@dataclass(frozen=True, slots=True)
class Node:
    node_id: NodeId
    address: str
    memory_capacity_bytes: int
    cpu_capacity_millis: int = 0
    registered_at_ms: int = 0
    # Taken out of service by an operator (NodeAdmin.CordonNode): no new lease is placed on it.
    cordoned_at_ms: int = 0  # 0: in service
    cordon_reason: str = ""
    drain_deadline_ms: int = 0  # leases still active on it then are revoked; 0: none

    @property
    def cordoned(self) -> bool:
        return self.cordoned_at_ms > 0


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: LeaseId
    tenant: TenantName
    session: SessionName
    command_class: str
    node_id: NodeId
    memory_bytes: int  # current budget (grows)
    intent_memory_bytes: int  # what the caller declared
    granted_at_ms: int
    expires_at_ms: int
    state: LeaseState = LeaseState.ACTIVE
    epoch: int = 1
    priority: int = 0
    cpu_millis: int = 0
    idempotency_key: str = ""
    ended_at_ms: int | None = None
    peak_memory_bytes: int = 0
    outcome: Outcome = Outcome.UNKNOWN
    session_max_memory_bytes: int = 0  # the session's declared maximum; 0: not declared
    session_class: str = ""  # the kind of session whose maxima are learned; "": none
    # On the lease whose end ended its session: the most the session held at once (all its
    # budgets together), what later sessions of its class are sized from; 0 on the others.
    session_peak_bytes: int = 0


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at_ms: int
    kind: str  # "reserve", "grow", "kill", "release", "expire", "tenant_set", ...
    tenant: str = ""
    lease_id: str = ""
    node_id: str = ""
    detail: str = ""  # JSON text


@dataclass(frozen=True, slots=True)
class PutTenant:
    tenant: Tenant


@dataclass(frozen=True, slots=True)
class DeleteTenant:
    name: TenantName


@dataclass(frozen=True, slots=True)
class PutNode:
    node: Node


@dataclass(frozen=True, slots=True)
class PutLease:
    lease: Lease


@dataclass(frozen=True, slots=True)
class Audit:
    entry: AuditEntry


@dataclass(frozen=True, slots=True)
class PruneHistory:
    """Delete up to ``limit`` ended leases granted before ``before_ms`` and up to ``limit`` of
    the oldest audit entries older than it: the history the broker keeps is bounded. Nothing
    live is touched (active leases stay)."""

    before_ms: int
    limit: int


@dataclass(frozen=True, slots=True)
class ForgetPeaks:
    """Drop what sizing learned of (tenant, command class): the peaks of leases that ended at
    or before ``at_ms`` are not learned from again, after a restart either. With ``sessions``,
    of (organization, session class) instead: ``tenant`` is the organization, ``command_class``
    the session class, and sessions that ended at or before ``at_ms`` are not learned from."""

    tenant: TenantName
    command_class: str
    at_ms: int
    sessions: bool = False


Change: TypeAlias = (
    PutTenant | DeleteTenant | PutNode | PutLease | Audit | PruneHistory | ForgetPeaks
)
