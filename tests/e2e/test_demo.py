"""`agentcg demo` (what `make demo` runs) end to end: a real broker and node, real traces replayed
as real processes in real cgroups under the BPF monitor, and the report it prints and writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_the_demo_grows_the_generous_tenant_and_kills_only_the_tight_ones_calls(
    tmp_path: Path, cgroup_write: Path, bcc_available: None
) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "demo", "--tenants", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-tenant results" in proc.stdout
    assert "in-kernel limit event -> decision applied" in proc.stdout
    report = json.loads(out.read_text())
    tenants = report["tenants"]
    assert sorted(tenants) == ["tenant-0", "tenant-1"]
    for name, t in tenants.items():
        # Every admitted call ended one way or the other, and none held more than its quota.
        assert t["admitted"] >= 1, (name, t)
        assert t["admitted"] == t["completed"] + t["grown"] + t["killed"], (name, t)
        assert 0 < t["max_budget_bytes"] <= t["quota_bytes"], (name, t)
        assert 0 < t["peak_bytes"] <= t["quota_bytes"], (name, t)
    # tenant-0's quota is twice its trace's largest rise: its spikes are grown, never killed.
    generous = tenants["tenant-0"]
    assert generous["grown"] >= 1 and generous["killed"] == 0, generous
    assert generous["max_budget_bytes"] > 64 << 20  # above what every call declared
    # tenant-1 has 96 MiB for a trace that rises above it: the calls that do are killed, alone.
    tight = tenants["tenant-1"]
    assert tight["killed"] >= 1, tight
    assert tight["completed"] >= 1, tight
    reactions = [ms for t in tenants.values() for ms in t["reactions_ms"]]
    assert reactions and all(ms > 0 for ms in reactions), reactions
