"""How much of this host's CPU time its hypervisor took: steal time, from ``/proc/stat``.

A vCPU that is runnable while the host runs something else counts steal ticks. Latency
percentiles measured then are the host's, not the code's: on one VM of this project's kind,
the same hour, quiet runs of ``agentcg bench admission`` had 0.04% of the CPUs' time stolen
(Reserve p50 1.5-1.6 ms, no-op p50 0.46-0.47 ms), and a run with Reserve's p50 at 26 ms (no-op
p50 1.4 ms) had 7.6%. The benchmarks record the share, so such a run can be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuTicks", "cpu_ticks", "steal_share", "ticks_between"]

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class CpuTicks:
    """All CPUs' time in clock ticks since boot: in all (guest time is counted in user time
    already, so not twice) and stolen by the hypervisor."""

    total: int
    steal: int

    def __add__(self, other: CpuTicks) -> CpuTicks:
        return CpuTicks(self.total + other.total, self.steal + other.steal)

    @property
    def steal_share(self) -> float | None:
        """The share of these ticks stolen (None: no ticks)."""
        return self.steal / self.total if self.total > 0 else None


def cpu_ticks(root: Path = PROC) -> CpuTicks | None:
    """The ``cpu`` line of ``/proc/stat`` (None: not readable, or without a steal field)."""
    try:
        text = (root / "stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal [guest guest_nice]
            values = fields[1:9]
            if len(values) < 8 or not all(v.isdigit() for v in values):
                return None
            ticks = [int(v) for v in values]
            return CpuTicks(total=sum(ticks), steal=ticks[7])
    return None


def ticks_between(before: CpuTicks | None, after: CpuTicks | None) -> CpuTicks:
    """The ticks that passed between two readings (none if either is missing)."""
    if before is None or after is None or after.total <= before.total:
        return CpuTicks(0, 0)
    return CpuTicks(after.total - before.total, after.steal - before.steal)


def steal_share(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """The share of all CPUs' time stolen between two readings (None if either is missing or
    no time passed)."""
    return ticks_between(before, after).steal_share
