"""Composition root of the broker process: config, logging, tracing, store, servers, signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import selectors
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from agentcg.cpuidle import idle_settings
from agentcg.gate import ServerCertificates, ServerSecurity, reload_on_sighup
from agentcg.heap import freeze_start_up
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
from agentcg.v1 import broker_pb2, broker_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import leadership, writer
from .journal import Journal
from .ledger import Ledger
from .metrics import BrokerMetrics
from .service import (
    AuditLogServicer,
    BrokerCore,
    BrokerServicer,
    NodeAdminServicer,
    NodeGatewayServicer,
    SizingServicer,
    TenantAdminServicer,
)
from .store import Store
from .writer import ProcessJournal

__all__ = ["BrokerConfig", "main", "run_broker"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DAY_MS = 86_400_000


@dataclass(frozen=True)
class BrokerConfig:
    listen: str = "127.0.0.1:50051"
    database_url: str = ""  # "" -> SQLite file in data_dir
    data_dir: Path = Path("var/broker")
    ready_file: Path | None = None  # written with the bound address once serving
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; "" off, port 0 any
    reap_interval_s: float = 1.0
    grace_s: float = 5.0
    # Declared intents on a node may add up to capacity x this (budgets, sized from measured
    # peaks, still fit its capacity); 0: no overcommit ceiling.
    overcommit_ratio: float = 1.5
    # Reserves waiting for capacity at once, in all and per tenant (beyond: denied at once,
    # code queue_full); 0: no bound. Each release walks the queue: bounded, it costs bounded.
    max_queued: int = 5_000
    max_queued_per_tenant: int = 1_000
    # A paused call whose growth does not fit stays paused up to this long for room to free
    # (spikes last 1-2 s: time-shifted instead of killed); 0: killed at once.
    growth_wait_ms: int = 2_000
    # A new session of a class is declared at this percentile of the most earlier sessions of
    # the class held at once (never above what it declares): lower, more sessions per node and
    # more of them past their maximum, waiting to grow.
    session_percentile: int = 95
    # Where group commits run: "process" (broker/writer.py) or "thread" (broker/journal.py). An
    # in-memory SQLite database is the broker's own: always "thread".
    db_writer: str = "process"
    # With the process writer: while the event loop is saturated, hold a group commit up to
    # this long for more decisions (broker/writer.py); 0: commit what has arrived at once.
    commit_hold_ms: float = 2.0
    log_level: str = "INFO"
    # Ended leases and audit entries older than this are deleted (a batch at a time, in the
    # background); 0: kept forever.
    history_days: float = 30.0
    # OpenTelemetry's server interceptor on every RPC. ``main`` turns it off when nothing is
    # exported: a non-recording span per RPC was a tenth of the event loop's time per Reserve.
    rpc_spans: bool = True
    # TLS and the access file (agentcg.gate, agentcg.access); by default plaintext, open to all.
    security: ServerSecurity = field(default_factory=ServerSecurity)
    # (CPU of this process: event loop and gRPC threads, CPU of the writer process), or None:
    # where the kernel's scheduler puts them (see pin_cpus).
    cpus: tuple[int, int] | None = None


# The broker's gRPC core runs with its EventEngine experiments off, as grpcio did before 1.80:
# with them on (grpcio 1.85's default for Python), socket I/O runs on thread pools of their own
# and every RPC takes ~4 more thread switches (gRPC's event_engine threads: ~4,100 switches/s at
# 1,000 Reserve/s). Off, ``agentcg bench admission`` (3 interleaved pairs): broker CPU per no-op
# 120-124 against 144-165 us, per Reserve or Release 184-205 against 200-224 us; Reserve at
# 1,000/s p50 0.73-0.77 against 0.78-0.88 ms, p99 1.92-2.13 against 2.02-2.55 ms (README,
# "gRPC without its EventEngine experiments"). gRPC reads the variable once, when it is
# imported: ``agentcg broker`` starts itself again with it set (see clients/cli.py). An operator's
# own GRPC_EXPERIMENTS (even empty: gRPC's defaults) is kept. (grpcio 1.85 does not know
# event_engine_poller: naming it only logged "Unknown experiment" at every start.)
GRPC_EXPERIMENTS = (
    "-event_engine_listener,-event_engine_client,-event_engine_for_all_other_endpoints,"
    "-event_engine_callback_cq"
)


def pin_cpus(spec: str, allowed: Iterable[int]) -> tuple[int, int] | None:
    """``--pin-cpus``: "off" (None), "auto" (the last two CPUs of ``allowed``, the ones this
    process may run on; None with fewer than two) or "A,B" (two distinct allowed CPUs).

    The event loop shares the GIL with gRPC's threads and hands every commit to the writer
    process. On 2 CPUs shared with the load generator, Reserve at 1,000/s (``agentcg bench
    admission``'s fixed-rate phase, rounds interleaved) had p50 0.75 ms pinned against 0.81 ms,
    and p99 1.44-1.87 ms in 4 of 5 rounds against 1.88-2.62 ms, but 4.42 ms in the fifth: a
    pinned thread cannot move off a CPU something else is busy on. The no-op ceiling fell by a
    fifth and Reserve+Release by 8-21% (gRPC's threads no longer run beside the loop). The writer
    pinned alone, or the loop thread alone, did not help. Hence off by default, and only onto
    CPUs the broker has to itself (a cpuset, a dedicated host).
    """
    cpus = sorted(set(allowed))
    if spec == "off":
        return None
    if spec == "auto":
        return (cpus[-2], cpus[-1]) if len(cpus) >= 2 else None
    parts = spec.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{spec!r}: expected off, auto or two CPU numbers A,B")
    loop_cpu, writer_cpu = (int(p) for p in parts)
    if loop_cpu == writer_cpu:
        raise ValueError(f"{spec!r}: the two CPUs must differ")
    for cpu in (loop_cpu, writer_cpu):
        if cpu not in cpus:
            raise ValueError(f"{spec!r}: CPU {cpu} is not one this process may run on {cpus}")
    return loop_cpu, writer_cpu


def _pin_process(cpu: int) -> None:
    """Every thread of this process onto ``cpu``; threads started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass  # the thread ended meanwhile


async def run_broker(
    config: BrokerConfig,
    stop: asyncio.Event | None = None,
    on_serving: Callable[[], None] | None = None,
    busy_clock: Callable[[], float] = time.thread_time,
    notifier: ServiceNotifier | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM). ``busy_clock``: the journal's (see
    ``Journal``; ``main`` passes ``TimedSelector.busy_s``); ``notifier``: the service
    manager's (``main``: systemd's, from the environment)."""
    # The metrics endpoint first: a bad --metrics-listen fails before anything else starts.
    registry = metrics_registry()
    metrics = BrokerMetrics(registry)
    metrics_server = (
        serve_metrics(config.metrics_listen, registry) if config.metrics_listen else None
    )
    try:
        await _run(
            config,
            metrics,
            metrics_server,
            stop,
            on_serving,
            busy_clock,
            notifier or ServiceNotifier(),
        )
    finally:
        if metrics_server is not None:
            await asyncio.get_running_loop().run_in_executor(None, metrics_server.close)


def _read_on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout_s: float = 2.0
) -> Callable[[], T | None]:
    """A reader for another thread (the metrics endpoint's) that runs ``fn`` on ``loop``, where
    the live state is changed, and waits for its result; None if the loop cannot answer."""

    def read() -> T | None:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - handed to the reader
                    fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            return fut.result(timeout_s)
        except RuntimeError:  # the loop is closed
            return None
        except concurrent.futures.TimeoutError:
            fut.cancel()
            log.warning("metrics: the event loop did not answer within %.1f s", timeout_s)
            return None
        except Exception:
            log.exception("metrics: reading the broker state failed")
            return None

    return read


async def _run(
    config: BrokerConfig,
    metrics: BrokerMetrics,
    metrics_server: MetricsServer | None,
    stop: asyncio.Event | None,
    on_serving: Callable[[], None] | None,
    busy_clock: Callable[[], float],
    notifier: ServiceNotifier,
) -> None:
    url = config.database_url
    if not url:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        url = Store.default_url(config.data_dir)
    # A bad file stops the broker before it takes the lock.
    gate = config.security.interceptors(metrics.access_refused)
    certificates = config.security.certificates()
    stop = stop_on_signals(stop)
    reload_on_sighup(config.security, gate, certificates)
    lock = leadership.lock_for(url)
    # The writer process starts now, so that its imports overlap the wait for the lock and the
    # loading of the state: a standby taking over served 0.7 s sooner.
    fds = lock.child_fds() if lock is not None else ()
    started = writer.spawn(fds=fds) if _process_writer(config, url) else None
    serve = functools.partial(
        _serve,
        config,
        url,
        metrics,
        metrics_server,
        stop,
        on_serving,
        busy_clock,
        started,
        fds,
        gate=gate,
        certificates=certificates,
        notifier=notifier,
    )
    watchdog = asyncio.create_task(notifier.keep_alive(), name="watchdog")
    try:
        if lock is None:
            metrics.leader.set(1)
            await serve()
            return
        try:
            metrics.leader.set(0)

            def standing_by() -> None:  # its job while another leads: ready (started)
                notifier.ready("standby: waiting for the database's leadership lock")

            if not await _first(leadership.acquire(lock, standing_by), stop):
                notifier.stopping("stopping (was standing by)")
                log.info("broker stopping (was standing by)")
                return
            metrics.leader.set(1)
            with leadership.Watchdog(lock, _leadership_lost):
                await serve(fenced=lock.watched)
        finally:
            lock.close()
    finally:
        watchdog.cancel()
        if started is not None:  # not taken, or already stopped by the journal: a no-op
            writer.stop(started)


def _process_writer(config: BrokerConfig, url: str) -> bool:
    """Group commits in a writer process (writer.py), not on a thread of the broker's."""
    return config.db_writer == "process" and not Store.in_memory(url)


async def _first(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` until it ends (True) or ``stop`` is set first (False: ``work`` cancelled)."""
    working = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((working, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not working.done():
        working.cancel()
        return False
    working.result()
    return True


def _leadership_lost(reason: str) -> None:
    """Fail-stop (leadership.py): no commit of this broker's may land after a standby took over."""
    log.critical("lost the database's leadership lock (%s): exiting now", reason)
    logging.shutdown()
    os._exit(leadership.LOST_EXIT_CODE)


async def _serve(
    config: BrokerConfig,
    url: str,
    metrics: BrokerMetrics,
    metrics_server: MetricsServer | None,
    stop: asyncio.Event,
    on_serving: Callable[[], None] | None,
    busy_clock: Callable[[], float],
    started: subprocess.Popen[bytes] | None,
    fds: tuple[int, ...],
    *,
    gate: list[grpc.aio.ServerInterceptor],
    certificates: ServerCertificates | None,
    notifier: ServiceNotifier,
    fenced: bool = False,
) -> None:
    notifier.status("loading the state")
    store = Store(url)
    store.migrate()
    epoch = None
    if fenced:  # a lock that can be lost while this broker lives: fence its commits too
        epoch = store.lead()
        store.fence(epoch)
        metrics.leadership_epoch.set(epoch)
        log.info("leadership epoch %d", epoch)
    snapshot = store.load()
    ledger = Ledger(overcommit_ratio=config.overcommit_ratio)
    ledger.load(snapshot.tenants, snapshot.nodes, snapshot.active_leases)
    for tenant, command_class, peak in store.recent_peaks():
        ledger.observe_peak(tenant, command_class, peak)
    for tenant, session_class, peak in store.recent_session_peaks():
        ledger.observe_session_peak(tenant, session_class, peak)
    journal: Journal
    if _process_writer(config, url):
        journal = ProcessJournal(
            store,
            url,
            log_level=config.log_level,
            metrics=metrics,
            hold_s=config.commit_hold_ms / 1000,
            busy_clock=busy_clock,
            cpu=None if config.cpus is None else config.cpus[1],
            started=started,
            epoch=epoch,
            fds=fds,
        )
    else:
        journal = Journal(store, metrics=metrics, busy_clock=busy_clock)
    journal.start()
    core = BrokerCore(
        store,
        journal,
        ledger,
        metrics,
        on_fenced=_leadership_lost,
        max_queued=config.max_queued,
        max_queued_per_tenant=config.max_queued_per_tenant,
        growth_wait_ms=config.growth_wait_ms,
        session_percentile=config.session_percentile,
    )
    metrics.track_state(_read_on_loop(asyncio.get_running_loop(), core.state))
    if store.wal_path is not None:
        metrics.track_wal(store.wal_path)
    log.info(
        "broker state loaded: %d tenants, %d nodes, %d active leases",
        len(snapshot.tenants),
        len(snapshot.nodes),
        len(snapshot.active_leases),
    )

    interceptors = [aio_server_interceptor()] if config.rpc_spans else []
    server = grpc.aio.server(interceptors=[*interceptors, *gate])
    broker_pb2_grpc.add_BrokerServicer_to_server(BrokerServicer(core), server)
    broker_pb2_grpc.add_TenantAdminServicer_to_server(TenantAdminServicer(core), server)
    broker_pb2_grpc.add_NodeGatewayServicer_to_server(NodeGatewayServicer(core), server)
    broker_pb2_grpc.add_NodeAdminServicer_to_server(NodeAdminServicer(core), server)
    broker_pb2_grpc.add_AuditLogServicer_to_server(AuditLogServicer(core), server)
    broker_pb2_grpc.add_SizingServicer_to_server(SizingServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    ours = [d.full_name for d in broker_pb2.DESCRIPTOR.services_by_name.values()]
    reflection.enable_server_reflection(
        [*ours, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = config.security.bind(server, config.listen, certificates)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.listen}")
    host = config.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    await server.start()
    for name in ours:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "broker serving on %s (%s; database %s; host %s)",
        address,
        config.security.describe(),
        url.split("@")[-1],
        idle_settings().text,
    )
    listeners = {}
    if metrics_server is not None:
        listeners["metrics"] = metrics_server.address
        log.info("broker metrics on http://%s/metrics", metrics_server.address)
    if on_serving is not None:
        on_serving()
    if config.ready_file is not None:
        write_ready_file(config.ready_file, address, listeners)
    notifier.ready(f"leader: serving on {address}")

    async def reap() -> None:
        while True:
            await asyncio.sleep(config.reap_interval_s)
            try:
                await core.expire_due()
            except Exception:
                log.exception("lease reaper failed")

    async def prune() -> None:
        keep_ms = round(config.history_days * DAY_MS)
        # Every second at most (a batch deleted per round keeps up with 1,000 leases/s);
        # sooner for a retention of seconds (tests).
        interval_s = min(1.0, max(0.05, keep_ms / 10_000))
        while True:
            await asyncio.sleep(interval_s)
            try:
                await core.prune_history(keep_ms)
            except Exception:
                log.exception("history pruning failed")

    background = [asyncio.create_task(reap())]
    if config.history_days > 0:
        background.append(asyncio.create_task(prune()))
    await stop.wait()
    log.info("broker stopping (grace %.1f s)", config.grace_s)
    notifier.stopping(f"stopping (grace {config.grace_s:.1f} s)")
    for task in background:
        task.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    await journal.close()
    store.close()


def _after_start() -> None:
    """Move the start-up state out of the cycle collector's way (``agentcg.heap``)."""
    log.debug("%d start-up objects frozen", freeze_start_up())


class TimedSelector(selectors.DefaultSelector):
    """The event loop's selector, keeping the wall time the loop spent waiting for events."""

    def __init__(self) -> None:
        super().__init__()
        self._started = time.monotonic()
        self._waited = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        t = time.monotonic()
        try:
            return super().select(timeout)
        finally:
            self._waited += time.monotonic() - t

    def busy_s(self) -> float:
        """Seconds since the selector was made that the loop was not waiting for events."""
        return time.monotonic() - self._started - self._waited


def main(config: BrokerConfig, log_level: str = "INFO") -> None:
    configure_logging(log_level)
    exported = configure_tracing("agentcg-broker")
    config = replace(config, log_level=log_level, rpc_spans=exported)
    if config.cpus is not None:
        _pin_process(config.cpus[0])
        log.info("broker on CPU %d, its writer on CPU %d", *config.cpus)
    selector = TimedSelector()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        runner.run(
            run_broker(
                config,
                on_serving=_after_start,
                busy_clock=selector.busy_s,
                notifier=ServiceNotifier.from_env(),
            )
        )
