"""Logging and OpenTelemetry set-up, called only from composition roots (broker and node mains).

Library code uses ``logging.getLogger(__name__)`` and the OpenTelemetry API only. Exporters:
``OTEL_EXPORTER_OTLP_ENDPOINT`` set -> OTLP/gRPC; ``AGENTCG_TRACE_CONSOLE=1`` -> console;
otherwise nothing is exported, so nothing is sampled: spans are still created as non-recording
spans (trace and span ids propagate) but cost no attributes, events or processing.
``OTEL_TRACES_SAMPLER`` (the SDK's variable) overrides the sampler either way.
"""

from __future__ import annotations

import logging
import os

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as otel_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

__all__ = [
    "aio_client_interceptors",
    "aio_server_interceptor",
    "configure_logging",
    "configure_tracing",
]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def configure_tracing(service_name: str) -> TracerProvider:
    exporter: SpanExporter | None = None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif os.environ.get("AGENTCG_TRACE_CONSOLE") == "1":
        exporter = ConsoleSpanExporter()
    # Recording a span nobody exports costs every RPC its attributes, timestamps and processor
    # calls (a tenth of a no-op RPC's CPU here); without an exporter sample nothing, unless a
    # caller's sampled parent says otherwise (ParentBased) or OTEL_TRACES_SAMPLER is set.
    sampler = None
    if exporter is None and not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ParentBased(ALWAYS_OFF)
    provider = TracerProvider(
        sampler=sampler, resource=Resource.create({"service.name": service_name})
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


# opentelemetry-instrumentation-grpc ships no annotations: these wrappers give its two aio factories
# the types of what they return (a server interceptor; one client interceptor per call kind).


def aio_server_interceptor() -> grpc.aio.ServerInterceptor:
    """OpenTelemetry's aio server interceptor (spans for every RPC served)."""
    interceptor: grpc.aio.ServerInterceptor = otel_grpc.aio_server_interceptor()  # type: ignore[no-untyped-call]  # untyped third-party factory
    return interceptor


def aio_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry's aio client interceptors (spans for every RPC made on the channel)."""
    interceptors: list[grpc.aio.ClientInterceptor] = otel_grpc.aio_client_interceptors()  # type: ignore[no-untyped-call]  # untyped third-party factory
    return interceptors
