"""The SDK's ``exec`` follows a call again after its stream broke, telling the node what it
already has: the bytes of each stream and the enforcement actions (the last one's seq + 1), so
it gets the rest of each exactly once. The node here is a scripted NodeAgent servicer on a real
gRPC server on loopback; the real node's side is tests/e2e/test_exec_resume.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from agentcg.clients.cluster import free_port
from agentcg.clients.sdk import AsyncClient, Lease, RunResult
from agentcg.v1 import node_pb2, node_pb2_grpc, types_pb2

OUT = node_pb2.Output.STREAM_STDOUT
# The call's actions as the node numbers them; seq 2 was dropped from its window meanwhile.
ACTIONS = [("throttle", 0), ("pause", 1), ("grow", 3), ("unthrottle", 4)]


def action(name: str, seq: int) -> node_pb2.ExecEvent:
    return node_pb2.ExecEvent(enforcement=node_pb2.Enforcement(action=name, seq=seq))


def output(data: bytes) -> node_pb2.ExecEvent:
    return node_pb2.ExecEvent(output=node_pb2.Output(stream=OUT, data=data))


class ScriptedNode(node_pb2_grpc.NodeAgentServicer):
    """Exec sends output and the first three actions, then breaks (UNAVAILABLE, as an agent
    restarting does); Resume sends what comes after the offsets and actions it is told of."""

    def __init__(self) -> None:
        self.resumes: list[node_pb2.ResumeRequest] = []

    async def Exec(self, request: Any, context: Any) -> AsyncIterator[node_pb2.ExecEvent]:
        yield node_pb2.ExecEvent(started=node_pb2.Started(call_id=request.lease_id, pid=9))
        yield output(b"abc")
        for name, seq in ACTIONS[:3]:
            yield action(name, seq)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "agent restarting: Resume it")

    async def Resume(self, request: Any, context: Any) -> AsyncIterator[node_pb2.ExecEvent]:
        self.resumes.append(request)
        yield node_pb2.ExecEvent(started=node_pb2.Started(call_id=request.lease_id, resumed=True))
        yield output(b"abcdef"[request.stdout_offset :])
        seen = request.actions_seen if request.HasField("actions_seen") else 0
        for name, seq in ACTIONS:
            if seq >= seen:
                yield action(name, seq)
        yield node_pb2.ExecEvent(
            exited=node_pb2.Exited(exit_code=0, outcome=types_pb2.OUTCOME_GROWN)
        )


def test_exec_resumes_with_the_bytes_and_actions_it_had_and_gets_the_rest_once() -> None:
    async def go() -> tuple[RunResult, bytes, list[node_pb2.ResumeRequest]]:
        scripted = ScriptedNode()
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeAgentServicer_to_server(scripted, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        got = bytearray()
        lease = Lease.from_pb(
            types_pb2.Lease(
                lease_id="l-1", tenant="t", node_id="n", node_address=f"127.0.0.1:{port}"
            )
        )
        try:
            # No broker answers: the SDK resumes at the address it knows.
            async with AsyncClient(f"127.0.0.1:{free_port()}", timeout_s=2) as client:
                result = await client.exec(
                    lease, ["true"], on_output=lambda _, d: got.extend(d), resume_timeout_s=10
                )
        finally:
            await server.stop(None)
        return result, bytes(got), scripted.resumes

    result, got, resumes = asyncio.run(go())
    [resume] = resumes
    assert resume.stdout_offset == 3 and resume.stderr_offset == 0
    assert resume.HasField("actions_seen") and resume.actions_seen == 4, resume
    assert got == b"abcdef"
    assert result.actions == ("throttle", "pause", "grow", "unthrottle")
    assert result.outcome == "grown"
