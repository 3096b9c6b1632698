"""The vertical slice end to end: broker and node as real subprocesses on loopback, real cgroups,
the real BPF program, a real ~200 MiB spike under a 64 MiB reservation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client, Lease
from agentcg.errors import InvalidArgumentError, NotFoundError

from ..conftest import wait_until

MiB = 1 << 20
# ~200 MiB held for half a second (the worker's curve is in decimal MB).
SPIKE_ARGV = [sys.executable, "-m", "agentcg.clients.worker", "--curve", "0:210,0.5:0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cgroup_write: Path, bcc_available: None):
    with LocalCluster(tmp_path_factory.mktemp("slice"), node_memory="1G") as c:
        yield c
    # Nothing may be left behind: the node removes its cgroup root on shutdown.
    left = [p.name for p in cgroup_write.iterdir() if p.is_dir() and p.name.startswith("agentcg-n")]
    assert left == [], f"cgroups left behind: {left}"


@pytest.fixture(scope="module")
def client(cluster: LocalCluster):
    with Client(cluster.broker_address) as c:
        yield c


def node_root(cgroup_write: Path) -> Path:
    roots = [
        p for p in cgroup_write.iterdir() if p.is_dir() and p.name == f"agentcg-n0-{os.getpid()}"
    ]
    assert len(roots) == 1
    return roots[0]


def agentcg_run(
    cluster: LocalCluster, tenant: str, memory: str, argv: list[str]
) -> tuple[int, dict]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentcg.clients.cli",
            "run",
            "--broker",
            cluster.broker_address,
            "--tenant",
            tenant,
            "--memory",
            memory,
            "--json",
            "--",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip(), f"no JSON on stdout; stderr: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_spike_is_grown_for_tenant_with_headroom(
    cluster: LocalCluster, client: Client, cgroup_write: Path
) -> None:
    client.set_tenant("rich", 1024 * MiB)
    code, result = agentcg_run(cluster, "rich", "64M", SPIKE_ARGV)
    assert code == 0, result
    assert result["outcome"] == "grown"
    assert result["budget_bytes"] >= 200 * MiB
    assert result["peak_bytes"] >= 200 * MiB
    assert set(result) >= {"exit_code", "outcome", "peak_bytes", "budget_bytes", "reason"}
    t = client.get_tenant("rich")
    assert t.granted_memory_bytes == 0 and t.active_leases == 0  # quota whole again
    assert list(node_root(cgroup_write).iterdir()) == [] or all(
        not p.is_dir() for p in node_root(cgroup_write).iterdir()
    )


def test_spike_is_killed_for_tenant_without_headroom(cluster: LocalCluster, client: Client) -> None:
    client.set_tenant("poor", 96 * MiB)
    code, result = agentcg_run(cluster, "poor", "64M", SPIKE_ARGV)
    assert code == 137, result
    assert result["outcome"] == "killed"
    reason = result["reason"]
    assert "budget" in reason and "peak" in reason and "quota" in reason, reason
    assert result["peak_bytes"] <= 96 * MiB + 4 * MiB
    client.ping()  # the broker is still serving
    t = client.get_tenant("poor")
    assert t.granted_memory_bytes == 0 and t.active_leases == 0
    leases = client.list_leases(tenant="poor", include_inactive=True)
    assert [x.outcome for x in leases] == ["killed"]


def test_small_call_completes_within_budget(cluster: LocalCluster, client: Client) -> None:
    client.set_tenant("small", 256 * MiB)
    code, result = agentcg_run(cluster, "small", "64M", [sys.executable, "-c", "print('hi')"])
    assert (code, result["outcome"], result["budget_bytes"]) == (0, "completed", 64 * MiB)


def test_exit_code_is_the_commands(cluster: LocalCluster, client: Client) -> None:
    client.set_tenant("codes", 256 * MiB)
    code, result = agentcg_run(cluster, "codes", "32M", ["sh", "-c", "exit 7"])
    assert code == 7 and result["exit_code"] == 7


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda c: c.reserve("rich", 0), InvalidArgumentError, "intent.memory_bytes"),
        (lambda c: c.reserve("rich", -5), InvalidArgumentError, "intent.memory_bytes"),
        (lambda c: c.reserve("nobody-here", 64 * MiB), NotFoundError, "tenant"),
        (lambda c: c.reserve("a/b", 64 * MiB), InvalidArgumentError, "tenant"),
        (lambda c: c.reserve("..", 64 * MiB), InvalidArgumentError, "tenant"),
        (lambda c: c.reserve("rich", 64 * MiB, session="../x"), InvalidArgumentError, "session"),
        (lambda c: c.set_tenant("x/../y", 64 * MiB), InvalidArgumentError, "name"),
        (lambda c: c.set_tenant("..", 64 * MiB), InvalidArgumentError, "name"),
        (lambda c: c.set_tenant("ok-name", 0), InvalidArgumentError, "quota.memory_bytes"),
        (lambda c: c.set_tenant("ok-name", -1), InvalidArgumentError, "quota.memory_bytes"),
        (lambda c: c.release("no-such-lease"), NotFoundError, "lease_id"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    cluster: LocalCluster, client: Client, call, error, field: str
) -> None:
    client.set_tenant("rich", 1024 * MiB)
    before = client.list_tenants()
    leases_before = client.list_leases(include_inactive=True)
    with pytest.raises(error) as info:
        call(client)
    assert field in info.value.message
    if isinstance(info.value, InvalidArgumentError):
        assert info.value.field == field
    assert client.list_tenants() == before
    assert client.list_leases(include_inactive=True) == leases_before
    client.ping()


def test_empty_command_is_refused_and_lease_state_untouched(
    cluster: LocalCluster, client: Client
) -> None:
    client.set_tenant("rich", 1024 * MiB)
    lease = client.reserve("rich", 64 * MiB)
    with pytest.raises(InvalidArgumentError) as info:
        client.exec(lease, [])
    assert info.value.field == "argv"
    assert client.get_lease(lease.lease_id).state == "active"
    client.release(lease.lease_id)
    assert client.get_tenant("rich").granted_memory_bytes == 0
    # and through the CLI: no command at all
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentcg.clients.cli",
            "run",
            "--broker",
            cluster.broker_address,
            "--tenant",
            "rich",
            "--memory",
            "64M",
            "--",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "argv" in proc.stderr
    assert client.get_tenant("rich").granted_memory_bytes == 0


def test_broker_reports_health(cluster: LocalCluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(cluster.broker_address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_run_renews_its_lease_while_the_call_outlives_the_ttl(
    cluster: LocalCluster, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1.5 s TTL and a 5 s call: `run` keeps the lease alive, so the node does not stop it.
    Every renewal asks for the Reserve's TTL again, also from a host whose clock runs 2 s ahead
    of the broker's (taking the time left by that clock, renewals asked for ever less)."""
    asked: list[int] = []
    renew = client._async.renew

    async def recorded(lease_id: str, ttl_ms: int = 0) -> Lease:
        asked.append(ttl_ms)
        return await renew(lease_id, ttl_ms)

    monkeypatch.setattr(client._async, "renew", recorded)
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 2.0)
    client.set_tenant("long", 256 * MiB)
    result = client.run("long", 32 * MiB, ["sleep", "5"], ttl_ms=1500)
    assert (result.exit_code, result.outcome) == (0, "completed"), result
    assert len(asked) >= 5 and set(asked) == {1500}, asked
    (lease,) = client.list_leases(tenant="long", include_inactive=True)
    assert lease.state == "released"


