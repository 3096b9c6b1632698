"""A broker and node agents as real subprocesses on loopback: for the demo, benchmarks, tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agentcg.readyfile import read_ready_file

__all__ = [
    "BrokerProcess",
    "LocalCluster",
    "child_pids",
    "free_port",
    "leader_and_standby",
    "scrape_metric",
    "tree_cpu_s",
]


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return read_ready_file(ready).address
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.02)
    raise TimeoutError(f"{proc.args!r} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


@dataclass
class LocalCluster:
    """``with LocalCluster(workdir) as c: c.broker_address, c.node_addresses``."""

    workdir: Path
    nodes: int = 1
    node_memory: str = "2G"
    database_url: str = ""
    node_args: tuple[str, ...] = ()
    broker_args: tuple[str, ...] = ()
    # Added to the nodes' environment: how they present themselves to the broker
    # (AGENTCG_TOKEN, AGENTCG_TLS_*: agentcg.channels.ClientSecurity.from_env).
    node_env: dict[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    ready_timeout_s: float = 60.0  # per process (a node compiles its BPF program first)
    broker_address: str = ""
    node_addresses: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> str:
        ready = self.workdir / f"{name}.addr"
        ready.unlink(missing_ok=True)
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentcg.clients.cli",
                    *args,
                    "--ready-file",
                    str(ready),
                    "--log-level",
                    self.log_level,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )
        self.procs[name] = proc
        return _wait_ready(proc, ready, log, self.ready_timeout_s)

    def start_broker(self) -> str:
        args = ["broker", "--listen", "127.0.0.1:0", "--data-dir", str(self.workdir / "broker")]
        if self.database_url:
            args += ["--db", self.database_url]
        self.broker_address = self._spawn("broker", [*args, *self.broker_args])
        return self.broker_address

    def start_node(self, index: int) -> str:
        node_id = f"n{index}-{os.getpid()}"
        address = self._spawn(
            f"node{index}",
            [
                "node",
                "--broker",
                self.broker_address,
                "--node-id",
                node_id,
                "--memory",
                self.node_memory,
                *self.node_args,
            ],
            self.node_env,
        )
        return address

    def __enter__(self) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_broker()
            self.node_addresses = [self.start_node(i) for i in range(self.nodes)]
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()

    def metrics_address(self, name: str) -> str:
        """host:port of the metrics endpoint of ``name`` ("broker", "node0", ...), started with
        ``--metrics-listen`` in broker_args / node_args; "" if it has none."""
        return read_ready_file(self.workdir / f"{name}.addr").listeners.get("metrics", "")

    def stop(
        self, name: str | None = None, *, sig: int = signal.SIGTERM, timeout_s: float = 15
    ) -> None:
        names = [name] if name else [n for n in self.procs if n != "broker"] + ["broker"]
        for n in names:
            proc = self.procs.get(n)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started that still run (a broker's: its database writer)."""
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def scrape_metric(address: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` at http://ADDRESS/metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise RuntimeError(f"no {name} {labels} at {address}")


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` and its children (a broker and its database
    writer) have used so far; a child that exited meanwhile counts no more."""
    ticks = 0
    for p in [pid, *child_pids(pid)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """``agentcg broker`` on a port chosen up front, with its metrics on another: a standby
    (broker/leadership.py) binds its port only once it leads, so a client target naming every
    replica has to know the ports before they listen."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        database_url: str,
        env: dict[str, str] | None = None,
        port: int = 0,
        args: Sequence[str] = (),
    ) -> None:
        """``env``: added to its environment; ``port``: to listen on (default: a free one; a
        restarted broker takes its predecessor's); ``args``: more options of ``agentcg
        broker``."""
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.ready = workdir / f"{name}.addr"
        self.log = workdir / f"{name}.log"
        self.ready.unlink(missing_ok=True)
        argv = ["broker", "--listen", f"127.0.0.1:{self.port}", "--db", database_url]
        argv += ["--metrics-listen", f"127.0.0.1:{self.metrics_port}"]
        argv += ["--ready-file", str(self.ready), "--log-level", "INFO", *args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentcg.clients.cli", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env} if env else None,
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> str:
        """Wait until it serves (its ready file); its address."""
        return _wait_ready(self.proc, self.ready, self.log, timeout_s)

    def wait_log(self, needle: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {needle!r} after {timeout_s} s: {self.log_text()}")
            time.sleep(0.02)

    def wait_standby(self, timeout_s: float = 30) -> None:
        self.wait_log("standing by: another broker holds", timeout_s)

    def metric(self, name: str, **labels: str) -> float:
        """The value of the sample ``name`` with ``labels`` from its metrics endpoint."""
        return scrape_metric(f"127.0.0.1:{self.metrics_port}", name, **labels)

    def leader_gauge(self) -> float:
        return self.metric("agentcg_broker_leader")

    def log_text(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal it (unless it has exited) and wait; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)


def leader_and_standby(
    workdir: Path, database_url: str, started: list[BrokerProcess], args: Sequence[str] = ()
) -> tuple[BrokerProcess, BrokerProcess]:
    """Broker "a" serving, then broker "b" standing by for it, on one database (both given
    ``args``); both are appended to ``started`` as they start (for the caller to stop)."""
    a = BrokerProcess(workdir, "a", database_url, args=args)
    started.append(a)
    a.wait_ready()
    b = BrokerProcess(workdir, "b", database_url, args=args)
    started.append(b)
    b.wait_standby()
    return a, b
