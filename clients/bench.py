"""`agentcg bench ...`: benchmarks that print numbers (and write them with --json).

reaction, side by side in one run on real cgroups, with a real allocator spiking at >= 1 GB/s
(1 MiB zero-filled buffers, touched from user space) past a budget; every time is on
CLOCK_MONOTONIC, the crossing taken in BPF (the first charge the program looks at whose usage
reaches the budget; it looks at one charge in 16 per CPU, so this can be up to 15 charges after
the true crossing: the overshoot shows what got through):
- ebpf: the kernel SIGSTOPs the allocator from inside that charge; in effect when it dequeues
  the signal (signal:signal_deliver, timestamped in BPF). ebpf_freeze: the node then freezes the
  whole call from user space (freezer state FROZEN).
- poll: a user-space poller reads the cgroup's usage every 100 ms and freezes the call once over.
- pause: the node agent's default at a call's budget (the ebpf stop above is its opt-in
  NodePolicy.stop_fraction): the limit is the budget with v1 oom_kill_disable, so the kernel
  pauses the charging task; from its first reclaim at the limit (vmscan tracepoint, in BPF) to
  the kernel's memory.oom_control notification of the pause (user space: an upper bound).
- overshoot: usage above the budget once the action took effect.
- cgroup lifecycle: create + limit + attach + remove; bpf overhead: an allocation loop's
  throughput with each monitor variant loaded and watching vs none.
- decision path (LocalCluster): in-kernel limit event -> broker decision received on the node
  (broker_*) and applied (decision_*: limit raised, or the call killed), broker and node real.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import LocalCluster
from .sdk import AsyncClient

__all__ = ["bench_reaction", "percentile"]

MiB = 1 << 20
SOURCES = ("counter", "lru", "pgpgin", "none")  # UsageSource names, the default first
# Reaction trials, interleaved: the in-kernel SIGSTOP at the budget then the freeze of the call
# (ebpf: the node agent's path with NodePolicy.stop_fraction set, `agentcg node
# --stop-fraction`), a 100 ms user-space poller (poll), and the node agent's default path
# (pause: the kernel pauses the charging task at the v1 limit after its reclaim attempts there;
# the agent then asks the broker, timed end to end by the cluster part as decision_*).
MODES = ("ebpf", "poll", "pause")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


async def _spikes(broker: str, n: int, spike_mb: int, concurrency: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"grow": [], "kill": [], "wall": [], "broker": []}
    argv = [sys.executable, "-m", "agentcg.clients.worker", "--curve", f"0:{spike_mb},0.2:0"]
    async with AsyncClient(broker) as client:
        await client.set_tenant("bench-rich", 64 * 1024 * MiB)
        await client.set_tenant("bench-poor", 96 * MiB * concurrency)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            tenant = "bench-rich" if i % 4 else "bench-poor"
            async with sem:
                t0 = time.monotonic()
                r = await client.run(tenant, 64 * MiB, argv, session=f"b{i % concurrency}")
                out["wall"].append((time.monotonic() - t0) * 1000)
                for action, ns in r.timed_actions:
                    out.setdefault(action, []).append(ns / 1e6)
                out["broker"].extend(ns / 1e6 for ns in r.decisions_ns)

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


# --- in-kernel detection vs a 100 ms poller, on real cgroups ------------------------------------

# A spike: 1 MiB zero-filled buffers, each page touched from user space (page faults), as real
# programs (and the replay worker) allocate; kept until the process is frozen or killed. Prints
# its rate (bytes/s) if it gets to the end. Not MAP_POPULATE: a charge made inside mmap's
# populate is not a user fault, so at a v1 limit with oom_kill_disable the kernel cannot pause
# the task there; the charge fails and the task runs on until a later fault of its own (measured:
# ~500 reclaim passes and 8-13 ms from the first reclaim to the pause, against 18 passes and
# ~1 ms for touched pages).
_SPIKE_CODE = """
import sys, time
chunk = 1 << 20
total = int(sys.argv[1]) << 20
keep = []
t0 = time.perf_counter()
for _ in range(total // chunk):
    keep.append(bytearray(chunk))
print(f"{total / (time.perf_counter() - t0):.0f}", flush=True)
time.sleep(float(sys.argv[2]))
"""

# An allocation loop: map, populate and unmap 16 MiB for `seconds`; prints bytes/s of its
# fastest decile of iterations (on shared cores other tenants' bursts only ever add time to an
# iteration; what the monitor adds, it adds to every one).
_LOOP_CODE = """
import mmap, sys, time
size = 16 << 20
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
times = []
t0 = time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[1]):
    t = time.perf_counter_ns()
    mmap.mmap(-1, size, flags=flags).close()
    times.append(time.perf_counter_ns() - t)
