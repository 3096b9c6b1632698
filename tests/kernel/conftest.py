"""Fixtures for kernel tests: a throw-away cgroup root, a loaded monitor, gated tool calls.

Teardown order (reverse of set-up) is: processes killed and reaped, monitor closed, then every
cgroup under the test's root removed and checked gone in every hierarchy, even on failure.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from agentcg.node.agent import NodeAgent
from agentcg.node.cgroup import Cgroup, CgroupV1Driver
from agentcg.node.enforcement import NodePolicy
from agentcg.node.monitor import MemEvent, MemoryMonitor
from agentcg.node.spawn import GatedProcess, spawn_gated

from .agent_helpers import NODE, MakeAgent, StubUplink
from .kernel_helpers import EventLog, Spawn


@pytest.fixture
def driver(cgroup_write: Path) -> Iterator[CgroupV1Driver]:
    d = CgroupV1Driver(f"agentcg-test-{uuid.uuid4().hex[:12]}")
    try:
        yield d
    finally:
        d.clear()
        left = [str(p) for p in d.paths().values() if p.exists()]
        assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def events() -> EventLog:
    return EventLog()


@pytest.fixture
def monitor(bcc_available: None, events: EventLog) -> Iterator[MemoryMonitor]:
    m = MemoryMonitor(events)
    m.start()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def spawn(driver: CgroupV1Driver, monitor: MemoryMonitor) -> Iterator[Spawn]:
    """Start argv gated, place it in the cgroup, attribute it to the watch, release it."""
    started: list[GatedProcess] = []

    def run(cg: Cgroup, argv: Sequence[str]) -> GatedProcess:
        gated = spawn_gated(argv, stdout=subprocess.PIPE)
        started.append(gated)
        driver.attach(cg, gated.pid)
        monitor.add_pid(gated.pid, driver.cgroup_id(cg))
        gated.release()
        return gated

    try:
        yield run
    finally:
        for gated in started:
            gated.abort()
            if gated.process.poll() is None:
                gated.process.kill()
            gated.process.communicate()


@pytest.fixture
def agent_monitor(bcc_available: None) -> Iterator[tuple[MemoryMonitor, list[NodeAgent]]]:
    holder: list[NodeAgent] = []

    def forward(ev: MemEvent) -> None:
        if holder:
            holder[0].on_mem_event(ev)

    monitor = MemoryMonitor(forward)
    monitor.start()
    try:
        yield monitor, holder
    finally:
        monitor.close()


@pytest.fixture
def make_agent(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    tmp_path: Path,
) -> MakeAgent:
    def make(uplink: StubUplink, policy: NodePolicy | None = None) -> NodeAgent:
        monitor, holder = agent_monitor
        agent = NodeAgent(
            NODE,
            driver,
            monitor,
            uplink,  # type: ignore[arg-type]
            8 << 30,
            policy,
            spool_root=tmp_path / "spool",
        )
        holder[:] = [agent]
        return agent

    return make
