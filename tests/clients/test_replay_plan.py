"""The replay's plan: pure arithmetic on traces (no processes, no cgroups)."""

from __future__ import annotations

from pathlib import Path

from agentcg.clients.replay_plan import (
    oracle_pool_bytes,
    peak_static_fit,
    percentile,
    pick_traces,
    plan_agent,
    total_curve,
)
from agentcg.clients.traces import MB, Trace, load_traces, sample_traces_path


def trace(name: str, samples: list[tuple[float, float]], calls: list[list[object]]) -> Trace:
    return Trace.from_json(
        {"task": name, "samples": [[t, mb, 0] for t, mb in samples], "tool_calls": calls}
    )


def test_plan_cuts_calls_out_of_the_curve() -> None:
    t = trace(
        "a",
        [(0, 100), (1, 120), (2, 300), (3, 250), (4, 130), (5, 110)],
        [[1.5, 3.5, "Bash", "python -m pytest"]],
    )
    plan = plan_agent(0, t, speed=2.0, scale=0.5)
    kinds = [s[0] for s in plan.steps]
    assert kinds == ["hold", "hold", "call", "hold", "hold", "end"]
    (call,) = plan.calls
    assert call.start_s == 0.75 and call.end_s == 1.75
    assert call.base_bytes == int(120 * 0.5 * MB)  # the level just before the call
    assert call.peak_rise_bytes == int(180 * 0.5 * MB)
    assert call.command_class == "python"  # the first known word
    assert call.curve_arg.endswith("1.000:0")
    assert plan.duration_s == 2.5
    assert plan.peak_bytes == int(300 * 0.5 * MB)


def test_overlapping_calls_are_merged_into_the_first() -> None:
    t = trace("a", [(0, 10), (1, 50), (2, 20), (3, 10)], [[0.5, 2.5, "x", "a"], [1, 2, "y", "b"]])
    assert len(plan_agent(0, t, speed=1, scale=1).calls) == 1


def test_oracle_is_the_max_of_the_summed_curves() -> None:
    a = plan_agent(0, trace("a", [(0, 100), (1, 200), (2, 100)], []), speed=1, scale=1)
    b = plan_agent(1, trace("b", [(0, 50), (1, 50), (2, 300), (3, 0)], []), speed=1, scale=1)
    # t in [1,2): 200 + 50; t in [2,3): a ended at 2 s, b 300
    assert oracle_pool_bytes([a, b]) == 300 * MB
    assert total_curve([a, b])[-1] == (3.0, 0)


def test_oracle_never_exceeds_the_sum_of_peaks_on_real_traces() -> None:
    traces = list(load_traces(sample_traces_path()))
    chosen = pick_traces(traces, 5, seed=1)
    assert chosen == pick_traces(traces, 5, seed=1)  # deterministic by seed
    plans = [plan_agent(i, t, speed=10, scale=0.5) for i, t in enumerate(chosen)]
    oracle = oracle_pool_bytes(plans)
    assert max(p.peak_bytes for p in plans) <= oracle <= sum(p.peak_bytes for p in plans)


def test_peak_static_fit_packs_smallest_first() -> None:
    assert peak_static_fit([5, 1, 2, 3], 6) == 3
    assert peak_static_fit([10], 9) == 0
    assert peak_static_fit([], 9) == 0


def test_percentile_nearest_rank() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([1, 2, 3, 4], 95) == 4
    assert percentile([7], 99) == 7


def test_sample_traces_path_exists() -> None:
    assert Path(sample_traces_path()).is_file()
