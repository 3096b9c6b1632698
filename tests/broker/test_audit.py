"""Reading the audit trail (AuditLog.ListAudit, `agentcg audit`) from a real broker process on a
real database (SQLite and PostgreSQL): filters, paging, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.broker.store import AUDIT_SCAN_IDS, AuditRow, Store
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import AuditRecord, Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import InvalidArgumentError
from sqlalchemy import insert

MiB = 1 << 20


@pytest.fixture
def history(tmp_path: Path, database_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    """A broker with a node and some history: org > team-a, team-b; a lease of team-a
    reserved and released, one of team-b reserved, the node cordoned. Yields the broker's
    address and the lease ids by name."""
    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        with SimNode(c.broker_address, "sim-a"), Client(c.broker_address) as cl:
            cl.set_tenant("org", 1 << 30)
            cl.set_tenant("team-a", 512 * MiB, parent="org")
            cl.set_tenant("team-b", 512 * MiB, parent="org")
            a = cl.reserve("team-a", 64 * MiB)
            cl.release(a.lease_id)
            b = cl.reserve("team-b", 32 * MiB)
            cl.cordon_node("sim-a", reason="audit me")
            yield c.broker_address, {"a": a.lease_id, "b": b.lease_id}


def everything(cl: Client, **filters: object) -> list[AuditRecord]:
    return list(cl.list_audit(limit=1000, **filters).records)


def test_filters_pick_their_entries_newest_first(history: tuple[str, dict[str, str]]) -> None:
    address, lease = history
    with Client(address) as cl:
        records = everything(cl)
        assert [r.id for r in records] == sorted((r.id for r in records), reverse=True)
        kinds = [r.kind for r in reversed(records)]
        assert kinds == [
            "node_register",
            "tenant_set",
            "tenant_set",
            "tenant_set",
            "reserve",
            "release",
            "reserve",
            "node_cordon",
        ]
        assert records[0].detail == {"reason": "audit me", "drain_deadline_ms": 0}
        assert records[0].by == ""  # no access file: nobody is named
        # A tenant's subtree; one tenant; a lease; a kind; a node.
        assert {r.tenant for r in everything(cl, tenant="org")} == {"org", "team-a", "team-b"}
        assert [r.kind for r in everything(cl, tenant="team-a")] == [
            "release",
            "reserve",
            "tenant_set",
        ]
        assert [r.kind for r in everything(cl, lease_id=lease["a"])] == ["release", "reserve"]
        [released] = everything(cl, kind="release")
        assert released.lease_id == lease["a"] and released.detail["peak_bytes"] == 0
        on_node = everything(cl, node_id="sim-a")
        assert [r.kind for r in on_node] == [
            "node_cordon",
            "reserve",
            "release",
            "reserve",
            "node_register",
        ]
        assert everything(cl, since_ms=int(time.time() * 1000) + 60_000) == []
        assert everything(cl, tenant="no-such-tenant") == []  # a deleted one's: none here


def test_pages_cover_the_trail_once(history: tuple[str, dict[str, str]]) -> None:
    address, _ = history
    with Client(address) as cl:
        whole = [r.id for r in everything(cl)]
        paged: list[int] = []
        before = 0
        while True:
            page = cl.list_audit(limit=3, before_id=before)
            paged += [r.id for r in page.records]
            if not page.next_before_id:
                break
            assert len(page.records) == 3
            before = page.next_before_id
        assert paged == whole


def test_bad_input_is_refused_naming_the_field(history: tuple[str, dict[str, str]]) -> None:
    address, _ = history
    with Client(address) as cl:
        for kwargs, field in [
            ({"limit": 1001}, "limit"),
            ({"limit": -1}, "limit"),
            ({"before_id": -5}, "before_id"),
            ({"since_ms": -1}, "since_ms"),
            ({"tenant": "../etc"}, "tenant"),
            ({"node_id": "a b"}, "node_id"),
            ({"kind": "x;drop"}, "kind"),
        ]:
            with pytest.raises(InvalidArgumentError) as bad:
                cl.list_audit(**kwargs)  # type: ignore[arg-type]
            assert bad.value.field == field, kwargs
        assert len(everything(cl)) == 8  # nothing changed, the broker serves


def test_the_audit_command(history: tuple[str, dict[str, str]]) -> None:
    address, lease = history
    out = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "audit", "--tenant", "team-a", "--json"]
        + ["--limit", "1", "--broker", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()
    record = json.loads(line)
    assert (record["kind"], record["lease_id"]) == ("release", lease["a"])
    table = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "audit", "--since-s", "600"]
        + ["--broker", address],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )
    assert table.returncode == 0, table.stderr
    assert "node_cordon" in table.stdout and "audit me" in table.stdout


def test_a_rare_entry_far_down_a_long_trail_is_found_a_bounded_page_at_a_time(
    tmp_path: Path, database_url: str
) -> None:
    """One ``expire`` entry under 1.5 scan slices of others: a ListAudit page for the kind
    reads one slice and comes back empty with where to go on, so no request reads the whole
    trail; the SDK's ``read_audit`` and ``agentcg audit`` walk on and find it."""
    now_ms = int(time.time() * 1000)
    store = Store(database_url)
    store.migrate()
    bulk = AUDIT_SCAN_IDS * 3 // 2
    row = {"kind": "reserve", "tenant": "bulk", "lease_id": "", "node_id": "", "detail": "{}"}
    with store._engine.begin() as conn:
        conn.execute(insert(AuditRow), [{**row, "at_ms": now_ms - 1000, "kind": "expire"}])
        conn.execute(insert(AuditRow), [{**row, "at_ms": now_ms}] * bulk)
    store.close()
    with LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="WARNING") as c:
        with Client(c.broker_address) as cl:
            page = cl.list_audit(kind="expire")
            assert page.records == ()
            assert page.next_before_id == bulk + 2 - AUDIT_SCAN_IDS  # ids 1 .. bulk + 1
            [found] = cl.read_audit(kind="expire")
            assert (found.kind, found.at_ms) == ("expire", now_ms - 1000)
            assert cl.read_audit(kind="expire", since_ms=now_ms - 500) == []
        out = subprocess.run(
            [sys.executable, "-m", "agentcg.clients.cli", "audit", "--kind", "expire", "--json"]
            + ["--broker", c.broker_address],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()
    assert json.loads(line)["id"] == found.id
