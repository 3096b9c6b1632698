"""Logging, OpenTelemetry and Prometheus set-up, called only from composition roots (broker and
node mains).

Library code uses ``logging.getLogger(__name__)`` and the OpenTelemetry API only. Exporters:
``OTEL_EXPORTER_OTLP_ENDPOINT`` set -> OTLP/gRPC; ``AGENTCG_TRACE_CONSOLE=1`` -> console;
otherwise nothing is exported, so nothing is sampled: spans are still created as non-recording
spans (trace and span ids propagate) but cost no attributes, events or processing.
``OTEL_TRACES_SAMPLER`` (the SDK's variable) overrides the sampler either way.

Metrics: each process has its own ``CollectorRegistry`` (``metrics_registry``), never
prometheus_client's global one, so in-process brokers, nodes and tests do not collide; it is
served over HTTP only when ``--metrics-listen`` is given (``serve_metrics``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation import grpc as otel_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

__all__ = [
    "MetricsListenError",
    "MetricsServer",
    "aio_client_interceptors",
    "aio_server_interceptor",
    "configure_logging",
    "configure_tracing",
    "metrics_registry",
    "parse_listen_address",
    "serve_metrics",
]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def configure_tracing(service_name: str) -> bool:
    """Install the process's tracer provider; whether spans are exported (an exporter is
    configured). When they are not, a server needs no per-RPC tracing interceptor: its spans
    would be built for nobody."""
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
    return exporter is not None


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


# -- Prometheus --------------------------------------------------------------------------------


class MetricsListenError(ValueError):
    """A metrics listen address that is malformed or cannot be bound."""


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6; port 0: any free port) -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise MetricsListenError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return host, int(port_s)


def metrics_registry() -> CollectorRegistry:
    """A registry of the process's own (not prometheus_client's global one) with the standard
    process, platform and garbage-collector metrics, all read at scrape time. The ``*_created``
    series (a timestamp per counter and histogram child, doubling what is scraped) are off in
    this process from here on."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    """The HTTP endpoint (any path, ``/metrics`` by convention) on its own daemon thread."""

    address: str  # host:port as bound (the real port when asked for 0)
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(listen: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``listen`` (HOST:PORT); MetricsListenError if it cannot."""
    host, port = parse_listen_address(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = server.server_port
    shown = f"[{host}]" if ":" in host else host
    return MetricsServer(f"{shown}:{bound}", server, thread)