@pytest.mark.parametrize("caller", ["cli", "sdk"])
def test_ctrl_c_stops_the_call_and_frees_its_budget(
    cluster: LocalCluster, client: Client, tmp_path: Path, caller: str
) -> None:
    """Ctrl-C on `agentcg run` (asyncio.run cancels it) or on the sync SDK's `run` (the wrapper
    stops the coroutine it waits for) releases the lease, and the node, told nothing but the
    release, stops the call as released: it does not run on for the resume grace (30 s)."""
    tenant = f"ctrlc-{caller}"
    client.set_tenant(tenant, 256 * MiB)
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    argv = [sys.executable, "-c", code]
    if caller == "cli":
        args = ["-m", "agentcg.clients.cli", "run", "--broker", cluster.broker_address]
        args += ["--tenant", tenant, "--memory", "64M", "--", *argv]
    else:
        script = (
            "import sys\nfrom agentcg.clients.sdk import Client\n"
            f"with Client({cluster.broker_address!r}) as c:\n"
            f"    c.run({tenant!r}, 64 << 20, {argv!r})\n"
        )
        args = ["-c", script]
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the call", timeout_s=60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    if caller == "cli":
        assert proc.returncode == 130, err  # 128 + SIGINT, as a shell reports Ctrl-C
    else:
        assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    (lease,) = client.list_leases(tenant=tenant, include_inactive=True)
    assert lease.state == "released", lease  # by the caller, on its way out
    assert client.get_tenant(tenant).granted_memory_bytes == 0
    pid = int(pid_file.read_text())
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), "the call stopped", timeout_s=20)
    stops = [
        line
        for line in cluster.log("node0").splitlines()
        if f"lease {lease.lease_id} " in line and "lease is released at the broker" in line
    ]
    assert stops, cluster.log("node0")[-3000:]
