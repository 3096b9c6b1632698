"""`agentcg bench node-restart` end to end: real broker and node agent processes, the agent
restarted under running tool calls. The bench counts what a restart would lose (output lines
missing or repeated, calls failed or run twice); here: that it measured every restart and that
nothing was lost, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_bench_node_restart_loses_nothing(
    tmp_path: Path, cgroup_write: Path, bcc_available: None, how: str
) -> None:
    out = tmp_path / "restart.json"
    argv = [sys.executable, "-m", "agentcg.clients.cli", "bench", "node-restart", "--how", how]
    run = subprocess.run(
        [*argv, "--restarts", "2", "--calls", "3", "--execs", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert (result["how"], result["restarts"], result["calls"]) == (how, 2, 3)
    assert result["lost_lines"] == result["repeated_lines"] == result["failed_calls"] == 0
    assert result["runs_per_call"] == 1
    assert (
        0 < result["agent_ready_s_max"] and 0 < result["resumed_s_p50"] <= result["resumed_s_max"]
    )
    assert 0 < result["exec_p50_ms"] <= result["exec_p99_ms"]
    assert run.stderr.count(f"({how}): agent ready") == 2
    # The node agent's last stop removed its cgroup root.
    assert [p.name for p in cgroup_write.iterdir() if p.name.startswith("agentcg-n")] == []
