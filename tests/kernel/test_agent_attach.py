"""Attach: an existing process (one the node did not start, as inside a sandbox) is moved into a
call cgroup and enforced like an Exec'd call. Real cgroups, a real BPF monitor."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentcg.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from agentcg.node.cgroup import CgroupV1Driver
from agentcg.v1 import broker_pb2, types_pb2

from .agent_helpers import MakeAgent, MiB, StubUplink, make_lease, start_call

pytestmark = pytest.mark.kernel


async def wait_for(predicate, what: str, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_attached_process_is_enforced_and_ends_its_call(
    driver: CgroupV1Driver, make_agent: MakeAgent, tmp_path: Path
) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    uplink.broker.leases["l1"] = make_lease("l1")
    go = tmp_path / "go"
    code = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "b = b'x' * (150 << 20)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])  # a process the node did not start
    try:

        async def main() -> None:
            agent.loop = asyncio.get_running_loop()
            reply = await agent.attach("l1", proc.pid)
            assert reply.created and reply.call_id == "l1"
            cg = agent.calls["l1"].cgroup
            assert driver.read_stats(cg).pids == (proc.pid,)
            go.touch()
            limit = broker_pb2.PRESSURE_KIND_LIMIT_REACHED
            await wait_for(
                lambda: any(
                    m.HasField("pressure") and m.pressure.kind == limit for m in uplink.sent
                ),
                "the attached call to hit its budget",
            )
            [ask] = [
                m.pressure
                for m in uplink.sent
                if m.HasField("pressure") and m.pressure.kind == limit
            ]
            await agent.on_decision(
                broker_pb2.Decision(
                    lease_id="l1",
                    event_id=ask.event_id,
                    kind=broker_pb2.DECISION_KIND_GROW,
                    new_budget_bytes=256 * MiB,
                    epoch=2,
                )
            )
            await wait_for(
                lambda: any(m.HasField("finished") for m in uplink.sent), "the call to end"
            )
            [done] = [m.finished for m in uplink.sent if m.HasField("finished")]
            assert done.outcome == types_pb2.OUTCOME_GROWN and done.budget_bytes == 256 * MiB
            assert agent.calls == {}
            # Its cgroup is removed on the cgroup-I/O thread, after the end is reported.
            await wait_for(lambda: driver.children() == [], "its cgroups to be removed", 10)
            if agent._adopt_poll is not None:
                agent._adopt_poll.cancel()

        asyncio.run(main())
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_attach_joins_a_running_call(driver: CgroupV1Driver, make_agent: MakeAgent) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    uplink.broker.leases["l1"] = make_lease("l1")
    helper = subprocess.Popen(["sleep", "60"])
    try:

        async def main() -> None:
            agent.loop = asyncio.get_running_loop()
            call = await start_call(agent, "l1")
            reply = await agent.attach("l1", helper.pid)
            assert not reply.created
            cg = agent.calls["l1"].cgroup
            assert helper.pid in driver.read_stats(cg).pids
            agent._stop(agent.calls["l1"], "test over")  # the whole call goes, helper included
            events = await asyncio.wait_for(call, 30)
            assert events[-1].exited.outcome == types_pb2.OUTCOME_KILLED

        asyncio.run(main())
        assert helper.wait(timeout=10) == -9
        assert driver.children() == []
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


def test_attach_bad_input(driver: CgroupV1Driver, make_agent: MakeAgent) -> None:
    uplink = StubUplink()
    agent = make_agent(uplink, None)
    released = make_lease("l2")
    released.state = types_pb2.LEASE_STATE_RELEASED
    uplink.broker.leases["l2"] = released
    uplink.broker.leases["l1"] = make_lease("l1")

    async def main() -> None:
        agent.loop = asyncio.get_running_loop()
        with pytest.raises(InvalidArgumentError, match="pid"):
            await agent.attach("l1", 1)
        with pytest.raises(InvalidArgumentError, match="lease_id"):
            await agent.attach("../x", 1234)
        with pytest.raises(NotFoundError, match="pid: process"):
            await agent.attach("l1", 2**22 + 7)
        helper = subprocess.Popen(["sleep", "60"])
        try:
            with pytest.raises(FailedPreconditionError, match="not active"):
                await agent.attach("l2", helper.pid)
            with pytest.raises(NotFoundError):
                await agent.attach("nope", helper.pid)
        finally:
            helper.kill()
            helper.wait()
        assert agent.calls == {} and driver.children() == []

    asyncio.run(main())
