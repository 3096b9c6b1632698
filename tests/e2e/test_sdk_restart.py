"""The SDK given one broker address rides through a restart of that broker (an upgrade,
systemd's Restart=), and still fails at once on an address where no broker ever answered: a
real broker process stopped and started again on its port, on its SQLite file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from agentcg.broker.store import Store
from agentcg.clients.cluster import BrokerProcess, free_port
from agentcg.clients.sdk import Client, TenantInfo
from agentcg.errors import UnavailableError

MiB = 1 << 20


def test_calls_made_while_the_broker_restarts_wait_for_it(tmp_path: Path) -> None:
    url = Store.default_url(tmp_path)
    first = BrokerProcess(tmp_path, "first", url)
    brokers = [first]
    try:
        first.wait_ready()
        with Client(first.address, timeout_s=60) as c:
            c.set_tenant("r", 64 * MiB)
            assert first.stop() == 0
            results: dict[str, object] = {}

            def ask(name: str, call: object) -> None:
                try:
                    results[name] = call()  # type: ignore[operator]
                except Exception as exc:  # noqa: BLE001 - the test looks at it
                    results[name] = exc

            threads = [
                threading.Thread(target=ask, args=("get", lambda: c.get_tenant("r"))),
                threading.Thread(target=ask, args=("set", lambda: c.set_tenant("s", 32 * MiB))),
            ]
            for t in threads:
                t.start()
            time.sleep(1.0)
            # Nothing listens: without the ride-through both failed at once (UNAVAILABLE).
            assert results == {}
            second = BrokerProcess(tmp_path, "second", url, port=first.port)
            brokers.append(second)
            second.wait_ready()
            for t in threads:
                t.join(60)
                assert not t.is_alive()
            got, made = results["get"], results["set"]
            assert isinstance(got, TenantInfo) and got.memory_quota_bytes == 64 * MiB, got
            assert isinstance(made, TenantInfo) and made.memory_quota_bytes == 32 * MiB, made
            assert {t.name for t in c.list_tenants()} >= {"r", "s"}
    finally:
        for b in brokers:
            b.stop()


def test_a_broker_that_never_answered_fails_at_once() -> None:
    """A wrong address is an error now, not at the call's deadline."""
    with Client(f"127.0.0.1:{free_port()}", timeout_s=30) as c:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            c.list_tenants()
        assert time.monotonic() - started < 15  # not the 30 s deadline


def test_a_broker_that_stays_down_is_reported_down(tmp_path: Path) -> None:
    """Waited for until the call's deadline, then the caller hears UNAVAILABLE (what
    happened), not DEADLINE_EXCEEDED."""
    broker = BrokerProcess(tmp_path, "gone", Store.default_url(tmp_path))
    try:
        broker.wait_ready()
        with Client(broker.address, timeout_s=2) as c:
            c.set_tenant("r", 64 * MiB)
            assert broker.stop() == 0
            started = time.monotonic()
            with pytest.raises(UnavailableError) as raised:
                c.get_tenant("r")
            assert time.monotonic() - started >= 1.5  # it waited for the broker
            assert "deadline" not in str(raised.value).lower(), raised.value
    finally:
        broker.stop()
