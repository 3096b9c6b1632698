"""Composition root of the node agent: cgroup driver, eBPF monitor, uplink, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from agentcg.channels import ClientSecurity
from agentcg.gate import ServerSecurity, reload_on_sighup
from agentcg.heap import freeze_start_up
from agentcg.names import validate_name
from agentcg.notify import ServiceNotifier
from agentcg.readyfile import write_ready_file
from agentcg.shutdown import stop_on_signals
from agentcg.telemetry import (
    MetricsServer,
    aio_server_interceptor,
    configure_logging,
    configure_tracing,
    metrics_registry,
    serve_metrics,
)
from agentcg.v1 import broker_pb2, node_pb2_grpc, types_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .agent import NodeAgent
from .cgroup import detect_driver
from .enforcement import NodePolicy
from .metrics import NodeMetrics
from .monitor import MemoryMonitor, UsageSource
from .preflight import rcu_settings
from .spool import default_spool_root
from .uplink import Uplink

__all__ = ["NodeConfig", "default_capacity_bytes", "default_node_id", "main", "run_node"]

log = logging.getLogger(__name__)


def default_node_id() -> str:
    return validate_name("node_id", socket.gethostname().split(".")[0][:63] or "node")


def default_capacity_bytes() -> int:
    """90% of MemTotal: what the node offers to tool calls by default."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 * 9 // 10
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass(frozen=True)
class NodeConfig:
    broker: str = "127.0.0.1:50051"
    listen: str = "127.0.0.1:0"
    node_id: str = ""
    capacity_bytes: int = 0
    cgroup_root: str = ""  # default: agentcg-<node_id> under the agent's own cgroup
    policy: NodePolicy = field(default_factory=NodePolicy)
    ready_file: Path | None = None
    grace_s: float = 5.0
    usage_source: str = "counter"  # UsageSource name, lower case
    keep_calls: bool = False  # on stop, leave calls running for the next agent to adopt
    spool_dir: Path | None = None  # Exec'd calls' output and exit; default per cgroup root
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; "" off, port 0 any
    # Its own listener's TLS and access file; how it presents itself to the broker.
    security: ServerSecurity = field(default_factory=ServerSecurity)
    broker_security: ClientSecurity = field(default_factory=ClientSecurity)


async def run_node(
    config: NodeConfig,
    stop: asyncio.Event | None = None,
    on_serving: Callable[[], None] | None = None,
    notifier: ServiceNotifier | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM); ``on_serving`` runs once the agent
    serves, before its ready file is written; ``notifier``: the service manager's (``main``:
    systemd's, from the environment)."""
    # The metrics endpoint first: a bad --metrics-listen fails before anything else starts.
    registry = metrics_registry()
    metrics = NodeMetrics(registry)
    metrics_server = (
        serve_metrics(config.metrics_listen, registry) if config.metrics_listen else None
    )
    try:
        await _run(config, metrics, metrics_server, stop, on_serving, notifier or ServiceNotifier())
    finally:
        if metrics_server is not None:
            await asyncio.get_running_loop().run_in_executor(None, metrics_server.close)


