"""A real node agent behind the same gate as its broker (tests/broker/test_access.py): its own
access file and mutual TLS, a tool call run for the caller's tenant and refused for another's,
and a node token rotated under a running broker and node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentcg.access import Role, new_token, principal_entry
from agentcg.channels import ClientSecurity
from agentcg.clients.cluster import LocalCluster, scrape_metric
from agentcg.clients.pki import Pki
from agentcg.clients.sdk import Client
from agentcg.errors import (
    UnauthenticatedError,
)
from agentcg.v1 import node_pb2, node_pb2_grpc

from ..access_helpers import (
    NODE_ID,
    TOKENS,
    MiB,
    access_file,
    client_env,
    security,
    server_flags,
)

# -- a node agent behind the same gate ----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, cgroup_write: Path, bcc_available: None
) -> Iterator[LocalCluster]:
    work = tmp_path_factory.mktemp("access-node")
    flags = server_flags(pki, access_file(work / "access.toml"))
    # Its one node agent is NODE_ID, the node id the node's token may act as.
    c = LocalCluster(
        work,
        node_memory="1G",
        broker_args=flags,
        node_args=(*flags, "--metrics-listen", "127.0.0.1:0"),
        node_env=client_env(pki, "node"),
    )
    with c:
        with Client(c.broker_address, security=security(pki, "root")) as root:
            root.set_tenant("org-a", 1 << 30)
            root.set_tenant("org-b", 1 << 30)
        yield c


def test_a_tool_call_runs_through_both_gates(cluster: LocalCluster, pki: Pki) -> None:
    env = {**os.environ, **client_env(pki, "client-a")}
    argv = [sys.executable, "-c", "print('hello from org-a')"]
    run = [sys.executable, "-m", "agentcg.clients.cli", "run", "--broker", cluster.broker_address]
    ok = subprocess.run(
        [*run, "--tenant", "org-a", "--memory", "64M", "--", *argv],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "hello from org-a" in ok.stdout
    denied = subprocess.run(
        [*run, "--tenant", "org-b", "--memory", "64M", "--", *argv],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert denied.returncode == 2
    assert "client-a: tenant 'org-b' is outside its scope" in denied.stderr


def test_a_node_runs_no_call_for_a_tenant_outside_the_callers_scope(
    cluster: LocalCluster, pki: Pki
) -> None:
    node = cluster.node_addresses[0]
    with (
        Client(cluster.broker_address, security=security(pki, "client-a")) as a,
        Client(cluster.broker_address, security=security(pki, "root")) as root,
    ):
        lease = a.reserve("org-a", 32 * MiB)
        assert lease.node_address == node
        creds = security(pki).credentials()
        exec_req = node_pb2.ExecRequest(lease_id=lease.lease_id, argv=["/bin/true"])
        with grpc.secure_channel(node, creds) as ch:
            stub = node_pb2_grpc.NodeAgentStub(ch)
            for who, code in (
                ("client-b", grpc.StatusCode.PERMISSION_DENIED),
                ("", grpc.StatusCode.UNAUTHENTICATED),
            ):
                md = (("authorization", f"Bearer {TOKENS[who]}"),) if who else ()
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Exec(exec_req, metadata=md, timeout=10))
                assert err.value.code() == code, err.value.details()
            listed = stub.ListCalls(
                node_pb2.ListCallsRequest(),
                metadata=(("authorization", f"Bearer {TOKENS['client-b']}"),),
                timeout=5,
            )
            assert list(listed.calls) == []
        assert root.get_lease(lease.lease_id).state == "active"  # refused, nothing changed
        a.release(lease.lease_id)
    metrics = cluster.metrics_address("node0")
    name = "agentcg_node_access_refused_total"
    assert scrape_metric(metrics, name, reason="scope") >= 1
    assert scrape_metric(metrics, name, reason="unauthenticated") >= 1


@pytest.mark.parametrize("sighup", [True, False], ids=["sighup", "file-watch"])
def test_a_node_rotates_its_token(
    tmp_path: Path, cgroup_write: Path, bcc_available: None, sighup: bool
) -> None:
    """The node reads its token from AGENTCG_TOKEN_FILE; the operator adds the new token to the
    broker's access file, writes it to the node's file (and sends the node SIGHUP, or not: the
    node sees the file change), then revokes the old one. The node goes on running calls (each
    Exec reads the lease with its token)."""
    node_id = NODE_ID  # LocalCluster's first node
    old, new, client = new_token(), new_token(), new_token()
    entries = {
        "client": principal_entry("client", client, Role.CLIENT, tenants=["*"]),
        "node-old": principal_entry("node-old", old, Role.NODE, nodes=[node_id]),
        "node-new": principal_entry("node-new", new, Role.NODE, nodes=[node_id]),
        "root": principal_entry("root", TOKENS["root"], Role.ADMIN, tenants=["*"]),
    }
    access, token_file = tmp_path / "access.toml", tmp_path / "node.token"

    def grant(*names: str) -> None:
        access.write_text("\n".join(entries[n] for n in names))

    grant("client", "node-old", "root")
    token_file.write_text(old + "\n")
    cluster = LocalCluster(
        tmp_path / "work",
        broker_args=("--access", str(access)),
        node_env={"AGENTCG_TOKEN_FILE": str(token_file)},
    )
    env = {**os.environ, "AGENTCG_TOKEN": client}
    with cluster:

        def run_call() -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "agentcg.clients.cli", "run", "--broker"]
            argv += [cluster.broker_address, "--tenant", "org-a", "--memory", "32M", "--"]
            argv += [sys.executable, "-c", "print('ran')"]
            return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)

        def wait_log(name: str, needle: str, count: int) -> None:
            deadline = time.monotonic() + 20
            while cluster.log(name).count(needle) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            assert cluster.log(name).count(needle) >= count, cluster.log(name)[-2000:]

        with Client(cluster.broker_address, security=ClientSecurity(TOKENS["root"])) as root:
            root.set_tenant("org-a", 1 << 30)
        assert run_call().returncode == 0
        grant("client", "node-old", "node-new", "root")
        cluster.procs["broker"].send_signal(signal.SIGHUP)
        wait_log("broker", "access file", 1)
        replacement = tmp_path / "node.token.new"
        replacement.write_text(new + "\n")
        replacement.rename(token_file)  # as cert-manager or spiffe-helper put one in place
        if sighup:
            cluster.procs["node0"].send_signal(signal.SIGHUP)
        wait_log("node0", "uplink connected to broker", 2)  # on the new channel
        if not sighup:
            assert "the credential files changed" in cluster.log("node0")
        grant("client", "node-new", "root")  # the old token revoked
        cluster.procs["broker"].send_signal(signal.SIGHUP)
        wait_log("broker", "access file", 2)
        with Client(cluster.broker_address, security=ClientSecurity(old)) as revoked:
            with pytest.raises(UnauthenticatedError):
                revoked.ping()
        done = run_call()
        assert done.returncode == 0, done.stderr
        assert "ran" in done.stdout
