"""The native load generator (clients/loadgen, `make loadgen`) against a real broker process on
loopback with a simulated node: every mode sends what it says (counts, no errors) and leaves no
lease behind; bad flags exit 2 with a message. Never how fast."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode

TENANT = "bench"  # what the generator asks for (bench_admission.TENANT)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("loadgen-broker")
    with LocalCluster(workdir, nodes=0, log_level="WARNING") as c:
        with Client(c.broker_address) as client:
            client.set_tenant(TENANT, 1 << 50)
        with SimNode(c.broker_address, memory_bytes=1 << 50):
            yield c.broker_address


def run(loadgen: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(loadgen), *args], capture_output=True, text=True, timeout=120)


def run_ok(loadgen: Path, broker: str, *args: str) -> dict[str, Any]:
    proc = run(loadgen, "--address", broker, *args)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def active_leases(broker: str) -> int:
    with Client(broker) as client:
        return len(client.list_leases(tenant=TENANT))


@pytest.mark.parametrize(("kind", "live"), [("reserve", 10), ("reserve", 0), ("ping", 100)])
def test_rate_sends_every_scheduled_request(
    loadgen: Path, broker: str, kind: str, live: int
) -> None:
    # 200/s for 0.5 s of warm-up and 1 s measured: 300 sent, the last 200 measured.
    # fmt: off
    result = run_ok(
        loadgen, broker, "--mode", "rate", "--kind", kind, "--rate", "200",
        "--warmup", "0.5", "--seconds", "1", "--live", str(live),
        "--start-at", str(time.time() + 0.2),
    )
    # fmt: on
    assert set(result) == {"latencies_ms", "late_ms", "errors"}
    assert result["errors"] == 0
    assert len(result["latencies_ms"]) == len(result["late_ms"]) == 200
    assert all(x > 0 for x in result["latencies_ms"])
    assert all(x >= 0 for x in result["late_ms"])  # never sent before its scheduled time
    assert active_leases(broker) == 0  # the releaser and the final ReleaseBatch freed them all


@pytest.mark.parametrize("kind", ["noop", "reserve_release", "batch"])
def test_closed_loop_counts_whole_operations(loadgen: Path, broker: str, kind: str) -> None:
    # fmt: off
    result = run_ok(
        loadgen, broker, "--mode", "closed", "--kind", kind, "--concurrency", "3",
        "--warmup", "0.2", "--seconds", "0.6",
    )
    # fmt: on
    assert result == {
        "ops": result["ops"],
        "seconds": 0.6,
        "counts": {"noop": 0, "reserve_release": 0},
    }
    assert result["ops"] > 0
    per_op = {"noop": 1, "reserve_release": 2, "batch": 1000}[kind]  # 500 granted + 500 released
    assert result["ops"] % per_op == 0
    assert active_leases(broker) == 0


def test_closed_loop_mixed_counts_each_kind(loadgen: Path, broker: str) -> None:
    # Two 0.5 s slices after the warm-up: the first noop, the second reserve_release.
    # fmt: off
    result = run_ok(
        loadgen, broker, "--mode", "closed", "--kind", "mixed", "--concurrency", "2",
        "--warmup", "0.3", "--seconds", "1", "--start-at", str(time.time() + 0.2),
    )
    # fmt: on
    assert result["ops"] == 0 and result["seconds"] == 1
    assert result["counts"]["noop"] > 0
    assert result["counts"]["reserve_release"] > 0
    assert result["counts"]["reserve_release"] % 2 == 0
    assert active_leases(broker) == 0


# fmt: off
BAD = [
    (["--mode", "rate", "--rate", "10"], "--address is required"),
    (["--address", "x:1", "--mode", "open", "--rate", "10"], "--mode must be rate or closed"),
    (["--address", "x:1", "--mode", "rate", "--rate", "fast"], "--rate wants a number, got 'fast'"),
    (["--address", "x:1", "--mode", "rate"], "--rate is required with --mode rate"),
    (["--address", "x:1", "--mode", "rate", "--rate", "0"], "--rate must be > 0"),
    (["--address", "x:1", "--mode", "rate", "--rate", "10", "--kind", "noop"],
     "--kind for rate: ping or reserve"),
    (["--address", "x:1", "--mode", "rate", "--rate", "10", "--concurrency", "2"],
     "--concurrency applies to --mode closed only"),
    (["--address", "x:1", "--mode", "closed", "--kind", "noop"],
     "--concurrency is required with --mode closed"),
    (["--address", "x:1", "--mode", "closed", "--kind", "noop", "--concurrency", "0"],
     "--concurrency must be >= 1"),
    (["--address", "x:1", "--mode", "closed", "--kind", "noop", "--concurrency", "1",
      "--seconds", "-1"], "--seconds must be > 0"),
    (["--address", "x:1", "--mode", "rate", "--rate", "10", "--burst", "3"],
     "unknown flag --burst"),
    (["--address", "x:1", "--mode", "rate", "--rate", "10", "extra"],
     "unexpected argument 'extra'"),
    (["--address", "x:1", "--mode", "rate", "--rate"], "--rate wants a value"),
]
# fmt: on


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_flags_exit_2_with_a_message(loadgen: Path, argv: list[str], message: str) -> None:
    proc = run(loadgen, *argv)
    assert proc.returncode == 2
    assert f"loadgen: {message}\n" in proc.stderr
    assert "usage: loadgen" in proc.stderr
    assert proc.stdout == ""
