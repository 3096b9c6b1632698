"""Who may do what at the broker, over real TLS: a broker process with an access file and mutual
TLS (real certificates, clients/pki.py), on SQLite and on PostgreSQL, called through the SDK
with bearer tokens. Every refusal leaves the quota and lease state as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from agentcg.access import Role, new_token, principal_entry
from agentcg.broker.store import Store
from agentcg.channels import ClientSecurity
from agentcg.clients.cluster import LocalCluster, scrape_metric
from agentcg.clients.pki import Pki, make_client_cert, make_pki
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import (
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from agentcg.v1 import broker_pb2, broker_pb2_grpc, types_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..access_helpers import (
    NODE_ID,
    TOKENS,
    MiB,
    access_file,
    client_env,
    security,
    server_flags,
)
from ..conftest import wait_until


@pytest.fixture
def broker(tmp_path: Path, pki: Pki, database_url: str) -> Iterator[LocalCluster]:
    """A broker behind mutual TLS and the access file, on SQLite or PostgreSQL, with tenants
    org-a, org-b > team-b1 and a simulated node (NODE_ID) connected with the node's token."""
    flags = (
        *server_flags(pki, access_file(tmp_path / "access.toml")),
        "--metrics-listen",
        "127.0.0.1:0",
    )
    cluster = LocalCluster(tmp_path / "work", nodes=0, broker_args=flags, database_url=database_url)
    with cluster as c:
        with Client(c.broker_address, security=security(pki, "root")) as root:
            root.set_tenant("org-a", 1 << 30)
            root.set_tenant("org-b", 1 << 30)
            root.set_tenant("team-b1", 512 * MiB, parent="org-b")
        with SimNode(c.broker_address, NODE_ID, security=security(pki, "node")):
            yield c


def test_a_call_without_a_known_token_is_unauthenticated(broker: LocalCluster, pki: Pki) -> None:
    for sec in (security(pki), replace(security(pki), token=new_token())):
        with Client(broker.broker_address, security=sec) as c:
            with pytest.raises(UnauthenticatedError, match="Tenant"):
                c.list_tenants()
    assert broker.procs["broker"].poll() is None


def test_tls_is_required_and_verified(broker: LocalCluster, pki: Pki) -> None:
    """Plaintext, a server certificate from another CA, no client certificate: no connection."""
    refused = [
        ClientSecurity(token=TOKENS["root"]),  # plaintext to a TLS listener
        replace(security(pki, "root"), ca=pki.other_ca),  # cannot verify the server
        replace(security(pki, "root"), cert=None, key=None),  # mutual TLS: no client cert
    ]
    for sec in refused:
        with Client(broker.broker_address, security=sec, timeout_s=3) as c:
            with pytest.raises(UnavailableError):
                c.list_tenants()
    with Client(broker.broker_address, security=security(pki, "root")) as c:
        assert {"org-a", "org-b"} <= {t.name for t in c.list_tenants()}


def test_health_checks_need_no_token(broker: LocalCluster, pki: Pki) -> None:
    creds = security(pki).credentials()
    with grpc.secure_channel(broker.broker_address, creds) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_an_admin_manages_only_below_its_scope(
    broker: LocalCluster, pki: Pki, database_url: str
) -> None:
    with Client(broker.broker_address, security=security(pki, "admin-a")) as admin:
        team = admin.set_tenant("team-a1", 256 * MiB, parent="org-a")
        assert team.parent == "org-a"
        refusals = {
            "org-a's own quota": lambda: admin.set_tenant("org-a", 64 << 30),
            "a new org": lambda: admin.set_tenant("org-c", 1 << 30),
            "under org-b": lambda: admin.set_tenant("team-x", 1 << 30, parent="org-b"),
            "org-b's team": lambda: admin.delete_tenant("team-b1"),
            "moving org-b's team": lambda: admin.set_tenant("team-b1", 1 << 30, parent="org-a"),
        }
        for what, call in refusals.items():
            with pytest.raises(PermissionDeniedError, match="admin-a: .*outside its scope"):
                call()
                pytest.fail(f"{what}: not refused")
        assert {t.name for t in admin.list_tenants()} == {"org-a", "team-a1"}
    with Client(broker.broker_address, security=security(pki, "root")) as root:
        tenants = {t.name: t for t in root.list_tenants()}
        assert tenants["org-a"].memory_quota_bytes == 1 << 30  # untouched
        assert tenants["team-b1"].parent == "org-b" and "team-x" not in tenants
        assert "org-c" not in tenants
    # The audit trail names who set it.
    store = Store(database_url)
    try:
        [entry] = [e for e in store.audit() if e.kind == "tenant_set" and e.tenant == "team-a1"]
    finally:
        store.close()
    assert json.loads(entry.detail)["by"] == "admin-a"


