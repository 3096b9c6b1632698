"""`agentcg bench ...`: benchmarks that print numbers (and write them with --json).

reaction: from the in-kernel limit event of a real spike (the first memcg reclaim of a call at
its budget, timestamped in BPF with CLOCK_MONOTONIC) to the broker's decision applied on the
node (the cgroup limit raised, or the call killed), through a real broker and node on loopback.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .cluster import LocalCluster
from .sdk import AsyncClient

__all__ = ["bench_reaction", "percentile"]

MiB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


async def _spikes(broker: str, n: int, spike_mb: int, concurrency: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"grow": [], "kill": [], "wall": []}
    argv = [sys.executable, "-m", "agentcg.clients.worker", "--curve", f"0:{spike_mb},0.2:0"]
    async with AsyncClient(broker) as client:
        await client.set_tenant("bench-rich", 64 * 1024 * MiB)
        await client.set_tenant("bench-poor", 96 * MiB * concurrency)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            tenant = "bench-rich" if i % 4 else "bench-poor"
            async with sem:
                t0 = time.monotonic()
                r = await client.run(tenant, 64 * MiB, argv, session=f"b{i % concurrency}")
                out["wall"].append((time.monotonic() - t0) * 1000)
                for action, ns in zip(
                    [a for a in r.actions if a != "pause"], r.reactions_ns, strict=False
                ):
                    out[action].append(ns / 1e6)

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


def bench_reaction(
    *, calls: int, spike_mb: int, concurrency: int, json_path: Path | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-") as tmp:
        with LocalCluster(Path(tmp), nodes=1, node_memory="8G", log_level="WARNING") as cluster:
            samples = asyncio.run(_spikes(cluster.broker_address, calls, spike_mb, concurrency))
    result: dict[str, Any] = {"calls": calls, "spike_mb": spike_mb, "concurrency": concurrency}
    for kind in ("grow", "kill"):
        v = samples[kind]
        result[f"{kind}_actions"] = len(v)
        if v:
            result[f"decision_{kind}_p50_ms"] = round(statistics.median(v), 3)
            result[f"decision_{kind}_p99_ms"] = round(percentile(v, 99), 3)
            result[f"decision_{kind}_max_ms"] = round(max(v), 3)
    both = samples["grow"] + samples["kill"]
    if both:
        result["decision_applied_p50_ms"] = round(statistics.median(both), 3)
        result["decision_applied_p99_ms"] = round(percentile(both, 99), 3)
    result["call_wall_p50_ms"] = round(statistics.median(samples["wall"]), 1)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