times.sort()
print(f"{size / times[len(times) // 10] * 1e9:.0f}", flush=True)
"""


@dataclass
class _Trial:
    mode: str  # one of MODES
    cgroup: Any  # node.cgroup.Cgroup
    cgroup_id: int
    budget_bytes: int
    crossed_ns: int = 0  # in-kernel crossing of the budget (bpf_ktime_get_ns)
    stopped_ns: int = 0  # ebpf: the in-kernel SIGSTOP in effect (signal dequeued; kernel clock)
    acted_ns: int = 0  # the whole call frozen by user space (freezer.state FROZEN)
    usage_at_action_bytes: int = 0
    usage_at_arm_bytes: int = -1  # ebpf: usage when the per-page program was armed
    done: threading.Event = field(default_factory=threading.Event)


def _ms(values_ns: list[int], q: float) -> float:
    return round(percentile([v / 1e6 for v in values_ns], q), 3)


def _freeze(driver: Any, trial: _Trial) -> None:
    """The enforcement action: pause the call (freezer), timestamped once in effect."""
    driver.set_frozen(trial.cgroup, True)
    trial.acted_ns = time.monotonic_ns()
    trial.usage_at_action_bytes = driver.read_stats(trial.cgroup).usage_bytes
    trial.done.set()


def _arm_when_signalled(
    driver: Any, monitor: Any, trial: _Trial, arm_fd: int, stop: threading.Event
) -> None:
    """As the node agent does: arm the call's per-page accounting when the kernel's usage
    threshold (arm_threshold, below the budget) signals; record the usage at that moment."""
    import select

    while not stop.is_set():
        ready, _, _ = select.select([arm_fd], [], [], 0.05)
        if ready:
            os.eventfd_read(arm_fd)
            trial.usage_at_arm_bytes = driver.read_stats(trial.cgroup).usage_bytes
            monitor.arm(trial.cgroup_id)
            return


def _paused_when_signalled(driver: Any, trial: _Trial, fd: int, stop: threading.Event) -> None:
    """pause mode: the kernel's memory.oom_control notification that a task of the call waits
    at its limit (an upper bound of when the pause took effect: it includes this wake-up)."""
    import select

    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            trial.acted_ns = time.monotonic_ns()
            os.eventfd_read(fd)
            trial.usage_at_action_bytes = driver.read_stats(trial.cgroup).usage_bytes
            trial.done.set()
            return


def _crossing_seen(trial: _Trial, timeout_s: float = 2.0) -> bool:
    """Whether the in-kernel crossing of a trial whose action took effect has reached us: a
    poller may act before the ring buffer's event of the crossing is delivered."""
    deadline = time.monotonic() + timeout_s
    while not trial.crossed_ns and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(trial.crossed_ns)


def _poll_until_over(driver: Any, trial: _Trial, interval_s: float, stop: threading.Event) -> None:
    """A user-space poller: read the cgroup's usage every interval_s, act once over budget."""
    next_s = time.monotonic() + random.uniform(0, interval_s)  # random phase vs the spike
    while not stop.is_set():
        delay = next_s - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        next_s += interval_s
        if driver.read_stats(trial.cgroup).usage_bytes > trial.budget_bytes:
            _freeze(driver, trial)
            return


