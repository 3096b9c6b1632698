"""Who may call the broker and the node agent, and on which tenants: pure decisions.

An access file (``--access FILE``, TOML) names the principals a server knows. Each presents a
bearer token (gRPC metadata ``authorization: Bearer <token>``); the file holds only the token's
SHA-256, so reading the file does not give the tokens away::

    [[principal]]
    name = "orchestrator-a"
    token_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    role = "client"          # client | admin | node
    tenants = ["org-a"]      # the subtrees it acts on ("*": every tenant)

    [[principal]]
    name = "host-17"
    token_sha256 = "..."
    role = "node"
    nodes = ["host-17"]      # the node ids it may register and connect as ("*": any)

Under mutual TLS a principal may be known by its client certificate instead of (or as well as)
a token: ``cert_names = ["host-18.nodes.example", "spiffe://example.org/node/host-18"]``. A
call with no token whose verified client certificate has one of these as its subject's common
name or as a subject alternative name (DNS name, URI: a SPIFFE id) is that principal's. A
token, when the call carries one, decides.

Roles (``ROLE_METHODS``: a method no role lists is refused to every principal):

- ``client`` reserves, renews, releases and reads leases, and reads tenants and what sizing
  learned of them, within its scope;
- ``admin`` can also set and delete the tenants *below* its scope's roots: an admin of
  ``org-a`` manages org-a's teams but not org-a's own quota, which belongs to whoever holds
  the level above (``"*"`` for top-level tenants); it makes sizing forget a tenant's classes
  in its scope, reads the audit trail and the nodes, and with ``"*"`` it may cordon, drain
  and uncordon them (they run every tenant's calls);
- ``node`` registers and connects as one of its node ids and reads the leases placed on them.

A tenant is in scope when it or one of its ancestors is one of the principal's ``tenants``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from agentcg.errors import PermissionDeniedError
from agentcg.names import InvalidNameError, validate_name

__all__ = [
    "ANY",
    "OPEN",
    "REFUSALS",
    "ROLE_METHODS",
    "Access",
    "AccessFileError",
    "Principal",
    "Role",
    "new_token",
    "parse_access",
    "principal_entry",
    "token_sha256",
]

ANY = "*"

# Why a call was refused (a metric label): an unknown or no token, a method outside the
# principal's role, a tenant, lease or node outside its scope.
REFUSALS = ("unauthenticated", "role", "scope")


class Role(enum.Enum):
    CLIENT = "client"
    ADMIN = "admin"
    NODE = "node"


_CLIENT_METHODS = frozenset(
    {
        "/agentcg.v1.Broker/Reserve",
        "/agentcg.v1.Broker/ReserveBatch",
        "/agentcg.v1.Broker/Release",
        "/agentcg.v1.Broker/ReleaseBatch",
        "/agentcg.v1.Broker/Renew",
        "/agentcg.v1.Broker/GetLease",
        "/agentcg.v1.Broker/ListLeases",
        "/agentcg.v1.Broker/Ping",
        "/agentcg.v1.Broker/WhoAmI",
        "/agentcg.v1.TenantAdmin/GetTenant",
        "/agentcg.v1.TenantAdmin/ListTenants",
        "/agentcg.v1.Sizing/ListProfiles",
        "/agentcg.v1.NodeAgent/Exec",
        "/agentcg.v1.NodeAgent/Resume",
        "/agentcg.v1.NodeAgent/Attach",
        "/agentcg.v1.NodeAgent/ListCalls",
    }
)

# The gRPC methods each role may call; the servicers then check the tenant or node it names.
ROLE_METHODS: Mapping[Role, frozenset[str]] = {
    Role.CLIENT: _CLIENT_METHODS,
    Role.ADMIN: _CLIENT_METHODS
    | {
        "/agentcg.v1.TenantAdmin/SetTenant",
        "/agentcg.v1.TenantAdmin/DeleteTenant",
        # Reading the nodes: any admin; cordoning: an admin of "*" (the servicer checks).
        "/agentcg.v1.NodeAdmin/ListNodes",
        "/agentcg.v1.NodeAdmin/GetNode",
        "/agentcg.v1.NodeAdmin/CordonNode",
        "/agentcg.v1.NodeAdmin/UncordonNode",
        # The audit trail of the tenants in its scope (the servicer filters).
        "/agentcg.v1.AuditLog/ListAudit",
        "/agentcg.v1.Sizing/ForgetProfile",
        "/agentcg.v1.Sizing/ForgetSessionProfile",
    },
    Role.NODE: frozenset(
        {
            "/agentcg.v1.NodeGateway/RegisterNode",
            "/agentcg.v1.NodeGateway/Connect",
            "/agentcg.v1.Broker/GetLease",
            "/agentcg.v1.Broker/Ping",
            "/agentcg.v1.Broker/WhoAmI",
        }
    ),
}


class AccessFileError(ValueError):
    """The access file is malformed; the message names the entry and the key."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    tenants: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()

    def may_call(self, method: str) -> bool:
        return method in ROLE_METHODS[self.role]

    def covers(self, chain: Iterable[str]) -> bool:
        """Whether a tenant is in scope, given its chain (the tenant, then its ancestors)."""
        return ANY in self.tenants or any(name in self.tenants for name in chain)

    def manages(self, parents: Sequence[str]) -> bool:
        """Whether this admin may set or delete a tenant whose parent chain (its parent, then
        the parent's ancestors; empty for a top-level tenant) is ``parents``: one of them must
        be a root of its scope."""
        return self.role is Role.ADMIN and self.covers(parents)

    def outside_scope(self, what: str) -> PermissionDeniedError:
        """The error for ``what`` (a tenant, a lease, managing some tenants) outside the scope."""
        scope = ", ".join(sorted(self.tenants)) or "none"
        return PermissionDeniedError(f"{self.name}: {what} is outside its scope (tenants {scope})")

    def acts_for_node(self, node_id: str) -> bool:
        # Only a node principal (or OPEN) has nodes: parse_access refuses them on other roles.
        return ANY in self.nodes or node_id in self.nodes


