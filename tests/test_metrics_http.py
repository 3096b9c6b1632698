"""The metrics endpoint set-up the composition roots use: HOST:PORT parsing, port 0, a registry
of the process's own, a clean stop, and the cycle collector's pauses."""

from __future__ import annotations

import gc
import socket
import time
import urllib.request

import pytest
from agentcg.telemetry import (
    GcPauseCollector,
    MetricsListenError,
    metrics_registry,
    parse_listen_address,
    serve_metrics,
)
from prometheus_client import REGISTRY, CollectorRegistry, Counter


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


def test_gc_pauses_are_served_by_generation_from_one_hook_per_process() -> None:
    registry = metrics_registry()
    hooks = len(gc.callbacks)
    metrics_registry()  # a second registry shares the process's hook
    assert len(gc.callbacks) == hooks
    count = "agentcg_gc_pause_seconds_count"
    before = registry.get_sample_value(count, {"generation": "2"})
    assert before is not None
    gc.collect()  # a full collection: generation 2
    after = registry.get_sample_value(count, {"generation": "2"})
    assert after is not None and after >= before + 1
    inf = registry.get_sample_value(
        "agentcg_gc_pause_seconds_bucket", {"generation": "2", "le": "+Inf"}
    )
    assert inf == after
    assert registry.get_sample_value("agentcg_gc_pause_seconds_sum", {"generation": "2"}) > 0


def test_a_gc_pause_lands_in_the_bucket_of_its_duration() -> None:
    pauses = GcPauseCollector()  # not hooked: driven by hand
    registry = CollectorRegistry()
    registry.register(pauses)
    pauses.on_gc("start", {"generation": 1})
    time.sleep(0.003)
    pauses.on_gc("stop", {"generation": 1, "collected": 0, "uncollectable": 0})

    def bucket(le: str) -> float | None:
        return registry.get_sample_value(
            "agentcg_gc_pause_seconds_bucket", {"generation": "1", "le": le}
        )

    assert bucket("0.002") == 0  # slept 3 ms: not within 2 ms
    assert bucket("+Inf") == 1
    assert registry.get_sample_value("agentcg_gc_pause_seconds_sum", {"generation": "1"}) >= 0.003
    assert registry.get_sample_value("agentcg_gc_pause_seconds_count", {"generation": "0"}) == 0
