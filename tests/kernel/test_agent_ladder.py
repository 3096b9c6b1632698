"""The graduated ladder on real cgroups and a real BPF monitor: running -> throttled (with a
deadline) -> paused asking the broker -> grown, or resumed/killed; dry-run writes nothing."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from agentcg.node.agent import MAX_ASKS_AGAIN, NodeAgent
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.node.enforcement import NodePolicy
from agentcg.v1 import broker_pb2, node_pb2, types_pb2

from .agent_helpers import MakeAgent, MiB, StubUplink, make_lease, run_call

pytestmark = pytest.mark.kernel

POLICY = NodePolicy(throttle_deadline_s=0.3, broker_timeout_s=30)


def hold_code(mib: int, release: Path) -> str:
    # Hold `mib` MiB (between the 80% soft threshold and the 64 MiB budget) until told to end.
    return (
        f"import os, time\nb = b'x' * ({mib} << 20)\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
    )


async def wait_for(predicate, what: str, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def actions(uplink: StubUplink) -> list[broker_pb2.ActionReport]:
    return [m.action for m in uplink.sent if m.HasField("action")]


def limit_asks(uplink: StubUplink) -> list[broker_pb2.PressureEvent]:
    return [
        m.pressure
        for m in uplink.sent
        if m.HasField("pressure") and m.pressure.kind == broker_pb2.PRESSURE_KIND_LIMIT_REACHED
    ]


@pytest.mark.parametrize("decision", ["grow", "deny"])
def test_throttle_then_pause_then_decision(
    driver: CgroupV1Driver, make_agent: MakeAgent, tmp_path: Path, decision: str
) -> None:
    uplink = StubUplink()
    agent: NodeAgent = make_agent(uplink, POLICY)
    uplink.broker.leases["l1"] = make_lease("l1")
    release = tmp_path / "release"

    async def main() -> list[node_pb2.ExecEvent]:
        agent.loop = asyncio.get_running_loop()
        call = asyncio.create_task(
            run_call(agent, "l1", [sys.executable, "-c", hold_code(56, release)])
        )
        # Throttled at 80% of 64 MiB, with the soft limit written.
        await wait_for(lambda: len(actions(uplink)) >= 1, "throttle")
        [throttle] = actions(uplink)
        assert throttle.kind == broker_pb2.ACTION_KIND_THROTTLE and throttle.action_id
        cg = agent.calls["l1"].cgroup
        assert driver.read_memory_throttle(cg) == int(64 * MiB * 0.8) // 4096 * 4096  # pages
        # Still above it at the deadline: frozen, the broker asked.
        await wait_for(lambda: limit_asks(uplink), "pause after the throttle deadline")
        [ask] = limit_asks(uplink)
        assert ask.action_id and ask.action_id != throttle.action_id
        assert ask.requested_memory_bytes == 128 * MiB
        assert agent.calls["l1"].frozen
        kind = (
            broker_pb2.DECISION_KIND_GROW if decision == "grow" else broker_pb2.DECISION_KIND_KILL
        )
        await agent.on_decision(
            broker_pb2.Decision(
                decision_id="d1",
                lease_id="l1",
                event_id=ask.event_id,
                kind=kind,
                new_budget_bytes=128 * MiB,
                epoch=2,
                reason="denied: tenant quota" if decision == "deny" else "",
            )
        )
        # Either way it runs again (a denial does not kill a call within its budget).
        assert not agent.calls["l1"].frozen
        assert driver.read_memory_throttle(cg) is None
        release.touch()
        return await asyncio.wait_for(call, 30)

    events = asyncio.run(main())
    seen = [e.enforcement.action for e in events if e.HasField("enforcement")]
    exited = events[-1].exited
    if decision == "grow":
        assert seen == ["throttle", "pause", "grow"]
        assert exited.outcome == types_pb2.OUTCOME_GROWN and exited.budget_bytes == 128 * MiB
    else:
        assert seen == ["throttle", "pause", "resume"]
        assert exited.outcome == types_pb2.OUTCOME_COMPLETED and exited.budget_bytes == 64 * MiB
        assert "resumed within its budget" in actions(uplink)[-1].reason
    assert exited.exit_code == 0
    assert driver.children() == []


def test_dry_run_reports_but_writes_nothing(
    driver: CgroupV1Driver, make_agent: MakeAgent, tmp_path: Path
) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, NodePolicy(dry_run=True, throttle_deadline_s=0.2))
    uplink.broker.leases["l1"] = make_lease("l1")
    release = tmp_path / "release"

    async def main() -> list[node_pb2.ExecEvent]:
        agent.loop = asyncio.get_running_loop()
        call = asyncio.create_task(
            run_call(agent, "l1", [sys.executable, "-c", hold_code(56, release)])
        )
        await wait_for(lambda: limit_asks(uplink), "dry-run pause")
        cg = agent.calls["l1"].cgroup
        assert driver.read_memory_throttle(cg) is None  # nothing written
        assert not agent.calls["l1"].frozen
        [throttle] = actions(uplink)
        assert throttle.dry_run and throttle.kind == broker_pb2.ACTION_KIND_THROTTLE
        release.touch()
        return await asyncio.wait_for(call, 30)

    events = asyncio.run(main())
    assert events[-1].exited.exit_code == 0
    assert [e.enforcement.action for e in events if e.HasField("enforcement")] == [
        "throttle",
        "pause",
    ]


def test_in_kernel_stop_pauses_before_the_limit_then_grows(
    driver: CgroupV1Driver, make_agent: MakeAgent, tmp_path: Path
) -> None:
    # stop_fraction: the kernel SIGSTOPs the allocator at 90% of its 64 MiB budget (no reclaim
    # at the limit); the node freezes the call, asks the broker, and on growth thaws + SIGCONTs.
    uplink = StubUplink()
    agent = make_agent(uplink, NodePolicy(stop_fraction=0.9, throttle=False, broker_timeout_s=30))
    uplink.broker.leases["l1"] = make_lease("l1")
    release = tmp_path / "release"
    code = (
        "import os, time\nkeep = []\n"
        "for _ in range(80):\n    keep.append(b'x' * (1 << 20)); time.sleep(0.003)\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
    )

    async def main() -> list[node_pb2.ExecEvent]:
        agent.loop = asyncio.get_running_loop()
        call = asyncio.create_task(run_call(agent, "l1", [sys.executable, "-c", code]))
        await wait_for(lambda: limit_asks(uplink), "the in-kernel stop and the ask")
        [ask] = limit_asks(uplink)
        c = agent.calls["l1"]
        assert c.stopped and c.frozen
        stats = driver.read_stats(c.cgroup)
        assert not stats.under_oom  # stopped before the kernel's own pause at the limit
        # Stopped at its 57.6 MiB stop threshold (give or take the kernel's per-cpu charge batch).
        assert 56 * MiB <= stats.peak_bytes < 64 * MiB, stats
        await agent.on_decision(
            broker_pb2.Decision(
                decision_id="d1",
                lease_id="l1",
                event_id=ask.event_id,
                kind=broker_pb2.DECISION_KIND_GROW,
                new_budget_bytes=128 * MiB,
                epoch=2,
            )
        )
        assert not c.stopped and not c.frozen
        # It goes on to its 80 MiB (SIGCONT), under the new budget.
        await wait_for(
            lambda: driver.read_stats(c.cgroup).usage_bytes >= 80 * MiB, "the call to resume"
        )
        release.touch()
        return await asyncio.wait_for(call, 30)

    events = asyncio.run(main())
    seen = [e.enforcement.action for e in events if e.HasField("enforcement")]
    exited = events[-1].exited
    assert seen == ["pause", "grow"], seen
    assert exited.outcome == types_pb2.OUTCOME_GROWN and exited.exit_code == 0
    assert driver.children() == []


def test_an_ask_on_a_stream_that_broke_is_sent_again(
    driver: CgroupV1Driver, make_agent: MakeAgent, tmp_path: Path
) -> None:
    """A paused call's ask to grow that went out on a stream since broken is sent again once a
    new one opens (same event and action ids, a full broker timeout more), at most
    MAX_ASKS_AGAIN times; one buffered while the link was down goes out on the next stream as it
    is and is not doubled."""
    uplink = StubUplink(connected=False)  # the pause comes while the link is down
    agent: NodeAgent = make_agent(uplink, POLICY)
    uplink.broker.leases["l1"] = make_lease("l1")
    release = tmp_path / "release"

    async def main() -> node_pb2.ExecEvent:
        loop = agent.loop = asyncio.get_running_loop()
        call = asyncio.create_task(
            run_call(agent, "l1", [sys.executable, "-c", hold_code(56, release)])
        )
        await wait_for(lambda: limit_asks(uplink), "pause after the throttle deadline")
        [first] = limit_asks(uplink)
        pending = agent.calls["l1"].pending
        assert pending is not None
        uplink.connected, uplink.connections = True, 2  # the buffered ask went out on it
        await agent.on_uplink_connected()
        assert len(limit_asks(uplink)) == 1
        await asyncio.sleep(1.1)  # the broker timeout (30 s) runs down meanwhile
        for n in (3, 4, 5, 6):  # the stream breaks and opens again, and again
            uplink.connections = n
            agent.ask_again()
        asks = limit_asks(uplink)
        assert len(asks) == 1 + MAX_ASKS_AGAIN
        assert {(a.event_id, a.action_id) for a in asks} == {(first.event_id, first.action_id)}
        assert pending.timer.when() - loop.time() > POLICY.broker_timeout_s - 0.5
        await agent.on_decision(
            broker_pb2.Decision(
                decision_id="d1",
                lease_id="l1",
                event_id=first.event_id,
                kind=broker_pb2.DECISION_KIND_GROW,
                new_budget_bytes=128 * MiB,
                epoch=2,
            )
        )
        uplink.connections = 7
        agent.ask_again()  # answered: nothing to ask
        assert len(limit_asks(uplink)) == 1 + MAX_ASKS_AGAIN
        release.touch()
        events = await asyncio.wait_for(call, 30)
        return events[-1]

    last = asyncio.run(main())
    assert last.exited.outcome == types_pb2.OUTCOME_GROWN and last.exited.exit_code == 0
    assert driver.children() == []
