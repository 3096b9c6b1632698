"""`agentcg bench calls`: what agentcg adds to each tool call, and how many calls a node runs.

A real broker and node agent as processes (cgroups, the BPF monitor), driven through the SDK's
``run`` as an agent framework calls it: Reserve, Exec on the chosen node (the lease check at
the broker, the call's cgroup, its spool, the gated start, the watch), the exit, Release. The
tool is ``true``, so what is timed is agentcg's own work:

- ``direct_p50_ms``/``direct_p99_ms``: ``true`` started and waited for by this process with
  no agentcg (asyncio's subprocess), the floor;
- ``run_p50_ms``/``run_p99_ms``: one ``run`` after the other, nothing else running;
  ``reserve_p50_ms`` is its Reserve; ``added_p50_ms`` = run p50 - direct p50;
- ``calls_per_s``: ``--concurrency`` callers, each running one call after the other for
  ``--seconds``; ``concurrent_p50_ms``/``concurrent_p99_ms`` their runs;
- ``node_cpu_ms_per_call``/``broker_cpu_ms_per_call``: the node agent's CPU (user + system,
  from /proc; not its calls') and the broker's (its database writer process included) over the
  concurrent phase, per call;
- ``release_stop_p50_ms``/``release_stop_max_ms``: a call that would sleep a minute, followed
  by its caller (Exec), is stopped by releasing its lease through another client (an operator's
  ``agentcg lease release``, an orchestrator's clean-up): from the Release's send to the end of
  the Exec stream with the call killed. The broker pushes the release to the node that runs the
  call (without that push, the call ran on until the node's lease check, near its expiry);
  ``release_stops`` calls, one after the other;
- ``failed_calls``: runs that raised or did not complete with exit 0 (must be 0), and
  ``first_failure``, what the first of them said;
- ``host_rcu``: the host's RCU grace-period setting (``rcu_expedited``), which decides most of
  a call's wait on a v1 host (its usage threshold and its move each wait for a grace period:
  ~9 ms normal, ~0.2 ms expedited; see ``agentcg preflight``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentcg.node.preflight import rcu_settings

from .bench import percentile
from .cluster import LocalCluster

if TYPE_CHECKING:
    from .sdk import AsyncClient

__all__ = ["bench_calls"]

MiB = 1 << 20
TENANT = "bench-calls"
TOOL = ["true"]
SLEEPER = ["sleep", "60"]  # a call stopped by its lease's release


def _cpu_s(pid: int, *, tree: bool = False) -> float:
    """The process's user + system CPU seconds, its threads included; with ``tree``, its live
    descendants' too (the broker's database writer process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if tree:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    total += _cpu_s(int(child), tree=True)
                except FileNotFoundError:  # exited meanwhile
                    pass
    return total


async def _direct(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*TOOL)
        await proc.wait()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def _release_stops(client: AsyncClient, node: str, n: int) -> list[float]:
    """Milliseconds from each Release of a followed call's lease to its Exec stream's end.
    Raises if a call ended any other way than killed for its released lease."""
    import grpc
    from agentcg.v1 import node_pb2, node_pb2_grpc, types_pb2

    took = []
    async with grpc.aio.insecure_channel(node) as channel:
        stub = node_pb2_grpc.NodeAgentStub(channel)
        for _ in range(n):
            lease = await client.reserve(TENANT, 64 * MiB, ttl_ms=600_000)
            request = node_pb2.ExecRequest(lease_id=lease.lease_id, argv=SLEEPER)
            began = 0.0
            last = None
            try:
                async for event in stub.Exec(request, timeout=60):
                    if last is None:  # the first event: the call runs, its lease is released
                        if not event.HasField("started"):
                            raise RuntimeError(f"lease {lease.lease_id}: did not start: {event}")
                        began = time.perf_counter()
                        await client.release(lease.lease_id)
                    last = event
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(
                    f"lease {lease.lease_id}: its call's Exec stream failed ({exc.code().name}: "
                    f"{exc.details()}), the call not stopped by the release"
                ) from None
            took.append((time.perf_counter() - began) * 1000)
            exited = last.exited if last is not None else node_pb2.Exited()
            if exited.outcome != types_pb2.OUTCOME_KILLED or "released" not in exited.reason:
                raise RuntimeError(f"lease {lease.lease_id}: the call ended otherwise: {last}")
    return took


