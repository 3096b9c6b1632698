"""The node agent on real cgroups and a real BPF monitor: many calls leave nothing behind; a
call whose lease expired without renewal or whose epoch is stale is stopped."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import grpc
import pytest
from agentcg.node.agent import NodeAgent
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.node.monitor import MemoryMonitor
from agentcg.v1 import broker_pb2, node_pb2, types_pb2

from .agent_helpers import (
    MakeAgent,
    MiB,
    NoContext,
    RecordingContext,
    StubUplink,
    make_lease,
    run_call,
    start_call,
)

pytestmark = pytest.mark.kernel

CALLS = int(os.environ.get("AGENTCG_TEST_CALLS", "10000"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_many_calls_leave_nothing_behind(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
) -> None:
    uplink = StubUplink(keep=False)
    agent = make_agent(uplink, None)
    monitor = agent_monitor[0]
    warmup = min(1000, CALLS // 10)
    rss: dict[str, int] = {}
    fds_before = len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(8)
        outcomes: list[int] = []

        async def one(i: int) -> None:
            lease_id = f"l{i}"
            # Spread over tenants and sessions: their dirs come and go with their calls.
            uplink.broker.leases[lease_id] = make_lease(
                lease_id, tenant=f"t{i % 3}", session=f"s{i % 7}"
            )
            async with sem:
                events = await run_call(agent, lease_id, ["true"])
            del uplink.broker.leases[lease_id]
            outcomes.append(events[-1].exited.outcome)

        await asyncio.gather(*(one(i) for i in range(warmup)))
        rss["warm"] = rss_bytes()
        half = warmup + (CALLS - warmup) // 2
        await asyncio.gather(*(one(i) for i in range(warmup, half)))
        rss["half"] = rss_bytes()
        await asyncio.gather(*(one(i) for i in range(half, CALLS)))
        rss["end"] = rss_bytes()
        assert outcomes.count(types_pb2.OUTCOME_COMPLETED) == CALLS

    asyncio.run(main())
    assert agent.calls == {} and agent._by_cgroup == {}
    assert driver.children() == [], "cgroups left behind"
    assert monitor.entry_counts() == (0, 0), "BPF map entries left behind"
    assert monitor.drop_counts().events == 0
    assert not monitor.per_page_attached, "per-page accounting left armed"
    # Each call's usage-threshold eventfd is closed with it.
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    assert uplink.kinds["finished"] == CALLS
    # Flat: what the node holds does not grow with the number of calls it has run. The
    # allocator settles during the first half after warm-up; a per-call leak would grow the
    # second half as much as the first (>= 1 KiB per call: 4.4 MiB over 4,500 calls).
    assert rss["end"] - rss["warm"] < 24 * MiB, rss
    assert rss["end"] - rss["half"] < max(4 * MiB, (rss["half"] - rss["warm"]) // 2), rss


@pytest.mark.parametrize(
    ("broker_answer", "reason"),
    [
        ("same", "without renewal"),
        ("unreachable", "without renewal (broker unreachable)"),
        ("stale", "stale epoch: broker has 1, node enforces 2"),
        ("released", "lease is released at the broker"),
        ("gone", "lease is unknown at the broker"),
        # A broker with an access file lets a node read only the leases placed on it.
        ("not ours", "lease is unknown at the broker"),
    ],
)
def test_lease_that_no_longer_holds_stops_its_call(
    driver: CgroupV1Driver,
    make_agent: MakeAgent,
    broker_answer: str,
    reason: str,
) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    lease = make_lease("l1", epoch=2, expires_in_ms=60_000)
    uplink.broker.leases["l1"] = lease

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        call = await start_call(agent, "l1")
        now = lease.expires_at_unix_ms + 5  # as if it were 5 ms past its expiry
        if broker_answer == "unreachable":
            uplink.broker.reachable = False
        elif broker_answer == "stale":
            uplink.broker.leases["l1"].epoch = 1
        elif broker_answer == "released":
            uplink.broker.leases["l1"].state = types_pb2.LEASE_STATE_RELEASED
            now = lease.expires_at_unix_ms - 1_000  # not yet expired: stopped all the same
        elif broker_answer == "gone":
            del uplink.broker.leases["l1"]
            now = lease.expires_at_unix_ms - 1_000
        elif broker_answer == "not ours":
            uplink.broker.denied.add("l1")
            now = lease.expires_at_unix_ms - 1_000
        await agent.check_leases(now)
        events = await asyncio.wait_for(call, 30)
        [stop] = [e.enforcement for e in events if e.HasField("enforcement")]
        assert stop.action == "kill" and reason in stop.reason and stop.action_id
        exited = events[-1].exited
        assert exited.outcome == types_pb2.OUTCOME_KILLED
        assert exited.exit_code == 137 and reason in exited.reason
        [report] = [m.action for m in uplink.sent if m.HasField("action")]
        assert report.action_id == stop.action_id
        assert report.kind == broker_pb2.ACTION_KIND_KILL

    asyncio.run(main())
    assert driver.children() == []


def test_a_lease_ended_while_its_call_is_set_up_stops_the_start(
    driver: CgroupV1Driver, make_agent: MakeAgent, tmp_path: Path
) -> None:
    """The broker pushes a lease's end (a caller released it) after it answered the node's
    check for Exec but before the call is registered, so no call is there to stop: the start
    is stopped instead, and the command never runs."""
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    uplink.broker.leases["l1"] = make_lease("l1", expires_in_ms=600_000)

    def released_right_after(answer: types_pb2.Lease) -> None:
        ended = types_pb2.Lease()
        ended.CopyFrom(answer)
        ended.state = types_pb2.LEASE_STATE_RELEASED
        assert agent.loop is not None
        agent.loop.call_soon(agent.on_lease_update, ended)  # the stream's next message

    uplink.broker.after_answer = released_right_after
    ran = tmp_path / "ran"
    context = RecordingContext()

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        argv = [sys.executable, "-c", f"open({str(ran)!r}, 'w').close()"]
        request = node_pb2.ExecRequest(lease_id="l1", argv=argv)
        events = [ev async for ev in agent.Exec(request, context)]  # type: ignore[arg-type]
        assert events == []

    asyncio.run(main())
    assert context.status is not None
    assert context.status.code == grpc.StatusCode.FAILED_PRECONDITION
    assert context.status.details == (
        "lease l1 changed at the broker while its call was set up: lease is released at the broker"
    )
    assert agent.calls == {}
    time.sleep(0.2)
    assert not ran.exists()
    assert driver.children() == []


@pytest.mark.parametrize("pushed", ["while it runs", "while it is set up"])
def test_a_pushed_renewal_keeps_its_call_through_a_broker_outage(
    driver: CgroupV1Driver, make_agent: MakeAgent, pushed: str
) -> None:
    """The broker pushes a renewal on the stream (LeaseUpdate): the node counts the new expiry
    at once, so a broker it cannot reach at the expiry it knew before (a restart, a failover)
    does not have the renewed call stopped as expired (it would be without the push:
    test_lease_that_no_longer_holds_stops_its_call[unreachable]). A renewal pushed after the
    broker answered the node's check for Exec, before the call is registered, counts as well:
    the call starts with it."""
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    lease = make_lease("l1", expires_in_ms=3_000)
    uplink.broker.leases["l1"] = lease
    renewed = types_pb2.Lease()
    renewed.CopyFrom(lease)
    renewed.expires_at_unix_ms = int(time.time() * 1000) + 600_000

    def push_renewal(_: types_pb2.Lease) -> None:
        assert agent.loop is not None
        agent.loop.call_soon(agent.on_lease_update, renewed)  # the stream's next message

    if pushed == "while it is set up":
        uplink.broker.after_answer = push_renewal

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        call = await start_call(agent, "l1")
        if pushed == "while it runs":
            agent.on_lease_update(renewed)
        assert agent.calls["l1"].lease.expires_at_unix_ms == renewed.expires_at_unix_ms
        uplink.broker.reachable = False
        await agent.check_leases(lease.expires_at_unix_ms + 5)  # past the expiry it first had
        assert list(agent.calls) == ["l1"] and not call.done()
        assert [m for m in uplink.sent if m.HasField("action")] == []
        agent.kill_all("test over")
        await asyncio.wait_for(call, 30)

    asyncio.run(main())
    assert driver.children() == []


def test_a_reconnected_uplink_has_every_lease_checked(
    driver: CgroupV1Driver, make_agent: MakeAgent
) -> None:
    """A lease revoked while the node's stream was down (a drain, a preemption: the decision
    was lost) is far from its expiry, so the periodic pass does not ask about it; the check at
    reconnection does, and stops the call. A lease still active is left alone."""
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    for lease_id in ("revoked", "fine"):
        uplink.broker.leases[lease_id] = make_lease(lease_id, expires_in_ms=600_000)

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        started = {i: asyncio.Event() for i in ("revoked", "fine")}
        calls = {i: asyncio.create_task(run_call(agent, i, argv, e)) for i, e in started.items()}
        for event in started.values():
            await event.wait()
        uplink.broker.leases["revoked"].state = types_pb2.LEASE_STATE_REVOKED
        await agent.check_leases()  # nothing due: not asked, still running
        assert sorted(agent.calls) == ["fine", "revoked"]
        await agent.on_uplink_connected()
        events = await asyncio.wait_for(calls["revoked"], 30)
        assert events[-1].exited.outcome == types_pb2.OUTCOME_KILLED
        assert list(agent.calls) == ["fine"]
        agent.kill_all("test over")
        await asyncio.wait_for(calls["fine"], 30)

    asyncio.run(main())
    assert driver.children() == []


def test_renewed_lease_keeps_its_call(driver: CgroupV1Driver, make_agent: MakeAgent) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    lease = make_lease("l1", expires_in_ms=1_000)
    uplink.broker.leases["l1"] = lease

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        started = asyncio.Event()
        code = "import sys; sys.stdin.read(); print('done')"  # ends at EOF: a quick call
        call = asyncio.create_task(run_call(agent, "l1", [sys.executable, "-c", code], started))
        await started.wait()
        expired_ms = lease.expires_at_unix_ms
        renewed = uplink.broker.leases["l1"]
        renewed.expires_at_unix_ms += 60_000  # renewed at the broker; the node did not see it
        await agent.check_leases(expired_ms + 5)
        assert agent.calls["l1"].lease.expires_at_unix_ms == renewed.expires_at_unix_ms
        events = await asyncio.wait_for(call, 30)
        assert events[-1].exited.outcome == types_pb2.OUTCOME_COMPLETED
        assert not any(e.HasField("enforcement") for e in events)

    asyncio.run(main())


def test_a_lease_runs_out_by_the_brokers_clock_not_the_nodes(
    driver: CgroupV1Driver, make_agent: MakeAgent
) -> None:
    """The broker's clock is a minute behind the node's. Its lease has 5 s left, though its
    expiry is in the node's past: the node counts the time left from the broker's own clock
    (GetLease's as_of) and keeps the call, then stops it once the lease ran out by that count."""
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    skew_ms = -60_000
    uplink.broker.clock_offset_ms = skew_ms
    lease = make_lease("l1", expires_in_ms=5_000)
    lease.expires_at_unix_ms += skew_ms  # 5 s from now on the broker's clock
    uplink.broker.leases["l1"] = lease

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        started = asyncio.Event()
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        call = asyncio.create_task(run_call(agent, "l1", argv, started))
        await started.wait()
        await agent.check_leases(every=True)
        assert list(agent.calls) == ["l1"], "stopped for an expiry read on the node's clock"
        left_ms = agent.calls["l1"].lease.expires_at_unix_ms - time.time() * 1000
        assert 0 < left_ms <= 5_000
        uplink.broker.clock_offset_ms = skew_ms + 6_000  # the broker's clock moved on by 6 s
        await agent.check_leases(every=True)
        events = await asyncio.wait_for(call, 30)
        [stop] = [e.enforcement for e in events if e.HasField("enforcement")]
        assert stop.action == "kill" and "without renewal" in stop.reason, stop
        assert events[-1].exited.outcome == types_pb2.OUTCOME_KILLED

    asyncio.run(main())
    assert driver.children() == []


def test_leases_due_together_are_refreshed_together(
    driver: CgroupV1Driver, make_agent: MakeAgent
) -> None:
    """Three calls' leases are due; the broker answers only once all three questions are in
    flight. Asked one after another, the first would run into its deadline, and each call, its
    lease expired with no answer, would be stopped."""
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    ids = ["l1", "l2", "l3"]
    for lease_id in ids:
        uplink.broker.leases[lease_id] = make_lease(lease_id, expires_in_ms=1_000)

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        calls, started = [], []
        for lease_id in ids:
            started.append(asyncio.Event())
            calls.append(asyncio.create_task(run_call(agent, lease_id, argv, started[-1])))
        for event in started:
            await event.wait()
        expired_ms = max(uplink.broker.leases[i].expires_at_unix_ms for i in ids)
        for lease_id in ids:  # renewed at the broker; the node did not see it
            uplink.broker.leases[lease_id].expires_at_unix_ms += 60_000
        uplink.broker.answer_together(len(ids))
        await agent.check_leases(expired_ms + 5)
        assert sorted(agent.calls) == ids, "a call was stopped"
        for lease_id in ids:
            held = agent.calls[lease_id].lease.expires_at_unix_ms
            assert held == uplink.broker.leases[lease_id].expires_at_unix_ms
        assert not any(m.HasField("action") for m in uplink.sent)
        agent.kill_all("test over")
        for events in await asyncio.gather(*calls):
            assert not any(e.HasField("enforcement") for e in events)
            assert events[-1].exited.outcome == types_pb2.OUTCOME_KILLED

    asyncio.run(main())
    assert driver.children() == []


def test_preempt_decision_stops_a_running_call(
    driver: CgroupV1Driver, make_agent: MakeAgent
) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    uplink.broker.leases["l1"] = make_lease("l1", epoch=3)

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        call = await start_call(agent, "l1")
        preempt = broker_pb2.Decision(
            decision_id="d1", lease_id="l1", kind=broker_pb2.DECISION_KIND_PREEMPT, epoch=2
        )
        await agent.on_decision(preempt)  # stale epoch: ignored
        assert agent.calls["l1"].phase.value == "running"
        preempt.epoch = 3
        preempt.reason = "preempted for tenant t9 (priority 5 > 0)"
        await agent.on_decision(preempt)
        events = await asyncio.wait_for(call, 30)
        exited = events[-1].exited
        assert exited.outcome == types_pb2.OUTCOME_KILLED and "preempted" in exited.reason
        [report] = [m.action for m in uplink.sent if m.HasField("action")]
        assert report.kind == broker_pb2.ACTION_KIND_KILL and "preempted" in report.reason
        [done] = [m.finished for m in uplink.sent if m.HasField("finished")]
        assert done.outcome == types_pb2.OUTCOME_KILLED

    asyncio.run(main())
    assert driver.children() == []


def test_per_page_accounting_runs_only_above_the_arm_threshold(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    # Budget 64 MiB: soft 51 MiB; per-page accounting armed from 25.6 MiB by the kernel's own
    # usage threshold (v1), disarmed when the call ends.
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    monitor = agent_monitor[0]
    seen: dict[str, object] = {}
    # Each step waits for the test to have looked (a file), not for a time: on a busy host the
    # output comes late.
    code = (
        "import os, sys, time\n"
        "def hold(name):\n"
        "    t = time.monotonic() + 60\n"
        "    while not os.path.exists(sys.argv[1] + name) and time.monotonic() < t:\n"
        "        time.sleep(0.01)\n"
        "a = b'x' * (8 << 20); print('low', flush=True); hold('low')\n"
        "b = b'x' * (32 << 20); print('high', flush=True); hold('high')\n"
    )

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        uplink.broker.leases["l1"] = make_lease("l1")
        argv = [sys.executable, "-c", code, f"{tmp_path}/looked-"]
        request = node_pb2.ExecRequest(lease_id="l1", argv=argv, capture_output=True)
        async for ev in agent.Exec(request, NoContext()):  # type: ignore[arg-type]
            if ev.HasField("output"):
                line = ev.output.data.decode().strip()
                # The threshold's eventfd is read on this loop: armed in time, or never.
                deadline = time.monotonic() + (0.5 if line == "low" else 10)
                while not monitor.per_page_attached and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                seen[line] = monitor.per_page_attached
                stats = monitor.stats(agent.calls["l1"].cgroup_id)
                seen[line + "_usage"] = stats.usage_bytes if stats else None
                (tmp_path / f"looked-{line}").touch()
        seen["after"] = monitor.per_page_attached

    asyncio.run(main())
    assert seen["low"] is False, seen
    assert seen["high"] is True, seen
    usage = seen["high_usage"]
    assert isinstance(usage, int) and usage >= 40 * MiB, seen  # the memcg's own counter
    assert seen["after"] is False, seen
