"""`agentcg bench commit` commits real grants to a real database (SQLite and PostgreSQL), both
ways, and reports what it timed."""

from __future__ import annotations

import json
from pathlib import Path

from agentcg.clients.bench_commit import bench_commit

WAYS = ("back_to_back", "paced")
FIGURES = ("mean_ms", "p50_ms", "p99_ms", "p999_ms", "max_ms")


def test_bench_commit_times_durable_grants_both_ways(database_url: str, tmp_path: Path) -> None:
    sqlite = database_url.startswith("sqlite")
    out = tmp_path / "commit.json"
    result = bench_commit(
        commits=40,
        rate=400,
        rounds=2,
        database_url="" if sqlite else database_url,  # SQLite: its own file in data_dir
        data_dir=tmp_path,
        json_path=out,
    )
    assert json.loads(out.read_text()) == result
    assert result["database"] == ("sqlite" if sqlite else "postgresql")
    assert result["commits_per_way"] == 80
    # Every commit made, warm-up (50) included, is in the database.
    assert result["leases_in_database"] == 50 + 2 * 80
    for way in WAYS:
        values = [result[f"{way}_{k}"] for k in FIGURES]
        assert all(v > 0 for v in values), result
        assert result[f"{way}_p50_ms"] <= result[f"{way}_p99_ms"] <= result[f"{way}_max_ms"]
    assert result["paced_over_back_to_back_p50"] == round(
        result["paced_p50_ms"] / result["back_to_back_p50_ms"], 2
    )
    assert result["host_cpuidle"].startswith("cpuidle driver ")
    assert list(tmp_path.iterdir()) == [out]  # its temporary directory is gone
