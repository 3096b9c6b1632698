"""The ``agentcg`` command line. Client commands use only the SDK; ``broker`` and ``node`` start
the servers through their composition roots."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import enum
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from agentcg.access import ANY
from agentcg.channels import ClientSecurity
from agentcg.errors import AgentcgError
from agentcg.gate import ServerSecurity, ServerSecurityError
from agentcg.quantity import format_bytes, parse_bytes
from rich.console import Console
from rich.table import Table

from .sdk import (
    AsyncClient,
    AuditRecord,
    NodeCalls,
    NodeInfo,
    RunResult,
    SizingProfile,
    TenantInfo,
)

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="agentcg: memory leases for agent tool calls"
)
tenant_app = typer.Typer(no_args_is_help=True, help="Tenant quotas")
lease_app = typer.Typer(no_args_is_help=True, help="Leases")
app.add_typer(tenant_app, name="tenant")
app.add_typer(lease_app, name="lease")
access_app = typer.Typer(no_args_is_help=True, help="Access: tokens for the access file")
app.add_typer(access_app, name="access")
nodes_app = typer.Typer(
    no_args_is_help=True, help="Registered nodes: list, cordon, drain, uncordon (admin)"
)
app.add_typer(nodes_app, name="nodes")
sizing_app = typer.Typer(
    no_args_is_help=True,
    help="What the broker learned from measured peaks: of each tenant's command classes and "
    "each organization's session classes",
)
app.add_typer(sizing_app, name="sizing")

console = Console()
err_console = Console(stderr=True)

BROKER_DEFAULT = os.environ.get("AGENTCG_BROKER", "127.0.0.1:50051")
BrokerOpt = Annotated[str, typer.Option("--broker", help="broker address host:port")]

AccessOpt = Annotated[
    Path | None,
    typer.Option(
        "--access",
        help="access file (TOML): the principals allowed to call, by token, with their role "
        "and tenants or nodes (README, 'Access'); default: open to every caller",
    ),
]
TlsCertOpt = Annotated[
    Path | None, typer.Option("--tls-cert", help="serve TLS with this PEM certificate chain")
]
TlsKeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="the certificate's PEM key")]
TlsClientCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-client-ca",
        help="require client certificates signed by this CA (mutual TLS)",
    ),
]


def _server_security(
    access: Path | None, cert: Path | None, key: Path | None, client_ca: Path | None
) -> ServerSecurity:
    security = ServerSecurity(access, cert, key, client_ca)
    try:
        security.check()
    except ServerSecurityError as e:
        raise typer.BadParameter(str(e)) from None
    return security


def _client_security() -> ClientSecurity:
    """What the CLI presents to servers: AGENTCG_TOKEN (or AGENTCG_TOKEN_FILE),
    AGENTCG_TLS_CA, AGENTCG_TLS_CERT, AGENTCG_TLS_KEY, AGENTCG_TLS_SERVER_NAME."""
    security = ClientSecurity.from_env()
    try:
        security.bearer()  # a token file that cannot be read: say so now
    except OSError as e:
        err_console.print(f"[red]error:[/red] AGENTCG_TOKEN_FILE {e.filename}: {e.strerror}")
        raise typer.Exit(2) from None
    return security


# Exit status of `agentcg run` when admission is denied (EX_TEMPFAIL: retry later).
EXIT_DENIED = 75

T = TypeVar("T")


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _fail(exc: AgentcgError) -> NoReturn:
    err_console.print(f"[red]error:[/red] {exc.message}")
    raise typer.Exit(2)


def _client_call(broker: str, fn: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with AsyncClient(broker, security=_client_security()) as c:
            return await fn(c)

    try:
        return asyncio.run(go())
    except AgentcgError as exc:
        _fail(exc)


# -- servers ----------------------------------------------------------------------------------


def _metrics_listen(value: str) -> str:
    if value:
        from agentcg.telemetry import MetricsListenError, parse_listen_address

        try:
            parse_listen_address(value)
        except MetricsListenError as e:
            raise typer.BadParameter(str(e)) from None
    return value


MetricsListenOpt = Annotated[
    str,
    typer.Option(
        "--metrics-listen",
        callback=_metrics_listen,
        help="serve Prometheus metrics on HOST:PORT (port 0: any free port, written to the "
        "ready file as 'metrics HOST:PORT'); default: off",
    ),
]


def _serve(run: Callable[[], None]) -> None:
    """Run a server's composition root; a metrics address it cannot bind is a usage error."""
    from agentcg.telemetry import MetricsListenError

    try:
        run()
    except MetricsListenError as exc:
        err_console.print(f"[red]error:[/red] --metrics-listen: {exc}")
        raise typer.Exit(2) from None


class DbWriter(enum.StrEnum):
    PROCESS = "process"
    THREAD = "thread"


