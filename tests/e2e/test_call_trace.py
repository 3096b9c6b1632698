"""One tool call, one trace, end to end: `agentcg run` (continuing a caller's TRACEPARENT), the
broker's admission, the node's Exec, the node's pause at the budget, the broker's growth
decision, the node's grow, and the tool itself (TRACEPARENT in its environment); and a call
attached by a traced caller that a restarted node re-adopts stays in that trace. Real
processes (CLI, broker, node) export their spans over OTLP/gRPC to a real receiver in this
test; real cgroups and BPF, a real spike over the budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.v1 import node_pb2, node_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

MiB = 1 << 20
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
# Spans by "service:name".
RUN = "agentcg-cli:agentcg.run"
ADMISSION = "agentcg-broker:agentcg.admission"
EXEC = "agentcg-node:/agentcg.v1.NodeAgent/Exec"
ATTACH = "agentcg-node:/agentcg.v1.NodeAgent/Attach"
PAUSE = "agentcg-node:agentcg.enforce.pause"
GROWTH = "agentcg-broker:agentcg.growth"
GROW = "agentcg-node:agentcg.enforce.grow"
# Prints the TRACEPARENT it was given, then holds ~80 MB for 0.3 s under a 32 MiB budget.
TOOL = (
    "import os, sys; print('tool traceparent', os.environ.get('TRACEPARENT', '-'), flush=True); "
    "from agentcg.clients.worker import main; sys.argv[1:] = ['--curve', '0:80,0.3:0']; main()"
)


@dataclass(frozen=True)
class Span:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        got = []
        for rs in request.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            s.name,
                            service,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                        )
                    )
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, key: str) -> list[Span]:
        """The spans ``service:name`` names."""
        with self.lock:
            return [s for s in self.spans if f"{s.service}:{s.name}" == key]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, f"http://127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def collector(receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch) -> Receiver:
    """The receiver, with the processes started from here on exporting their spans to it."""
    collector, endpoint = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.delenv("AGENTCG_TRACE_CONSOLE", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    return collector


def _wait_for(receiver: Receiver, keys: list[str], timeout_s: float = 30) -> dict[str, Span]:
    """The first span of each ``service:name`` in ``keys``, once all were exported."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {k: receiver.named(k) for k in keys}
        if all(found.values()):
            return {n: spans[0] for n, spans in found.items()}
        time.sleep(0.1)
    missing = [k for k in keys if not receiver.named(k)]
    seen = sorted({f"{s.service}:{s.name}" for s in receiver.spans})
    raise AssertionError(f"spans never exported: {missing}; seen: {seen}")


