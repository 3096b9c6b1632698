"""The broker process traces its RPCs when spans are exported (it leaves the per-RPC tracing
interceptor out when nothing is): a real broker process (console exporter on its stdout, which
LocalCluster writes to its log), a real (denied) Reserve."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.errors import QuotaExceededError

MiB = 1 << 20
SPAN = '"name": "/agentcg.v1.Broker/Reserve"'


def _reserve_and_read_log(tmp_path: Path) -> str:
    cluster = LocalCluster(tmp_path, nodes=0, log_level="INFO")
    with cluster:
        with Client(cluster.broker_address) as c:
            c.set_tenant("t", 64 * MiB)
            # No node is connected: denied, a Reserve RPC all the same.
            with pytest.raises(QuotaExceededError, match="no connected node"):
                c.reserve("t", MiB, session="s", command_class="pytest")
    # Stopped: the batch span processor has flushed at shutdown.
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = (tmp_path / "broker.log").read_text()
        if "broker stopping" in text:
            break
        time.sleep(0.1)
    return text


def test_rpc_spans_when_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTCG_TRACE_CONSOLE", "1")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    assert SPAN in _reserve_and_read_log(tmp_path)
