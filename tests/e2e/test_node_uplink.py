"""The node's uplink against a real broker process that is stopped and restarted: it buffers
(bounded, drops counted) while the broker is away, reconnects with backoff, and what it queued
meanwhile reaches the new broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from agentcg.clients.cluster import free_port
from agentcg.node.uplink import Uplink
from agentcg.v1 import broker_pb2, types_pb2


def start_broker(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    ready = workdir / "broker.addr"
    ready.unlink(missing_ok=True)
    with (workdir / "broker.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentcg.clients.cli",
                "broker",
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(workdir / "broker"),
                "--ready-file",
                str(ready),
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, (workdir / "broker.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "broker not ready"
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(15)


def test_uplink_buffers_and_reconnects_when_the_broker_restarts(tmp_path: Path) -> None:
    port = free_port()
    broker = start_broker(tmp_path, port)
    decisions: list[broker_pb2.Decision] = []
    connected: list[float] = []

    async def on_decision(d: broker_pb2.Decision) -> None:
        decisions.append(d)

    async def on_connected() -> None:
        connected.append(time.monotonic())

    async def wait(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 30
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def main() -> None:
        nonlocal broker
        uplink = Uplink(
            f"127.0.0.1:{port}",
            broker_pb2.RegisterNodeRequest(
                node_id="n-uplink",
                address="127.0.0.1:1",
                capacity=types_pb2.Resources(memory_bytes=1 << 30),
            ),
            on_decision,
            lambda: broker_pb2.Heartbeat(dropped_events=uplink.dropped),
            buffer_size=5,
            max_backoff_s=0.5,
            on_connected=on_connected,
        )
        await uplink.start()
        try:
            assert uplink.connected
            broker.kill()  # SIGKILL: the stream breaks, it is not closed
            broker.wait(15)
            await wait(lambda: not uplink.connected, "the uplink to notice the broker left")
            for i in range(6):  # 8 reports into a buffer of 5: the 3 oldest are dropped
                uplink.send(broker_pb2.NodeMessage(heartbeat=broker_pb2.Heartbeat(running_calls=i)))
            for lease_id in ("gone-1", "gone-2"):  # asks the broker answers (leases it lacks)
                uplink.send(
                    broker_pb2.NodeMessage(
                        pressure=broker_pb2.PressureEvent(
                            event_id=f"ev-{lease_id}",
                            lease_id=lease_id,
                            kind=broker_pb2.PRESSURE_KIND_LIMIT_REACHED,
                        )
                    )
                )
            assert uplink.dropped == 3
            await asyncio.sleep(1.0)  # a few failed attempts (backoff) while it is away
            assert not uplink.connected
            broker = start_broker(tmp_path, port)
            await wait(lambda: uplink.connected, "reconnection")
            # The node is told of each (re)connection: it checks its leases again then.
            await wait(lambda: len(connected) == 2, "the callback of the reconnection")
            assert uplink.connections == 2
            await wait(lambda: not uplink._buffer, "the buffer to drain to the broker")
            assert uplink.dropped == 3
            # What was queued while the broker was away reached the new one: both answered.
            await wait(lambda: len(decisions) == 2, "the answers to what was queued")
            assert {(d.event_id, d.kind) for d in decisions} == {
                ("ev-gone-1", broker_pb2.DECISION_KIND_KILL),
                ("ev-gone-2", broker_pb2.DECISION_KIND_KILL),
            }
        finally:
            await uplink.close()

    try:
        asyncio.run(main())
    finally:
        stop(broker)
