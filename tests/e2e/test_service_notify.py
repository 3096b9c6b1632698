"""Broker and node agent under a service manager (systemd's Type=notify, WatchdogSec=): real
processes notify a real unix datagram socket, as systemd listens. Ready once serving (a
standby broker once standing by), watchdog pings from the event loop, stopping at SIGTERM, and
no child process that can speak for the service."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import BrokerProcess, LocalCluster, child_pids, free_port
from agentcg.clients.sdk import Client

MiB = 1 << 20


class Manager:
    """What systemd does with a unit's notifications: read them as they come (on a thread),
    keep each one and the last value of each key, count the watchdog pings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[dict[str, str]] = []
        self.state: dict[str, str] = {}
        self.pings = 0
        self._next = 0  # the first notification the next wait_for looks at
        self._cv = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            message = dict(line.split("=", 1) for line in data.splitlines())
            with self._cv:
                self.received.append(message)
                self.pings += message.get("WATCHDOG") == "1"
                self.state.update(message)
                self._cv.notify_all()

    def env(self, watchdog_usec: int = 0) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def wait_for(self, key: str, value_prefix: str = "", timeout_s: float = 60) -> str:
        """The next notification (after the one the last call returned) that sets ``key`` to
        a value starting with ``value_prefix``, waited for; its STATUS."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                while self._next < len(self.received):
                    message = self.received[self._next]
                    self._next += 1
                    if key in message and message[key].startswith(value_prefix):
                        return message.get("STATUS", "")
                left = deadline - time.monotonic()
                assert left > 0, f"no {key}={value_prefix}... within {timeout_s} s: {self.state}"
                self._cv.wait(left)

    def close(self) -> None:
        self._closed = True
        self._reader.join()
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify.sock")
    try:
        yield m
    finally:
        m.close()


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
            m.close()


def test_node_agent_notifies_ready_watchdog_and_stopping(tmp_path: Path, manager: Manager) -> None:
    cluster = LocalCluster(
        tmp_path,
        nodes=1,
        node_env=manager.env(watchdog_usec=200_000),
        broker_args=("--listen", f"127.0.0.1:{free_port()}"),  # the same after a restart
        log_level="WARNING",
    )
    with cluster:
        status = manager.wait_for("READY", "1")
        node_id = f"n0-{os.getpid()}"
        address = cluster.node_addresses[0]
        serving = f"node {node_id} serving on {address}"
        broker = f"broker {cluster.broker_address}"
        assert status == f"{serving}; 0 call(s) re-adopted; {broker} connected"
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
        # `systemctl status` says when the node lost the broker, and when it is back.
        cluster.stop("broker")
        status = manager.wait_for("STATUS", f"{serving}; {broker} unreachable since")
        assert "UNAVAILABLE" in status or "closed the stream" in status, status
        cluster.start_broker()  # the same data directory and port
        assert manager.wait_for("STATUS", f"{serving}; {broker} connected")
        cluster.stop("node0")
        assert manager.wait_for("STOPPING", "1") == "stopping (grace 5.0 s; calls stopped)"
