"""Admission spans: a real broker (in this process, so the SDK's in-memory exporter sees its
spans) on a loopback port, a real SQLite database, a real gRPC client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.broker.main import BrokerConfig, run_broker
from agentcg.clients.sdk import Client
from agentcg.errors import QuotaExceededError
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

MiB = 1 << 20
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    tmp = tmp_path_factory.mktemp("tracing")
    ready = tmp / "addr"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    config = BrokerConfig(listen="127.0.0.1:0", data_dir=tmp, ready_file=ready, grace_s=0.5)
    thread = threading.Thread(target=loop.run_until_complete, args=(run_broker(config, stop),))
    thread.start()
    for _ in range(500):
        if ready.exists():
            break
        thread.join(0.02)
    assert ready.exists(), "broker did not start"
    yield ready.read_text()
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def spans(name: str) -> list:
    return [s for s in EXPORTER.get_finished_spans() if s.name == name]


def test_reserve_has_an_admission_span_with_tenant_and_decision(
    broker: str, tmp_path: Path
) -> None:
    EXPORTER.clear()
    with Client(broker) as c:
        c.set_tenant("traced", 128 * MiB)
        with pytest.raises(QuotaExceededError):
            c.reserve("traced", 256 * MiB)  # no node registered, and over quota
    (span,) = spans("agentcg.admission")
    assert span.attributes["agentcg.tenant"] == "traced"
    assert span.attributes["agentcg.decision"] == "deny"
    assert span.attributes["agentcg.reason"] == "tenant_quota"
    # The RPC span from the gRPC instrumentation is the admission span's parent. It ends after
    # the reply has gone out, so it may be exported a moment after the client has its answer.
    # The SDK's client span (same name, kind CLIENT) is the server span's parent: one trace.
    rpc: dict[SpanKind, ReadableSpan] = {}
    for _ in range(200):
        rpc = {
            s.kind: s for s in EXPORTER.get_finished_spans() if s.name.endswith("Broker/Reserve")
        }
        if len(rpc) == 2:
            break
        time.sleep(0.01)
    server, client = rpc[SpanKind.SERVER], rpc[SpanKind.CLIENT]
    assert span.parent is not None and span.parent.span_id == server.context.span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert span.context.trace_id == client.context.trace_id
