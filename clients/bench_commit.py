"""`agentcg bench commit`: what one durable grant costs the broker's database, here.

Each commit is what a granted Reserve makes durable before its reply: the lease and its audit
entry in one transaction (``Store.apply``, the call the broker's writer makes; SQLite in WAL
with ``synchronous=FULL``, or the PostgreSQL given with ``--db``). Two ways, one after the
other, ``rounds`` times alternately:

- ``back_to_back``: the next commit starts as soon as one returns (a saturated broker);
- ``paced``: one commit each 1/``rate`` s (``rate`` 1,000: ``bench admission``'s fixed-rate
  phase), the writer idle in between.

On a virtual machine whose idle vCPU halts (no guest halt polling: ``host_cpuidle``), an fsync
that waits on an idle CPU takes the host's wake-up on top: a paced commit can take several
times a back-to-back one. That floor is under every Reserve's latency at a fixed rate;
``paced_over_back_to_back_p50`` says how much of it this machine adds.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cpuidle import idle_settings
from .bench import percentile
from .bench_admission import fresh_database

__all__ = ["bench_commit"]

MiB = 1 << 20


def _figures(latencies_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies_s]
    return {
        "mean_ms": round(sum(ms) / len(ms), 3),
        "p50_ms": round(percentile(ms, 50), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "p999_ms": round(percentile(ms, 99.9), 3),
        "max_ms": round(max(ms), 3),
    }


def bench_commit(
    *,
    commits: int = 2000,
    rate: float = 1000.0,
    rounds: int = 2,
    database_url: str = "",
    data_dir: Path | None = None,
    json_path: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time ``commits`` grants per way and round (see the module doc); return (and write) the
    figures. ``data_dir``: where the SQLite file goes (default a new temporary directory)."""
    from agentcg.broker.model import (
        Audit,
        AuditEntry,
        Lease,
        LeaseId,
        LeaseState,
        NodeId,
        PutTenant,
        SessionName,
        Tenant,
        TenantName,
    )
    from agentcg.broker.model import PutLease as Put
    from agentcg.broker.store import Store

    if commits < 1 or rounds < 1 or rate <= 0:
        raise ValueError("commits and rounds must be >= 1 and rate > 0")
    tenant = TenantName("bench")
    made = 0

    def grant() -> list[Any]:
        nonlocal made
        made += 1
        now_ms = int(time.time() * 1000)
        lease_id = LeaseId(f"bench{made:027d}")
        lease = Lease(
            lease_id=lease_id,
            tenant=tenant,
            session=SessionName(f"s{made % 64}"),
            command_class="bench",
            node_id=NodeId("n"),
            memory_bytes=MiB,
            intent_memory_bytes=MiB,
            granted_at_ms=now_ms,
            expires_at_ms=now_ms + 60_000,
            state=LeaseState.ACTIVE,
            epoch=1,
        )
        detail = json.dumps({"memory_bytes": MiB, "session": lease.session})
        return [Put(lease), Audit(AuditEntry(now_ms, "reserve", tenant, lease_id, "n", detail))]

    with tempfile.TemporaryDirectory(prefix="agentcg-bench-commit-", dir=data_dir) as tmp:
        with fresh_database(database_url) as url:
            store = Store(url or Store.default_url(Path(tmp)))
            try:
                store.migrate()
                store.open_writer()
                store.apply([PutTenant(Tenant(tenant, 1 << 50))])
                for _ in range(50):  # warm: connection, statements, the file's first pages
                    store.apply(grant())
                ways: dict[str, list[float]] = {"back_to_back": [], "paced": []}
                for r in range(rounds):
                    for way, lat in ways.items():
                        if log is not None:
                            log(f"round {r + 1}/{rounds}: {commits} commits {way} ...")
                        interval_s = 0.0 if way == "back_to_back" else 1.0 / rate
                        next_at = time.perf_counter()
                        for _ in range(commits):
                            if interval_s:
                                next_at += interval_s
                                time.sleep(max(0.0, next_at - time.perf_counter()))
                            changes = grant()
                            started = time.perf_counter()
                            store.apply(changes)
                            lat.append(time.perf_counter() - started)
                held = len(store.load().active_leases)
            finally:
                store.close()
    result: dict[str, Any] = {
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "commits_per_way": commits * rounds,
        "rate_per_s": rate,
        "leases_in_database": held,
        "host_cpuidle": idle_settings().text,  # how an idle vCPU wakes (agentcg.cpuidle)
    }
    for way, lat in ways.items():
        result.update({f"{way}_{k}": v for k, v in _figures(lat).items()})
    fast = result["back_to_back_p50_ms"]
    result["paced_over_back_to_back_p50"] = (
        round(result["paced_p50_ms"] / fast, 2) if fast else None
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
