"""A restarted node agent re-adopts the calls a previous one left running, and keeps enforcing
them: real cgroups, a real BPF monitor (the old agent's maps died with it), real processes."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.node.agent import NodeAgent
from agentcg.node.cgroup import Cgroup, CgroupError, CgroupV1Driver
from agentcg.node.monitor import MemEvent, MemoryMonitor
from agentcg.node.spawn import GatedProcess, spawn_gated
from agentcg.v1 import broker_pb2, types_pb2

from .agent_helpers import NODE, MiB, StubUplink, make_lease

pytestmark = pytest.mark.kernel


def leave_call(
    driver: CgroupV1Driver, names: tuple[str, str, str], argv: list[str], *, frozen: bool = False
) -> GatedProcess:
    """What a crashed agent leaves behind: a call running in its limited, pausing cgroup
    (``frozen``: paused by that agent, whose ask to the broker died with it)."""
    cg = driver.create(*names)
    driver.set_memory_limit(cg, 64 * MiB)
    driver.set_pause_at_limit(cg, True)
    gated = spawn_gated(argv)
    driver.attach(cg, gated.pid)
    gated.release()
    if frozen:
        driver.set_frozen(cg, True)
    return gated


@pytest.fixture
def left_behind(driver: CgroupV1Driver, tmp_path: Path) -> Iterator[dict[str, GatedProcess]]:
    go = tmp_path / "go"
    spike = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "b = b'x' * (150 << 20)\n"
    )
    procs = {
        "live": leave_call(driver, ("t1", "s1", "l1"), [sys.executable, "-c", spike], frozen=True),
        "released": leave_call(driver, ("t1", "s2", "l2"), ["sleep", "60"]),
    }
    driver.create("t2", "s9", "l9")  # an empty leftover
    try:
        yield procs
    finally:
        live = Cgroup(rel=("t1", "s1", "l1"), path=driver.root / "t1" / "s1" / "l1")
        with contextlib.suppress(CgroupError):  # a frozen task dies only once thawed (v1)
            driver.set_frozen(live, False)
        for gated in procs.values():
            if gated.process.poll() is None:
                gated.process.kill()
            gated.process.wait()


def test_restarted_agent_adopts_and_enforces(
    bcc_available: None,
    driver: CgroupV1Driver,
    left_behind: dict[str, GatedProcess],
    tmp_path: Path,
) -> None:
    uplink = StubUplink()
    uplink.broker.leases["l1"] = make_lease("l1", epoch=1, session="s1")
    released = make_lease("l2", session="s2")
    released.state = types_pb2.LEASE_STATE_RELEASED
    uplink.broker.leases["l2"] = released
    holder: list[NodeAgent] = []

    def forward(ev: MemEvent) -> None:
        if holder:
            holder[0].on_mem_event(ev)

    async def main(monitor: MemoryMonitor) -> None:
        agent = NodeAgent(NODE, driver, monitor, uplink, 8 << 30, spool_root=tmp_path / "spool")  # type: ignore[arg-type]
        agent.loop = asyncio.get_running_loop()
        holder.append(agent)
        assert await agent.adopt() == 1
        assert list(agent.calls) == ["l1"] and agent.calls["l1"].adopted
        # The released lease's call was stopped and its cgroup removed; so was the empty one.
        assert left_behind["released"].process.wait(timeout=10) == -9
        assert driver.children() == ["t1"]
        assert driver.children(agent._dir("t1")) == ["s1"]
        assert monitor.entry_counts() == (1, 1)

        # The adopted call (thawed: this agent decides its pause again) now spikes past its
        # budget: caught in-kernel, paused, broker asked.
        (tmp_path / "go").touch()
        deadline = time.monotonic() + 30
        limit = broker_pb2.PRESSURE_KIND_LIMIT_REACHED
        while (
            not (asks := [m.pressure for m in uplink.sent if m.HasField("pressure")])
            or asks[-1].kind != limit
        ):
            assert time.monotonic() < deadline, f"no limit event from the adopted call: {asks}"
            await asyncio.sleep(0.01)
        assert [a.kind for a in asks] == [broker_pb2.PRESSURE_KIND_SOFT_THRESHOLD, limit]
        ask = asks[-1]
        assert ask.lease_id == "l1" and ask.action_id and ask.budget_bytes == 64 * MiB
        await agent.on_decision(
            broker_pb2.Decision(
                decision_id="d1",
                lease_id="l1",
                event_id=ask.event_id,
                kind=broker_pb2.DECISION_KIND_GROW,
                new_budget_bytes=256 * MiB,
                epoch=2,
            )
        )
        # It finishes its allocation and exits; the agent sees its cgroup empty and ends it.
        deadline = time.monotonic() + 30
        while not (done := [m.finished for m in uplink.sent if m.HasField("finished")]):
            assert time.monotonic() < deadline, "adopted call never finished"
            await asyncio.sleep(0.05)
        [finished] = done
        assert finished.lease_id == "l1" and finished.outcome == types_pb2.OUTCOME_GROWN
        assert finished.budget_bytes == 256 * MiB
        throttle, grow = [m.action for m in uplink.sent if m.HasField("action")]
        assert throttle.kind == broker_pb2.ACTION_KIND_THROTTLE  # at its soft threshold first
        assert grow.action_id == ask.action_id and grow.kind == broker_pb2.ACTION_KIND_GROW
        assert agent.calls == {} and monitor.entry_counts() == (0, 0)
        # Its cgroup is removed on the cgroup-I/O thread, after the end is reported.
        deadline = time.monotonic() + 10
        while driver.children():
            assert time.monotonic() < deadline, f"cgroups left behind: {driver.children()}"
            await asyncio.sleep(0.02)
        if agent._adopt_poll is not None:
            agent._adopt_poll.cancel()

    with MemoryMonitor(forward) as monitor:
        monitor.start()
        asyncio.run(main(monitor))
    assert left_behind["live"].process.wait(timeout=10) == 0
