"""A NodeAgent on real cgroups and a real monitor, with a stand-in for the broker side.

The broker is replaced (it is not the kernel): `StubBroker.GetLease` answers from a dict, and
`StubUplink.send` records what the node reports upstream.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from agentcg.node.agent import NodeAgent
from agentcg.node.enforcement import NodePolicy
from agentcg.v1 import broker_pb2, node_pb2, types_pb2

MiB = 1 << 20
NODE = "n1"

MakeAgent = Callable[["StubUplink", NodePolicy | None], NodeAgent]


def make_lease(
    lease_id: str,
    *,
    budget: int = 64 * MiB,
    epoch: int = 1,
    expires_in_ms: int = 60_000,
    tenant: str = "t1",
    session: str = "s1",
) -> types_pb2.Lease:
    return types_pb2.Lease(
        lease_id=lease_id,
        tenant=tenant,
        session=session,
        node_id=NODE,
        budget=types_pb2.Resources(memory_bytes=budget),
        epoch=epoch,
        state=types_pb2.LEASE_STATE_ACTIVE,
        expires_at_unix_ms=int(time.time() * 1000) + expires_in_ms,
    )


class StubBroker:
    def __init__(self) -> None:
        self.leases: dict[str, types_pb2.Lease] = {}
        self.reachable = True
        self.denied: set[str] = set()  # GetLease: PERMISSION_DENIED (placed on another node)
        # Set: GetLease tells its clock (as_of), this far from the node's (None: it does not).
        self.clock_offset_ms: int | None = None
        # Called with each answer just before it is returned (the broker doing more meanwhile).
        self.after_answer: Callable[[types_pb2.Lease], None] | None = None
        self._together = 0
        self._waiting = 0
        self._all_in = asyncio.Event()

    def answer_together(self, questions: int) -> None:
        """From now on GetLease answers only once this many are in flight together, and runs
        into its deadline (DEADLINE_EXCEEDED) otherwise, as a broker slow to answer would."""
        self._together, self._waiting = questions, 0
        self._all_in.clear()

    async def GetLease(  # noqa: N802 - the gRPC method name
        self, request: broker_pb2.GetLeaseRequest, timeout: float | None = None
    ) -> types_pb2.Lease:
        if self._together:
            self._waiting += 1
            if self._waiting >= self._together:
                self._all_in.set()
            try:
                await asyncio.wait_for(self._all_in.wait(), timeout)
            except TimeoutError:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "slow",
                ) from None
        if not self.reachable:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        if request.lease_id in self.denied:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no"
            )
        lease = self.leases.get(request.lease_id)
        if lease is None:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no lease"
            )
        out = types_pb2.Lease()
        out.CopyFrom(lease)
        if self.clock_offset_ms is not None:
            out.as_of_unix_ms = int(time.time() * 1000) + self.clock_offset_ms
        if self.after_answer is not None:
            self.after_answer(out)
        return out


@dataclass
class StubUplink:
    broker: StubBroker = field(default_factory=StubBroker)
    keep: bool = True
    sent: list[broker_pb2.NodeMessage] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    connections: int = 1  # streams opened so far (a test moves it on for a reconnection)
    connected: bool = True

    def send(self, msg: broker_pb2.NodeMessage) -> None:
        self.kinds[str(msg.WhichOneof("body"))] += 1
        if self.keep:
            self.sent.append(msg)


class NoContext:
    async def abort_with_status(self, status: object) -> None:
        raise AssertionError(f"Exec aborted: {status}")


class RecordingContext:
    """Keeps the status an RPC ended with."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


async def start_call(
    agent: NodeAgent, lease_id: str, argv: Sequence[str] = SLEEPER
) -> asyncio.Task[list[node_pb2.ExecEvent]]:
    """Exec ``argv`` (a call that sleeps a minute) under ``lease_id`` and wait until it has
    started; the task that ends with its events."""
    started = asyncio.Event()
    call = asyncio.create_task(run_call(agent, lease_id, argv, started))
    await started.wait()
    return call


async def run_call(
    agent: NodeAgent,
    lease_id: str,
    argv: Sequence[str],
    started: asyncio.Event | None = None,
) -> list[node_pb2.ExecEvent]:
    events = []
    request = node_pb2.ExecRequest(lease_id=lease_id, argv=list(argv))
    async for ev in agent.Exec(request, NoContext()):  # type: ignore[arg-type]
        events.append(ev)
        if started is not None and ev.HasField("started"):
            started.set()
    return events
