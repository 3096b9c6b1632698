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
