"""`agentcg bench reaction` end to end, shrunk: real cgroups, the real monitor, real spiking
allocators, and a real broker and node for the decision path. Checks that every mode ran and
reported what it says (keys, counts, consistency, cgroups gone), never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRIALS = 3
CALLS = 4

KEYS = {
    "ebpf_p50_ms",
    "ebpf_p99_ms",
    "poll_p50_ms",
    "poll_p99_ms",
    "speedup_p99",
    "pause_p50_ms",
    "pause_p99_ms",
    "broker_p99_ms",
    "overshoot_p99_bytes",
    "cgroup_lifecycle_p50_ms",
    "bpf_overhead_pct",
    "spike_rate_gbps",
}


@pytest.mark.usefixtures("bcc_available")
def test_bench_reaction_runs_every_mode(tmp_path: Path, cgroup_write: Path) -> None:
    out = tmp_path / "reaction.json"
    # fmt: off
    argv = [
        sys.executable, "-m", "agentcg.clients.cli", "bench", "reaction",
        "--trials", str(TRIALS), "--kernel-spike-mb", "256", "--lifecycle", "5",
        "--overhead-rounds", "1", "--overhead-seconds", "0.3",
        "--calls", str(CALLS), "--spike", "100", "--concurrency", "2", "--json", str(out),
    ]
    # fmt: on
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(out.read_text())
    assert KEYS <= result.keys()

    # Every trial of every mode timed its action: none timed out or was lost.
    for mode in ("ebpf", "ebpf_freeze", "poll", "pause"):
        assert result[f"{mode}_samples"] == TRIALS, mode
    assert result["ebpf_late_arms"] == 0
    assert 0 < result["ebpf_p50_ms"] <= result["ebpf_p99_ms"]
    assert 0 < result["pause_p50_ms"] <= result["pause_p99_ms"]
    # The freeze of the whole call follows the allocator's in-kernel stop.
    assert result["ebpf_freeze_p50_ms"] >= result["ebpf_p50_ms"]
    # The pause is the kernel's hard limit: never above the budget. The in-kernel stop lets at
    # most the charges in flight through (per-CPU batches), far less than the spike.
    assert result["pause_overshoot_p99_bytes"] == 0
    assert result["ebpf_overshoot_p99_bytes"] < 8 << 20
    assert result["speedup_p99"] == round(result["poll_p99_ms"] / result["ebpf_p99_ms"], 1)
    assert result["spike_rate_gbps"] > 0

    # The decision path through a real broker: every call spiked past its 64 MiB budget and
    # got a decision (grown, or killed when its tenant had no room).
    assert result["calls"] == CALLS
    assert result["grow_actions"] + result["kill_actions"] >= CALLS
    assert 0 < result["broker_p50_ms"] <= result["broker_p99_ms"]
    assert "ebpf_p99_ms" in stdout

    # The bench's cgroups (created under the cgroups it inherited from this process) are gone
    # from every hierarchy.
    left = [p for base in own_cgroups() for p in base.glob(f"agentcg-bench-{proc.pid}*")]
    assert cgroup_write in own_cgroups()
    assert not left, left


def own_cgroups() -> list[Path]:
    """This process's cgroup directory in each mounted v1 hierarchy."""
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(","):
            d = Path("/sys/fs/cgroup") / name / path.lstrip("/")
            if name and d.is_dir():
                dirs.append(d)
    return dirs