async def _runs(
    broker: str,
    node: str,
    *,
    calls: int,
    concurrency: int,
    seconds: float,
    release_stops: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    from .sdk import AsyncClient

    async with AsyncClient(broker, timeout_s=30) as client:
        await client.set_tenant(TENANT, 64 * 1024 * MiB)
        failed = 0
        first_failure = ""

        async def one() -> tuple[float, float] | None:
            nonlocal first_failure
            t = time.perf_counter()
            try:
                result = await client.run(TENANT, 64 * MiB, TOOL)
            except Exception as exc:  # noqa: BLE001 - counted, the first one reported
                first_failure = first_failure or f"{type(exc).__name__}: {exc}"
                return None
            if result.exit_code != 0 or result.outcome != "completed":
                first_failure = first_failure or (
                    f"exit {result.exit_code}, {result.outcome}: {result.reason}"
                )
                return None
            return (time.perf_counter() - t) * 1000, result.admission_s * 1000

        for _ in range(min(20, calls)):  # warm: channels to the node, the broker's caches
            await one()
        serial: list[tuple[float, float]] = []
        for _ in range(calls):
            if (got := await one()) is None:
                failed += 1
            else:
                serial.append(got)

        concurrent: list[float] = []
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal failed
            while time.monotonic() < stop:
                if (got := await one()) is None:
                    failed += 1
                else:
                    concurrent.append(got[0])

        def cpu_now() -> dict[str, float]:
            return {name: _cpu_s(pid, tree=name == "broker") for name, pid in pids.items()}

        cpu = cpu_now()
        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu = {name: s - cpu[name] for name, s in cpu_now().items()}
        stops = await _release_stops(client, node, release_stops)
    return {
        "stops": stops,
        "serial": serial,
        "concurrent": concurrent,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "failed": failed,
        "first_failure": first_failure,
    }


def bench_calls(
    *,
    calls: int = 200,
    concurrency: int = 8,
    seconds: float = 10.0,
    release_stops: int = 20,
    json_path: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    if calls < 1 or concurrency < 1 or release_stops < 1 or seconds <= 0:
        raise ValueError("calls, concurrency and release_stops must be >= 1, seconds > 0")
    direct = asyncio.run(_direct(calls))
    log(f"direct start of true: p50 {statistics.median(direct):.2f} ms")
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-calls-") as tmp:
        with LocalCluster(Path(tmp), node_memory="8G", log_level="WARNING") as cluster:
            pids = {"node": cluster.procs["node0"].pid, "broker": cluster.procs["broker"].pid}
            got = asyncio.run(
                _runs(
                    cluster.broker_address,
                    cluster.node_addresses[0],
                    calls=calls,
                    concurrency=concurrency,
                    seconds=seconds,
                    release_stops=release_stops,
                    pids=pids,
                )
            )
    serial = [total for total, _ in got["serial"]]
    done = got["concurrent"]
    if not serial or not done:
        raise RuntimeError(f"no call completed ({got['failed']} failed: {got['first_failure']})")
    result = {
        "calls": calls,
        "concurrency": concurrency,
        "direct_p50_ms": round(statistics.median(direct), 3),
        "direct_p99_ms": round(percentile(direct, 99), 3),
        "run_p50_ms": round(statistics.median(serial), 3),
        "run_p99_ms": round(percentile(serial, 99), 3),
        "reserve_p50_ms": round(statistics.median(r for _, r in got["serial"]), 3),
        "added_p50_ms": round(statistics.median(serial) - statistics.median(direct), 3),
        "calls_per_s": round(len(done) / got["elapsed_s"], 1),
        "concurrent_p50_ms": round(statistics.median(done), 3),
        "concurrent_p99_ms": round(percentile(done, 99), 3),
        "node_cpu_ms_per_call": round(got["cpu_s"]["node"] * 1000 / len(done), 3),
        "broker_cpu_ms_per_call": round(got["cpu_s"]["broker"] * 1000 / len(done), 3),
        "release_stops": release_stops,
        "release_stop_p50_ms": round(statistics.median(got["stops"]), 3),
        "release_stop_max_ms": round(max(got["stops"]), 3),
        "failed_calls": got["failed"],
        "first_failure": got["first_failure"],  # "" when none failed
        "host_rcu": rcu_settings().text,
    }
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
