"""`agentcg preflight` on this host, for real: cgroups, the BPF monitor, a real allocation
paused at its budget and grown; and the broker check against real broker processes (open, and
behind an access file that knows this node or does not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.pki import Pki
from agentcg.node.preflight import MOVE_GAP_S, RCU_DIR, run_preflight

from ..access_helpers import NODE_ID, access_file, client_env, server_flags
from ..conftest import kernel_missing

pytestmark = pytest.mark.kernel


def preflight(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "preflight", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    report = json.loads(done.stdout)
    assert isinstance(report, dict), done.stderr
    return done.returncode, report


def test_this_host_passes_every_check(cgroup_write: Path, bcc_available: None) -> None:
    checks = run_preflight()
    by_name = {c.name: c for c in checks}
    names = ["cgroups", "moves", "thresholds", "memwatch", "enforcement"]
    assert [c.name for c in checks] == names, checks
    timed = ("moves", "thresholds")
    assert [c.status for c in checks if c.name not in timed] == ["ok"] * 3, checks
    # A warning where the kernel makes them wait for a grace period (see the next test).
    moves, thresholds = by_name["moves"], by_name["thresholds"]
    assert moves.status in ("ok", "warn") and "moving a call into its cgroup takes" in moves.detail
    assert thresholds.status in ("ok", "warn")
    assert "registering a call's usage threshold takes" in thresholds.detail  # v1: it has them
    enforcement = checks[-1].detail
    assert "paused at the limit" in enforcement and enforcement.endswith("exit 0")
    assert "cgroup v1" in checks[0].detail
    # Nothing left behind: its cgroups were its own, and are gone.
    assert not list(cgroup_write.glob("agentcg-preflight-*"))


def test_the_cli_checks_the_broker_and_this_nodes_identity(
    tmp_path: Path, cgroup_write: Path, bcc_available: None, pki: Pki
) -> None:
    with LocalCluster(tmp_path / "open", nodes=0, log_level="WARNING") as open_broker:
        code, report = preflight("--broker", open_broker.broker_address)
        assert code == 0, report
        assert report["ok"] is True
        names = [(c["name"], c["status"]) for c in report["checks"]]  # type: ignore[union-attr,index]
        assert names[-1] == ("broker", "ok")
    flags = server_flags(pki, access_file(tmp_path / "access.toml"))
    with LocalCluster(tmp_path / "gated", nodes=0, broker_args=flags, log_level="WARNING") as c:
        address = c.broker_address
        code, report = preflight(
            "--broker", address, "--node-id", NODE_ID, env=client_env(pki, "node")
        )
        assert code == 0, report
        # Another node's credentials: the broker would refuse this node's registration.
        code, report = preflight(
            "--broker", address, "--node-id", NODE_ID, env=client_env(pki, "node-2")
        )
        assert code == 1
        broker_check = report["checks"][-1]  # type: ignore[index]
        assert broker_check["status"] == "fail"
        assert f"may not act as node {NODE_ID!r}" in broker_check["detail"]
    # No broker there any more: a failure naming it, not a traceback.
    code, report = preflight("--broker", address)
    assert code == 1
    assert report["checks"][-1]["status"] == "fail"  # type: ignore[index]
    assert address in report["checks"][-1]["detail"]  # type: ignore[index]


@pytest.fixture
def rcu_expedited(cgroup_write: Path) -> Iterator[Path]:
    """/sys/kernel/rcu_expedited, given back as it was."""
    knob = RCU_DIR / "rcu_expedited"
    try:
        was = knob.read_text()
        knob.write_text(was)
    except OSError as e:
        kernel_missing(f"cannot write {knob}: {e}")
    if (RCU_DIR / "rcu_normal").read_text().strip() != "0":
        kernel_missing("rcu_normal is set: expedited grace periods are not available")
    try:
        yield knob
    finally:
        knob.write_text(was)


def test_expedited_grace_periods_make_registrations_fast_and_normal_ones_warn(
    rcu_expedited: Path, bcc_available: None
) -> None:
    """The remedy the warning names, tried on this kernel: with expedited grace periods a
    registration takes well under the bound; with normal ones it waits for one (favordynmods
    does not change that) and the check says what to set."""
    rcu_expedited.write_text("1")
    by_name = {c.name: c for c in run_preflight()}
    assert by_name["thresholds"].status == "ok", by_name["thresholds"]
    assert by_name["moves"].status == "ok", by_name["moves"]
    rcu_expedited.write_text("0")
    by_name = {c.name: c for c in run_preflight()}
    thresholds = by_name["thresholds"]
    assert thresholds.status == "warn", thresholds
    assert "(rcu_expedited is 0)" in thresholds.detail
    assert "echo 1 > /sys/kernel/rcu_expedited" in thresholds.detail
    # The check spaces its registrations as calls arrive, so each waits for its own.
    assert thresholds.duration_ms > 5 * MOVE_GAP_S * 1000
