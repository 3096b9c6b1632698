"""The metrics endpoint set-up the composition roots use: HOST:PORT parsing, port 0, a registry
of the process's own, and a clean stop."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from agentcg.telemetry import (
    MetricsListenError,
    metrics_registry,
    parse_listen_address,
    serve_metrics,
)
from prometheus_client import REGISTRY, Counter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_listen_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "9464", ":9464", "host:", "host:x", "host:65536", "[]:1"])
def test_malformed_listen_addresses_are_refused(text: str) -> None:
    with pytest.raises(MetricsListenError, match="HOST:PORT"):
        parse_listen_address(text)


def test_port_zero_serves_the_registry_on_a_free_port_until_closed() -> None:
    registry = metrics_registry()
    Counter("agentcg_test_things", "things", registry=registry).inc(3)
    server = serve_metrics("127.0.0.1:0", registry)
    host, port = parse_listen_address(server.address)
    try:
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert "agentcg_test_things_total 3.0" in text
        assert "process_cpu_seconds_total" in text
        assert "agentcg_test_things_created" not in text  # *_created series are off
    finally:
        server.close()
    # Not the global registry: nothing registered there.
    assert REGISTRY.get_sample_value("agentcg_test_things_total") is None
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_busy_port_is_a_metrics_listen_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_metrics(f"127.0.0.1:{port}", metrics_registry())
