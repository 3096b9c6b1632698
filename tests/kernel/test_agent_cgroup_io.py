"""The node agent's slow cgroup operations run off its event loop (the cgroup-io thread, and the
cgroup-watch threads for usage thresholds): calls that spike concurrently are still grown, and
their cgroups, usage-threshold eventfds and BPF entries all go with them, in sessions whose dirs
are removed and created again in between; usage thresholds of calls starting together register
side by side, each in place before its call runs (also when it comes back in the loop iteration
that places the call); a usage-threshold registration overtaken by a later one, or by the end of
its call, is closed. Real cgroups, a real BPF monitor, real processes."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import pytest
from agentcg.node.agent import NodeAgent
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.node.enforcement import NodePolicy, arm_threshold
from agentcg.node.monitor import EventKind, MemEvent, MemoryMonitor
from agentcg.v1 import broker_pb2, node_pb2, types_pb2

from .agent_helpers import MakeAgent, MiB, NoContext, StubUplink, make_lease, run_call, start_call

pytestmark = pytest.mark.kernel

SPIKE = "b = b'x' * (100 << 20)\n"  # past its 64 MiB budget: paused there until grown


def eventfds() -> int:
    """Open eventfds of this process (each call's usage threshold holds one)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass  # closed meanwhile
    return n


class GrowingUplink(StubUplink):
    """Answers every limit ask with a GROW to what was asked, as a broker with headroom does
    (from the loop, after the ask: as a decision arriving on the stream)."""

    agent: NodeAgent | None = None

    def send(self, msg: broker_pb2.NodeMessage) -> None:
        super().send(msg)
        ask = msg.pressure
        if msg.HasField("pressure") and ask.kind == broker_pb2.PRESSURE_KIND_LIMIT_REACHED:
            assert self.agent is not None
            decision = broker_pb2.Decision(
                decision_id=f"d-{ask.event_id}",
                lease_id=ask.lease_id,
                event_id=ask.event_id,
                kind=broker_pb2.DECISION_KIND_GROW,
                new_budget_bytes=ask.requested_memory_bytes,
                epoch=ask.epoch + 1,
            )
            asyncio.get_running_loop().create_task(self.agent.on_decision(decision))


def test_concurrent_spikes_are_grown_and_leave_nothing_behind(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
) -> None:
    uplink = GrowingUplink()
    agent = uplink.agent = make_agent(uplink, None)
    monitor = agent_monitor[0]
    eventfds_before = eventfds()

    async def main() -> list[list[str]]:
        agent.loop = asyncio.get_running_loop()
        seen: list[list[str]] = []

        async def one(i: int) -> None:
            lease_id = f"l{i}"
            uplink.broker.leases[lease_id] = make_lease(lease_id, session=f"s{i % 2}")
            events = await run_call(agent, lease_id, [sys.executable, "-c", SPIKE])
            exited = events[-1].exited
            assert exited.exit_code == 0, exited
            assert exited.outcome == types_pb2.OUTCOME_GROWN, exited
            # ~110 MiB at its peak: one grow, 64 -> 128 MiB. A limit report from before that
            # grow's limit raise must not ask again (it did: 64 -> 128 -> 256 MiB).
            assert exited.budget_bytes == 128 * MiB, exited
            seen.append([e.enforcement.action for e in events if e.HasField("enforcement")])

        # Two waves: the second's session dirs were removed with the first (the same thread
        # removes, then creates them again, in that order).
        for wave in range(2):
            await asyncio.gather(*(one(wave * 4 + i) for i in range(4)))
        return seen

    seen = asyncio.run(main())
    # Every pause was answered by a grow (applied: the call ran on to its end).
    assert len(seen) == 8, seen
    assert all(a.count("grow") == a.count("pause") == 1 and "kill" not in a for a in seen), seen
    assert agent.calls == {}
    assert driver.children() == [], "cgroups left behind"
    assert monitor.entry_counts() == (0, 0), "BPF map entries left behind"
    assert not monitor.per_page_attached, "per-page accounting left armed"
    assert eventfds() == eventfds_before, "usage-threshold or pause-notice eventfds left open"


def test_usage_thresholds_of_calls_starting_together_register_side_by_side(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each registration waits for an RCU grace period (~12 ms); on one thread they queued, and a
    # node started ~60 calls a second at most. Grace periods are shared, so they go side by
    # side, and each is in place before its call runs (its eventfd is open once it started).
    # A call that fails to start (no such cwd) after its registration began leaves none behind.
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    monitor = agent_monitor[0]
    eventfds_before = eventfds()
    register = driver.watch_usage
    lock = threading.Lock()
    in_flight, most, threads = 0, 0, set()

    def counted(*args: Any) -> int | None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
            threads.add(threading.current_thread().name)
        try:
            return register(*args)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(driver, "watch_usage", counted)
    armed_at_start: list[bool] = []

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            lease_id = f"l{i}"
            uplink.broker.leases[lease_id] = make_lease(lease_id, session=f"s{i % 2}")
            request = node_pb2.ExecRequest(lease_id=lease_id, argv=["sleep", "0.2"])
            async for ev in agent.Exec(request, NoContext()):  # type: ignore[arg-type]
                if ev.HasField("started"):
                    armed_at_start.append(agent.calls[lease_id].arm_fd >= 0)
                if ev.HasField("exited"):
                    outcome = (ev.exited.exit_code, ev.exited.outcome)
                    assert outcome == (0, types_pb2.OUTCOME_COMPLETED), ev.exited

        await asyncio.gather(*(one(i) for i in range(8)))
        uplink.broker.leases["bad"] = make_lease("bad")
        request = node_pb2.ExecRequest(lease_id="bad", argv=["true"], cwd="/nonexistent/cwd")
        with pytest.raises(AssertionError, match="INVALID_ARGUMENT"):
            async for _ in agent.Exec(request, NoContext()):  # type: ignore[arg-type]
                pass
        await asyncio.sleep(0.1)  # a registration landing late is closed on the loop

    asyncio.run(main())
    assert armed_at_start == [True] * 8
    assert most > 1, "usage thresholds registered one at a time"
    assert threads and all(t.startswith("cgroup-watch") for t in threads), threads
    assert agent.calls == {} and driver.children() == []
    assert monitor.entry_counts() == (0, 0), "BPF map entries left behind"
    assert eventfds() == eventfds_before, "usage-threshold or pause-notice eventfds left open"


def test_a_call_runs_only_once_its_usage_threshold_is_read_on_the_loop(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The call's placement (attach, on the cgroup-io thread) and its threshold's registration
    # (a cgroup-watch thread) come back while the loop is held, one iteration apart, placement
    # first: the call's task wakes (its await of attach is shielded: one hop) in the iteration
    # that runs the registration's own callback. The call must still not run before the
    # threshold's eventfd is read on the loop (3 of 8 calls did, once, on a busy CI host).
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    monitor = agent_monitor[0]
    eventfds_before = eventfds()
    attach, register = driver.attach, driver.watch_usage
    both_back = threading.Barrier(2, timeout=10)
    attach_returns, register_returns = threading.Event(), threading.Event()

    def hold_loop() -> None:  # on the loop: attach returns meanwhile, then the registration
        attach_returns.set()  # while this iteration runs
        time.sleep(0.1)
        assert agent.loop is not None
        agent.loop.call_soon(hold_loop_again)  # after attach's return, in the next iteration

    def hold_loop_again() -> None:
        register_returns.set()
        time.sleep(0.1)

    def held_attach(*args: Any) -> None:
        attach(*args)
        both_back.wait()
        assert agent.loop is not None
        agent.loop.call_soon_threadsafe(hold_loop)
        assert attach_returns.wait(10)

    def held_register(*args: Any) -> int | None:
        fd = register(*args)
        both_back.wait()
        assert register_returns.wait(10)
        return fd

    monkeypatch.setattr(driver, "attach", held_attach)
    monkeypatch.setattr(driver, "watch_usage", held_register)
    uplink.broker.leases["l1"] = make_lease("l1")
    armed_at_start: list[bool] = []

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        request = node_pb2.ExecRequest(lease_id="l1", argv=["true"])
        async for ev in agent.Exec(request, NoContext()):  # type: ignore[arg-type]
            if ev.HasField("started"):
                armed_at_start.append(agent.calls["l1"].arm_fd >= 0)
            if ev.HasField("exited"):
                outcome = (ev.exited.exit_code, ev.exited.outcome)
                assert outcome == (0, types_pb2.OUTCOME_COMPLETED), ev.exited

    asyncio.run(main())
    assert attach_returns.is_set() and register_returns.is_set(), "the loop was not held"
    assert armed_at_start == [True]
    assert agent.calls == {} and driver.children() == []
    assert monitor.entry_counts() == (0, 0), "BPF map entries left behind"
    assert eventfds() == eventfds_before, "usage-threshold or pause-notice eventfds left open"


def test_a_call_held_at_its_limit_with_its_limit_report_lost_is_still_grown(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
) -> None:
    # The kernel's own notice of a task waiting at its limit (memory.oom_control) backs up the
    # BPF LIMIT report: with every LIMIT report lost (dropped here, on its way to the agent),
    # the call still asks, is grown once and finishes, instead of waiting at its limit for good.
    # No throttle: its deadline (a pause and ask if still above the soft threshold) would
    # rescue this call too, 2 s later, but not one that waits below its soft threshold.
    uplink = GrowingUplink()
    agent = uplink.agent = make_agent(uplink, NodePolicy(throttle=False))
    dropped: list[MemEvent] = []
    handle = agent._handle_mem_event

    def lossy(ev: MemEvent) -> None:
        if ev.kind is EventKind.LIMIT:
            dropped.append(ev)
        else:
            handle(ev)

    agent._handle_mem_event = lossy  # type: ignore[method-assign]
    eventfds_before = eventfds()
    uplink.broker.leases["l1"] = make_lease("l1")

    async def main() -> list[node_pb2.ExecEvent]:
        agent.loop = asyncio.get_running_loop()
        return await run_call(agent, "l1", [sys.executable, "-c", SPIKE])

    events = asyncio.run(main())
    exited = events[-1].exited
    assert (exited.exit_code, exited.outcome) == (0, types_pb2.OUTCOME_GROWN), exited
    assert exited.budget_bytes == 128 * MiB, exited
    assert dropped, "the kernel reported no LIMIT: nothing was lost"
    asks = [
        m.pressure
        for m in uplink.sent
        if m.HasField("pressure") and m.pressure.kind == broker_pb2.PRESSURE_KIND_LIMIT_REACHED
    ]
    assert len(asks) == 1 and asks[0].requested_memory_bytes == 128 * MiB, asks
    sample = agent.metrics.registry.get_sample_value
    assert sample("agentcg_node_pause_notices_total", {"action": "ask"}) == 1
    assert sample("agentcg_node_pause_notices_total", {"action": "wake"}) == 0
    assert eventfds() == eventfds_before
    assert driver.children() == []


def test_overtaken_threshold_registration_is_closed(
    driver: CgroupV1Driver,
    agent_monitor: tuple[MemoryMonitor, list[NodeAgent]],
    make_agent: MakeAgent,
) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    monitor = agent_monitor[0]
    uplink.broker.leases["l1"] = make_lease("l1")
    eventfds_before = eventfds()

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        task = await start_call(agent, "l1")
        call = agent.calls["l1"]
        # Two eventfds per call: its arm threshold and its pause notice.
        assert call.arm_fd >= 0 and call.pause_fd >= 0 and eventfds() == eventfds_before + 2
        # Two budgets in a row: the first registration lands after the second was asked for.
        first = agent._watch_arming(call, 256 * MiB)
        second = agent._watch_arming(call, 512 * MiB)
        await asyncio.gather(first, second)
        await asyncio.sleep(0.05)  # their completions run on the loop
        assert call.arm_bytes == arm_threshold(512 * MiB, agent.policy)
        assert eventfds() == eventfds_before + 2, "the overtaken registration is still open"
        # One still registering when the call ends: closed when it lands.
        late = agent._watch_arming(call, 1024 * MiB)
        agent._stop(call, "test over")
        events = await asyncio.wait_for(task, 30)
        assert events[-1].exited.outcome == types_pb2.OUTCOME_KILLED
        await asyncio.wait_for(late, 30)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert eventfds() == eventfds_before, "a late registration was left open"
    assert driver.children() == []
    assert monitor.entry_counts() == (0, 0) and not monitor.per_page_attached
