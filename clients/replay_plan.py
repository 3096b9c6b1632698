"""What a replay will do, computed before it runs: pure arithmetic on traces.

An agent's plan is its trace compressed in time (``speed``) and scaled in memory (``scale``),
cut into the steps its process follows: ``hold`` a level between tool calls, run a ``call``
(the rise above the level held just before it, as a separate child process), ``end``.
The oracle pool is the maximum over time of the summed curves of all agents started together.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .traces import MB, Trace

__all__ = [
    "MiB",
    "AgentPlan",
    "CallPlan",
    "Step",
    "oracle_pool_bytes",
    "pick_traces",
    "plan_agent",
    "peak_static_fit",
    "percentile",
    "total_curve",
]

MiB = 1 << 20

# Step: ("hold", t_s, level_bytes) | ("call", index, start_s, end_s, base_bytes) | ("end", t_s)
Step = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class CallPlan:
    index: int
    start_s: float  # compressed, since the agent's start
    end_s: float
    base_bytes: int  # what the agent holds during the call
    peak_rise_bytes: int
    curve_arg: str  # the worker's --curve (compressed seconds, decimal MB, already scaled)
    command_class: str


@dataclass(frozen=True, slots=True)
class AgentPlan:
    index: int
    task: str
    steps: tuple[Step, ...]
    calls: tuple[CallPlan, ...]
    duration_s: float  # compressed trace length: the replay's nominal duration
    peak_bytes: int
    points: tuple[tuple[float, int], ...]  # the whole scaled, compressed curve (step-hold)


def pick_traces(traces: Sequence[Trace], n: int, seed: int) -> list[Trace]:
    """``n`` traces chosen by ``seed`` (deterministic); all of them if there are fewer."""
    if n >= len(traces):
        return list(traces)
    return random.Random(seed).sample(list(traces), n)


def _bytes(mb: float, scale: float) -> int:
    return int(mb * scale * MB)


def plan_agent(index: int, trace: Trace, *, speed: float, scale: float) -> AgentPlan:
    if speed <= 0 or scale <= 0:
        raise ValueError(f"speed and scale must be > 0 (got {speed}, {scale})")
    calls: list[CallPlan] = []
    steps: list[Step] = []
    last_end = -math.inf
    windows = []
    for c in trace.tool_calls:
        if c.start_s < last_end or c.end_s < c.start_s:
            continue  # overlaps the previous call: its memory is inside that call's curve
        last_end = c.end_s
        windows.append(c)
    i_call = 0
    level = trace.samples[0][1]
    for t, mb in trace.samples:
        while i_call < len(windows) and windows[i_call].start_s <= t:
            c = windows[i_call]
            end = max(c.duration_s / speed, 0.05)
            pts = [f"{dt / speed:.3f}:{rise * scale:.2f}" for dt, rise in c.curve] or ["0:0"]
            cp = CallPlan(
                index=len(calls),
                start_s=c.start_s / speed,
                end_s=c.start_s / speed + end,
                base_bytes=_bytes(c.base_mb, scale),
                peak_rise_bytes=_bytes(c.peak_rise_mb, scale),
                curve_arg=",".join([*pts, f"{end:.3f}:0"]),
                command_class=c.command_class,
            )
            calls.append(cp)
            steps.append(("call", cp.index, cp.start_s, cp.end_s, cp.base_bytes))
            level = c.base_mb
            i_call += 1
        if any(c.start_s <= t <= c.end_s for c in windows[max(0, i_call - 1) : i_call]):
            continue  # inside a call window: the call's process carries the rise
        if mb != level or not steps:
            steps.append(("hold", t / speed, _bytes(mb, scale)))
            level = mb
    duration = max(trace.duration_s / speed, calls[-1].end_s if calls else 0.0)
    steps.append(("end", duration))
    points = tuple((t / speed, _bytes(mb, scale)) for t, mb in trace.samples)
    return AgentPlan(
        index=index,
        task=trace.task,
        steps=tuple(steps),
        calls=tuple(calls),
        duration_s=duration,
        peak_bytes=_bytes(trace.peak_mb, scale),
        points=points,
    )


def total_curve(plans: Sequence[AgentPlan]) -> list[tuple[float, int]]:
    """The summed step-hold curve of all agents started together: [(t_s, bytes)], each point
    the total from t until the next point."""
    deltas: dict[float, int] = {}
    for p in plans:
        prev = 0
        for t, b in p.points:
            deltas[t] = deltas.get(t, 0) + b - prev
            prev = b
        deltas[p.duration_s] = deltas.get(p.duration_s, 0) - prev
    out: list[tuple[float, int]] = []
    total = 0
    for t in sorted(deltas):
        total += deltas[t]
        out.append((t, total))
    return out


def oracle_pool_bytes(plans: Sequence[AgentPlan]) -> int:
    """The smallest pool in which every agent fits with no delay: max of the summed curves."""
    return max((b for _, b in total_curve(plans)), default=0)


def peak_static_fit(peaks_bytes: Sequence[int], pool_bytes: int) -> int:
    """How many of these agents fit in the pool with peak-sized limits (smallest first)."""
    used = n = 0
    for peak in sorted(peaks_bytes):
        if used + peak > pool_bytes:
            break
        used += peak
        n += 1
    return n


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]
