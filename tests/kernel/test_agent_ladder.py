"""The graduated ladder on real cgroups and a real BPF monitor: running -> throttled (with a
deadline) -> paused asking the broker -> grown, or resumed/killed; dry-run writes nothing."""

from __future__ import annotations

import asyncio
import errno
import sys
import time
from pathlib import Path

import pytest
from agentcg.node.agent import MAX_ASKS_AGAIN, NodeAgent
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.node.enforcement import NodePolicy
from agentcg.node.spool import CallSpool
from agentcg.v1 import broker_pb2, node_pb2, types_pb2

from .agent_helpers import MakeAgent, MiB, NoContext, StubUplink, make_lease, run_call

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


@pytest.mark.parametrize("flush", ["works", "fails"])
def test_output_at_the_limit_is_flushed_first_and_asked_for_if_that_fails(
    driver: CgroupV1Driver,
    make_agent: MakeAgent,
    monkeypatch: pytest.MonkeyPatch,
    flush: str,
) -> None:
    """A call whose output fills its budget (its caller not reading yet): the node flushes it
    (written to disk, out of the call's memory) and the call finishes within its budget,
    nothing asked. A flush that fails (a disk error) is not tried again and again: the node
    decides as if flushed, and asks."""
    uplink = StubUplink()
    agent: NodeAgent = make_agent(uplink, NodePolicy(throttle=False, broker_timeout_s=30))
    uplink.broker.leases["l1"] = make_lease("l1")
    flushes: list[str] = []
    works = CallSpool.flush_output

    def flush_output(spool: CallSpool) -> int:
        flushes.append(spool.dir.name)
        if flush == "fails":
            raise OSError(errno.EIO, "Input/output error")
        return works(spool)

    monkeypatch.setattr(CallSpool, "flush_output", flush_output)
    reading = asyncio.Event()

    async def follow() -> list[node_pb2.ExecEvent]:
        """The caller: it takes the Started, then reads nothing until ``reading``."""
        events = []
        request = node_pb2.ExecRequest(
            lease_id="l1", argv=["head", "-c", f"{160 * MiB}", "/dev/zero"], capture_output=True
        )
        async for ev in agent.Exec(request, NoContext()):  # type: ignore[arg-type]
            events.append(ev)
            await reading.wait()
        return events

    async def main() -> list[node_pb2.ExecEvent]:
        agent.loop = asyncio.get_running_loop()
        call = asyncio.create_task(follow())
        if flush == "works":
            # It ends with its caller having read nothing: all it wrote went through the flushes.
            await wait_for(lambda: flushes and "l1" not in agent.calls, "its exit")
        else:
            await wait_for(lambda: limit_asks(uplink), "an ask once the flush failed")
            [ask] = limit_asks(uplink)
            assert flushes == ["l1"]  # one flush, not one per look
            await agent.on_decision(
                broker_pb2.Decision(
                    decision_id="d1",
                    lease_id="l1",
                    event_id=ask.event_id,
                    kind=broker_pb2.DECISION_KIND_GROW,
                    new_budget_bytes=1024 * MiB,
                    epoch=2,
                )
            )
        reading.set()
        return await asyncio.wait_for(call, 60)

    events = asyncio.run(main())
    exited = events[-1].exited
    assert exited.exit_code == 0
    assert sum(len(e.output.data) for e in events if e.HasField("output")) == 160 * MiB
    if flush == "works":
        assert set(flushes) == {"l1"}  # 160 MiB through a 64 MiB budget: one flush or more
        assert limit_asks(uplink) == []
        assert exited.outcome == types_pb2.OUTCOME_COMPLETED and exited.budget_bytes == 64 * MiB
    else:
        assert exited.outcome == types_pb2.OUTCOME_GROWN
    assert driver.children() == []
