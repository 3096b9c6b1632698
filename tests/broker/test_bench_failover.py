"""`agentcg bench failover` end to end: real broker processes on SQLite and PostgreSQL, two
takeovers. Checks that each took place and was measured (the bench itself fails when a new
leader has not loaded the old one's last write, or holds a grant its load never got), and that
no load call failed, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_bench_failover_measures_every_takeover(tmp_path: Path, database_url: str) -> None:
    out = tmp_path / "failover.json"
    # The bench wants a database of its own: on SQLite a file that does not exist yet.
    db = f"sqlite:///{tmp_path / 'bench.db'}" if database_url.startswith("sqlite") else database_url
    argv = [sys.executable, "-m", "agentcg.clients.cli", "bench", "failover", "--takeovers", "2"]
    run = subprocess.run(
        [*argv, "--db", db, "--json", str(out)], capture_output=True, text=True, timeout=280
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["database"] == database_url.split(":", 1)[0].split("+")[0]
    assert result["takeovers"] == 2
    assert len(result["serving_s"]) == len(result["client_s"]) == 2
    assert all(x > 0 for x in result["serving_s"] + result["client_s"])
    assert result["serving_max_s"] == max(result["serving_s"])
    assert result["first_start_s"] > 0
    # Calls in flight at the kills were sent again to the new leader: none failed.
    assert result["load_errors"] == 0, result.get("load_first_error")
    assert result["load_calls"] > 0 and isinstance(result["load_replayed"], int)
    assert result["load_max_call_s"] > 0
    assert "client_max_s" in run.stdout  # the table