# Whoever calls a server that has no access file: it may do everything, for every tenant and
# as every node (the default, for a broker on loopback; the server logs that it runs open).
OPEN = Principal("anyone", Role.ADMIN, frozenset({ANY}), frozenset({ANY}))


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Access:
    """The principals a server knows, by their token's SHA-256 and by their certificates'
    names."""

    by_token_sha256: Mapping[str, Principal]
    by_cert_name: Mapping[str, Principal] = field(default_factory=dict)

    @property
    def principals(self) -> int:
        return len({*self.by_token_sha256.values(), *self.by_cert_name.values()})

    def authenticate(self, token: str) -> Principal | None:
        # Looked up by the token's digest: how long a lookup takes tells nothing about a token
        # an attacker could steer toward a known one.
        return self.by_token_sha256.get(token_sha256(token))

    def identify(self, cert_names: Iterable[str]) -> Principal | None:
        """The principal of a verified client certificate with these names (its common name
        and subject alternative names), or None: none of them is known, or they name two
        principals (refused rather than guessed)."""
        found = {p for n in cert_names if (p := self.by_cert_name.get(n)) is not None}
        return found.pop() if len(found) == 1 else None


def _names(entry: Mapping[str, object], key: str, where: str) -> frozenset[str]:
    """A list of tenant or node names (or "*"), each one a valid name."""
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AccessFileError(f"{where}: {key} must be a list of strings")
    out = frozenset(value)
    for v in out - {ANY}:
        try:
            validate_name(key, v)
        except InvalidNameError as exc:
            raise AccessFileError(f"{where}: {exc}") from None
    return out


