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

import bisect
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
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
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "GC_PAUSE_BUCKETS_S",
    "GcPauseCollector",
    "MetricsListenError",
    "MetricsServer",
    "aio_server_interceptor",
    "configure_logging",
    "configure_tracing",
    "metrics_registry",
    "parse_listen_address",
    "process_gc_pauses",
    "serve_metrics",
    "tracing_exported",
]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACE_CONSOLE = "AGENTCG_TRACE_CONSOLE"


def tracing_exported() -> bool:
    """Whether the environment asks for spans to be exported (what ``configure_tracing`` would
    set up an exporter for)."""
    return bool(os.environ.get(OTLP_ENDPOINT)) or os.environ.get(TRACE_CONSOLE) == "1"


def configure_tracing(service_name: str) -> bool:
    """Install the process's tracer provider; whether spans are exported (an exporter is
    configured). When they are not, a server needs no per-RPC tracing interceptor: its spans
    would be built for nobody."""
    exporter: SpanExporter | None = None
    if os.environ.get(OTLP_ENDPOINT):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif os.environ.get(TRACE_CONSOLE) == "1":
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


# opentelemetry-instrumentation-grpc ships no annotations: this wrapper gives its aio server
# factory the type of what it returns (the client side: agentcg.tracecontext).


def aio_server_interceptor() -> grpc.aio.ServerInterceptor:
    """OpenTelemetry's aio server interceptor (spans for every RPC served)."""
    interceptor: grpc.aio.ServerInterceptor = otel_grpc.aio_server_interceptor()  # type: ignore[no-untyped-call]  # untyped third-party factory
    return interceptor


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


# A full collection walks every tracked object that was not frozen at start-up: with 1,000
# node streams connected (~77 tracked objects each, most of them gRPC's) it took 40-80 ms here.
GC_PAUSE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class GcPauseCollector(Collector):
    """How long the cycle collector stopped the process, by generation
    (``agentcg_gc_pause_seconds``): the pauses every request of the event loop may land in,
    which prometheus_client's own GC metrics (collections and objects) do not show; and the
    objects no collection walks any more (``agentcg_gc_frozen_objects``, ``agentcg.heap``): 0
    in a served process means its full collections walk its whole start-up state.

    One ``gc.callbacks`` hook per process (``process_gc_pauses``) counts into plain lists: a
    callback runs inside whatever allocation triggered the collection, so it takes no lock (a
    metric child's lock may be held by that very thread). The histogram is built at scrape."""

    def __init__(self) -> None:
        self._counts = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in range(3)]
        self._sums = [0.0] * 3
        self._started = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = info["generation"]
        self._counts[generation][bisect.bisect_left(GC_PAUSE_BUCKETS_S, seconds)] += 1
        self._sums[generation] += seconds

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(
            "agentcg_gc_pause_seconds",
            "Pauses of Python's cycle collector (the whole process stops), by generation",
            labels=["generation"],
        )
        bounds = [repr(b) for b in GC_PAUSE_BUCKETS_S] + ["+Inf"]
        for generation in range(3):
            cumulative = itertools.accumulate(self._counts[generation])
            family.add_metric(
                [str(generation)],
                list(zip(bounds, cumulative, strict=True)),
                self._sums[generation],
            )
        yield family
        yield GaugeMetricFamily(
            "agentcg_gc_frozen_objects",
            "Objects in the permanent generation, which no collection walks (the start-up freeze)",
            value=gc.get_freeze_count(),
        )


_gc_pauses: GcPauseCollector | None = None


def process_gc_pauses() -> GcPauseCollector:
    """The process's one ``GcPauseCollector``, hooked into ``gc.callbacks`` on first use."""
    global _gc_pauses
    if _gc_pauses is None:
        _gc_pauses = GcPauseCollector()
        gc.callbacks.append(_gc_pauses.on_gc)
    return _gc_pauses


def metrics_registry() -> CollectorRegistry:
    """A registry of the process's own (not prometheus_client's global one) with the standard
    process, platform and garbage-collector metrics and the collector's pauses
    (``GcPauseCollector``), all read at scrape time. The ``*_created`` series (a timestamp per
    counter and histogram child, doubling what is scraped) are off in this process from here
    on."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(process_gc_pauses())
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
