"""A broker and node agents as real subprocesses on loopback: for the demo, benchmarks, tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentcg.readyfile import read_ready_file

__all__ = ["LocalCluster"]


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
    log_level: str = "INFO"
    broker_address: str = ""
    node_addresses: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, name: str, args: list[str]) -> str:
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
            )
        self.procs[name] = proc
        return _wait_ready(proc, ready, log, 60)

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