def _cert_names(entry: Mapping[str, object], where: str) -> frozenset[str]:
    value = entry.get("cert_names", [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) and 0 < len(v) <= 1024 and v.isprintable() and v.strip() == v
        for v in value
    ):
        raise AccessFileError(
            f"{where}: cert_names must be a list of names (a certificate's common name, DNS "
            "name or URI)"
        )
    return frozenset(value)


def parse_access(text: str) -> Access:
    """Parse an access file (TOML, module docstring); raise AccessFileError naming the entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AccessFileError(f"not TOML: {exc}") from None
    entries = doc.get("principal", [])
    if not isinstance(entries, list):
        raise AccessFileError("principal must be an array of tables ([[principal]])")
    by_digest: dict[str, Principal] = {}
    by_cert: dict[str, Principal] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"principal[{i}]"
        if not isinstance(entry, dict):
            raise AccessFileError(f"{where}: must be a table ([[principal]] with keys)")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise AccessFileError(f"{where}: name is required")
        where = f"principal[{i}] ({name})"
        if name in names:
            raise AccessFileError(f"{where}: name given twice")
        names.add(name)
        cert_names = _cert_names(entry, where)
        digest = entry.get("token_sha256")
        if digest is None and not cert_names:
            raise AccessFileError(f"{where}: token_sha256 or cert_names is required")
        if digest is not None:
            if not isinstance(digest, str) or len(digest) != 64 or not _is_hex(digest):
                raise AccessFileError(f"{where}: token_sha256 must be 64 hex digits")
            digest = digest.lower()
            if digest in by_digest:
                raise AccessFileError(f"{where}: same token as {by_digest[digest].name}")
        for cert_name in sorted(cert_names):
            if cert_name in by_cert:
                raise AccessFileError(
                    f"{where}: cert name {cert_name!r} is {by_cert[cert_name].name}'s already"
                )
        try:
            role = Role(entry.get("role"))
        except ValueError:
            roles = ", ".join(r.value for r in Role)
            raise AccessFileError(f"{where}: role must be one of {roles}") from None
        tenants = _names(entry, "tenants", where)
        nodes = _names(entry, "nodes", where)
        if role is Role.NODE:
            if tenants:
                raise AccessFileError(f"{where}: a node has no tenants (it acts for nodes)")
            if not nodes:  # it acts as the node named as itself
                try:
                    nodes = frozenset({validate_name("name", name)})
                except InvalidNameError as exc:
                    raise AccessFileError(f"{where}: {exc} (or give nodes)") from None
        else:
            if nodes:
                raise AccessFileError(f"{where}: nodes is for role node only")
            if not tenants:
                raise AccessFileError(f'{where}: tenants is required ("*" for every tenant)')
        unknown = set(entry) - {"name", "token_sha256", "cert_names", "role", "tenants", "nodes"}
        if unknown:
            raise AccessFileError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        principal = Principal(name, role, tenants, nodes)
        if digest is not None:
            by_digest[digest] = principal
        by_cert.update(dict.fromkeys(cert_names, principal))
    return Access(MappingProxyType(by_digest), MappingProxyType(by_cert))


def principal_entry(
    name: str,
    token: str,
    role: Role,
    *,
    tenants: Iterable[str] = (),
    nodes: Iterable[str] = (),
    cert_names: Iterable[str] = (),
) -> str:
    """The access file's ``[[principal]]`` table for a principal holding ``token`` (only its
    SHA-256 is written; "": known by ``cert_names`` only); checked by ``parse_access``, whose
    AccessFileError it raises."""
    lines = ["[[principal]]", f"name = {json.dumps(name)}"]
    if token:
        lines.append(f'token_sha256 = "{token_sha256(token)}"')
    if cert_names:
        lines.append(f"cert_names = {json.dumps(sorted(cert_names))}")
    lines.append(f'role = "{role.value}"')
    if tenants:
        lines.append(f"tenants = {json.dumps(sorted(tenants))}")
    if nodes:
        lines.append(f"nodes = {json.dumps(sorted(nodes))}")
    text = "\n".join(lines) + "\n"
    parse_access(text)
    return text


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True
