"""`agentcg bench admission` end to end, shrunk: a real broker process, real load generator
processes (the native one; once the Python one) and simulated node streams. Checks that every
phase ran and reported what it says (keys, counts, consistency), never how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agentcg.broker.main import GRPC_EXPERIMENTS
from sqlalchemy import create_engine, text

from ..conftest import kernel_missing

POSTGRES_URL = os.environ.get("AGENTCG_TEST_POSTGRES_URL", "")

KEYS = {
    "noop_rps",
    "reserve_release_rps",
    "ratio",
    "noop_p99_ms_at_rate",
    "p50_ms",
    "p99_ms",
    "client_send_late_p99_ms",
    "p99_ms_from_send",
    "p99_over_noop_p99",
    "stream_decisions_per_s",
    "p99_ms_10k_leases",
    "p99_ratio_10k_leases",
    "broker_rss_mb",
    "p99_ms_many_nodes",
    "p99_ratio_many_nodes",
    "p99_ms_queued",
    "p99_ratio_queued",
}


def bench_schemas() -> set[str]:
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'agentcg_bench_%'")
            )
            return {r[0] for r in rows}
    finally:
        engine.dispose()


def bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # fmt: off
    argv = [
        sys.executable, "-m", "agentcg.clients.cli", "bench", "admission",
        "--seconds", "0.5", "--processes", "1", "--concurrency", "2", "--rate", "100",
        "--leases", "300", "--rounds", "2", "--node-streams", "3", "--queued", "5",
        "--json", str(out), *args,
    ]
    # fmt: on
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def check_every_phase(proc: subprocess.CompletedProcess[str], result: dict[str, Any]) -> None:
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert KEYS <= result.keys()
    assert result["rate_errors"] == 0
    assert result["rate_rounds"] == 2
    assert result["live_leases"] == 300 and result["node_streams"] == 3
    for key in ("noop_rps", "reserve_release_rps", "stream_decisions_per_s", "broker_rss_mb"):
        assert result[key] > 0, key
    # ratio is computed before rps are rounded to integers
    assert abs(result["ratio"] - result["reserve_release_rps"] / result["noop_rps"]) < 0.01
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    # Each request's latency from its send is its latency less its lateness (>= 0).
    assert 0 < result["p99_ms_from_send"] <= result["p99_ms"]
    # The hypervisor's share of the CPUs over the run and the ~100-lease rounds (/proc/stat
    # is readable here, with a steal field: never null on this kind of machine).
    for key in ("host_steal_share", "host_steal_share_at_rate"):
        assert 0 <= result[key] <= 1, key
    # The share of Reserves (and of no-ops) within the 2 ms goal, from the same rounds.
    for key in ("within_2ms_at_rate", "noop_within_2ms_at_rate"):
        assert 0 <= result[key] <= 1, key
    assert result["p99_ratio_10k_leases"] == round(
        result["p99_ms_10k_leases"] / result["p99_ms"], 3
    )
    assert result["rate_errors_many_nodes"] == 0
    assert result["queued_waiters"] == 5 and result["rate_errors_queued"] == 0
    assert 0 < result["p50_ms_queued"] <= result["p99_ms_queued"]
    assert result["p99_ratio_queued"] == round(result["p99_ms_queued"] / result["p99_ms"], 3)
    assert 0 < result["p50_ms_many_nodes"] <= result["p99_ms_many_nodes"]
    assert result["p99_ratio_many_nodes"] == round(
        result["p99_ms_many_nodes"] / result["p99_ms"], 3
    )
    # The broker's full cycle collections in those rounds (its GC pause histogram).
    for key in ("10k_leases", "many_nodes", "queued"):
        collections = result[f"gc_full_collections_{key}"]
        assert collections >= 0 and collections == int(collections), key
        assert result[f"gc_full_pause_ms_{key}"] >= 0, key
    # The broker's own view of the same phases (its metrics endpoint).
    for key in ("at_rate", "10k_leases"):
        assert 0 < result[f"broker_reserve_mean_ms_{key}"], key
        assert 0 <= result[f"broker_reserve_within_2ms_{key}"] <= 1, key
        # Estimated from the same histogram's buckets: under the last finite bound (30 s).
        assert 0 < result[f"broker_reserve_p99_ms_{key}"] <= 30_000, key
        assert 0 < result[f"commit_mean_ms_{key}"], key
        assert result[f"decisions_per_commit_{key}"] >= 1, key
    # The closed-loop phase's commits (2 in flight: rarely saturated, so seldom held).
    assert result["decisions_per_commit_saturated"] >= 1
    assert 0 <= result["commits_held_share_saturated"] <= 1
    # The printed table carries the same figures.
    assert "p99_ratio_10k_leases" in proc.stdout


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_bench_admission_runs_every_phase(tmp_path: Path, database: str, loadgen: Path) -> None:
    out = tmp_path / "admission.json"
    db: list[str] = []
    if database == "postgresql":
        if not POSTGRES_URL:
            kernel_missing("PostgreSQL: AGENTCG_TEST_POSTGRES_URL not set")
        db = ["--db", POSTGRES_URL]
        schemas_before = bench_schemas()
    # The default: the native generator, built (the loadgen fixture fails in CI if not). On
    # SQLite the broker pinned (a CPU for it, one for its writer, where there are two).
    pin = ["--broker-pin-cpus", "auto"] if database == "sqlite" else []
    proc = bench(out, *db, *pin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    check_every_phase(proc, result)
    assert result["load_generator"] == "native"
    assert result["database"] == database
    assert result["broker_pin_cpus"] == ("auto" if pin else "off")
    assert result["broker_grpc_experiments"] == os.environ.get("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    if database == "postgresql":
        # It ran in a schema of its own, dropped afterwards.
        assert bench_schemas() == schemas_before


def test_bench_admission_refuses_a_pinning_the_broker_would_refuse() -> None:
    argv = [sys.executable, "-m", "agentcg.clients.cli", "bench", "admission"]
    proc = subprocess.run(
        [*argv, "--broker-pin-cpus", "1,1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "--broker-pin-cpus" in proc.stderr and "the two CPUs must differ" in proc.stderr


@pytest.mark.parametrize("bench", ["admission", "failover"])
def test_a_bench_refuses_an_existing_sqlite_file(tmp_path: Path, bench: str) -> None:
    """Each bench wants a database of its own: it never writes into one that exists."""
    used = tmp_path / "broker.db"
    used.write_bytes(b"")
    argv = [sys.executable, "-m", "agentcg.clients.cli", "bench", bench]
    proc = subprocess.run(
        [*argv, "--db", f"sqlite:///{used}"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "exists; the bench needs a new database" in proc.stderr
    assert used.read_bytes() == b""


def test_bench_admission_with_the_python_load_generator(tmp_path: Path) -> None:
    out = tmp_path / "admission.json"
    proc = bench(out, "--load-generator", "python")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    check_every_phase(proc, result)
    assert result["load_generator"] == "python"


def test_bench_admission_native_generator_asked_for_but_missing(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "agentcg.clients.cli", "bench", "admission"]
    env = {**os.environ, "AGENTCG_LOADGEN": str(tmp_path / "no-such-loadgen")}
    for choice in ("native", ""):  # an explicit path that is not there is never passed over
        extra = ["--load-generator", choice] if choice else []
        proc = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2
        assert "no-such-loadgen: not an executable file" in proc.stderr
    proc = subprocess.run(
        [*argv, "--load-generator", "rust"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "must be native or python" in proc.stderr