@app.command()
def broker(
    listen: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1:50051",
    db: Annotated[str, typer.Option(help="SQLAlchemy URL (default: SQLite in --data-dir)")] = "",
    data_dir: Annotated[Path, typer.Option(help="where the embedded SQLite lives")] = Path(
        "var/broker"
    ),
    ready_file: Annotated[Path | None, typer.Option(help="write the bound address here")] = None,
    overcommit_ratio: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="declared intents (a declared session's maximum) on a node may add up to "
            "capacity x this; 0: no ceiling",
        ),
    ] = 1.5,
    session_percentile: Annotated[
        int,
        typer.Option(
            min=1,
            max=100,
            help="a new session of a class is declared at this percentile of the most earlier "
            "sessions of the class held at once (never above what it declares)",
        ),
    ] = 95,
    growth_wait_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="a paused call whose growth does not fit stays paused up to this long for "
            "room to free, then lower-priority leases or the call give way; 0: killed at once",
        ),
    ] = 2_000,
    max_queued: Annotated[
        int,
        typer.Option(
            min=0,
            help="Reserves waiting for capacity (queue_timeout_ms) at once; one more is denied "
            "at once (code queue_full); 0: no bound",
        ),
    ] = 5_000,
    max_queued_per_tenant: Annotated[
        int,
        typer.Option(min=0, help="the same, per tenant; 0: no bound"),
    ] = 1_000,
    metrics_listen: MetricsListenOpt = "",
    db_writer: Annotated[
        DbWriter,
        typer.Option(
            help="where group commits run: a child process (no GIL shared with the event "
            "loop) or a thread of the broker's",
        ),
    ] = DbWriter.PROCESS,
    commit_hold_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=100.0,
            help="while the event loop is saturated, the writer process (--db-writer process) "
            "holds a group commit up to this long to gather more decisions (fewer fsyncs, more "
            "throughput); 0: never",
        ),
    ] = 2.0,
    history_days: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="delete ended leases and audit entries older than this (a batch at a time, "
            "in the background); 0: keep them forever",
        ),
    ] = 30.0,
    pin_cpus_spec: Annotated[
        str,
        typer.Option(
            "--pin-cpus",
            help="run this process (event loop, gRPC threads) on one CPU and the writer process "
            "on another: 'auto' (the last two this process may use), 'A,B', or 'off'. Only "
            "onto CPUs the broker has to itself",
        ),
    ] = "off",
    access: AccessOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsClientCaOpt = None,
    log_level: str = "INFO",
) -> None:
    """Run the broker (embedded SQLite by default)."""
    from agentcg.broker.main import GRPC_EXPERIMENTS, BrokerConfig, pin_cpus
    from agentcg.broker.main import main as broker_main

    try:
        cpus = pin_cpus(pin_cpus_spec, os.sched_getaffinity(0))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--pin-cpus") from None
    security = _server_security(access, tls_cert, tls_key, tls_client_ca)
    if "GRPC_EXPERIMENTS" not in os.environ:
        # gRPC read its settings when this process imported it: start again (same process,
        # same pid) with the broker's (see broker.main.GRPC_EXPERIMENTS).
        env = {**os.environ, "GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}
        os.execve(sys.executable, [sys.executable, "-m", "agentcg.clients.cli", *sys.argv[1:]], env)

    config = BrokerConfig(
        listen=listen,
        database_url=db,
        data_dir=data_dir,
        ready_file=ready_file,
        overcommit_ratio=overcommit_ratio,
        growth_wait_ms=growth_wait_ms,
        session_percentile=session_percentile,
        max_queued=max_queued,
        max_queued_per_tenant=max_queued_per_tenant,
        metrics_listen=metrics_listen,
        db_writer=db_writer.value,
        commit_hold_ms=commit_hold_ms,
        history_days=history_days,
        cpus=cpus,
        security=security,
    )
    _serve(lambda: broker_main(config, log_level))


@app.command()
def node(
    broker: BrokerOpt = BROKER_DEFAULT,
    listen: Annotated[str, typer.Option(help="address for the NodeAgent service")] = "127.0.0.1:0",
    node_id: Annotated[str, typer.Option(help="default: host name")] = "",
    memory: Annotated[
        str, typer.Option(help="memory offered to tool calls (default 90% of RAM)")
    ] = "",
    cgroup_root: Annotated[
        str, typer.Option(help="cgroup dir name under the agent's own cgroup")
    ] = "",
    broker_timeout: Annotated[
        float, typer.Option(help="seconds a paused call waits for the broker")
    ] = 5.0,
    on_timeout: Annotated[str, typer.Option(help="kill | grow-local")] = "kill",
    dry_run: Annotated[
        bool, typer.Option(help="log enforcement actions without applying them")
    ] = False,
    usage_source: Annotated[
        str,
        typer.Option(
            help="in-kernel usage: counter (memcg counter, raw tracepoint; falls back to lru),"
            " lru, pgpgin, none (cheapest)"
        ),
    ] = "counter",
    keep_calls: Annotated[
        bool, typer.Option(help="on stop, leave calls running for the next agent to adopt")
    ] = False,
    resume_grace: Annotated[
        float,
        typer.Option(help="seconds an Exec'd call whose caller went away runs on for it to resume"),
    ] = 30.0,
    max_output: Annotated[
        str,
        typer.Option(
            help="hold (freeze) an Exec'd call whose spooled output takes more of the node's "
            "disk than this until its caller has had more of it (0: no limit; else >= 64M)"
        ),
    ] = "256M",
    spool_dir: Annotated[
        Path | None,
        typer.Option(
            help="where Exec'd calls' output and exit status go (default "
            "/var/lib/agentcg/spool/<cgroup root>): a restarted agent resumes them from there"
        ),
    ] = None,
    stop_fraction: Annotated[
        float,
        typer.Option(
            help="pause a call in-kernel (SIGSTOP from BPF) at budget x this, before the "
            "kernel's reclaim at the limit; 0: off (the kernel pauses it at the limit)"
        ),
    ] = 0.0,
    ready_file: Annotated[Path | None, typer.Option(help="write the bound address here")] = None,
    metrics_listen: MetricsListenOpt = "",
    access: AccessOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsClientCaOpt = None,
    log_level: str = "INFO",
) -> None:
    """Run the node agent: registers with the broker and runs tool calls in cgroups.

    It presents itself to the broker as the CLI does: AGENTCG_TOKEN (or AGENTCG_TOKEN_FILE) and
    AGENTCG_TLS_CA, AGENTCG_TLS_CERT, AGENTCG_TLS_KEY, AGENTCG_TLS_SERVER_NAME."""
    from agentcg.node.enforcement import MIN_MAX_OUTPUT_BYTES, NodePolicy
    from agentcg.node.main import NodeConfig
    from agentcg.node.main import main as node_main

    if on_timeout not in ("kill", "grow-local"):
        raise typer.BadParameter("--on-timeout must be kill or grow-local")
    if usage_source not in ("counter", "lru", "pgpgin", "none"):
        raise typer.BadParameter("--usage-source must be counter, lru, pgpgin or none")
    if not 0 <= stop_fraction < 1:
        raise typer.BadParameter("--stop-fraction must be in [0, 1)")
    if not 0 < resume_grace <= 86400:
        raise typer.BadParameter("--resume-grace must be in (0, 86400] seconds")
    max_output_bytes = _size(max_output)
    if max_output_bytes != 0 and max_output_bytes < MIN_MAX_OUTPUT_BYTES:
        raise typer.BadParameter(
            f"--max-output must be 0 (no limit) or at least {format_bytes(MIN_MAX_OUTPUT_BYTES)}"
        )
    config = NodeConfig(
        broker=broker,
        listen=listen,
        node_id=node_id,
        capacity_bytes=_size(memory) if memory else 0,
        cgroup_root=cgroup_root,
        policy=NodePolicy(
            broker_timeout_s=broker_timeout,
            on_timeout=on_timeout,
            dry_run=dry_run,
            stop_fraction=stop_fraction,
            resume_grace_s=resume_grace,
            max_output_bytes=max_output_bytes,
        ),
        spool_dir=spool_dir,
        ready_file=ready_file,
        usage_source=usage_source,
        keep_calls=keep_calls,
        metrics_listen=metrics_listen,
        security=_server_security(access, tls_cert, tls_key, tls_client_ca),
        broker_security=_client_security(),
    )
    _serve(lambda: node_main(config, log_level))


# -- tenants ----------------------------------------------------------------------------------


def _tenant_table(tenants: Iterable[TenantInfo]) -> Table:
    table = Table("tenant", "parent", "quota", "granted", "cpu", "leases", "weight")
    for t in tenants:
        table.add_row(
            t.name,
            t.parent or "-",
            format_bytes(t.memory_quota_bytes),
            format_bytes(t.granted_memory_bytes),
            f"{t.granted_cpu_millis}/{t.cpu_quota_millis or '-'}",
            f"{t.active_leases}/{t.max_calls or '-'}",
            str(t.weight),
        )
    return table


class RoleOpt(enum.StrEnum):
    CLIENT = "client"
    ADMIN = "admin"
    NODE = "node"


RoleArg = Annotated[RoleOpt, typer.Option(help="what it may call")]
TenantsArg = Annotated[
    list[str] | None,
    typer.Option(help="a subtree it acts on (repeat; '*': every tenant); client and admin"),
]
NodesArg = Annotated[
    list[str] | None,
    typer.Option(help="a node id it may act as (repeat; default: NAME); role node"),
]


def _access_entry(
    name: str,
    token: str,
    role: RoleOpt,
    tenant: list[str] | None,
    node: list[str] | None,
    cert_names: list[str] | None = None,
) -> str:
    from agentcg.access import AccessFileError, Role, principal_entry

    try:
        return principal_entry(
            name,
            token,
            Role(role.value),
            tenants=tenant or (),
            nodes=node or (),
            cert_names=cert_names or (),
        )
    except AccessFileError as e:
        raise typer.BadParameter(str(e)) from None


@access_app.command("token")
def access_token(
    name: Annotated[str, typer.Argument(help="who holds it: a team, an orchestrator, a host")],
    role: RoleArg = RoleOpt.CLIENT,
    tenant: TenantsArg = None,
    node: NodesArg = None,
) -> None:
    """Make a new bearer token: the token goes to stderr (hand it to its holder), the access
    file's entry to stdout (append it: ``agentcg access token ci --tenant org-a >> access.toml``).
    Only the token's SHA-256 is in the entry."""
    from agentcg.access import new_token

    token = new_token()
    entry = _access_entry(name, token, role, tenant, node)
    err_console.print(f"token for {name} (AGENTCG_TOKEN): {token}", soft_wrap=True)
    sys.stdout.write("\n" + entry)


@access_app.command("cert")
def access_cert(
    name: Annotated[str, typer.Argument(help="who holds the certificate")],
    cert_name: Annotated[
        list[str],
        typer.Option(
            help="a name of its client certificate: the subject's common name, a DNS name or "
            "a URI such as a SPIFFE id (repeat)"
        ),
    ],
    role: RoleArg = RoleOpt.CLIENT,
    tenant: TenantsArg = None,
    node: NodesArg = None,
) -> None:
    """The access file's entry for a principal known by its client certificate (mutual TLS:
    the server needs --tls-client-ca), to stdout: ``agentcg access cert host-17 --role node
    --cert-name spiffe://example.org/node/host-17 >> access.toml``."""
    sys.stdout.write("\n" + _access_entry(name, "", role, tenant, node, cert_name))


@tenant_app.command("set")
def tenant_set(
    name: str,
    memory: Annotated[str, typer.Option(help="memory quota, e.g. 4G")],
    parent: Annotated[str, typer.Option(help="parent tenant (org)")] = "",
    cpu: Annotated[int, typer.Option(help="CPU quota in millis for the subtree; 0: none")] = 0,
    max_calls: Annotated[
        int, typer.Option(help="concurrent calls in the subtree; 0: unlimited")
    ] = 0,
    weight: Annotated[int, typer.Option(help="fair-share weight under contention")] = 1,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Create or update a tenant: quotas per resource, checked for its whole subtree."""
    mem = _size(memory)
    t = _client_call(
        broker,
        lambda c: c.set_tenant(
            name, mem, parent=parent, cpu_millis=cpu, max_calls=max_calls, weight=weight
        ),
    )
    console.print(_tenant_table([t]))


@tenant_app.command("get")
def tenant_get(name: str, broker: BrokerOpt = BROKER_DEFAULT) -> None:
    console.print(_tenant_table([_client_call(broker, lambda c: c.get_tenant(name))]))


@tenant_app.command("list")
def tenant_list(broker: BrokerOpt = BROKER_DEFAULT) -> None:
    console.print(_tenant_table(_client_call(broker, lambda c: c.list_tenants())))


@tenant_app.command("delete")
def tenant_delete(name: str, broker: BrokerOpt = BROKER_DEFAULT) -> None:
    _client_call(broker, lambda c: c.delete_tenant(name))
    console.print(f"deleted tenant {name}")


@lease_app.command("list")
def lease_list(
    tenant: str = "",
    node: Annotated[str, typer.Option(help="only the leases placed on this node")] = "",
    all_: Annotated[bool, typer.Option("--all", help="include ended leases")] = False,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    leases = _client_call(
        broker, lambda c: c.list_leases(tenant=tenant, node_id=node, include_inactive=all_)
    )
    table = Table("lease", "tenant", "session", "node", "budget", "state", "peak", "outcome")
    for x in leases:
        table.add_row(
            x.lease_id[:12],
            x.tenant,
            x.session,
            x.node_id,
            format_bytes(x.memory_bytes),
            x.state,
            format_bytes(x.peak_memory_bytes),
            x.outcome or "-",
        )
    console.print(table)


# -- nodes ------------------------------------------------------------------------------------


def _ago(t_ms: int, now_ms: int) -> str:
    return f"{max(0, now_ms - t_ms) / 1000:.1f}s ago" if t_ms else "-"


def _drain_note(n: NodeInfo, now_ms: int) -> str:
    if not n.drain_deadline_ms:
        return ""
    left_s = (n.drain_deadline_ms - now_ms) / 1000
    return f"revokes in {left_s:.0f}s" if left_s > 0 else "deadline passed"


def _nodes_table(nodes: Iterable[NodeInfo], now_ms: int) -> Table:
    table = Table(
        "node", "address", "state", "capacity", "granted", "used", "leases", "heartbeat", "note"
    )
    for n in nodes:
        note = "; ".join(x for x in (n.cordon_reason, _drain_note(n, now_ms)) if x)
        table.add_row(
            n.node_id,
            n.address,
            n.state,
            format_bytes(n.memory_capacity_bytes),
            format_bytes(n.granted_memory_bytes),
            format_bytes(n.used_memory_bytes) if n.last_heartbeat_ms else "-",
            str(n.active_leases),
            _ago(n.last_heartbeat_ms, now_ms),
            note or "-",
        )
    return table


def _now_ms() -> int:
    return int(time.time() * 1000)


@nodes_app.command("list")
def nodes_list(
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """The registered nodes: state (ready, pressured, disconnected, cordoned, draining),
    capacity, granted and measured memory, active leases."""
    nodes = _client_call(broker, lambda c: c.list_nodes())
    if json_out:
        print(json.dumps({"nodes": [n.as_dict() for n in nodes]}))
        return
    console.print(_nodes_table(nodes, _now_ms()))


ReasonOpt = Annotated[
    str, typer.Option(help="why (shown by 'nodes list' and kept in the audit trail)")
]


@nodes_app.command("cordon")
def nodes_cordon(node_id: str, reason: ReasonOpt = "", broker: BrokerOpt = BROKER_DEFAULT) -> None:
    """No new leases on NODE_ID; its running calls keep theirs (they may renew and grow)."""
    n = _client_call(broker, lambda c: c.cordon_node(node_id, reason=reason))
    console.print(f"node {n.node_id} cordoned: {n.active_leases} active leases left")


@nodes_app.command("uncordon")
def nodes_uncordon(node_id: str, broker: BrokerOpt = BROKER_DEFAULT) -> None:
    """NODE_ID takes new leases again (a drain's deadline is dropped)."""
    n = _client_call(broker, lambda c: c.uncordon_node(node_id))
    console.print(f"node {n.node_id} uncordoned: {n.state}")


@nodes_app.command("drain")
def nodes_drain(
    node_id: str,
    grace_s: Annotated[
        float,
        typer.Option(
            "--grace-s",
            min=0.0,
            max=86_400.0,
            help="revoke the leases still active this long from now (their calls are "
            "stopped); 0: wait for them to end on their own",
        ),
    ] = 0.0,
    reason: ReasonOpt = "",
    wait: Annotated[bool, typer.Option(help="wait until no lease is active on the node")] = True,
    timeout_s: Annotated[
        float,
        typer.Option(
            "--timeout-s", min=0.0, help="stop waiting after this long (exit 1); 0: no limit"
        ),
    ] = 0.0,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Cordon NODE_ID and wait until its leases are gone (a maintenance window): exit 0 once
    it runs nothing, 1 if --timeout-s ran out first (it stays cordoned either way)."""
    grace_ms = round(grace_s * 1000)
    seen: list[int] = []

    def progress(n: NodeInfo) -> None:
        if not seen or seen[-1] != n.active_leases:
            seen.append(n.active_leases)
            note = _drain_note(n, _now_ms())
            console.print(
                f"node {n.node_id}: {n.active_leases} active leases{' (' + note + ')' if note else ''}"
            )

    async def drain(c: AsyncClient) -> NodeInfo | None:
        if not wait:
            return await c.cordon_node(node_id, reason=reason, drain_grace_ms=grace_ms)
        work = c.drain_node(node_id, reason=reason, drain_grace_ms=grace_ms, progress=progress)
        try:
            return await asyncio.wait_for(work, timeout_s or None)
        except TimeoutError:
            return None

    n = _client_call(broker, drain)
    if n is None:
        err_console.print(
            f"node {node_id}: still has {seen[-1] if seen else '?'} active leases after "
            f"{timeout_s:g}s (it stays cordoned)"
        )
        raise typer.Exit(1)
    if wait:
        console.print(f"node {n.node_id} drained: no active lease")
    else:
        progress(n)


# -- audit ------------------------------------------------------------------------------------


def _audit_table(records: Iterable[AuditRecord]) -> Table:
    table = Table("id", "time (UTC)", "kind", "tenant", "lease", "node", "by", "detail")
    for r in records:
        detail = {k: v for k, v in r.detail.items() if k != "by"}
        table.add_row(
            str(r.id),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.at_ms / 1000))
            + f".{r.at_ms % 1000:03d}",
            r.kind,
            r.tenant or "-",
            r.lease_id[:12] or "-",
            r.node_id or "-",
            r.by or "-",
            json.dumps(detail, sort_keys=True) if detail else "-",
        )
    return table


@app.command()
def audit(
    tenant: Annotated[str, typer.Option(help="this tenant and its subtree")] = "",
    node: Annotated[str, typer.Option(help="entries about this node")] = "",
    lease: Annotated[str, typer.Option(help="entries about this lease")] = "",
    kind: Annotated[
        str, typer.Option(help="reserve, grow, release, expire, preempt, drain, tenant_set, ...")
    ] = "",
    since_s: Annotated[
        float, typer.Option("--since-s", min=0.0, help="only the last this many seconds")
    ] = 0.0,
    limit: Annotated[int, typer.Option(min=1, help="entries at most (newest first)")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """The broker's audit trail, newest first: decisions and changes, and who made them.

    Admin; the tenants in its scope."""
    since_ms = int((time.time() - since_s) * 1000) if since_s else 0

    async def read(c: AsyncClient) -> list[AuditRecord]:
        return await c.read_audit(
            tenant=tenant, node_id=node, lease_id=lease, kind=kind, since_ms=since_ms, limit=limit
        )

    records = _client_call(broker, read)
    if json_out:
        for r in records:
            print(json.dumps(dataclasses.asdict(r), sort_keys=True))
        return
    console.print(_audit_table(records))


# -- sizing -----------------------------------------------------------------------------------


def _sizing_table(
    profiles: Iterable[SizingProfile], with_budget: bool, sessions: bool = False
) -> Table:
    columns = ["organization" if sessions else "tenant", "session class" if sessions else "class"]
    columns += ["peaks", "sized", "p50", "p95", "max", "last"]
    table = Table(
        *columns,
        *(["session max" if sessions else "budget"] if with_budget else []),
        title="session classes" if sessions else None,
    )
    for p in profiles:
        peaks = (p.p50_bytes, p.p95_bytes, p.max_bytes, p.last_peak_bytes)
        table.add_row(
            p.tenant,
            p.command_class,
            str(p.samples),
            ("learned" if p.learned else "declared")
            if sessions
            else ("p95" if p.learned else "intent"),
            *(format_bytes(b) if p.samples else "-" for b in peaks),
            *([format_bytes(p.budget_bytes)] if with_budget else []),
        )
    return table


@sizing_app.command("list")
def sizing_list(
    tenant: Annotated[str, typer.Option(help="this tenant and its subtree")] = "",
    command_class: Annotated[str, typer.Option("--class", help="one command class")] = "",
    intent: Annotated[
        str, typer.Option(help="also show the budget a Reserve declaring this gets now, e.g. 1G")
    ] = "",
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Per tenant and command class: the committed peaks the broker sizes Reserves from (the
    newest 64), and whether it does yet ("p95": enough peaks, a Reserve gets their 95th
    percentile, never above its intent; "intent": too few, it gets what it declares). Then per
    organization and session class: the most each recent session held at once, and whether new
    sessions of the class are declared from them ("learned": at the broker's
    --session-percentile of them, never above what they declare) or at what they declare."""
    intent_bytes = _size(intent) if intent else 0

    async def both(c: AsyncClient) -> tuple[list[SizingProfile], list[SizingProfile]]:
        calls = await c.list_sizing(
            tenant=tenant, command_class=command_class, intent_memory_bytes=intent_bytes
        )
        sessions = (
            []
            if command_class
            else await c.list_session_sizing(tenant=tenant, intent_memory_bytes=intent_bytes)
        )
        return calls, sessions

    profiles, sessions = _client_call(broker, both)
    if json_out:
        print(
            json.dumps(
                {
                    "profiles": [dataclasses.asdict(p) for p in profiles],
                    "sessions": [dataclasses.asdict(p) for p in sessions],
                }
            )
        )
        return
    console.print(_sizing_table(profiles, with_budget=bool(intent_bytes)))
    if sessions:
        console.print(_sizing_table(sessions, with_budget=bool(intent_bytes), sessions=True))


@sizing_app.command("forget")
def sizing_forget(
    tenant: str,
    command_class: Annotated[
        str, typer.Option("--class", help="one command class; default: every class of TENANT")
    ] = "",
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Forget the peaks learned of TENANT's command classes (after a tool upgrade changed
    their memory use): their Reserves get their intent until enough new peaks (admin)."""
    forgotten = _client_call(broker, lambda c: c.forget_sizing(tenant, command_class))
    for p in forgotten:
        console.print(
            f"tenant {p.tenant} class {p.command_class}: forgot {p.samples} peaks"
            + (f" (p95 {format_bytes(p.p95_bytes)})" if p.samples else "")
        )
    if not forgotten:
        console.print(f"tenant {tenant}: nothing learned to forget")


@sizing_app.command("forget-sessions")
def sizing_forget_sessions(
    organization: str,
    session_class: Annotated[
        str,
        typer.Option("--class", help="one session class; default: every one of ORGANIZATION"),
    ] = "",
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Forget what ORGANIZATION's sessions of a class held at most (after its agents changed
    how they work): new sessions of the class are declared at what they declare until enough
    more have ended (admin)."""
    forgotten = _client_call(broker, lambda c: c.forget_session_sizing(organization, session_class))
    for p in forgotten:
        console.print(
            f"organization {p.tenant} session class {p.command_class}: forgot {p.samples} "
            "sessions" + (f" (p95 {format_bytes(p.p95_bytes)})" if p.samples else "")
        )
    if not forgotten:
        console.print(f"organization {organization}: nothing learned to forget")


# -- top --------------------------------------------------------------------------------------


def _top_table(snapshot: list[NodeCalls]) -> Table:
    table = Table(
        "node", "tenant", "session", "lease", "budget", "usage", "peak", "state", "up", "actions"
    )
    for node in snapshot:
        for c in sorted(node.calls, key=lambda c: (c.tenant, c.session, c.lease_id)):
            actions = ", ".join(a.action for a in c.recent_actions[-3:]) or "-"
            table.add_row(
                node.node_id,
                c.tenant,
                c.session,
                c.lease_id[:12],
                format_bytes(c.budget_bytes),
                format_bytes(c.usage_bytes),
                format_bytes(c.peak_bytes),
                c.state + (" (grown)" if c.grown else ""),
                f"{c.running_ms / 1000:.1f}s",
                actions,
            )
    total = sum(len(n.calls) for n in snapshot)
    table.caption = f"{total} call(s) on {len(snapshot)} node(s)"
    return table


def _top_json(snapshot: list[NodeCalls]) -> str:
    return json.dumps({"nodes": [dataclasses.asdict(n) for n in snapshot]}, indent=2) + "\n"


@app.command()
def preflight(
    broker: Annotated[
        str,
        typer.Option(
            "--broker", help="also check this broker: reachable, and takes us for --node-id"
        ),
    ] = "",
    node_id: Annotated[str, typer.Option(help="the node id to check (default: host name)")] = "",
    usage_source: Annotated[
        str, typer.Option(help="the usage source the node will ask for (see 'agentcg node')")
    ] = "counter",
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Can this host run the node agent? Tries what it needs, for real; exit 1 on a failure.

    Tries cgroups (and how long moving a call into one and registering its usage threshold
    take), the BPF monitor and a real paused and grown allocation (and with --broker, the broker
    and this node's identity there), as the agent will. Root needed, as for the agent."""
    from agentcg.node.main import default_node_id
    from agentcg.node.monitor import UsageSource
    from agentcg.node.preflight import Check, run_preflight

    if usage_source.upper() not in UsageSource.__members__:
        raise typer.BadParameter(
            f"unknown usage source {usage_source!r}", param_hint="--usage-source"
        )
    with _stdout_to_stderr() if json_out else contextlib.nullcontext():
        # bcc's compiler writes its warnings to fd 1 (e.g. no kernel headers): not into JSON.
        checks = run_preflight(UsageSource[usage_source.upper()])
    if broker:
        node = node_id or default_node_id()

        async def identify(c: AsyncClient) -> Check:
            t = time.perf_counter()
            await c.ping()
            me = await c.whoami()
            took_ms = (time.perf_counter() - t) * 1000
            if not me.checked:
                return Check("broker", "ok", f"{broker}: reachable, no access file", took_ms)
            if me.role == "node" and (node in me.nodes or ANY in me.nodes):
                return Check(
                    "broker", "ok", f"{broker}: reachable, takes us for {me.name}", took_ms
                )
            return Check(
                "broker",
                "fail",
                f"{broker}: takes us for {me.name} (role {me.role}, nodes "
                f"{', '.join(me.nodes) or 'none'}), which may not act as node {node!r}",
                took_ms,
            )

        async def check() -> Check:
            try:
                async with AsyncClient(broker, security=_client_security(), timeout_s=5) as c:
                    return await identify(c)
            except AgentcgError as exc:
                return Check("broker", "fail", f"{broker}: {exc}")

        checks.append(asyncio.run(check()))
    failed = [c.name for c in checks if c.status == "fail"]
    if json_out:
        print(json.dumps({"ok": not failed, "checks": [dataclasses.asdict(c) for c in checks]}))
    else:
        table = Table("check", "status", "ms", "detail")
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            status = f"[{colour[c.status]}]{c.status}[/{colour[c.status]}]"
            table.add_row(c.name, status, f"{c.duration_ms:.0f}", c.detail)
        console.print(table)
    if failed:
        raise typer.Exit(1)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """What this process and the libraries in it write to fd 1 goes to fd 2 meanwhile."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        libc.fflush(None)  # C stdio buffers what it writes to a pipe: out before fd 1 is back
        os.dup2(saved, 1)
        os.close(saved)


@app.command()
def whoami(
    broker: BrokerOpt = BROKER_DEFAULT,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Who the broker takes you for (the principal of AGENTCG_TOKEN) and what it may do."""
    me = _client_call(broker, lambda c: c.whoami())
    if json_out:
        print(json.dumps(dataclasses.asdict(me)))
        return
    if not me.checked:
        console.print("the broker has no access file: every caller may do everything")
        return
    scope = ", ".join(me.nodes if me.role == "node" else me.tenants)
    console.print(
        f"{me.name} (role {me.role}; {'nodes' if me.role == 'node' else 'tenants'}: {scope})"
    )
    for method in me.methods:
        console.print(f"  {method}")


@app.command()
def top(
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="node agent address host:port (repeatable); default: "
            "every node with an active lease at the broker",
        ),
    ] = None,
    tenant: Annotated[str, typer.Option(help="only this tenant's calls")] = "",
    once: Annotated[bool, typer.Option("--once", help="print one table and exit")] = False,
    interval: Annotated[float, typer.Option(help="refresh period, seconds")] = 1.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write the (latest) snapshot here")
    ] = None,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Live view of the tool calls running on nodes: budget, usage, peak, state, actions."""
    from rich.live import Live

    async def snapshot(c: AsyncClient) -> list[NodeCalls]:
        if node:
            return [await c.node_calls(a, tenant=tenant) for a in node]
        return await c.nodes_calls(tenant=tenant)

    async def go() -> None:
        async with AsyncClient(broker, security=_client_security()) as c:
            snap = await snapshot(c)
            if json_path is not None:
                json_path.write_text(_top_json(snap))
            if once:
                console.print(_top_table(snap))
                return
            with Live(_top_table(snap), console=console, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(interval)
                    snap = await snapshot(c)
                    if json_path is not None:
                        json_path.write_text(_top_json(snap))
                    live.update(_top_table(snap), refresh=True)

    try:
        asyncio.run(go())
    except AgentcgError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


# -- run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_span(tenant: str, session: str, command_class: str, argv: list[str]) -> Iterator[None]:
    """The trace of one ``agentcg run``: continued from ``TRACEPARENT`` (OpenTelemetry's
    environment carrier: a program that runs us passes its trace so), under a span
    ``agentcg.run`` when spans are exported (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``AGENTCG_TRACE_CONSOLE=1``). The broker's and the node's spans of the call join it."""
    from agentcg.telemetry import configure_tracing, tracing_exported
    from agentcg.tracecontext import parent_context
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    parent = parent_context(os.environ.get("TRACEPARENT", ""))
    # Not exported: no tracer provider, so the RPCs pass on the caller's trace as it is, or
    # none (with an unsampled one of our own the broker would stop sampling our calls).
    if not tracing_exported():
        token = otel_context.attach(parent) if parent is not None else None
        try:
            yield
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    attributes = {
        "agentcg.tenant": tenant,
        "agentcg.session": session,
        "agentcg.command_class": command_class,
        "process.command": argv[0],
    }
    configure_tracing("agentcg-cli")  # spans flushed at exit (the SDK's atexit hook)
    tracer = trace.get_tracer(__name__)
    with tracer.start_as_current_span("agentcg.run", context=parent, attributes=attributes):
        yield


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="tenant the call is charged to")],
    memory: Annotated[str, typer.Option(help="memory budget asked for, e.g. 64M")],
    broker: BrokerOpt = BROKER_DEFAULT,
    session: str = "default",
    command_class: Annotated[
        str, typer.Option("--class", help="command class, e.g. pytest")
    ] = "default",
    priority: int = 0,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print the result as JSON (command output goes to stderr)"),
    ] = False,
) -> None:
    """Reserve a lease and run CMD under it: agentcg run --tenant T --memory 64M -- CMD ARGS..."""
    argv = list(ctx.args)
    if not argv:
        err_console.print("[red]error:[/red] argv: give the command after --")
        raise typer.Exit(2)
    mem = _size(memory)

    def sink(stream: int, data: bytes) -> None:
        out = sys.stderr if (as_json or stream == 2) else sys.stdout
        out.buffer.write(data)
        out.flush()

    with _run_span(tenant, session, command_class, argv):
        result: RunResult = _client_call(
            broker,
            lambda c: c.run(
                tenant,
                mem,
                argv,
                session=session,
                command_class=command_class,
                priority=priority,
                on_output=sink,
            ),
        )
    if as_json:
        print(json.dumps(result.as_dict()))
    elif result.outcome != "completed":
        err_console.print(
            f"agentcg: {result.outcome}: peak {format_bytes(result.peak_bytes)}, "
            f"budget {format_bytes(result.budget_bytes)}{': ' + result.reason if result.reason else ''}"
        )
    raise typer.Exit(EXIT_DENIED if result.outcome == "denied" else result.exit_code)


@app.command()
def demo(
    traces: Annotated[
        Path | None, typer.Option(help="traces file (default: the shipped sample)")
    ] = None,
    tenants: int = 4,
    speed: float = 20.0,
    max_seconds: float = 60.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
) -> None:
    """Start a broker and a node on this host and replay real agent traces through them."""
    from .demo import run_demo

    raise typer.Exit(
        run_demo(
            traces=traces,
            tenants=tenants,
            speed=speed,
            max_seconds=max_seconds,
            json_path=json_path,
        )
    )


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print numbers; --json PATH)")
app.add_typer(bench_app, name="bench")
BenchDbOpt = Annotated[
    str,
    typer.Option(
        help="SQLAlchemy URL (default: SQLite in a temp dir); PostgreSQL runs in a new"
        " schema, dropped afterwards; a SQLite file must not exist yet"
    ),
]


def _print_result(result: dict[str, Any]) -> None:
    """A bench's figures as a metric/value table."""
    table = Table("metric", "value")
    for k, v in result.items():
        table.add_row(k, str(v))
    console.print(table)


@bench_app.command("reaction")
def bench_reaction_cmd(
    calls: Annotated[int, typer.Option(help="spiking tool calls through the broker")] = 40,
    spike: Annotated[int, typer.Option(help="broker-path spike size in MB (budget 64 MiB)")] = 200,
    concurrency: int = 2,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    trials: Annotated[int, typer.Option(help="spikes per mode (ebpf, poll, pause)")] = 50,
    budget_mb: Annotated[int, typer.Option(help="budget the spike crosses, MiB")] = 64,
    kernel_spike_mb: Annotated[int, typer.Option(help="kernel-path spike size, MiB")] = 512,
    poll_interval_ms: Annotated[int, typer.Option(help="the user-space poller's period")] = 100,
    lifecycle: Annotated[int, typer.Option(help="cgroup lifecycles to time")] = 300,
    usage_source: Annotated[
        str, typer.Option(help="in-kernel usage source: counter|lru|pgpgin")
    ] = "counter",
    overhead_rounds: Annotated[
        int, typer.Option(help="alloc-loop rounds, median taken (0: skip)")
    ] = 9,
    overhead_seconds: Annotated[float, typer.Option(help="seconds per alloc-loop run")] = 1.5,
    cluster: Annotated[bool, typer.Option(help="also run the broker decision path")] = True,
) -> None:
    """Spike -> enforcement: eBPF vs a 100 ms poller, cgroup lifecycle, BPF overhead, broker."""
    from .bench import bench_reaction

    result = bench_reaction(
        calls=calls,
        spike_mb=spike,
        concurrency=concurrency,
        json_path=json_path,
        trials=trials,
        budget_mb=budget_mb,
        kernel_spike_mb=kernel_spike_mb,
        poll_interval_ms=poll_interval_ms,
        lifecycle_n=lifecycle,
        usage_source=usage_source,
        overhead_rounds=overhead_rounds,
        overhead_seconds=overhead_seconds,
        cluster=cluster,
    )
    _print_result(result)


@bench_app.command("admission")
def bench_admission_cmd(
    seconds: Annotated[float, typer.Option(help="seconds per measured phase")] = 3.0,
    processes: Annotated[int, typer.Option(help="load generator processes")] = 2,
    concurrency: Annotated[int, typer.Option(help="requests in flight per process")] = 16,
    rate: Annotated[float, typer.Option(help="Reserve/s of the fixed-rate phase")] = 1000.0,
    leases: Annotated[int, typer.Option(help="live leases for the 10k phase")] = 10_000,
    rounds: Annotated[int, typer.Option(help="rounds of the fixed-rate phases, pooled")] = 3,
    node_streams: Annotated[int, typer.Option(help="simulated node streams for RSS")] = 1000,
    queued: Annotated[
        int, typer.Option(help="Reserves waiting in the queue during the last phase")
    ] = 1000,
    db: BenchDbOpt = "",
    load_generator: Annotated[
        str,
        typer.Option(
            help="native (clients/loadgen, `make loadgen`; $AGENTCG_LOADGEN names another"
            " build) or python (grpc.aio); default: native if built, else python"
        ),
    ] = "",
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    broker_pin_cpus: Annotated[
        str,
        typer.Option(
            help="the broker's --pin-cpus: off (its default), auto (its process and its writer "
            "on a CPU each) or A,B"
        ),
    ] = "off",
) -> None:
    """Admission throughput and latency against a real broker process (see bench_admission)."""
    from .bench_admission import LoadGeneratorError, UsedDatabaseError, bench_admission

    if load_generator not in ("", "native", "python"):
        raise typer.BadParameter("must be native or python", param_hint="--load-generator")
    from agentcg.broker.main import pin_cpus

    try:
        pin_cpus(broker_pin_cpus, os.sched_getaffinity(0))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--broker-pin-cpus") from None
    try:
        result = bench_admission(
            seconds=seconds,
            processes=processes,
            concurrency=concurrency,
            rate=rate,
            leases=leases,
            rounds=rounds,
            node_streams=node_streams,
            queued=queued,
            database_url=db,
            load_generator=load_generator,
            json_path=json_path,
            log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
            broker_pin_cpus=broker_pin_cpus,
        )
    except UsedDatabaseError as e:
        raise typer.BadParameter(str(e), param_hint="--db") from None
    except LoadGeneratorError as e:
        raise typer.BadParameter(str(e), param_hint="--load-generator") from None
    _print_result(result)


@bench_app.command("failover")
def bench_failover_cmd(
    takeovers: Annotated[int, typer.Option(min=1, help="leaders to SIGKILL, one by one")] = 3,
    db: BenchDbOpt = "",
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """Broker takeover: SIGKILL the leader, time until the standby serves and a client call
    made meanwhile is answered (see bench_failover)."""
    from .bench_admission import UsedDatabaseError
    from .bench_failover import bench_failover

    try:
        result = bench_failover(
            takeovers=takeovers,
            database_url=db,
            json_path=json_path,
            log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
        )
    except UsedDatabaseError as e:
        raise typer.BadParameter(str(e), param_hint="--db") from None
    _print_result(result)


@bench_app.command("node-restart")
def bench_node_restart_cmd(
    restarts: Annotated[int, typer.Option(min=1, help="node agent restarts, one by one")] = 3,
    calls: Annotated[int, typer.Option(min=1, help="tool calls running through them")] = 8,
    how: Annotated[
        str, typer.Option(help="kill (SIGKILL) | stop (SIGTERM, --keep-calls)")
    ] = "kill",
    execs: Annotated[int, typer.Option(min=1, help="Execs of `true` timed first")] = 50,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """Node agent restarts under running tool calls: time until the new agent serves and every
    caller follows its call again; no output line lost or repeated, no call run twice (see
    bench_restart)."""
    from .bench_restart import bench_node_restart

    if how not in ("kill", "stop"):
        raise typer.BadParameter("--how must be kill or stop")
    result = bench_node_restart(
        restarts=restarts,
        calls=calls,
        how=how,
        execs=execs,
        json_path=json_path,
        log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
    )
    _print_result(result)


@bench_app.command("calls")
def bench_calls_cmd(
    calls: Annotated[int, typer.Option(min=1, help="runs of `true`, one after the other")] = 200,
    concurrency: Annotated[
        int, typer.Option(min=1, help="callers running calls at once, for the throughput")
    ] = 8,
    seconds: Annotated[float, typer.Option(min=0.1, help="seconds of the concurrent phase")] = 10.0,
    release_stops: Annotated[
        int, typer.Option(min=1, help="followed calls stopped by releasing their lease")
    ] = 20,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """What agentcg adds to a tool call (the SDK's run of `true` through a real broker and
    node agent, against starting it directly) and how many calls a node runs per second, with
    the node agent's and the broker's CPU per call; how soon a running call stops once its
    lease is released (see bench_calls)."""
    from .bench_calls import bench_calls

    result = bench_calls(
        calls=calls,
        concurrency=concurrency,
        seconds=seconds,
        release_stops=release_stops,
        json_path=json_path,
        log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
    )
    _print_result(result)


@bench_app.command("commit")
def bench_commit_cmd(
    commits: Annotated[int, typer.Option(min=1, help="commits per way and round")] = 2000,
    rate: Annotated[float, typer.Option(min=1.0, help="commits/s of the paced way")] = 1000.0,
    rounds: Annotated[int, typer.Option(min=1, help="rounds, the two ways alternated")] = 2,
    db: Annotated[
        str, typer.Option(help="PostgreSQL URL (a new schema, dropped after); default SQLite")
    ] = "",
    data_dir: Annotated[
        Path | None, typer.Option(help="where the SQLite file goes (the broker's disk)")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """What one durable grant (a Reserve's lease and audit entry, one transaction) costs the
    database here: back to back, and paced at --rate with the writer idle in between (see
    bench_commit)."""
    from .bench_commit import bench_commit

    result = bench_commit(
        commits=commits,
        rate=rate,
        rounds=rounds,
        database_url=db,
        data_dir=data_dir,
        json_path=json_path,
        log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
    )
    _print_result(result)


@bench_app.command("access")
def bench_access_cmd(
    rounds: Annotated[int, typer.Option(min=1, help="rounds of each mode, alternated")] = 3,
    seconds: Annotated[float, typer.Option(min=1.0, help="measured load per round")] = 8.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """What TLS and the access gate cost the broker: Reserve+Release pairs/s and broker CPU
    per pair, open vs behind the gate vs behind mutual TLS too (see bench_access)."""
    from .bench_access import bench_access

    result = bench_access(
        rounds=rounds,
        seconds=seconds,
        json_path=json_path,
        log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
    )
    _print_result(result)


@bench_app.command("replay")
def bench_replay_cmd(
    traces: Annotated[Path, typer.Option(help="traces file (shared/traces JSONL format)")],
    agents: Annotated[int, typer.Option(help="how many traces to replay at once")] = 32,
    pool_fraction: Annotated[
        float | None, typer.Option(help="pool = F x the sum of the traces' peaks")
    ] = None,
    pool_of_oracle: Annotated[
        float | None, typer.Option(help="pool = F x the oracle pool (max of summed curves)")
    ] = None,
    speed: Annotated[float, typer.Option(help="time compression")] = 10.0,
    policy: Annotated[str, typer.Option(help="unlimited | static | agentcg | all")] = "all",
    seed: int = 0,
    mem_scale: Annotated[float, typer.Option(help="shrink the traces' memory by this")] = 1.0,
    find_min_pool: Annotated[
        bool, typer.Option(help="bisect the smallest zero-kill pool per policy")
    ] = False,
    session_overcommit: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="agentcg: the agents' declared session maxima may add up to the pool x this "
            "(the broker's --overcommit-ratio; 0: no ceiling; default 1.1); above it a new "
            "agent waits to start",
        ),
    ] = None,
    session_max: Annotated[
        str,
        typer.Option(
            help="agentcg: what each agent declares as its session's maximum: peak (its own "
            "trace's peak, which no real agent knows before it runs), cap (the largest peak of "
            "the replayed traces, a limit that holds every agent), learn (the cap and a session "
            "class: once five sessions ended, the broker declares new ones at a percentile, "
            "--session-percentile, of what those held) or none"
        ),
    ] = "peak",
    session_percentile: Annotated[
        int,
        typer.Option(
            min=1,
            max=100,
            help="agentcg, --session-max learn: the broker's --session-percentile (what new "
            "sessions are declared at, of what ended ones held)",
        ),
    ] = 95,
    broker_db: Annotated[
        str,
        typer.Option(
            help="agentcg: the broker's database URL (default: a new one per run); give two "
            "replays the same one and the second starts with what the first learned, as a "
            "deployment's broker does",
        ),
    ] = "",
    deadline_s: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="stop each run this many seconds after its agents start (0: never); the "
            "agents not done by then count as lost",
        ),
    ] = 0.0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of the run here")] = None,
) -> None:
    """Replay real agent traces as real processes in one memory pool, per policy."""
    from .replay_cli import bench_replay

    raise typer.Exit(
        bench_replay(
            console,
            traces=traces,
            agents=agents,
            pool_fraction=pool_fraction,
            pool_of_oracle=pool_of_oracle,
            speed=speed,
            policy=policy,
            seed=seed,
            mem_scale=mem_scale,
            find_min_pool=find_min_pool,
            session_overcommit=session_overcommit,
            session_max=session_max,
            session_percentile=session_percentile,
            broker_db=broker_db,
            deadline_s=deadline_s,
            json_path=json_path,
            plot=plot,
        )
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
