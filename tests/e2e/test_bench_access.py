"""`agentcg bench access` end to end: a broker per mode (open, behind the gate, behind mutual
TLS too). The bench fails by itself when a gated broker answers a call without a token, or a
TLS one a plaintext call; here: that every mode was measured, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MODES = ("open", "gate", "tls")


@pytest.mark.timeout(300)
def test_bench_access_measures_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "access.json"
    argv = [sys.executable, "-m", "agentcg.clients.cli", "bench", "access", "--rounds", "1"]
    run = subprocess.run(
        [*argv, "--seconds", "1", "--json", str(out)], capture_output=True, text=True, timeout=280
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    for mode in MODES:
        assert result[f"{mode}_pairs_per_s"] > 0
        assert result[f"{mode}_cpu_us_per_pair"] > 0
        assert len(result[f"{mode}_cpu_us_per_pair_all"]) == 1
    assert result["gate_cpu_ratio"] > 0 and result["tls_rate_ratio"] > 0
    assert "tls_cpu_ratio" in run.stdout  # the table