def _kernel_reaction(
    *,
    trials: int,
    budget_mb: int,
    spike_mb: int,
    poll_interval_ms: int,
    lifecycle_n: int,
    usage_source: str,
) -> dict[str, Any]:
    from agentcg.node.cgroup import CgroupV1Driver
    from agentcg.node.enforcement import NodePolicy, arm_threshold
    from agentcg.node.monitor import EventKind, MemEvent, MemoryMonitor, UsageSource
    from agentcg.node.spawn import spawn_gated

    if usage_source not in ("counter", "lru", "pgpgin"):
        raise ValueError("the reaction timing needs an in-kernel usage estimate: not none")
    budget = budget_mb * MiB
    driver = CgroupV1Driver(f"agentcg-bench-{os.getpid()}")
    driver.clear()
    current: list[_Trial] = []
    lock = threading.Lock()

    def on_event(ev: MemEvent) -> None:
        with lock:
            trial = current[0] if current else None
        if trial is None or ev.cgroup_id != trial.cgroup_id:
            return
        if ev.kind in (EventKind.SOFT, EventKind.STOP):  # the same charge emits both
            if not trial.crossed_ns or ev.kernel_time_ns < trial.crossed_ns:
                trial.crossed_ns = ev.kernel_time_ns
        elif ev.kind is EventKind.LIMIT and trial.mode == "pause" and not trial.crossed_ns:
            trial.crossed_ns = ev.kernel_time_ns  # the charge that met the limit: reclaim
        elif ev.kind is EventKind.STOPPED and trial.mode == "ebpf" and not trial.stopped_ns:
            # The allocator is stopped in-kernel: its usage is settled; the node now freezes
            # the whole call (user space), as it would before asking the broker.
            trial.stopped_ns = ev.kernel_time_ns
            _freeze(driver, trial)

    out: dict[str, Any] = {}
    late_arms = 0
    # The policy the node agent runs, with the budget as the soft threshold (the crossing).
    policy = NodePolicy(soft_fraction=1.0)
    samples: dict[str, list[int]] = {"ebpf": [], "ebpf_freeze": [], "poll": [], "pause": []}
    overshoot: dict[str, list[int]] = {"ebpf": [], "poll": [], "pause": []}
    rates: list[float] = []
    try:
        with MemoryMonitor(on_event, usage_source=UsageSource[usage_source.upper()]) as monitor:
            monitor.start()
            # The spike rate, measured without any action taken.
            for i in range(3):
                cg = driver.create("rate", str(i))
                gated = spawn_gated(
                    [sys.executable, "-c", _SPIKE_CODE, str(spike_mb), "0"],
                    stdout=subprocess.PIPE,
                )
                driver.attach(cg, gated.pid)
                gated.release()
                stdout, _ = gated.process.communicate(timeout=60)
                rates.append(float(stdout.decode().strip() or 0))
                driver.remove(cg)
            for i in range(trials * len(MODES)):
                mode = MODES[i % len(MODES)]
                cg = driver.create("reaction", f"{mode}{i}")
                if mode == "pause":
                    # What the node agent does at a call's budget: the kernel pauses the task
                    # in the charge that meets the limit (v1 oom_kill_disable).
                    driver.set_memory_limit(cg, budget)
                    driver.set_pause_at_limit(cg, True)
                else:
                    driver.set_memory_limit(cg, 4 * spike_mb * MiB)  # a backstop, never reached
                trial = _Trial(mode, cg, driver.cgroup_id(cg), budget)
                monitor.watch(
                    trial.cgroup_id,
                    soft_bytes=0 if mode == "pause" else budget,
                    limit_bytes=budget if mode == "pause" else 4 * spike_mb * MiB,
                    # ebpf: the kernel stops the allocator in the charge that crosses the budget
                    stop_bytes=budget if mode == "ebpf" else 0,
                    # ebpf: armed by the kernel's usage threshold, as the agent arms a call;
                    # poll: armed throughout (its BPF crossing is only the timing reference)
                    armed=mode == "poll",
                )
                with lock:
                    current[:] = [trial]
                stop = threading.Event()
                poller = None
                arm_fd = None
                if mode == "ebpf":
                    arm_fd = driver.watch_usage(cg, arm_threshold(budget, policy))
                    assert arm_fd is not None  # v1
                    poller = threading.Thread(
                        target=_arm_when_signalled,
                        args=(driver, monitor, trial, arm_fd, stop),
                        daemon=True,
                    )
                    poller.start()
                elif mode == "pause":
                    arm_fd = driver.watch_pause(cg)
                    assert arm_fd is not None  # v1
                    poller = threading.Thread(
                        target=_paused_when_signalled,
                        args=(driver, trial, arm_fd, stop),
                        daemon=True,
                    )
                    poller.start()
                gated = spawn_gated(
                    [sys.executable, "-c", _SPIKE_CODE, str(spike_mb), "5"],
                    stdout=subprocess.DEVNULL,
                )
                try:
                    driver.attach(cg, gated.pid)
                    monitor.add_pid(gated.pid, trial.cgroup_id)
                    if mode == "poll":
                        poller = threading.Thread(
                            target=_poll_until_over,
                            args=(driver, trial, poll_interval_ms / 1000, stop),
                            daemon=True,
                        )
                        poller.start()
                    gated.release()
                    if trial.done.wait(20) and _crossing_seen(trial):
                        if mode == "ebpf":
                            if trial.usage_at_arm_bytes >= budget:
                                late_arms += 1  # crossing seen late: its time is not it
                            samples["ebpf"].append(trial.stopped_ns - trial.crossed_ns)
                            samples["ebpf_freeze"].append(trial.acted_ns - trial.crossed_ns)
                        else:
                            samples[mode].append(trial.acted_ns - trial.crossed_ns)
                        overshoot[mode].append(max(0, trial.usage_at_action_bytes - budget))
                finally:
                    stop.set()
                    if poller is not None:
                        poller.join()
                    if arm_fd is not None:
                        os.close(arm_fd)
                    with lock:
                        current.clear()
                    gated.abort()
                    driver.kill(cg)
                    gated.process.wait()
                    monitor.unwatch(trial.cgroup_id)
                    driver.remove(cg)
            out["bpf_map_entries_left"] = list(monitor.entry_counts())

        # Per-tool-call cgroup lifecycle: create + limit + attach (a gated process) + remove
        # (after it exited). Spawning and reaping the process are not timed.
        create_ns: list[int] = []
        attach_ns: list[int] = []
        remove_ns: list[int] = []
        lifecycle_ns: list[int] = []
        driver.create("lifecycle")
        for i in range(lifecycle_n):
            gated = spawn_gated(["true"])
            t0 = time.perf_counter_ns()
            cg = driver.create("lifecycle", f"c{i}")
            driver.set_memory_limit(cg, budget)
            t1 = time.perf_counter_ns()
            driver.attach(cg, gated.pid)
            t2 = time.perf_counter_ns()
            gated.abort()
            gated.process.wait()
            t3 = time.perf_counter_ns()
            driver.remove(cg)
            t4 = time.perf_counter_ns()
            create_ns.append(t1 - t0)
            attach_ns.append(t2 - t1)
            remove_ns.append(t4 - t3)
            lifecycle_ns.append(t4 - t3 + t2 - t0)
    finally:
        driver.clear()

    out["trials_per_mode"] = trials
    out["budget_mb"] = budget_mb
    out["spike_mb"] = spike_mb
    out["spike_rate_gbps"] = round(statistics.median(rates) / 1e9, 2) if rates else 0
    out["poll_interval_ms"] = poll_interval_ms
    out["usage_source"] = usage_source
    out["ebpf_late_arms"] = late_arms  # armed only after the crossing (0 expected)
    for mode in ("ebpf", "ebpf_freeze", "poll", "pause"):
        out[f"{mode}_samples"] = len(samples[mode])
        if samples[mode]:
            out[f"{mode}_p50_ms"] = _ms(samples[mode], 50)
            out[f"{mode}_p99_ms"] = _ms(samples[mode], 99)
            out[f"{mode}_max_ms"] = round(max(samples[mode]) / 1e6, 3)
        if overshoot.get(mode):
            out[f"{mode}_overshoot_p99_bytes"] = int(percentile(overshoot[mode], 99))
    if samples["ebpf"] and samples["poll"]:
        out["speedup_p99"] = round(out["poll_p99_ms"] / max(out["ebpf_p99_ms"], 1e-3), 1)
        out["overshoot_p99_bytes"] = out["ebpf_overshoot_p99_bytes"]
    if samples["pause"] and samples["poll"]:
        out["speedup_pause_p99"] = round(out["poll_p99_ms"] / max(out["pause_p99_ms"], 1e-3), 1)
    out["cgroup_lifecycle_p50_ms"] = _ms(lifecycle_ns, 50)
    out["cgroup_lifecycle_p99_ms"] = _ms(lifecycle_ns, 99)
    out["cgroup_create_limit_p50_ms"] = _ms(create_ns, 50)
    out["cgroup_attach_p50_ms"] = _ms(attach_ns, 50)
    out["cgroup_remove_p50_ms"] = _ms(remove_ns, 50)
    out["cgroup_controllers"] = ",".join(driver.controllers)
    return out


