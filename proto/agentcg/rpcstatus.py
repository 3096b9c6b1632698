"""The one translation point between domain errors and gRPC status (both directions).

Servers: ``abort_with(context, exc)`` turns an AgentcgError into a status with rich details
(google.rpc BadRequest / QuotaFailure / RetryInfo + agentcg AdmissionHint). Clients:
``error_from_rpc(rpc_error)`` turns a status back into the matching AgentcgError.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentcg.errors import (
    AgentcgError,
    ConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    UnauthenticatedError,
    UnavailableError,
)
from agentcg.v1 import types_pb2

__all__ = ["GENERIC_INTERNAL", "error_from_rpc", "to_status"]

GENERIC_INTERNAL = "internal error (details are in the server log)"
DOMAIN = "agentcg.v1"  # ErrorInfo.domain of the denial codes this server sends

_CODES: list[tuple[type[AgentcgError], int]] = [
    (InvalidArgumentError, code_pb2.INVALID_ARGUMENT),
    (NotFoundError, code_pb2.NOT_FOUND),
    (FailedPreconditionError, code_pb2.FAILED_PRECONDITION),
    (ConflictError, code_pb2.ABORTED),
    (QuotaExceededError, code_pb2.RESOURCE_EXHAUSTED),
    (UnavailableError, code_pb2.UNAVAILABLE),
    (UnauthenticatedError, code_pb2.UNAUTHENTICATED),
    (PermissionDeniedError, code_pb2.PERMISSION_DENIED),
]


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def to_status(exc: BaseException) -> grpc.Status:
    """Map an exception to a grpc.Status; unknown exceptions become a generic INTERNAL."""
    code = code_pb2.INTERNAL
    message = GENERIC_INTERNAL
    details: list[any_pb2.Any] = []
    if isinstance(exc, AgentcgError):
        message = exc.message
        for cls, c in _CODES:
            if isinstance(exc, cls):
                code = c
                break
        if isinstance(exc, InvalidArgumentError):
            details.append(
                _pack(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=exc.field, description=exc.message
                            )
                        ]
                    )
                )
            )
        elif isinstance(exc, QuotaExceededError):
            details.append(
                _pack(
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=exc.scope, description=exc.message
                            )
                        ]
                    )
                )
            )
            # The machine-readable denial code (tenant_quota, node_capacity, node_unsafe, ...).
            details.append(_pack(error_details_pb2.ErrorInfo(reason=exc.code, domain=DOMAIN)))
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(exc.retry_after_ms)
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
            details.append(
                _pack(
                    types_pb2.AdmissionHint(
                        largest_memory_bytes_available=exc.largest_memory_bytes_available,
                        retry_after_ms=exc.retry_after_ms,
                        last_peak_memory_bytes=exc.last_peak_memory_bytes,
                        limiting_scope=exc.scope,
                    )
                )
            )
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def error_from_rpc(err: grpc.RpcError) -> AgentcgError:
    """Rebuild the domain error a server sent; transport failures become UnavailableError."""
    # Raised RpcErrors (sync and aio) are also the call (code, details, trailing metadata); the
    # stubs type from_call's argument as grpc.Call only.
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(err)
    field = ""
    hint = types_pb2.AdmissionHint()
    scope = ""
    reason = ""
    if status is not None:
        for d in status.details:
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                if br.field_violations:
                    field = br.field_violations[0].field
            elif d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
                if info.domain == DOMAIN:
                    reason = info.reason
            elif d.Is(types_pb2.AdmissionHint.DESCRIPTOR):
                d.Unpack(hint)
                scope = hint.limiting_scope
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(field or "request", message)
    if code == grpc.StatusCode.NOT_FOUND:
        e = NotFoundError("object", "", field=field)
        e.message = message
        e.args = (message,)
        return e
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(message)
    if code == grpc.StatusCode.ABORTED:
        return ConflictError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return QuotaExceededError(
            message,
            code=reason or "denied",
            scope=scope,
            largest_memory_bytes_available=hint.largest_memory_bytes_available,
            retry_after_ms=hint.retry_after_ms,
            last_peak_memory_bytes=hint.last_peak_memory_bytes,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(message)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(message)
    return AgentcgError(f"{code.name if code else 'UNKNOWN'}: {message}")
