"""One tool call, one trace: W3C trace context where gRPC metadata cannot carry it.

An RPC carries its caller's trace context in its metadata (OpenTelemetry's gRPC
instrumentation). The steps of a call that cross the node's long-lived stream to the broker are
messages, not RPCs: the node's pressure event and the broker's decision back carry the context
of the step that caused them in a ``traceparent`` field (the W3C header's value), so the
node's pause, the broker's growth decision and the node's resume are one trace with the
caller's Reserve and Exec. OpenTelemetry API only (library code)."""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation import grpc as otel_grpc
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["aio_client_interceptors", "parent_context", "traceparent"]

_W3C = TraceContextTextMapPropagator()


def traceparent(context: Context | None = None) -> str:
    """The W3C ``traceparent`` of the current span (or of ``context``'s) if it is sampled, else
    "". An unsampled span here means "this process exports nothing", not a decision for the
    whole trace: passed on, it would make a broker (or a traced tool) that does export drop
    its own spans of the call."""
    if not trace.get_current_span(context).get_span_context().trace_flags.sampled:
        return ""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier.get("traceparent", "")


def parent_context(value: str) -> Context | None:
    """The context a ``traceparent`` value continues; None for "" or a malformed value (the
    span then starts a trace of its own)."""
    if not value:
        return None
    context = _W3C.extract({"traceparent": value})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def aio_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's aio client interceptors: a client span for every RPC made on the
    channel, and the caller's trace context in its metadata. With no tracer provider set up
    (the API's default) they make non-recording spans and send no context."""
    # opentelemetry-instrumentation-grpc ships no annotations: this gives the type.
    interceptors: list[grpc.aio.ClientInterceptor] = otel_grpc.aio_client_interceptors()  # type: ignore[no-untyped-call]  # untyped third-party factory
    return interceptors