def _agentcg_run(
    cluster: LocalCluster, tenant: str, tool: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``agentcg run`` of ``python -c tool`` under a 32 MiB budget."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agentcg.clients.cli",
            "run",
            "--broker",
            cluster.broker_address,
            "--tenant",
            tenant,
            "--memory",
            "32M",
            "--class",
            "spike",
            "--",
            sys.executable,
            "-c",
            tool,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_one_tool_call_is_one_trace(
    tmp_path: Path, collector: Receiver, cgroup_write: Path, bcc_available: None
) -> None:
    with LocalCluster(tmp_path, node_memory="1G") as cluster:
        with Client(cluster.broker_address) as c:
            c.set_tenant("traced", 512 * MiB)
        env = {**os.environ, "TRACEPARENT": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        proc = _agentcg_run(cluster, "traced", TOOL, env)
        assert proc.returncode == 0, proc.stderr
        spans = _wait_for(
            collector,
            [RUN, ADMISSION, EXEC, PAUSE, GROWTH, GROW],
        )
    run = spans[RUN]
    # The CLI continued its caller's trace (TRACEPARENT).
    assert (run.trace_id, run.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    by_id = {s.span_id: s for s in collector.spans}

    def ancestors(span: Span) -> list[str]:
        names = []
        while span.parent_id in by_id:
            span = by_id[span.parent_id]
            names.append(f"{span.service}:{span.name}")
        return names

    for span in spans.values():
        assert span.trace_id == CALLER_TRACE, span
    assert ancestors(spans[ADMISSION]) == [
        "agentcg-broker:/agentcg.v1.Broker/Reserve",
        "agentcg-cli:/agentcg.v1.Broker/Reserve",
        "agentcg-cli:agentcg.run",
    ]
    # node pauses -> broker decides (its span under the pause) -> node grows (under the decision)
    exec_span, pause, growth = spans[EXEC], spans[PAUSE], spans[GROWTH]
    assert pause.parent_id == exec_span.span_id
    assert growth.parent_id == pause.span_id
    assert spans[GROW].parent_id == growth.span_id
    assert ancestors(spans[GROW]) == [
        "agentcg-broker:agentcg.growth",
        "agentcg-node:agentcg.enforce.pause",
        "agentcg-node:/agentcg.v1.NodeAgent/Exec",
        "agentcg-cli:/agentcg.v1.NodeAgent/Exec",
        "agentcg-cli:agentcg.run",
    ]
    # The tool was given the trace too: its parent is the node's Exec span.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("tool traceparent"))
    assert line.split()[-1] == f"00-{CALLER_TRACE}-{exec_span.span_id}-01"


def test_a_call_re_adopted_after_a_node_restart_stays_in_its_trace(
    tmp_path: Path, collector: Receiver, cgroup_write: Path, bcc_available: None
) -> None:
    """A traced caller attaches its own process; the node agent is SIGKILLed and started
    again; the process then spikes: the new agent's pause, the broker's growth and the grow
    are in the caller's trace, under the Attach (kept with the call's cgroup)."""
    go = tmp_path / "go"
    code = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "b = b'x' * (80 << 20)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with LocalCluster(tmp_path / "cluster", node_memory="1G") as cluster:
            with Client(cluster.broker_address) as c:
                c.set_tenant("traced", 512 * MiB)
                lease = c.reserve("traced", 32 * MiB, session="s1")
            # The caller's trace context, as the SDK's interceptor sends it from a traced caller.
            with grpc.insecure_channel(lease.node_address) as channel:
                node_pb2_grpc.NodeAgentStub(channel).Attach(
                    node_pb2.AttachRequest(lease_id=lease.lease_id, pid=proc.pid),
                    metadata=[("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")],
                    timeout=30,
                )
            attach = _wait_for(collector, [ATTACH])[ATTACH]
            cluster.stop("node0", sig=signal.SIGKILL)
            cluster.start_node(0)
            assert "re-adopted 1 running call" in cluster.log("node0")
            go.touch()
            assert proc.wait(timeout=60) == 0
            spans = _wait_for(collector, [PAUSE, GROWTH, GROW])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (attach.trace_id, attach.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    pause, growth, grow = spans[PAUSE], spans[GROWTH], spans[GROW]
    assert all(s.trace_id == CALLER_TRACE for s in (pause, growth, grow))
    assert pause.parent_id == attach.span_id  # by the agent that re-adopted the call
    assert growth.parent_id == pause.span_id
    assert grow.parent_id == growth.span_id


def test_an_untraced_call_passes_no_trace_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroup_write: Path, bcc_available: None
) -> None:
    """Nothing exports spans: the tool gets no TRACEPARENT (an unsampled one would make a
    traced tool drop its own spans)."""
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "AGENTCG_TRACE_CONSOLE", "TRACEPARENT"):
        monkeypatch.delenv(var, raising=False)
    with LocalCluster(tmp_path, node_memory="1G") as cluster:
        with Client(cluster.broker_address) as c:
            c.set_tenant("plain", 512 * MiB)
        proc = _agentcg_run(cluster, "plain", TOOL, dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "tool traceparent -\n" in proc.stdout
