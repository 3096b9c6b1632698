"""The ``agentcg`` command line. Client commands use only the SDK; ``broker`` and ``node`` start
the servers through their composition roots."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from agentcg.errors import AgentcgError
from agentcg.quantity import format_bytes, parse_bytes
from rich.console import Console
from rich.table import Table

from .sdk import AsyncClient, RunResult

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="agentcg: memory leases for agent tool calls"
)
tenant_app = typer.Typer(no_args_is_help=True, help="Tenant quotas")
lease_app = typer.Typer(no_args_is_help=True, help="Leases")
app.add_typer(tenant_app, name="tenant")
app.add_typer(lease_app, name="lease")

console = Console()
err_console = Console(stderr=True)

BROKER_DEFAULT = os.environ.get("AGENTCG_BROKER", "127.0.0.1:50051")
BrokerOpt = Annotated[str, typer.Option("--broker", help="broker address host:port")]

# Exit status of `agentcg run` when admission is denied (EX_TEMPFAIL: retry later).
EXIT_DENIED = 75


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _fail(exc: AgentcgError) -> None:
    err_console.print(f"[red]error:[/red] {exc.message}")
    raise typer.Exit(2)


def _client_call(broker: str, fn):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with AsyncClient(broker) as c:
            return await fn(c)

    try:
        return asyncio.run(go())
    except AgentcgError as exc:
        _fail(exc)


# -- servers ----------------------------------------------------------------------------------


@app.command()
def broker(
    listen: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1:50051",
    db: Annotated[str, typer.Option(help="SQLAlchemy URL (default: SQLite in --data-dir)")] = "",
    data_dir: Annotated[Path, typer.Option(help="where the embedded SQLite lives")] = Path(
        "var/broker"
    ),
    ready_file: Annotated[Path | None, typer.Option(help="write the bound address here")] = None,
    log_level: str = "INFO",
) -> None:
    """Run the broker (embedded SQLite by default)."""
    from agentcg.broker.main import BrokerConfig
    from agentcg.broker.main import main as broker_main

    broker_main(
        BrokerConfig(listen=listen, database_url=db, data_dir=data_dir, ready_file=ready_file),
        log_level,
    )


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
    ready_file: Annotated[Path | None, typer.Option(help="write the bound address here")] = None,
    log_level: str = "INFO",
) -> None:
    """Run the node agent: registers with the broker and runs tool calls in cgroups."""
    from agentcg.node.enforcement import NodePolicy
    from agentcg.node.main import NodeConfig
    from agentcg.node.main import main as node_main

    if on_timeout not in ("kill", "grow-local"):
        raise typer.BadParameter("--on-timeout must be kill or grow-local")
    node_main(
        NodeConfig(
            broker=broker,
            listen=listen,
            node_id=node_id,
            capacity_bytes=_size(memory) if memory else 0,
            cgroup_root=cgroup_root,
            policy=NodePolicy(
                broker_timeout_s=broker_timeout, on_timeout=on_timeout, dry_run=dry_run
            ),
            ready_file=ready_file,
        ),
        log_level,
    )


# -- tenants ----------------------------------------------------------------------------------


def _tenant_table(tenants) -> Table:  # type: ignore[no-untyped-def]
    table = Table("tenant", "parent", "quota", "granted", "leases")
    for t in tenants:
        table.add_row(
            t.name,
            t.parent or "-",
            format_bytes(t.memory_quota_bytes),
            format_bytes(t.granted_memory_bytes),
            str(t.active_leases),
        )
    return table


@tenant_app.command("set")
def tenant_set(
    name: str,
    memory: Annotated[str, typer.Option(help="memory quota, e.g. 4G")],
    parent: Annotated[str, typer.Option(help="parent tenant (org)")] = "",
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    """Create or update a tenant's memory quota."""
    mem = _size(memory)
    t = _client_call(broker, lambda c: c.set_tenant(name, mem, parent=parent))
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
    all_: Annotated[bool, typer.Option("--all", help="include ended leases")] = False,
    broker: BrokerOpt = BROKER_DEFAULT,
) -> None:
    leases = _client_call(broker, lambda c: c.list_leases(tenant=tenant, include_inactive=all_))
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


# -- run --------------------------------------------------------------------------------------


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
) -> None:
    """Start a broker and a node on this host and replay real agent traces through them."""
    from .demo import run_demo

    raise typer.Exit(run_demo(traces=traces, tenants=tenants, speed=speed, max_seconds=max_seconds))


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print numbers; --json PATH)")
app.add_typer(bench_app, name="bench")


@bench_app.command("reaction")
def bench_reaction_cmd(
    calls: Annotated[int, typer.Option(help="spiking tool calls to run")] = 40,
    spike: Annotated[int, typer.Option(help="spike size in MB (budget is 64 MiB)")] = 200,
    concurrency: int = 2,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
) -> None:
    """In-kernel limit event -> broker decision applied, through a real broker and node."""
    from .bench import bench_reaction

    result = bench_reaction(
        calls=calls, spike_mb=spike, concurrency=concurrency, json_path=json_path
    )
    table = Table("metric", "value")
    for k, v in result.items():
        table.add_row(k, str(v))
    console.print(table)


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
            json_path=json_path,
            plot=plot,
        )
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
