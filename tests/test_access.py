"""The access file and the scope rules (agentcg.access): pure, table-driven."""

from __future__ import annotations

import json

import pytest
from agentcg.access import (
    ANY,
    OPEN,
    ROLE_METHODS,
    AccessFileError,
    Principal,
    Role,
    new_token,
    parse_access,
    principal_entry,
    token_sha256,
)
from agentcg.v1 import broker_pb2, node_pb2

DIGEST = token_sha256("secret")


def entry(**keys: object) -> str:
    """One [[principal]] table; a key given as None is left out (JSON strings and arrays of
    strings are TOML too)."""
    fields = {"name": "p", "token_sha256": DIGEST, "role": "client", "tenants": ["org-a"]}
    fields.update(keys)
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items() if v is not None)
    return "[[principal]]\n" + body


def test_a_known_token_is_its_principal_and_an_unknown_one_nobody() -> None:
    text = entry() + entry(
        name="host-1", token_sha256=token_sha256("node-secret"), role="node", tenants=None
    )
    access = parse_access(text)
    assert access.authenticate("secret") == Principal("p", Role.CLIENT, frozenset({"org-a"}))
    node = access.authenticate("node-secret")
    assert node is not None and node.nodes == frozenset({"host-1"})  # its name by default
    assert access.authenticate("Secret") is None
    assert access.authenticate("") is None


def test_a_client_certificate_is_its_principal_by_one_of_its_names() -> None:
    """Known by the common name or a subject alternative name; none known, or two principals
    named by one certificate: nobody (refused, not guessed)."""
    spiffe = "spiffe://example.org/node/host-1"
    text = entry(token_sha256=None, cert_names=["ops.example"], role="admin", tenants=["*"])
    text += entry(name="host-1", token_sha256=None, cert_names=[spiffe], role="node", tenants=None)
    text += entry(name="both", cert_names=["both.example"])  # a token and a certificate
    access = parse_access(text)
    assert access.principals == 3
    assert access.identify(["ops.example"]) == Principal("p", Role.ADMIN, frozenset({"*"}))
    host = access.identify(["host-1", "host-1.example", spiffe])  # CN, DNS, URI
    assert host is not None and host.name == "host-1" and host.nodes == frozenset({"host-1"})
    assert access.identify(["client", "other.example"]) is None
    assert access.identify([]) is None
    assert access.identify(["ops.example", spiffe]) is None  # two principals: refused
    assert access.authenticate("secret") == access.identify(["both.example"])
    assert "ops.example" not in access.by_token_sha256


def test_an_entry_for_a_certificate_holds_no_token() -> None:
    text = principal_entry(
        "host-9", "", Role.NODE, cert_names=["spiffe://example.org/node/host-9", "host-9"]
    )
    assert "token_sha256" not in text
    host = parse_access(text).identify(["host-9"])
    assert host is not None and host.nodes == frozenset({"host-9"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("principal = 3", "array of tables"),
        ("principal = [1, 2]", "principal[0]: must be a table"),
        ("[[principal]\n", "not TOML"),
        (entry(name=None), "principal[0]: name is required"),
        (entry() + entry(token_sha256=token_sha256("x")), "principal[1] (p): name given twice"),
        (entry() + entry(name="q"), "principal[1] (q): same token as p"),
        (entry(token_sha256="abc"), "token_sha256 must be 64 hex digits"),
        (entry(token_sha256="z" * 64), "token_sha256 must be 64 hex digits"),
        (entry(role="root"), "role must be one of client, admin, node"),
        (entry(tenants=None), 'tenants is required ("*" for every tenant)'),
        (entry(tenants="org-a"), "tenants must be a list of strings"),
        (entry(tenants=["../etc"]), "invalid name '../etc'"),
        (entry(nodes=["n1"]), "nodes is for role node only"),
        (entry(role="node"), "a node has no tenants"),
        (entry(colour="blue"), "unknown key 'colour'"),
        (entry(token_sha256=None), "principal[0] (p): token_sha256 or cert_names is required"),
        (entry(cert_names="host-1"), "cert_names must be a list of names"),
        (entry(cert_names=[""]), "cert_names must be a list of names"),
        (entry(cert_names=[" host-1"]), "cert_names must be a list of names"),
        (entry(cert_names=["a\nb"]), "cert_names must be a list of names"),
        (
            entry(cert_names=["h1"]) + entry(name="q", token_sha256=None, cert_names=["h1"]),
            "principal[1] (q): cert name 'h1' is p's already",
        ),
    ],
)
def test_a_bad_access_file_is_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(AccessFileError) as err:
        parse_access(text)
    assert message in str(err.value)


SCOPE = Principal("a", Role.ADMIN, frozenset({"org-a"}))


@pytest.mark.parametrize(
    ("chain", "covered"),
    [
        (["org-a"], True),
        (["team-1", "org-a"], True),  # below a root of its scope
        (["deep", "team-1", "org-a"], True),
        (["org-b"], False),
        (["team-9", "org-b"], False),
        ([], False),
    ],
)
def test_a_tenant_is_in_scope_when_it_or_an_ancestor_is_a_root(
    chain: list[str], covered: bool
) -> None:
    assert SCOPE.covers(chain) is covered
    assert OPEN.covers(chain)


@pytest.mark.parametrize(
    ("parents", "managed"),
    [
        (["org-a"], True),  # a team of org-a
        (["team-1", "org-a"], True),
        ([], False),  # a top-level tenant: org-a itself, or a new org
        (["org-b"], False),
    ],
)
def test_an_admin_manages_the_tenants_below_its_roots(parents: list[str], managed: bool) -> None:
    assert SCOPE.manages(parents) is managed
    assert Principal("c", Role.CLIENT, frozenset({ANY})).manages(parents) is False
    assert Principal("root", Role.ADMIN, frozenset({ANY})).manages(parents) is True


def test_every_rpc_is_callable_by_some_role_and_a_node_only_by_nodes() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (broker_pb2, node_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    granted = set().union(*ROLE_METHODS.values())
    assert methods == granted, "an RPC no role may call, or a role naming an unknown RPC"
    node_only = {m for m in methods if "/agentcg.v1.NodeGateway/" in m}
    assert node_only <= ROLE_METHODS[Role.NODE]
    assert not node_only & (ROLE_METHODS[Role.CLIENT] | ROLE_METHODS[Role.ADMIN])


def test_new_tokens_are_long_and_distinct() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert min(len(t) for t in tokens) >= 43  # 32 random bytes, URL-safe base64
