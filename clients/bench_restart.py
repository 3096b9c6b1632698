"""`agentcg bench node-restart`: what a node agent restart costs the tool calls running on it.

A real broker and node agent (``--keep-calls``) as processes. ``calls`` tool calls run under
the SDK's ``run``, each writing a numbered line every 10 ms. Each restart SIGKILLs the agent
(``--how kill``) or stops it with SIGTERM (``--how stop``), starts a new one, and times from the
signal:

- ``agent_ready_s``: until the new agent serves (its ready file), calls re-adopted;
- ``resumed_s``: until every caller has output again that it received after the old agent
  exited (the SDK's exec followed the call again with the node's Resume, at the lease's new
  node address).

At the end the calls are told to finish, and every caller's output is checked line by line:
``lost_lines`` (a number missing) and ``repeated_lines`` (one delivered twice) must be 0,
``failed_calls`` (a run that raised or did not exit 0) 0, and ``runs_per_call`` 1 (no call was
started again). ``exec_p50_ms``/``exec_p99_ms``: an Exec of ``true`` under a fresh lease, from the request to
the exit status (the lease check at the broker, the cgroup, the spool, the gated start, the
cgroup's removal), first, with no other call running.
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bench import percentile
from .cluster import LocalCluster

__all__ = ["bench_node_restart"]

MiB = 1 << 20
TENANT = "bench-restart"


def _tool(marks: Path, index: int) -> list[str]:
    """Lines ``0``, ``1``, ... every 10 ms until ``marks/stop`` exists; each start recorded."""
    code = f"""
import os, pathlib, sys, time
marks = pathlib.Path({str(marks)!r})
with open(marks / "starts-{index}", "a") as f:
    f.write(f"{{os.getpid()}}\\n")
i = 0
while not (marks / "stop").exists():
    print(i, flush=True)
    i += 1
    time.sleep(0.01)
print(i, flush=True)
"""
    return [sys.executable, "-c", code]


class _Caller:
    """One ``run`` in a thread; its stdout, and when it last grew."""

    def __init__(self, client: Any, marks: Path, index: int) -> None:
        self.out = bytearray()
        self.last_output = 0.0
        self.result: Any = None
        self.index = index

        def sink(stream: int, data: bytes) -> None:
            if stream == 1:
                self.out.extend(data)
                self.last_output = time.monotonic()

        def run() -> None:
            try:
                self.result = client.run(TENANT, 64 * MiB, _tool(marks, index), on_output=sink)
            except Exception as exc:  # noqa: BLE001 - counted as a failed call
                self.result = exc

        self.thread = threading.Thread(target=run, name=f"caller-{index}")
        self.thread.start()

    def lines(self) -> list[int]:
        return [int(x) for x in bytes(self.out).split()]


def bench_node_restart(
    *,
    restarts: int = 3,
    calls: int = 8,
    how: str = "kill",
    execs: int = 50,
    json_path: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    from .sdk import Client

    if how not in ("kill", "stop"):
        raise ValueError("how must be kill or stop")
    sig = signal.SIGKILL if how == "kill" else signal.SIGTERM
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-restart-") as tmp:
        work = Path(tmp)
        marks = work / "marks"
        marks.mkdir()
        node_args = ("--keep-calls", "--spool-dir", str(work / "spool"))
        with (
            LocalCluster(work / "cluster", node_memory="2G", node_args=node_args) as cluster,
            Client(cluster.broker_address, timeout_s=30) as client,
        ):
            client.set_tenant(TENANT, 4096 * MiB)
            exec_ms = []
            for _ in range(execs):
                lease = client.reserve(TENANT, 64 * MiB)  # one call per lease
                t = time.perf_counter()
                client.exec(lease, ["true"])
                exec_ms.append((time.perf_counter() - t) * 1000)
            log(f"exec of true: p50 {statistics.median(exec_ms):.2f} ms")

            callers = [_Caller(client, marks, i) for i in range(calls)]
            ready_s: list[float] = []
            resumed_s: list[float] = []
            try:
                for n in range(restarts):
                    deadline = time.monotonic() + 60
                    while not all(c.out.count(b"\n") >= 10 for c in callers):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the calls wrote no output within 60 s")
                        time.sleep(0.01)
                    signalled = time.monotonic()
                    cluster.stop("node0", sig=sig)
                    gone = time.monotonic()  # the old agent has exited: what comes now is resumed
                    cluster.start_node(0)
                    ready_s.append(time.monotonic() - signalled)
                    while not all(c.last_output > gone for c in callers):
                        if time.monotonic() - signalled > 120:
                            raise RuntimeError(
                                "callers not following their calls again; the node's log:\n"
                                + cluster.log("node0")[-4000:]
                            )
                        time.sleep(0.005)
                    resumed_s.append(max(c.last_output for c in callers) - signalled)
                    log(
                        f"restart {n + 1} ({how}): agent ready {ready_s[-1]:.2f} s, "
                        f"every caller resumed {resumed_s[-1]:.2f} s after the signal"
                    )
            finally:
                (marks / "stop").touch()
                for c in callers:
                    c.thread.join(120)
                # A last agent without --keep-calls: stopped, it removes its cgroup root.
                cluster.node_args = ("--spool-dir", str(work / "spool"))
                cluster.stop("node0")
                cluster.start_node(0)
            lost = repeated = failed = 0
            for c in callers:
                got = c.lines()
                want = list(range(got[-1] + 1)) if got else [0]
                lost += len(set(want) - set(got))
                repeated += len(got) - len(set(got))
                if getattr(c.result, "exit_code", None) != 0:
                    failed += 1
            runs = [len((marks / f"starts-{c.index}").read_text().split()) for c in callers]
    result = {
        "how": how,
        "restarts": restarts,
        "calls": calls,
        "agent_ready_s_max": round(max(ready_s), 3),
        "resumed_s_p50": round(statistics.median(resumed_s), 3),
        "resumed_s_max": round(max(resumed_s), 3),
        "lost_lines": lost,
        "repeated_lines": repeated,
        "failed_calls": failed,
        "runs_per_call": max(runs),
        "exec_p50_ms": round(statistics.median(exec_ms), 3),
        "exec_p99_ms": round(percentile(exec_ms, 99), 3),
    }
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
