"""The SDK's calls that follow calls on a restarted node again ask the broker where that node is
now once per client and second, not once per call: a real broker process and a simulated node."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agentcg.clients.cluster import LocalCluster, free_port
from agentcg.clients.sdk import AsyncClient, Lease
from agentcg.clients.simnode import SimNode
from agentcg.v1 import types_pb2

MiB = 1 << 20
SIM_ADDRESS = "127.0.0.1:1"  # what SimNode registers


def test_calls_on_one_node_share_one_lookup_per_second(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=0, log_level="WARNING") as cluster:
        with SimNode(cluster.broker_address):

            async def go() -> tuple[list[str], int, str, int]:
                async with AsyncClient(cluster.broker_address) as client:
                    await client.set_tenant("t", 1 << 34)
                    leases = [await client.reserve("t", MiB) for _ in range(40)]
                    asked: list[str] = []
                    real = client.get_lease

                    async def counting(lease_id: str) -> Lease:
                        asked.append(lease_id)
                        return await real(lease_id)

                    client.get_lease = counting  # type: ignore[method-assign]
                    found = await asyncio.gather(
                        *(client._node_address(le, "stale:1") for le in leases)
                    )
                    shared = len(asked)
                    client.NODE_LOOKUP_S = 0.0  # the answer is old: asked again
                    again = await client._node_address(leases[0], "stale:1")
                    return found, shared, again, len(asked)

            found, shared, again, total = asyncio.run(go())
    assert found == [SIM_ADDRESS] * 40
    assert shared == 1
    assert again == SIM_ADDRESS and total == 2


def test_the_known_address_when_the_broker_cannot_say() -> None:
    lease = Lease.from_pb(types_pb2.Lease(lease_id="l-1", tenant="t", node_id="n"))

    async def go() -> str:
        async with AsyncClient(f"127.0.0.1:{free_port()}", timeout_s=2) as client:
            return await client._node_address(lease, "10.0.0.7:7070")

    assert asyncio.run(go()) == "10.0.0.7:7070"