def _bpf_overhead(*, rounds: int, seconds: float, sources: list[str]) -> dict[str, Any]:
    """Throughput of an allocation loop in a watched cgroup, with each monitor vs none.

    The loop is watched as the node agent watches a call with a 1 GiB budget (NodePolicy
    defaults): thresholds in the maps, and for the COUNTER source the kernel's usage threshold
    that arms the per-page program at arm_threshold (never reached by this loop, so its figure
    is that of a call below it). `counter_armed` is the same with the per-page program
    attached throughout: a call near its budget. The other sources are always attached.

    The variants run interleaved, in reversed order every other round, so a drift in the
    machine's speed (other tenants on shared cores) hits them alike; each variant's overhead is
    the median over rounds of its slowdown against the unmonitored run of the same round.
    """
    from agentcg.node.cgroup import CgroupV1Driver
    from agentcg.node.enforcement import NodePolicy, arm_threshold, soft_threshold
    from agentcg.node.monitor import MemoryMonitor, UsageSource
    from agentcg.node.spawn import spawn_gated

    budget = 1 << 30
    policy = NodePolicy()
    driver = CgroupV1Driver(f"agentcg-bench-ovh-{os.getpid()}")
    driver.clear()
    variants = ["off", *sources]  # off: no monitor loaded
    if "counter" in sources:
        variants.insert(variants.index("counter") + 1, "counter_armed")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    loaded: dict[str, str] = {}  # variant -> the source the monitor really loaded
    armed_during_run = False
    try:
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                source = variant.removesuffix("_armed")
                monitor = (
                    None
                    if variant == "off"
                    else MemoryMonitor(lambda ev: None, usage_source=UsageSource[source.upper()])
                )
                arm_fd = None
                try:
                    if monitor is not None:
                        loaded[variant] = monitor.usage_source.name.lower()
                        monitor.start()
                    cg = driver.create("loop", f"{variant}{r}")
                    gated = spawn_gated(
                        [sys.executable, "-c", _LOOP_CODE, str(seconds)], stdout=subprocess.PIPE
                    )
                    driver.attach(cg, gated.pid)
                    if monitor is not None:
                        cid = driver.cgroup_id(cg)
                        armed = variant.endswith("_armed")
                        monitor.watch(
                            cid,
                            soft_bytes=soft_threshold(budget, policy),
                            limit_bytes=budget,
                            armed=armed,
                        )
                        if not armed:
                            arm_fd = driver.watch_usage(cg, arm_threshold(budget, policy))
                            if arm_fd is None:  # no kernel usage threshold: always armed
                                monitor.arm(cid)
                        monitor.add_pid(gated.pid, cid)
                    gated.release()
                    stdout, _ = gated.process.communicate(timeout=seconds + 30)
                    rates[variant].append(float(stdout.decode().strip()))
                    if arm_fd is not None:
                        try:
                            os.eventfd_read(arm_fd)
                            armed_during_run = True  # would have armed: not a below-arm run
                        except BlockingIOError:
                            pass
                    driver.remove(cg)
                finally:
                    if arm_fd is not None:
                        os.close(arm_fd)
                    if monitor is not None:
                        monitor.close()
    finally:
        driver.clear()
    base = statistics.median(rates["off"])
    out: dict[str, Any] = {"alloc_loop_gbps": round(base / 1e9, 2), "overhead_rounds": rounds}
    for variant in variants[1:]:
        slowdowns = [1 - v / n for v, n in zip(rates[variant], rates["off"], strict=True)]
        out[f"bpf_overhead_{variant}_pct"] = round(statistics.median(slowdowns) * 100, 1)
        if loaded.get(variant, variant).removesuffix("_armed") != variant.removesuffix("_armed"):
            out[f"bpf_overhead_{variant}_loaded"] = loaded[variant]
    out["bpf_overhead_pct"] = out[f"bpf_overhead_{sources[0]}_pct"]
    out["bpf_overhead_armed_during_run"] = armed_during_run
    out["loadavg_overhead"] = _loadavg()
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def bench_reaction(
    *,
    calls: int,
    spike_mb: int,
    concurrency: int,
    json_path: Path | None,
    trials: int = 50,
    budget_mb: int = 64,
    kernel_spike_mb: int = 512,
    poll_interval_ms: int = 100,
    lifecycle_n: int = 300,
    usage_source: str = "counter",
    overhead_rounds: int = 9,
    overhead_seconds: float = 1.5,
    cluster: bool = True,
) -> dict[str, Any]:
    """Side by side in one run: in-kernel detection vs a poller (real cgroups, a real spike),
    the cgroup lifecycle, the BPF overhead, and the decision path through a real broker."""
    result: dict[str, Any] = _kernel_reaction(
        trials=trials,
        budget_mb=budget_mb,
        spike_mb=kernel_spike_mb,
        poll_interval_ms=poll_interval_ms,
        lifecycle_n=lifecycle_n,
        usage_source=usage_source,
    )
    sources = [usage_source, *(s for s in SOURCES if s != usage_source)]
    if overhead_rounds > 0:
        result.update(
            _bpf_overhead(rounds=overhead_rounds, seconds=overhead_seconds, sources=sources)
        )
    if cluster:
        result.update(_cluster_reaction(calls, spike_mb, concurrency))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cluster_reaction(calls: int, spike_mb: int, concurrency: int) -> dict[str, Any]:
    """In-kernel limit event -> broker decision on the node / applied, via a real broker."""
    with tempfile.TemporaryDirectory(prefix="agentcg-bench-") as tmp:
        cluster = LocalCluster(Path(tmp), nodes=1, node_memory="8G", log_level="WARNING")
        # The broker decides at once: a growth that does not fit kills (the poor tenant's),
        # instead of being held up to --growth-wait-ms for room. This times decisions.
        cluster.broker_args = ("--growth-wait-ms", "0")
        with cluster:
            samples = asyncio.run(_spikes(cluster.broker_address, calls, spike_mb, concurrency))
    result: dict[str, Any] = {
        "calls": calls,
        "cluster_spike_mb": spike_mb,
        "concurrency": concurrency,
    }
    for kind in ("grow", "kill"):
        v = samples[kind]
        result[f"{kind}_actions"] = len(v)
        if v:
            result[f"decision_{kind}_p50_ms"] = round(statistics.median(v), 3)
            result[f"decision_{kind}_p99_ms"] = round(percentile(v, 99), 3)
            result[f"decision_{kind}_max_ms"] = round(max(v), 3)
    both = samples["grow"] + samples["kill"]
    if both:
        result["decision_applied_p50_ms"] = round(statistics.median(both), 3)
        result["decision_applied_p99_ms"] = round(percentile(both, 99), 3)
    if samples["broker"]:
        result["broker_p50_ms"] = round(statistics.median(samples["broker"]), 3)
        result["broker_p99_ms"] = round(percentile(samples["broker"], 99), 3)
    result["call_wall_p50_ms"] = round(statistics.median(samples["wall"]), 1)
    return result
