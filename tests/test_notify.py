"""systemd's notification protocol (agentcg.notify) against real unix datagram sockets, as
systemd listens: a path and the abstract namespace."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.notify import ServiceNotifier


def receive(sock: socket.socket, timeout_s: float = 5.0) -> dict[str, str]:
    """One notification, as KEY -> value."""
    sock.settimeout(timeout_s)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A NOTIFY_SOCKET value and the socket listening on it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    with sock:
        yield str(path), sock


def test_from_env_takes_the_variables_out_of_the_environment() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "500000",
        "WATCHDOG_PID": str(os.getpid()),
        "HOME": "/root",
    }
    n = ServiceNotifier.from_env(env)
    assert n.enabled
    assert n.watchdog_interval_s == 0.25  # half the manager's timeout
    assert env == {"HOME": "/root"}  # no child inherits them
    n.close()


@pytest.mark.parametrize(
    ("env", "enabled", "interval_s"),
    [
        ({}, False, None),  # not under a service manager
        ({"NOTIFY_SOCKET": "/run/x"}, True, None),  # no watchdog
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, True, None),
        ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "many"}, True, None),
        ({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"}, False, None),
        ({"WATCHDOG_USEC": "1000000"}, False, None),  # a watchdog with nowhere to send
    ],
)
def test_what_the_environment_asks_for(
    env: dict[str, str], enabled: bool, interval_s: float | None
) -> None:
    n = ServiceNotifier.from_env(dict(env))
    assert (n.enabled, n.watchdog_interval_s) == (enabled, interval_s)
    n.close()


def test_ready_status_and_stopping_reach_the_socket(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    n = ServiceNotifier(address)
    n.status("loading the state")
    assert receive(sock) == {"STATUS": "loading the state"}
    n.ready("serving on 127.0.0.1:50051")
    assert receive(sock) == {"READY": "1", "STATUS": "serving on 127.0.0.1:50051"}
    n.stopping("stopping (grace 5.0 s)")
    assert receive(sock) == {"STOPPING": "1", "STATUS": "stopping (grace 5.0 s)"}
    n.status("broker unreachable (UNAVAILABLE: a\nREADY=1)")  # a value cannot add a key
    assert receive(sock) == {"STATUS": "broker unreachable (UNAVAILABLE: a READY=1)"}
    n.close()


def test_the_abstract_namespace() -> None:
    name = f"agentcg-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        n = ServiceNotifier("@" + name)
        n.ready("up")
        assert receive(sock) == {"READY": "1", "STATUS": "up"}
        n.close()


def test_keep_alive_pings_until_cancelled(listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    n = ServiceNotifier(address, watchdog_usec=40_000)  # a ping every 20 ms

    async def three_pings() -> None:
        pinging = asyncio.create_task(n.keep_alive())
        loop = asyncio.get_running_loop()
        for _ in range(3):
            assert await loop.run_in_executor(None, receive, sock) == {"WATCHDOG": "1"}
        pinging.cancel()

    asyncio.run(three_pings())
    n.close()


def test_without_a_manager_nothing_is_sent_and_keep_alive_returns() -> None:
    n = ServiceNotifier()
    n.ready("up")
    asyncio.run(asyncio.wait_for(n.keep_alive(), 5))  # returns at once: no watchdog


def test_a_manager_that_does_not_listen_stops_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = ServiceNotifier(str(tmp_path / "nobody.sock"))
    with caplog.at_level(logging.WARNING, logger="agentcg.notify"):
        for _ in range(3):
            n.ready("up")  # no exception
    assert len(caplog.records) == 1  # said once, not per send
    assert "nobody.sock" in caplog.text
    n.close()


def test_a_full_queue_delays_state_changes_in_order_and_drops_pings(
    listener: tuple[str, socket.socket],
) -> None:
    """The manager's queue (net.unix.max_dgram_qlen datagrams) is full: a state change is sent
    again from the event loop once there is room, after the ones refused before it; pings
    are not kept."""
    address, sock = listener
    n = ServiceNotifier(address)
    fillers = 0
    while n._send(b"STATUS=filler"):  # noqa: SLF001 - filling the queue with the real send
        fillers += 1
        assert fillers < 100_000

    async def refused_then_delivered() -> list[dict[str, str]]:
        n.ready("up")
        n.notify(watchdog=1)
        n.status("later")
        loop = asyncio.get_running_loop()
        got: list[dict[str, str]] = []
        while len(got) < fillers + 2:
            got.append(await loop.run_in_executor(None, receive, sock))
        return got

    got = asyncio.run(refused_then_delivered())
    assert got[:fillers] == [{"STATUS": "filler"}] * fillers
    assert got[fillers:] == [{"READY": "1", "STATUS": "up"}, {"STATUS": "later"}]
    n.close()
