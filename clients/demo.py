"""`agentcg demo`: a broker and a node on this host, real agent traces replayed through them.

Each tenant replays one trace from the shipped sample: every tool call of the trace becomes a
real process (``agentcg.clients.worker``) that follows the call's memory curve, time compressed,
run through ``agentcg run``'s path (reserve -> exec in a cgroup -> release). Every call declares
the same small budget, so calls that rise above it are paused by the kernel and grown by the
broker while the tenant's quota allows, and killed once it does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agentcg.quantity import format_bytes
from rich.console import Console
from rich.table import Table

from .cluster import LocalCluster
from .sdk import AsyncClient, RunResult
from .traces import MB, ToolCall, Trace, load_traces, sample_traces_path

__all__ = ["run_demo"]

DECLARED_BYTES = 64 << 20


@dataclass
class TenantReport:
    trace: str
    quota_bytes: int
    admitted: int = 0
    completed: int = 0
    grown: int = 0
    killed: int = 0
    denied: int = 0
    peak_bytes: int = 0
    max_budget_bytes: int = 0
    reactions_ns: list[int] = field(default_factory=list)  # decided at once
    # Outcomes of the calls the broker kept paused for a while, waiting for room.
    held: list[str] = field(default_factory=list)


def _curve_arg(call: ToolCall, speed: float) -> str:
    pts = call.curve or ((0.0, 0.0),)
    end = max(call.duration_s / speed, 0.05)
    parts = [f"{t / speed:.3f}:{mb:.1f}" for t, mb in pts] + [f"{end:.3f}:0"]
    return ",".join(parts)


async def _replay_tenant(
    client: AsyncClient,
    tenant: str,
    trace: Trace,
    speed: float,
    deadline: float,
    report: TenantReport,
) -> None:
    t0 = time.monotonic()
    for call in trace.tool_calls:
        # Keep the trace's pacing: a call starts at its (compressed) start time.
        delay = t0 + call.start_s / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > deadline:
            break
        result: RunResult = await client.run(
            tenant,
            DECLARED_BYTES,
            [sys.executable, "-m", "agentcg.clients.worker", "--curve", _curve_arg(call, speed)],
            session=f"s-{tenant}",
            command_class=call.command_class,
        )
        if result.outcome == "denied":
            report.denied += 1
            continue
        report.admitted += 1
        report.completed += result.outcome == "completed"
        report.grown += result.outcome == "grown"
        report.killed += result.outcome == "killed"
        report.peak_bytes = max(report.peak_bytes, result.peak_bytes)
        report.max_budget_bytes = max(report.max_budget_bytes, result.budget_bytes)
        timed = [ns for a, ns in result.timed_actions if a in ("grow", "kill")]
        if "wait" in result.actions:  # held: its decisions are timed from the pause
            report.held.append(result.outcome)
        else:
            report.reactions_ns.extend(timed)


async def _replay(
    broker: str, traces: list[Trace], speed: float, max_seconds: float
) -> dict[str, TenantReport]:
    reports: dict[str, TenantReport] = {}
    async with AsyncClient(broker) as client:
        for i, trace in enumerate(traces):
            name = f"tenant-{i}"
            rise = max((c.peak_rise_mb for c in trace.tool_calls), default=0) * MB
            # Alternate generous and tight quotas so both growth and kills show up.
            quota = int(max(rise * 2, 256 << 20)) if i % 2 == 0 else (96 << 20)
            await client.set_tenant(name, quota)
            reports[name] = TenantReport(trace.task, quota)
        deadline = time.monotonic() + max_seconds
        await asyncio.gather(
            *(
                _replay_tenant(client, name, trace, speed, deadline, reports[name])
                for name, trace in zip(reports, traces, strict=True)
            )
        )
    return reports


def _pick(traces: list[Trace], n: int) -> list[Trace]:
    """Traces with the largest tool-call rises first, so the demo shows enforcement."""
    ranked = sorted(traces, key=lambda t: -max((c.peak_rise_mb for c in t.tool_calls), default=0))
    return ranked[:n]


def run_demo(
    *,
    traces: Path | None,
    tenants: int,
    speed: float,
    max_seconds: float,
    json_path: Path | None = None,
) -> int:
    console = Console(width=max(140, Console().width))
    chosen = _pick(list(load_traces(traces or sample_traces_path())), tenants)
    with tempfile.TemporaryDirectory(prefix="agentcg-demo-") as tmp:
        console.print(f"[bold]agentcg demo[/bold]: broker + node on loopback, work dir {tmp}")
        with LocalCluster(Path(tmp), nodes=1, node_memory="4G") as cluster:
            console.print(f"broker {cluster.broker_address}, node {cluster.node_addresses[0]}")
            console.print(
                f"replaying {len(chosen)} traces at {speed:g}x, every call declaring "
                f"{format_bytes(DECLARED_BYTES)} ..."
            )
            started = time.monotonic()
            reports = asyncio.run(_replay(cluster.broker_address, chosen, speed, max_seconds))
            elapsed = time.monotonic() - started
    table = Table(title=f"per-tenant results ({elapsed:.1f} s)")
    for col in (
        "tenant",
        "trace",
        "quota",
        "admitted",
        "completed",
        "grown",
        "killed",
        "denied",
        "peak",
        "largest budget",
    ):
        table.add_column(col)
    reactions: list[int] = []
    held: list[str] = []
    for name, r in reports.items():
        reactions += r.reactions_ns
        held += r.held
        table.add_row(
            name,
            r.trace[:32],
            format_bytes(r.quota_bytes),
            str(r.admitted),
            str(r.completed),
            str(r.grown),
            str(r.killed),
            str(r.denied),
            format_bytes(r.peak_bytes),
            format_bytes(r.max_budget_bytes),
        )
    console.print(table)
    if reactions:
        console.print(f"in-kernel limit event -> decision applied: {_spread(reactions)}")
    if held:
        outcomes = ", ".join(f"{n} {o}" for o, n in sorted(Counter(held).items()))
        console.print(
            f"{len(held)} calls kept paused while the broker waited for room (up to "
            f"--growth-wait-ms), then: {outcomes}"
        )
    if json_path is not None:
        json_path.write_text(json.dumps(_report_json(reports, elapsed), indent=2) + "\n")
    return 0


def _report_json(reports: dict[str, TenantReport], elapsed_s: float) -> dict[str, object]:
    """The report as data: per tenant its counts and sizes (bytes), and the reaction times
    (in-kernel limit event -> decision applied) in milliseconds."""
    tenants: dict[str, object] = {}
    for name, r in reports.items():
        row = dataclasses.asdict(r)
        row["reactions_ms"] = [ns / 1e6 for ns in row.pop("reactions_ns")]
        tenants[name] = row
    return {"elapsed_s": round(elapsed_s, 3), "tenants": tenants}


def _spread(values_ns: list[int]) -> str:
    v = sorted(values_ns)
    return (
        f"{len(v)} actions, p50 {v[len(v) // 2] / 1e6:.2f} ms, "
        f"p99 {v[min(len(v) - 1, len(v) * 99 // 100)] / 1e6:.2f} ms, max {v[-1] / 1e6:.2f} ms"
    )
