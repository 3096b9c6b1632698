"""`agentcg bench calls` end to end: real broker and node agent processes, tool calls through
the SDK's run. Here: that every call it timed completed and the figures hang together, never
how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_bench_calls_runs_every_call_and_reports_its_figures(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    out = tmp_path / "calls.json"
    run = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "bench", "calls", "--calls", "10"]
        + ["--concurrency", "3", "--seconds", "1", "--release-stops", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert (result["calls"], result["concurrency"], result["failed_calls"]) == (10, 3, 0)
    assert result["first_failure"] == ""
    assert 0 < result["direct_p50_ms"] <= result["direct_p99_ms"]
    assert 0 < result["reserve_p50_ms"] < result["run_p50_ms"] <= result["run_p99_ms"]
    assert result["added_p50_ms"] == pytest.approx(
        result["run_p50_ms"] - result["direct_p50_ms"], abs=0.002
    )
    assert result["calls_per_s"] > 0
    assert 0 < result["concurrent_p50_ms"] <= result["concurrent_p99_ms"]
    # Every call costs the node agent and the broker some CPU (read from /proc).
    assert result["node_cpu_ms_per_call"] > 0 and result["broker_cpu_ms_per_call"] > 0
    # Each followed call was killed for its released lease (else the bench fails), long
    # before its Exec deadline (60 s) or its lease's expiry (10 minutes).
    assert result["release_stops"] == 3
    assert 0 < result["release_stop_p50_ms"] <= result["release_stop_max_ms"] < 30_000
    assert "run_p50_ms" in run.stdout  # the table
    expedited = Path("/sys/kernel/rcu_expedited").read_text().strip()
    assert result["host_rcu"] == f"rcu_expedited is {expedited}"  # what the figures ran with
    # The node agent stopped with the cluster removed its cgroup root.
    assert [p.name for p in cgroup_write.iterdir() if p.name.startswith("agentcg-n")] == []
