"""Domain errors shared by the broker, the node and the SDK. No grpc here: ``agentcg.rpcstatus``
is the one place that maps them to and from gRPC status codes."""

from __future__ import annotations

__all__ = [
    "AgentcgError",
    "ConflictError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "UnauthenticatedError",
    "UnavailableError",
]


class AgentcgError(Exception):
    """Base of every error agentcg raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(AgentcgError):
    """A request field is malformed. ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message if message.startswith(field) else f"{field}: {message}")
        self.field = field


class NotFoundError(AgentcgError):
    def __init__(self, kind: str, name: str, *, field: str = "") -> None:
        super().__init__(f"{field + ': ' if field else ''}{kind} {name!r} not found")
        self.kind = kind
        self.name = name
        self.field = field


class FailedPreconditionError(AgentcgError):
    """The object exists but is in the wrong state (expired lease, stale epoch, busy tenant)."""


class ConflictError(AgentcgError):
    pass


class QuotaExceededError(AgentcgError):
    """Admission denied: carries what would fit now so the caller can adapt."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        scope: str,
        largest_memory_bytes_available: int,
        retry_after_ms: int,
        last_peak_memory_bytes: int = 0,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.scope = scope
        self.largest_memory_bytes_available = largest_memory_bytes_available
        self.retry_after_ms = retry_after_ms
        self.last_peak_memory_bytes = last_peak_memory_bytes


class UnavailableError(AgentcgError):
    """The database or a node cannot be reached; retrying later may work."""


class UnauthenticatedError(AgentcgError):
    """The caller presented no credentials, or ones the server does not know."""


class PermissionDeniedError(AgentcgError):
    """The caller is known, and may not do this (its role, or a tenant outside its scope)."""
