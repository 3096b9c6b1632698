"""Logging and OpenTelemetry set-up, called only from composition roots (broker and node mains).

Library code uses ``logging.getLogger(__name__)`` and the OpenTelemetry API only. Exporters:
``OTEL_EXPORTER_OTLP_ENDPOINT`` set -> OTLP/gRPC; ``AGENTCG_TRACE_CONSOLE=1`` -> console;
otherwise spans are created (so ids propagate) and dropped.
"""

from __future__ import annotations

import logging
import os

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as otel_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

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
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif os.environ.get("AGENTCG_TRACE_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
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