def test_only_an_admin_of_every_tenant_cordons_a_node(
    broker: LocalCluster, pki: Pki, database_url: str
) -> None:
    """Any admin reads the nodes; cordoning moves every tenant's work, so it needs "*"."""
    with (
        Client(broker.broker_address, security=security(pki, "client-a")) as client,
        Client(broker.broker_address, security=security(pki, "admin-a")) as admin,
        Client(broker.broker_address, security=security(pki, "root")) as root,
    ):
        with pytest.raises(PermissionDeniedError, match="may not call .*ListNodes"):
            client.list_nodes()
        assert [n.node_id for n in admin.list_nodes()] == [NODE_ID]
        for call in (admin.cordon_node, admin.uncordon_node):
            with pytest.raises(PermissionDeniedError, match="admin-a: cordoning a node"):
                call(NODE_ID)
        # Refused before the node is looked up: an unknown one is refused alike.
        with pytest.raises(PermissionDeniedError, match="admin-a: cordoning a node"):
            admin.cordon_node("no-such-node")
        assert not root.get_node(NODE_ID).cordoned  # untouched
        assert root.cordon_node(NODE_ID, reason="patching").cordoned
        assert root.uncordon_node(NODE_ID).state == "ready"
    store = Store(database_url)
    try:
        entries = [e for e in store.audit() if e.kind in ("node_cordon", "node_uncordon")]
    finally:
        store.close()
    assert [(e.kind, json.loads(e.detail)["by"]) for e in entries] == [
        ("node_cordon", "root"),
        ("node_uncordon", "root"),
    ]


def test_the_audit_trail_shows_an_admin_its_own_scope(broker: LocalCluster, pki: Pki) -> None:
    with (
        Client(broker.broker_address, security=security(pki, "client-a")) as client,
        Client(broker.broker_address, security=security(pki, "admin-a")) as admin,
        Client(broker.broker_address, security=security(pki, "root")) as root,
    ):
        root.set_tenant("team-a1", 64 * MiB, parent="org-a")
        admin.set_tenant("team-a2", 64 * MiB, parent="org-a")
        client.release(client.reserve("team-a2", MiB).lease_id)
        with pytest.raises(PermissionDeniedError, match="may not call .*ListAudit"):
            client.list_audit()
        seen = admin.list_audit(limit=1000).records
        assert {r.tenant for r in seen} == {"org-a", "team-a1", "team-a2"}  # no org-b, no node
        by = {(r.kind, r.tenant): r.by for r in seen}
        assert by[("tenant_set", "team-a1")] == "root"
        assert by[("tenant_set", "team-a2")] == "admin-a"
        assert by[("reserve", "team-a2")] == "client-a"
        assert by[("release", "team-a2")] == "client-a"
        with pytest.raises(PermissionDeniedError, match="admin-a: tenant 'org-b'"):
            admin.list_audit(tenant="org-b")
        everything = root.list_audit(limit=1000).records
        assert {"org-b", "team-b1"} <= {r.tenant for r in everything}
        assert ("node_register", NODE_ID) in {(r.kind, r.node_id) for r in everything}


