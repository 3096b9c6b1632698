"""Broker and node agent under a service manager (systemd's Type=notify, WatchdogSec=): real
processes notify a real unix datagram socket, as systemd listens. Ready once serving (a
standby broker once standing by), watchdog pings from the event loop, stopping at SIGTERM, and
no child process that can speak for the service."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import BrokerProcess, LocalCluster, child_pids
from agentcg.clients.sdk import Client

from ..test_notify import receive

MiB = 1 << 20


class Manager:
    """What systemd does with a unit's notifications: keep the last value of each key, count
    the watchdog pings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.state: dict[str, str] = {}
        self.pings = 0

    def env(self, watchdog_usec: int = 0) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def wait_for(self, key: str, value_prefix: str = "", timeout_s: float = 60) -> str:
        """Read notifications until one sets ``key`` (to a value starting so): its STATUS."""
        while True:
            message = receive(self.sock, timeout_s)
            self.pings += message.get("WATCHDOG") == "1"
            self.state.update(message)
            if message.get(key, "\0").startswith(value_prefix) and key in message:
                return message.get("STATUS", "")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    with m.sock:
        yield m


def environ_keys(pid: int) -> set[str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {entry.split(b"=", 1)[0].decode() for entry in raw.split(b"\0") if entry}


def test_broker_notifies_ready_watchdog_and_stopping(tmp_path: Path, manager: Manager) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    broker = BrokerProcess(tmp_path, "a", url, env=manager.env(watchdog_usec=200_000))
    try:
        status = manager.wait_for("READY", "1")
        assert status == f"leader: serving on {broker.wait_ready()}"
        for _ in range(3):  # every 0.1 s, from the event loop
            manager.wait_for("WATCHDOG", "1", timeout_s=10)
        assert manager.pings >= 3
        # Its database writer process cannot speak for the service.
        (writer,) = child_pids(broker.proc.pid)
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & environ_keys(writer)
        broker.proc.send_signal(signal.SIGTERM)
        assert manager.wait_for("STOPPING", "1").startswith("stopping (grace")
        assert broker.proc.wait(30) == 0
    finally:
        broker.stop()


def test_a_standby_broker_is_ready_and_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    managers = [Manager(tmp_path / f"{name}.sock") for name in "ab"]
    brokers: list[BrokerProcess] = []
    try:
        brokers.append(BrokerProcess(tmp_path, "a", url, env=managers[0].env()))
        assert managers[0].wait_for("READY", "1").startswith("leader: serving on")
        brokers.append(BrokerProcess(tmp_path, "b", url, env=managers[1].env()))
        status = managers[1].wait_for("READY", "1")
        assert status == "standby: waiting for the database's leadership lock"
        brokers[0].stop()  # a stops: b takes over and says so
        status = managers[1].wait_for("STATUS", "leader")
        assert status == f"leader: serving on {brokers[1].wait_ready()}"
        assert managers[1].state["READY"] == "1"
    finally:
        for b in brokers:
            b.stop()
        for m in managers:
            m.sock.close()


def test_node_agent_notifies_ready_watchdog_and_stopping(tmp_path: Path, manager: Manager) -> None:
    cluster = LocalCluster(
        tmp_path, nodes=1, node_env=manager.env(watchdog_usec=200_000), log_level="WARNING"
    )
    with cluster:
        status = manager.wait_for("READY", "1")
        node_id = f"n0-{os.getpid()}"
        address = cluster.node_addresses[0]
        assert status == f"node {node_id} serving on {address}; 0 call(s) re-adopted"
        manager.wait_for("WATCHDOG", "1", timeout_s=10)
        # A tool call gets the agent's environment: without the service manager's variables.
        out: list[bytes] = []
        with Client(cluster.broker_address) as c:
            c.set_tenant("t", 256 * MiB)
            done = c.run("t", 64 * MiB, ["env"], on_output=lambda fd, data: out.append(data))
        assert done.exit_code == 0
        names = {line.split("=", 1)[0] for line in b"".join(out).decode().splitlines()}
        assert "PATH" in names  # it printed its environment
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & names
        cluster.stop("node0")
        assert manager.wait_for("STOPPING", "1") == "stopping (grace 5.0 s; calls stopped)"
