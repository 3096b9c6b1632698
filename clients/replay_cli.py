"""The ``agentcg bench replay`` command: options checked, runs made, one table, JSON, plot."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path
from typing import Any

from agentcg.quantity import format_bytes
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .replay import (
    POLICIES,
    SESSION_MAX_CHOICES,
    SESSION_OVERCOMMIT_RATIO,
    ReplayOptions,
    prepare,
    run_replay,
    write_plot,
)
from .replay import find_min_pool as bisect_min_pool

__all__ = ["MAX_POOL_BYTES", "bench_replay"]

MAX_POOL_BYTES = 8 << 30  # these machines: 24 GiB, shared; use --mem-scale for bigger traces

_COLUMNS = (
    "policy",
    "oom_kills",
    "agents_completed",
    "agents",
    "inflation_p50",
    "inflation_p95",
    "delay_p95_s",
    "start_wait_p95_s",
    "inflation_with_start_wait_p95",
    "pool_utilisation_mean",
    "pool_utilisation_p95",
    "denied",
    "grown",
    "paused",
    "killed",
)


def _table(results: list[dict[str, Any]], title: str) -> Table:
    table = Table(*_COLUMNS, title=title)
    for r in results:
        table.add_row(*("-" if r.get(c) is None else str(r.get(c)) for c in _COLUMNS))
    return table


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: the cleanup itself is not interrupted again
    raise SystemExit(128 + signum)


def _backend(url: str) -> str:
    """The database kind a SQLAlchemy URL names ("" if it is not one)."""
    try:
        return make_url(url).get_backend_name()
    except ArgumentError:
        return ""


def bench_replay(
    console: Console,
    *,
    traces: Path,
    agents: int,
    pool_fraction: float | None,
    pool_of_oracle: float | None,
    speed: float,
    policy: str,
    seed: int,
    mem_scale: float,
    find_min_pool: bool,
    session_overcommit: float | None,
    session_max: str,
    session_percentile: int,
    broker_db: str,
    deadline_s: float,
    json_path: Path | None,
    plot: Path | None,
) -> int:
    console = Console(width=max(180, console.width), highlight=False)
    # SIGTERM (timeout, kill) unwinds like Ctrl-C: the pool cgroup, the agents and the cluster
    # are cleaned up on the way out instead of left behind.
    signal.signal(signal.SIGTERM, _terminate)
    policies = list(POLICIES) if policy == "all" else [policy]
    if any(p not in POLICIES for p in policies):
        console.print(f"[red]error:[/red] --policy: one of {', '.join(POLICIES)}, all")
        return 2
    if session_max not in SESSION_MAX_CHOICES:
        console.print(f"[red]error:[/red] --session-max: one of {', '.join(SESSION_MAX_CHOICES)}")
        return 2
    if not find_min_pool and (pool_fraction is None) == (pool_of_oracle is None):
        console.print("[red]error:[/red] give exactly one of --pool-fraction, --pool-of-oracle")
        return 2
    if broker_db and _backend(broker_db) not in ("sqlite", "postgresql"):
        console.print(
            "[red]error:[/red] --broker-db: a SQLAlchemy URL of SQLite or PostgreSQL, e.g. "
            "sqlite:////var/tmp/replay.db"
        )
        return 2
    if agents <= 0 or speed <= 0 or mem_scale <= 0:
        console.print("[red]error:[/red] --agents, --speed and --mem-scale must be > 0")
        return 2
    prep = prepare(traces, agents, seed, speed, mem_scale)
    if pool_of_oracle is not None:
        pool_bytes = int(prep.oracle_bytes * pool_of_oracle)
    elif pool_fraction is not None:
        pool_bytes = int(prep.sum_peaks_bytes * pool_fraction)
    else:
        pool_bytes = prep.oracle_bytes
    if max(pool_bytes, prep.oracle_bytes) > MAX_POOL_BYTES:
        console.print(
            f"[red]error:[/red] pool {format_bytes(max(pool_bytes, prep.oracle_bytes))} is over "
            f"{format_bytes(MAX_POOL_BYTES)}: shrink the traces with --mem-scale"
        )
        return 2
    console.print(
        f"[bold]bench replay[/bold]: {len(prep.plans)} agents from {traces.name} (seed {seed}), "
        f"speed {speed:g}x, mem-scale {mem_scale:g}; oracle pool "
        f"{format_bytes(prep.oracle_bytes)}, sum of peaks {format_bytes(prep.sum_peaks_bytes)}, "
        f"longest trace {max(p.duration_s for p in prep.plans):.0f} s; agentcg's agents declare "
        f"session maxima: {session_max}"
        + (f" (p{session_percentile})" if session_max == "learn" else "")
    )
    out: dict[str, Any]
    with tempfile.TemporaryDirectory(prefix="agentcg-replay-") as tmp:
        opts = ReplayOptions(
            speed=speed,
            workdir=Path(tmp),
            plot=plot is not None,
            session_overcommit_ratio=SESSION_OVERCOMMIT_RATIO
            if session_overcommit is None
            else session_overcommit,
            session_max=session_max,
            session_percentile=session_percentile,
            broker_db=broker_db,
            deadline_s=deadline_s,
        )
        if find_min_pool:
            summary, runs = bisect_min_pool(prep, policies, opts, console)
            console.print(_table(runs, "every run of the bisection"))
            table = Table("policy", "min_pool_of_oracle", "note", title="smallest zero-kill pool")
            for s in summary:
                table.add_row(s["policy"], str(s["min_pool_of_oracle"]), s["note"])
            console.print(table)
            out = {
                "min_pool_of_oracle": {s["policy"]: s["min_pool_of_oracle"] for s in summary},
                "summary": summary,
                "runs": runs,
            }
        else:
            results, timelines = run_replay(prep, policies, pool_bytes, opts, console)
            console.print(
                _table(
                    results,
                    f"pool {format_bytes(pool_bytes)} = {pool_bytes / prep.oracle_bytes:.3f} x "
                    f"oracle {format_bytes(prep.oracle_bytes)}; peak-sized limits would fit "
                    f"{results[0]['peak_static_fit']} of {len(prep.plans)} agents",
                )
            )
            out = {"results": results}
            if plot is not None:
                write_plot(timelines, prep.oracle_bytes, plot)
                console.print(f"plot written to {plot}")
    out["broker_db"] = "given" if broker_db else "new"  # not the URL: it may hold a password
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=2) + "\n")
    return 0
