"""Principals, tokens and flags shared by the access tests (tests/broker/test_access.py, on
both databases, and tests/e2e/test_access.py, with a real node agent)."""

from __future__ import annotations

import os
from pathlib import Path

from agentcg.access import Role, new_token, principal_entry
from agentcg.channels import ClientSecurity
from agentcg.clients.pki import Pki

MiB = 1 << 20

PRINCIPALS = ("root", "admin-a", "client-a", "client-b", "node", "node-2")
TOKENS = {name: new_token() for name in PRINCIPALS}
NODE_ID = f"n0-{os.getpid()}"  # the id LocalCluster gives its first node agent


def access_file(path: Path) -> Path:
    entries = [
        principal_entry("root", TOKENS["root"], Role.ADMIN, tenants=["*"]),
        principal_entry("admin-a", TOKENS["admin-a"], Role.ADMIN, tenants=["org-a"]),
        principal_entry("client-a", TOKENS["client-a"], Role.CLIENT, tenants=["org-a"]),
        principal_entry("client-b", TOKENS["client-b"], Role.CLIENT, tenants=["org-b"]),
        principal_entry("node", TOKENS["node"], Role.NODE, nodes=[NODE_ID]),
        principal_entry("node-2", TOKENS["node-2"], Role.NODE, nodes=["other-node"]),
    ]
    path.write_text("\n".join(entries))
    return path


def server_flags(pki: Pki, access: Path) -> tuple[str, ...]:
    return (
        "--access", str(access), "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
    )  # fmt: skip


def client_env(pki: Pki, who: str) -> dict[str, str]:
    """What the CLI or a node agent reads to present ``who``'s token and the client
    certificate (ClientSecurity.from_env)."""
    return {
        "AGENTCG_TOKEN": TOKENS[who],
        "AGENTCG_TLS_CA": str(pki.ca),
        "AGENTCG_TLS_CERT": str(pki.client_cert),
        "AGENTCG_TLS_KEY": str(pki.client_key),
    }


def security(pki: Pki, who: str = "") -> ClientSecurity:
    return ClientSecurity(
        token=TOKENS[who] if who else "", ca=pki.ca, cert=pki.client_cert, key=pki.client_key
    )