def test_sizing_is_read_in_scope_and_forgotten_by_an_admin(broker: LocalCluster, pki: Pki) -> None:
    with (
        Client(broker.broker_address, security=security(pki, "client-a")) as client,
        Client(broker.broker_address, security=security(pki, "client-b")) as client_b,
        Client(broker.broker_address, security=security(pki, "admin-a")) as admin,
        Client(broker.broker_address, security=security(pki, "root")) as root,
    ):
        root.set_tenant("team-a1", 256 * MiB, parent="org-a")
        for c, tenant in ((client, "team-a1"), (client_b, "team-b1")):
            lease = c.reserve(tenant, 32 * MiB, command_class="pytest")
            c.release(lease.lease_id, peak_bytes=8 * MiB, outcome="completed")
        assert [p.tenant for p in client.list_sizing()] == ["team-a1"]
        assert [p.tenant for p in root.list_sizing()] == ["team-a1", "team-b1"]
        with pytest.raises(PermissionDeniedError, match="client-a: tenant 'team-b1'"):
            client.list_sizing(tenant="team-b1")
        with pytest.raises(PermissionDeniedError, match="may not call .*ForgetProfile"):
            client.forget_sizing("team-a1")
        with pytest.raises(PermissionDeniedError, match="admin-a: tenant 'team-b1'"):
            admin.forget_sizing("team-b1")
        assert [p.tenant for p in root.list_sizing()] == ["team-a1", "team-b1"]  # unchanged
        assert [p.samples for p in admin.forget_sizing("team-a1")] == [1]
        assert [p.tenant for p in root.list_sizing()] == ["team-b1"]
        entry = root.list_audit(kind="sizing_forget").records[0]
        assert (entry.tenant, entry.by) == ("team-a1", "admin-a")
        with pytest.raises(PermissionDeniedError, match="may not call .*ForgetSessionProfile"):
            client.forget_session_sizing("org-a")
        with pytest.raises(PermissionDeniedError, match="admin-a: tenant 'org-b'"):
            admin.forget_session_sizing("org-b")
        assert admin.forget_session_sizing("org-a") == []  # nothing learned yet


def test_a_client_reserves_only_in_its_scope(broker: LocalCluster, pki: Pki) -> None:
    with (
        Client(broker.broker_address, security=security(pki, "client-a")) as a,
        Client(broker.broker_address, security=security(pki, "client-b")) as b,
        Client(broker.broker_address, security=security(pki, "root")) as root,
    ):
        root.set_tenant("team-a2", 256 * MiB, parent="org-a")
        with pytest.raises(PermissionDeniedError, match="may not call .*SetTenant"):
            a.set_tenant("team-a3", MiB, parent="org-a")  # a client's role
        lease_b = b.reserve("team-b1", 32 * MiB)  # a subtree of its scope
        before = {t.name: t.granted_memory_bytes for t in root.list_tenants()}
        with pytest.raises(PermissionDeniedError, match="client-a: tenant 'org-b'"):
            a.reserve("org-b", 32 * MiB)
        with pytest.raises(PermissionDeniedError, match="client-a: tenant 'nowhere'"):
            a.reserve("nowhere", 32 * MiB)  # refused, whether or not it exists
        for call in (a.release, a.renew, a.get_lease):
            with pytest.raises(PermissionDeniedError, match=lease_b.lease_id):
                call(lease_b.lease_id)
        assert {t.name: t.granted_memory_bytes for t in root.list_tenants()} == before
        assert root.get_lease(lease_b.lease_id).state == "active"
        lease_a = a.reserve("team-a2", 16 * MiB)
        assert {x.lease_id for x in a.list_leases()} == {lease_a.lease_id}
        assert lease_b.lease_id in {x.lease_id for x in b.list_leases()}
        a.release(lease_a.lease_id)
        b.release(lease_b.lease_id)
    assert broker.procs["broker"].poll() is None