async def _run(
    config: NodeConfig,
    metrics: NodeMetrics,
    metrics_server: MetricsServer | None,
    stop: asyncio.Event | None,
    on_serving: Callable[[], None] | None,
    notifier: ServiceNotifier,
) -> None:
    node_id = validate_name("node_id", config.node_id or default_node_id())
    capacity = config.capacity_bytes or default_capacity_bytes()
    driver = detect_driver(config.cgroup_root or f"agentcg-{node_id}")
    spool_root = config.spool_dir or default_spool_root(driver.root.name)
    try:  # Exec'd calls' output and exit go there: a node that cannot write it serves no Exec
        spool_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot use spool dir {spool_root} (--spool-dir): {exc}") from None

    gate = config.security.interceptors(metrics.access_refused)
    certificates = config.security.certificates()
    server = grpc.aio.server(interceptors=[aio_server_interceptor(), *gate])
    port = config.security.bind(server, config.listen, certificates)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.listen}")
    address = f"{config.listen.rsplit(':', 1)[0]}:{port}"

    agent: NodeAgent | None = None

    serving = ""  # "node N serving on A", once it does: the first part of its STATUS

    async def on_connected() -> None:
        if serving:
            notifier.status(f"{serving}; broker {config.broker} connected")
        if agent is not None:
            await agent.on_uplink_connected()

    def on_disconnected(why: str) -> None:
        at = time.strftime("%H:%M:%S")
        notifier.status(f"{serving}; broker {config.broker} unreachable since {at} ({why})")

    async def on_decision(d: broker_pb2.Decision) -> None:
        assert agent is not None
        await agent.on_decision(d)

    uplink = Uplink(
        config.broker,
        broker_pb2.RegisterNodeRequest(
            node_id=node_id,
            address=address,
            capacity=types_pb2.Resources(memory_bytes=capacity),
        ),
        on_decision,
        lambda: agent.heartbeat() if agent else broker_pb2.Heartbeat(),
        on_lease=lambda lease: agent.on_lease_update(lease) if agent else None,
        on_connected=on_connected,
        on_disconnected=on_disconnected,
        security=config.broker_security,
    )
    monitor = MemoryMonitor(
        lambda ev: agent.on_mem_event(ev) if agent else None,
        usage_source=UsageSource[config.usage_source.upper()],
    )
    # Slow cgroup operations (create, attach, remove: each can wait milliseconds in the kernel)
    # run on this one thread, in order, so the event loop stays free to apply other calls'
    # decisions; usage thresholds register on a pool of their own (see NodeAgent).
    cgroup_io = ThreadPoolExecutor(1, thread_name_prefix="cgroup-io")
    agent = NodeAgent(
        node_id,
        driver,
        monitor,
        uplink,
        capacity,
        config.policy,
        cgroup_io,
        metrics=metrics,
        spool_root=spool_root,
    )
    agent.loop = asyncio.get_running_loop()
    calls = agent.calls
    metrics.track(lambda: len(calls), uplink, monitor)
    monitor.start()

    node_pb2_grpc.add_NodeAgentServicer_to_server(agent, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    await uplink.start()
    # Calls a previous agent left running (it crashed, or stopped with keep_calls) are taken
    # over if their lease still holds; the rest are stopped and their cgroups removed.
    adopted = await agent.adopt()
    if adopted:
        log.warning("re-adopted %d running call(s) under %s", adopted, driver.root)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "node %s serving on %s (%s), broker %s, capacity %d bytes, cgroups under %s (v%d), "
        "%s (a call's move and usage threshold each wait for a grace period: agentcg preflight)",
        node_id,
        address,
        config.security.describe(),
        config.broker,
        capacity,
        driver.root,
        driver.version,
        rcu_settings().text,
    )
    listeners = {}
    if metrics_server is not None:
        listeners["metrics"] = metrics_server.address
        log.info("node %s metrics on http://%s/metrics", node_id, metrics_server.address)
    if on_serving is not None:
        on_serving()
    if config.ready_file is not None:
        write_ready_file(config.ready_file, address, listeners)
    serving = f"node {node_id} serving on {address}"
    link = "connected" if uplink.connected else "unreachable (reconnecting)"
    notifier.ready(f"{serving}; {adopted} call(s) re-adopted; broker {config.broker} {link}")
    watchdog = asyncio.create_task(notifier.keep_alive(), name="watchdog")

    stop = stop_on_signals(stop)
    reconnects: set[asyncio.Task[bool]] = set()

    def reconnect() -> None:  # SIGHUP: to the broker with credentials read again
        task = asyncio.create_task(uplink.reconnect())
        reconnects.add(task)
        task.add_done_callback(reconnects.discard)

    reload_on_sighup(config.security, gate, certificates, then=reconnect)
    watches = [
        asyncio.create_task(agent.watch_leases(), name="leases"),
        asyncio.create_task(agent.watch_output(), name="output"),
    ]
    await stop.wait()
    for watch in watches:
        watch.cancel()
    log.info("node %s stopping (grace %.1f s)", node_id, config.grace_s)
    notifier.stopping(
        f"stopping (grace {config.grace_s:.1f} s; "
        + ("calls left running)" if config.keep_calls else "calls stopped)")
    )
    await health_servicer.enter_graceful_shutdown()
    if config.keep_calls:
        agent.leave()  # their callers resume them with the next agent
    stopping = asyncio.create_task(server.stop(config.grace_s))
    await asyncio.sleep(min(config.grace_s, 0.5))
    if not config.keep_calls:
        agent.kill_all("node agent shutting down")
    await stopping
    await uplink.close()
    monitor.close()
    cgroup_io.shutdown(wait=True)  # cgroup removals already submitted finish first
    if not config.keep_calls:
        driver.clear()
        agent.clear_spool()
    watchdog.cancel()


def _after_start() -> None:
    """Move the start-up state (imports, bcc's, the adopted calls) out of the cycle collector's
    way (``agentcg.heap``): a full collection stops enforcement too."""
    log.debug("%d start-up objects frozen", freeze_start_up())


def main(config: NodeConfig, log_level: str = "INFO") -> None:
    configure_logging(log_level)
    configure_tracing("agentcg-node")
    notifier = ServiceNotifier.from_env()  # before any call is spawned: none inherits it
    asyncio.run(run_node(config, on_serving=_after_start, notifier=notifier))
