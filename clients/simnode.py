"""A simulated node (broker tests, `agentcg bench failover`): registers, holds the Connect
stream, and reconnects (to whatever address ``address`` holds now) when the broker goes away.
Records the decisions and lease updates the broker sends down the stream."""

from __future__ import annotations

import asyncio
import queue
import threading

import grpc
from agentcg.channels import ClientSecurity
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2

__all__ = ["SimNode"]


class SimNode:
    def __init__(
        self,
        address: str,
        node_id: str = "sim-0",
        memory_bytes: int = 1 << 40,
        security: ClientSecurity | None = None,
    ) -> None:
        self.address = address
        self.security = security or ClientSecurity()
        self.node_id = node_id
        self.memory_bytes = memory_bytes
        self.decisions: list[broker_pb2.Decision] = []
        self.lease_updates: list[types_pb2.Lease] = []
        self.connected = threading.Event()
        self.outbox: queue.Queue[broker_pb2.NodeMessage] = queue.Queue()  # sent while connected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SimNode:
        self._thread.start()
        if not self.connected.wait(30):
            raise TimeoutError(f"sim node {self.node_id} did not connect to {self.address}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _run(self) -> None:
        while not self._stop.is_set():
            address = self.address
            try:
                async with self.security.aio_channel(address) as ch:
                    gw = broker_pb2_grpc.NodeGatewayStub(ch)
                    await gw.RegisterNode(
                        broker_pb2.RegisterNodeRequest(
                            node_id=self.node_id,
                            address="127.0.0.1:1",
                            capacity=types_pb2.Resources(memory_bytes=self.memory_bytes),
                        ),
                        timeout=5,
                    )
                    call = gw.Connect()
                    await call.write(
                        broker_pb2.NodeMessage(hello=broker_pb2.NodeHello(node_id=self.node_id))
                    )
                    # Heartbeat until the broker answers it is registered: then it is connected.
                    await call.write(broker_pb2.NodeMessage(heartbeat=broker_pb2.Heartbeat()))
                    await asyncio.sleep(0.2)
                    self.connected.set()
                    reader = asyncio.ensure_future(self._read(call))
                    while not self._stop.is_set() and not reader.done() and self.address == address:
                        while not self.outbox.empty():
                            await call.write(self.outbox.get_nowait())
                        await asyncio.sleep(0.05)
                    self.connected.clear()
                    reader.cancel()
                    call.cancel()
            except (grpc.aio.AioRpcError, asyncio.CancelledError, OSError):
                self.connected.clear()
            await asyncio.sleep(0.05)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        async for msg in call:
            if msg.HasField("decision"):
                self.decisions.append(msg.decision)
            elif msg.HasField("lease"):
                self.lease_updates.append(msg.lease.lease)