def test_a_node_acts_only_as_its_own_node(broker: LocalCluster, pki: Pki) -> None:
    creds = security(pki, "node").credentials()
    metadata = (("authorization", f"Bearer {TOKENS['node']}"),)
    register = broker_pb2.RegisterNodeRequest(
        node_id="someone-else",
        address="127.0.0.1:1",
        capacity=types_pb2.Resources(memory_bytes=1 << 30),
    )
    with grpc.secure_channel(broker.broker_address, creds) as ch:
        gateway = broker_pb2_grpc.NodeGatewayStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            gateway.RegisterNode(register, metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not act as node 'someone-else'" in err.value.details()
        register.node_id = NODE_ID
        gateway.RegisterNode(register, metadata=metadata, timeout=5)
        reserve = broker_pb2.ReserveRequest(
            tenant="org-a", intent=types_pb2.Resources(memory_bytes=MiB)
        )
        with pytest.raises(grpc.RpcError) as err:
            broker_pb2_grpc.BrokerStub(ch).Reserve(reserve, metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node (role node) may not call /agentcg.v1.Broker/Reserve" in err.value.details()
        # A node reads the leases placed on it (with the tenant's ancestors), and no other's.
        with Client(broker.broker_address, security=security(pki, "client-b")) as b:
            lease_id = b.reserve("team-b1", 8 * MiB).lease_id
            get = broker_pb2.GetLeaseRequest(lease_id=lease_id)
            lease = broker_pb2_grpc.BrokerStub(ch).GetLease(get, metadata=metadata, timeout=5)
            assert lease.node_id == NODE_ID and list(lease.tenant_ancestors) == ["org-b"]
            other = (("authorization", f"Bearer {TOKENS['node-2']}"),)
            with pytest.raises(grpc.RpcError) as err:
                broker_pb2_grpc.BrokerStub(ch).GetLease(get, metadata=other, timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"placed on node '{NODE_ID}', not on one of its nodes" in err.value.details()
            b.release(lease_id)


def test_refusals_are_counted_by_reason(broker: LocalCluster, pki: Pki) -> None:
    def refused(reason: str) -> float:
        address = broker.metrics_address("broker")
        return scrape_metric(address, "agentcg_broker_access_refused_total", reason=reason)

    before = {r: refused(r) for r in ("unauthenticated", "role", "scope")}
    with Client(broker.broker_address, security=security(pki)) as nobody:
        with pytest.raises(UnauthenticatedError):
            nobody.list_tenants()
    with Client(broker.broker_address, security=security(pki, "client-a")) as a:
        with pytest.raises(PermissionDeniedError):
            a.delete_tenant("org-a")  # a client's role
        with pytest.raises(PermissionDeniedError):
            a.get_tenant("org-b")  # outside its scope
    assert {r: refused(r) - n for r, n in before.items()} == {
        "unauthenticated": 1,
        "role": 1,
        "scope": 1,
    }


def test_whoami_tells_each_caller_who_it_is_taken_for(broker: LocalCluster, pki: Pki) -> None:
    with Client(broker.broker_address, security=security(pki, "client-a")) as a:
        me = a.whoami()
    assert (me.name, me.role, me.tenants, me.nodes, me.checked) == (
        "client-a",
        "client",
        ("org-a",),
        (),
        True,
    )
    assert "/agentcg.v1.Broker/Reserve" in me.methods
    assert "/agentcg.v1.TenantAdmin/SetTenant" not in me.methods
    env = {**os.environ, **client_env(pki, "node")}
    argv = [sys.executable, "-m", "agentcg.clients.cli", "whoami", "--json"]
    out = subprocess.run(
        [*argv, "--broker", broker.broker_address],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    node = json.loads(out.stdout)
    assert (node["name"], node["role"], node["nodes"]) == ("node", "node", [NODE_ID])


def test_a_client_certificate_is_a_principal_without_a_token(
    tmp_path: Path, pki: Pki, database_url: str
) -> None:
    """Under mutual TLS a principal may be known by its certificate's names (cert_names): a
    SPIFFE id for an admin, a DNS name for a node. A certificate the file does not name gets
    UNAUTHENTICATED; a token, when sent, decides over the certificate."""
    ops_cert = make_client_cert(pki, "ops", ["URI:spiffe://example.org/ops"])
    host_cert = make_client_cert(pki, "host-17", ["DNS:host-17.nodes.example"])
    access = tmp_path / "access.toml"
    access.write_text(
        principal_entry(
            "ops", "", Role.ADMIN, tenants=["*"], cert_names=["spiffe://example.org/ops"]
        )
        # The node's entry as `agentcg access cert` prints it.
        + subprocess.run(
            [sys.executable, "-m", "agentcg.clients.cli", "access", "cert", "host-17"]
            + ["--role", "node", "--cert-name", "host-17.nodes.example"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        + principal_entry("client-a", TOKENS["client-a"], Role.CLIENT, tenants=["org-a"])
    )

    def by_cert(cert: tuple[Path, Path], token: str = "") -> ClientSecurity:
        return ClientSecurity(token=token, ca=pki.ca, cert=cert[0], key=cert[1])

    flags = server_flags(pki, access)
    with LocalCluster(tmp_path / "w", nodes=0, broker_args=flags, database_url=database_url) as c:
        with Client(c.broker_address, security=by_cert(ops_cert)) as ops:
            me = ops.whoami()
            assert (me.name, me.role, me.tenants) == ("ops", "admin", ("*",))
            ops.set_tenant("org-a", 1 << 30)
        # The node agent's certificate is its identity: it registers as itself, not another.
        with SimNode(c.broker_address, "host-17", security=by_cert(host_cert)):
            with Client(c.broker_address, security=by_cert(ops_cert)) as ops:
                assert [n.node_id for n in ops.list_nodes()] == ["host-17"]
        with Client(c.broker_address, security=by_cert(host_cert)) as host:
            with pytest.raises(PermissionDeniedError, match="host-17 .*may not call .*SetTenant"):
                host.set_tenant("org-b", 1 << 30)
        creds = by_cert(host_cert).credentials()
        register = broker_pb2.RegisterNodeRequest(
            node_id="host-18",
            address="127.0.0.1:1",
            capacity=types_pb2.Resources(memory_bytes=1 << 30),
        )
        with grpc.secure_channel(c.broker_address, creds) as ch:
            with pytest.raises(grpc.RpcError) as err:
                broker_pb2_grpc.NodeGatewayStub(ch).RegisterNode(register, timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may not act as node 'host-18'" in err.value.details()
        # A verified certificate the file does not name: nobody.
        with Client(c.broker_address, security=security(pki)) as stranger:
            with pytest.raises(
                UnauthenticatedError, match=r"client certificate's names \['client'\]"
            ):
                stranger.list_tenants()
        # A token decides over the certificate.
        with Client(c.broker_address, security=by_cert(ops_cert, TOKENS["client-a"])) as a:
            assert a.whoami().name == "client-a"
            with pytest.raises(PermissionDeniedError, match="may not call .*SetTenant"):
                a.set_tenant("team-a1", 1 << 20, parent="org-a")
        with Client(c.broker_address, security=by_cert(ops_cert)) as ops:
            assert [t.name for t in ops.list_tenants()] == ["org-a"]  # untouched
        assert c.procs["broker"].poll() is None


def test_a_long_lived_client_follows_its_rotated_files(tmp_path: Path, pki: Pki) -> None:
    """One SDK client, its certificate and token files replaced under it (a renewal, a
    rotation): its next calls present the new ones, no new client needed."""
    first = make_client_cert(pki, "renewed-1", ["URI:spiffe://example.org/agent"])
    second = make_client_cert(pki, "renewed-2", ["URI:spiffe://example.org/agent-v2"])
    access = tmp_path / "access.toml"
    access.write_text(
        principal_entry(
            "agent", "", Role.CLIENT, tenants=["*"], cert_names=["spiffe://example.org/agent"]
        )
        + principal_entry(
            "agent-v2", "", Role.CLIENT, tenants=["*"], cert_names=["spiffe://example.org/agent-v2"]
        )
        + principal_entry("client-a", TOKENS["client-a"], Role.CLIENT, tenants=["org-a"])
        + principal_entry("client-b", TOKENS["client-b"], Role.CLIENT, tenants=["org-b"])
    )
    cert, key, token = tmp_path / "me.pem", tmp_path / "me.key", tmp_path / "token"

    def install(pem: Path, private: Path) -> None:
        # As cert-manager or spiffe-helper do: a new file renamed over the old one.
        for src, dst in ((pem, cert), (private, key)):
            (tmp_path / "tmp").write_bytes(src.read_bytes())
            (tmp_path / "tmp").replace(dst)

    install(*first)
    flags = server_flags(pki, access)
    with LocalCluster(tmp_path / "w", nodes=0, broker_args=flags) as c:
        by_cert = ClientSecurity(ca=pki.ca, cert=cert, key=key)
        with Client(c.broker_address, security=by_cert) as client:
            assert client.whoami().name == "agent"
            install(*second)
            wait_until(lambda: client.whoami().name == "agent-v2", "the renewed certificate")
        token.write_text(TOKENS["client-a"])
        by_token = ClientSecurity(
            ca=pki.ca, cert=pki.client_cert, key=pki.client_key, token_file=token
        )
        with Client(c.broker_address, security=by_token) as client:
            assert client.whoami().name == "client-a"
            (tmp_path / "tmp").write_text(TOKENS["client-b"])
            (tmp_path / "tmp").replace(token)
            wait_until(lambda: client.whoami().name == "client-b", "the rotated token")


def test_certificate_principals_need_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    access = tmp_path / "access.toml"
    access.write_text(principal_entry("ops", "", Role.ADMIN, tenants=["*"], cert_names=["ops"]))
    proc = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "broker", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "b"), "--access", str(access),
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "ops is known by its client certificate (cert_names)" in proc.stderr
    assert "--tls-client-ca" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_whoami_on_a_broker_without_an_access_file(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, nodes=0) as c, Client(c.broker_address) as client:
        me = client.whoami()
    assert (me.name, me.checked, me.tenants) == ("anyone", False, ("*",))


def test_a_bad_access_file_stops_the_broker_before_it_listens(tmp_path: Path, pki: Pki) -> None:
    bad = tmp_path / "access.toml"
    bad.write_text('[[principal]]\nname = "x"\ntoken_sha256 = "abc"\nrole = "client"\n')
    flags = server_flags(pki, bad)
    proc = subprocess.run(
        [sys.executable, "-m", "agentcg.clients.cli", "broker", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "b"), *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "principal[0] (x): token_sha256 must be 64 hex digits" in proc.stderr
    assert not (tmp_path / "b").exists()  # stopped before it made its database


def test_sighup_reloads_the_access_file(tmp_path: Path) -> None:
    """Tokens added and revoked by rewriting the file take effect at SIGHUP; a file that does
    not parse leaves the one read before, and the broker serving."""
    old, new = new_token(), new_token()
    access = tmp_path / "access.toml"
    access.write_text(principal_entry("old", old, Role.ADMIN, tenants=["*"]))
    with LocalCluster(tmp_path, nodes=0, broker_args=("--access", str(access))) as c:
        broker = c.procs["broker"]

        def answer(token: str) -> str:
            with Client(c.broker_address, security=ClientSecurity(token=token)) as client:
                try:
                    client.list_tenants()
                except UnauthenticatedError:
                    return "refused"
                return "answered"

        assert (answer(old), answer(new)) == ("answered", "refused")
        access.write_text(principal_entry("new", new, Role.ADMIN, tenants=["*"]))
        broker.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while answer(new) != "answered" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (answer(old), answer(new)) == ("refused", "answered")
        access.write_text("[[principal]\n")
        broker.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not reloaded" not in c.log("broker") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "access file not reloaded, the one read before stays" in c.log("broker")
        assert (answer(old), answer(new)) == ("refused", "answered")
        assert broker.poll() is None


def test_sighup_rotates_the_tls_certificate_and_client_ca(tmp_path: Path) -> None:
    """New files in place plus SIGHUP: new connections get the new certificate and must present
    a client certificate of the new CA; no restart."""
    first, second = make_pki(tmp_path / "first"), make_pki(tmp_path / "second")
    cert, key, client_ca = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"

    def install(pki: Pki) -> None:
        for src, dst in ((pki.server_cert, cert), (pki.server_key, key), (pki.ca, client_ca)):
            dst.write_bytes(src.read_bytes())

    install(first)
    flags = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca))
    with LocalCluster(tmp_path / "work", nodes=0, broker_args=flags) as c:

        def connects(pki: Pki) -> bool:
            trusting = ClientSecurity(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
            with Client(c.broker_address, security=trusting, timeout_s=3) as client:
                try:
                    client.ping()
                except UnavailableError:
                    return False
                return True

        assert (connects(first), connects(second)) == (True, False)
        install(second)
        c.procs["broker"].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS files" not in c.log("broker") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (connects(first), connects(second)) == (False, True)
        assert c.procs["broker"].poll() is None
