"""The node's link to the broker: register, then one long-lived bidirectional stream.

Reconnects with exponential backoff. Messages produced while the link is down wait in a
bounded buffer; when it overflows the oldest are dropped and counted (reported in heartbeats).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc
from agentcg.channels import ClientSecurity, broker_channel_options
from agentcg.tracecontext import aio_client_interceptors
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2

__all__ = ["Uplink"]

log = logging.getLogger(__name__)


class Uplink:
    FILES_CHECK_S = 2.0

    def __init__(
        self,
        broker_address: str,
        registration: broker_pb2.RegisterNodeRequest,
        on_decision: Callable[[broker_pb2.Decision], Awaitable[None]],
        heartbeat: Callable[[], broker_pb2.Heartbeat],
        *,
        on_lease: Callable[[types_pb2.Lease], None] | None = None,
        on_connected: Callable[[], Coroutine[Any, Any, None]] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        buffer_size: int = 10_000,
        max_backoff_s: float = 5.0,
        security: ClientSecurity | None = None,
    ) -> None:
        # Given every broker replica: calls wait for the new leader, and one in flight when the
        # leader died is sent again (an Exec's lease check made during a takeover waits for it).
        self._stream: grpc.aio.StreamStreamCall[Any, Any] | None = None
        self._target = broker_address
        self._security = security or ClientSecurity()
        self._files = self._security.files_version()
        self._open_channel()
        self._registration = registration
        self._on_decision = on_decision
        self._heartbeat = heartbeat
        self._on_lease = on_lease
        # Run after every (re)connection, beside the stream: decisions and lease updates sent
        # while the link was down are lost, so the node checks what it holds again.
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected  # once per lost link, with why
        self._background: set[asyncio.Future[None]] = set()
        self.connections = 0  # how many times the stream was opened
        self._buffer: collections.deque[broker_pb2.NodeMessage] = collections.deque()
        self._buffer_size = buffer_size
        self._ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._max_backoff_s = max_backoff_s
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.heartbeat_interval_s = 2.0

    def _open_channel(self) -> None:
        self.channel = self._security.aio_channel(
            self._target,
            options=broker_channel_options(self._target),
            interceptors=aio_client_interceptors(),
        )
        self.broker = broker_pb2_grpc.BrokerStub(self.channel)
        self._gateway = broker_pb2_grpc.NodeGatewayStub(self.channel)

    async def reconnect(self, grace_s: float = 2.0) -> bool:
        """A new channel from the credentials' files read again (a rotated token file, client
        certificate or CA: SIGHUP, or seen changed by ``_follow_files``). Calls from now on use
        it, and the stream moves over at once (it is ended; the loop registers and connects
        again); calls still on the old channel get ``grace_s``. If the files cannot be read,
        the old channel stays (False)."""
        old = self.channel
        files = self._security.files_version()
        try:
            self._open_channel()
        except (OSError, ValueError) as exc:
            log.error("uplink: credentials not reloaded, the old channel stays: %s", exc)
            return False
        self._files = files
        log.info("uplink: new channel to the broker with the credentials read again")
        if self._stream is not None:
            self._stream.cancel()  # the loop connects again, on the new channel
        await old.close(grace_s)
        return True

    async def _follow_files(self) -> None:
        """Reconnect with the credentials' files when they change (cert-manager or
        spiffe-helper renaming a renewed certificate into place), looked at every
        ``FILES_CHECK_S``: a node whose certificate expired could not connect again after a
        broker restart or failover. A file caught mid-rename is tried again at the next look."""
        while True:
            await asyncio.sleep(self.FILES_CHECK_S)
            if self._security.files_version() != self._files:
                log.info("uplink: the credential files changed")
                await self.reconnect()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def buffered(self) -> int:
        """Messages waiting to go out (queued while the link is down, or not yet sent)."""
        return len(self._buffer)

    def send(self, msg: broker_pb2.NodeMessage) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(msg)
        self._ready.set()

    async def start(self, *, wait_connected_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="uplink")
        follow = asyncio.create_task(self._follow_files(), name="uplink-files")
        self._background.add(follow)
        follow.add_done_callback(self._background.discard)
        await asyncio.wait_for(self._connected.wait(), wait_connected_s)

    async def _outgoing(self, connection: int) -> AsyncIterator[broker_pb2.NodeMessage]:
        """What stream number ``connection`` sends. Once that stream has ended it takes nothing
        more: gRPC may still be reading this generator after its call ended, and a message taken
        then (one queued while the link was down, for the next stream) would be lost."""
        yield broker_pb2.NodeMessage(hello=broker_pb2.NodeHello(node_id=self._registration.node_id))

        def current() -> bool:
            return connection == self.connections and self._connected.is_set()

        while current():
            while self._buffer and current():
                yield self._buffer.popleft()
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), self.heartbeat_interval_s)
            except TimeoutError:
                yield broker_pb2.NodeMessage(heartbeat=self._heartbeat())

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                reply = await self._gateway.RegisterNode(self._registration, timeout=5)
                self.heartbeat_interval_s = max(0.1, reply.heartbeat_interval_ms / 1000)
                self.connections += 1
                stream = self._stream = self._gateway.Connect(self._outgoing(self.connections))
                self._connected.set()
                log.info("uplink connected to broker as node %s", self._registration.node_id)
                if self._on_connected is not None:
                    check = asyncio.ensure_future(self._on_connected())
                    self._background.add(check)
                    check.add_done_callback(self._background.discard)
                backoff = 0.1
                async for msg in stream:
                    if msg.HasField("decision"):
                        await self._on_decision(msg.decision)
                    elif msg.HasField("lease") and self._on_lease is not None:
                        self._on_lease(msg.lease.lease)
                log.warning("uplink: broker closed the stream")
                why = "the broker closed the stream"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this task is being cancelled (close)
                log.info("uplink: stream moved to a new channel")  # reconnect() ended it
                why = "moving to a new channel"
            except grpc.aio.AioRpcError as exc:
                log.warning("uplink: %s: %s", exc.code().name, exc.details())
                why = f"{exc.code().name}: {exc.details()}"
            except Exception as exc:
                log.exception("uplink failed")
                why = f"failed: {exc}"
            if self._connected.is_set():
                self._connected.clear()
                if self._on_disconnected is not None:
                    self._on_disconnected(why)
            await asyncio.sleep(backoff)
            backoff = min(self._max_backoff_s, backoff * 2)

    async def close(self) -> None:
        # Give buffered reports (final CallFinished messages) a moment to go out.
        for _ in range(50):
            if not self._buffer or not self.connected:
                break
            await asyncio.sleep(0.01)
        for check in list(self._background):
            check.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.channel.close()
