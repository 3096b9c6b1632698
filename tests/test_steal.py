"""Reading steal time: fixture trees of /proc (oomd's fixtures pattern), and this host's."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.steal import CpuTicks, cpu_ticks, steal_share, ticks_between

STAT = (
    "cpu  1018133 0 247412 1937780 13567 0 12483 20133 0 0\n"
    "cpu0 509000 0 123000 968000 6700 0 6200 10000 0 0\n"
    "intr 1 2 3\n"
)


def _proc(root: Path, text: str) -> Path:
    (root / "stat").write_text(text)
    return root


def test_cpu_ticks_reads_the_all_cpus_line(tmp_path: Path) -> None:
    ticks = cpu_ticks(_proc(tmp_path, STAT))
    assert ticks == CpuTicks(total=1018133 + 247412 + 1937780 + 13567 + 12483 + 20133, steal=20133)


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "cpu0 1 2 3 4 5 6 7 8\n",  # no all-CPUs line
        "cpu  1 2 3 4\n",  # a kernel without the steal field
        "cpu  1 2 3 4 5 6 7 x 0 0\n",  # not a number
    ],
)
def test_cpu_ticks_none_when_not_there(tmp_path: Path, text: str) -> None:
    assert cpu_ticks(_proc(tmp_path, text)) is None


def test_cpu_ticks_none_without_the_file(tmp_path: Path) -> None:
    assert cpu_ticks(tmp_path) is None


def test_ticks_between_and_their_sum() -> None:
    assert ticks_between(CpuTicks(1000, 10), CpuTicks(3000, 110)) == CpuTicks(2000, 100)
    assert ticks_between(None, CpuTicks(1000, 10)) == CpuTicks(0, 0)
    assert ticks_between(CpuTicks(1000, 10), CpuTicks(1000, 10)) == CpuTicks(0, 0)
    assert CpuTicks(2000, 100) + CpuTicks(1000, 50) == CpuTicks(3000, 150)
    assert CpuTicks(0, 0).steal_share is None
    assert CpuTicks(3000, 150).steal_share == pytest.approx(0.05)


def test_steal_share() -> None:
    assert steal_share(CpuTicks(1000, 10), CpuTicks(3000, 110)) == pytest.approx(0.05)
    assert steal_share(CpuTicks(1000, 10), CpuTicks(1000, 10)) is None  # no time passed
    assert steal_share(None, CpuTicks(1000, 10)) is None
    assert steal_share(CpuTicks(1000, 10), None) is None


def test_this_hosts_counters_move_forward() -> None:
    before = cpu_ticks()
    assert before is not None and 0 <= before.steal <= before.total
    after = cpu_ticks()
    assert after is not None and after.total >= before.total and after.steal >= before.steal
