"""`agentcg bench replay`: real agent traces replayed by real processes in one memory pool.

Every agent is a process (``replay_agent``) that follows its trace's memory between tool calls;
each tool call is a separate process (``worker``) that follows the call's rise above that level.
All agents start together, time compressed by ``speed``. A real v1 memory cgroup, the pool,
holds everything; its limit is the pool size. Policies (same traces, same pool):

- ``unlimited``: agents and their calls share the pool; the kernel's OOM killer decides.
- ``static``: each agent (with its calls) has a fixed container limit of pool / N.
- ``agentcg``: a real broker and node agent (subprocesses on loopback). The node's call cgroups
  live inside the pool. Each tool call is reserved through the broker at its declared intent
  and run by the node under that budget (pause at the budget, ask the broker to grow, kill only
  that call if refused); a denied reservation waits until a lease ends (the spike is time
  shifted, the agent's timeline with it). An agent's memory between calls is its session
  reservation: leases of the ``session`` class, grown (waiting if need be) before the agent
  rises and released when it falls. The node's capacity is the pool, so what the broker grants
  fits the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcg.errors import AgentcgError, QuotaExceededError
from agentcg.node.cgroup import Cgroup, CgroupError, CgroupV1Driver
from agentcg.node.spawn import GATE_RELEASE, gated_command
from agentcg.quantity import format_bytes
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .cluster import LocalCluster, _wait_ready
from .replay_plan import (
    AgentPlan,
    MiB,
    oracle_pool_bytes,
    peak_static_fit,
    percentile,
    pick_traces,
    plan_agent,
)
from .sdk import AsyncClient
from .traces import load_traces

__all__ = [
    "POLICIES",
    "RESULT_KEYS",
    "SESSION_MAX_CHOICES",
    "ReplayOptions",
    "find_min_pool",
    "prepare",
    "run_policy",
    "run_replay",
]

log = logging.getLogger(__name__)

POLICIES = ("unlimited", "static", "agentcg")
RESULT_KEYS = (
    "policy",
    "agents",
    "deadline_passed",
    "agents_completed",
    "oom_kills",
    "inflation_p50",
    "inflation_p95",
    "delay_p95_s",
    "pool_utilisation_mean",
    "pool_utilisation_p95",
    "denied",
    "grown",
    "paused",
    "killed",
    "pool_bytes",
    "oracle_pool_bytes",
    "sum_peaks_bytes",
    "peak_static_fit",
    "traces",
)
CALL_MARGIN_BYTES = 4 * MiB  # declared intent = the call's measured peak rise + this ...
CALL_FLOOR_BYTES = 10 * MiB  # ... and at least this (a tool call's interpreter alone is ~6 MiB)
SESSION_CHUNK_BYTES = 2 * MiB  # session leases grow in steps of this
SESSION_TTL_MS = 3600 * 1000  # a session lease outlives any replay
# An agent declares its session's maximum, so that the broker admits sessions and their growth
# only in an order in which all of them can finish (no pool of agents waiting on each other).
# What it declares (``--session-max``): ``peak``, its own trace's peak (knowledge no real agent
# has before it runs: the best case); ``cap``, the largest peak among the replayed traces (a
# sandbox limit that holds every agent: what a framework can know); ``learn``, the cap with a
# session class (``SESSION_CLASS``): once five sessions of it have ended, the broker declares
# new ones at a percentile (``--session-percentile``, 95) of what those held at most;
# ``none``, nothing. Each plus what the call processes' own interpreters and lease rounding add.
SESSION_MAX_CHOICES = ("peak", "cap", "learn", "none")
SESSION_CLASS = "replay-agent"
# Every agent is a tenant of this organization (whose quota does not bind): what the broker
# learns of a session class, it learns across an organization's tenants.
ORG = "replay"
SESSION_MAX_MARGIN_BYTES = 16 * MiB
# New sessions may declare up to this x the node's capacity together (the broker's overcommit
# ratio; ``--session-overcommit``): above it a new agent waits to start, which is where most
# time-shifting happens.
SESSION_OVERCOMMIT_RATIO = 1.1
QUEUE_TIMEOUT_MS = 300_000  # a reservation waits in the broker's queue this long, then ...
SAMPLE_S = 0.1
# agentcg pauses (never kills) at the pool limit too: a task that would push the pool over waits
# for memory. No swap: if the pool stays stalled this long, the kernel is let kill (counted).
POOL_STALL_S = 10.0


@dataclass
class ReplayOptions:
    speed: float = 10.0
    workdir: Path = Path("/tmp")
    log_level: str = "WARNING"
    plot: bool = False
    session_overcommit_ratio: float = SESSION_OVERCOMMIT_RATIO
    session_max: str = "peak"  # SESSION_MAX_CHOICES
    session_percentile: int = 95  # the broker's --session-percentile ("learn")
    # The agentcg broker's database; "": a new one per run. Given, a run starts with what the
    # runs before it on that database learned, as a deployment's broker does.
    broker_db: str = ""
    # Stop the run this long after its start (0: never): agents not done by then are lost.
    deadline_s: float = 0.0


@dataclass
class AgentRun:
    plan: AgentPlan
    cgroup: Cgroup
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    proc: asyncio.subprocess.Process | None = None
    ended_at: float | None = None
    returncode: int | None = None
    lost_calls: int = 0  # tool calls killed (by the kernel or the node)
    leases: list[tuple[str, int]] = field(default_factory=list)  # session leases, in order
    call_budget_bytes: int = 0
    started_at: float | None = None  # the first level in place: the trace's clock starts
    grow_wait_s: float = 0.0  # time spent waiting for session growth (after the start)
    call_s: float = 0.0  # time tool calls took, admission included
    call_plan_s: float = 0.0  # what they take in the trace
    call_admission_s: float = 0.0  # of call_s: waiting for the call's reservation
    session_max_bytes: int = 0  # the session maximum its reservations declare; 0: none
    session_class: str = ""  # the session class its reservations name ("learn"); "": none
    stopped: bool = False  # killed by the replay itself at its deadline, not by the kernel

    @property
    def leased_bytes(self) -> int:
        return sum(b for _, b in self.leases)

    @property
    def tenant(self) -> str:
        return f"agent-{self.plan.index}"


@dataclass
class Counters:
    oom_kills: int = 0
    denied: int = 0
    grown: int = 0
    paused: int = 0
    killed: int = 0
    unleased_session_growths: int = 0  # ... after which a session growth goes ahead unleased
    queued: int = 0  # reservations that waited in the broker's queue (> 20 ms) before admitted
    pool_stalls: int = 0  # pool paused at its limit for POOL_STALL_S: kernel let kill
    start_failures: int = 0  # a call the node could not start (retried)


class _NodeCluster(LocalCluster):
    """LocalCluster whose node keeps its cgroup tree under ``cgroup_base`` (the pool)."""

    cgroup_base: Path = Path("/")
    cgroup_root: str = ""
    node_policy_args: tuple[str, ...] = ()

    def start_node(self, index: int) -> str:
        name = f"node{index}"
        ready = self.workdir / f"{name}.addr"
        ready.unlink(missing_ok=True)
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentcg.clients.replay_node",
                    "--cgroup-base",
                    str(self.cgroup_base),
                    "--cgroup-root",
                    self.cgroup_root,
                    "--broker",
                    self.broker_address,
                    "--node-id",
                    f"replay{index}-{os.getpid()}",
                    "--memory",
                    self.node_memory,
                    *self.node_policy_args,
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


class _Replay:
    def __init__(
        self,
        plans: Sequence[AgentPlan],
        policy: str,
        pool_bytes: int,
        driver: CgroupV1Driver,
        pool: Cgroup,
        opts: ReplayOptions,
        client: AsyncClient | None,
        node_root: Path | None,
        on_progress: Callable[[float, int], None],
    ) -> None:
        self.plans = plans
        self.policy = policy
        self.pool_bytes = pool_bytes
        self.driver = driver
        self.pool = pool
        self.opts = opts
        self.client = client
        self.node_root = node_root
        self.on_progress = on_progress
        self.c = Counters()
        self.runs: list[AgentRun] = []
        # agentcg, "learn": the sessions of the class the broker knew of when the run began
        # (0 on a new database; see ReplayOptions.broker_db); None for the other runs
        self.sessions_known_at_start: int | None = None
        self.deadline_passed = False
        self.go = asyncio.Event()
        self.go_at = 0.0
        self.freed = asyncio.Condition()
        self.pool_samples: list[tuple[float, int]] = []
        self.agent_samples: list[tuple[float, list[int], list[int]]] = []
        self.events: list[tuple[float, int, str]] = []
        self.stalled_since: float | None = None
        self.stall_broken_at: float | None = None

    # -- agents -----------------------------------------------------------------------------

    async def start_agent(self, plan: AgentPlan) -> AgentRun:
        cg = self.driver.create("agents", f"a{plan.index}")
        if self.policy == "static":
            self.driver.set_memory_limit(cg, self.pool_bytes // len(self.plans))
        run = AgentRun(
            plan,
            cg,
            session_max_bytes=self.declared_max_bytes(plan),
            session_class=SESSION_CLASS if self.opts.session_max == "learn" else "",
        )
        path = self.opts.workdir / f"agent-{plan.index}.json"
        path.write_text(
            json.dumps(
                {
                    "steps": plan.steps,
                    "lease": self.policy == "agentcg",
                    "chunk": SESSION_CHUNK_BYTES,
                }
            )
        )
        proc = await asyncio.create_subprocess_exec(
            *gated_command([sys.executable, "-m", "agentcg.clients.replay_agent", str(path)]),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.driver.attach(cg, proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(GATE_RELEASE)
        run.proc = proc
        self.runs.append(run)
        return run

    async def drive(self, run: AgentRun) -> None:
        proc = run.proc
        assert proc is not None and proc.stdout is not None and proc.stdin is not None
        try:
            while line := await proc.stdout.readline():
                cmd, *args = line.decode().split()
                if cmd == "READY":
                    run.ready.set()
                    await self.go.wait()
                    reply = "GO"
                elif cmd == "GROW":
                    reply = f"OK {await self.session_grow(run, int(args[0]))}"
                elif cmd == "SHRINK":
                    reply = f"OK {await self.session_shrink(run, int(args[0]))}"
                elif cmd == "CALL":
                    call = run.plan.calls[int(args[0])]
                    began = time.monotonic()
                    await self.run_call(run, call)
                    run.call_s += time.monotonic() - began
                    run.call_plan_s += call.end_s - call.start_s
                    reply = f"DONE {args[0]}"
                elif cmd == "START":
                    run.started_at = time.monotonic()
                    self.event(run, "start")
                    continue
                elif cmd == "END":
                    run.ended_at = time.monotonic()
                    continue
                else:
                    raise RuntimeError(f"agent {run.plan.index}: unknown message {line!r}")
                proc.stdin.write(reply.encode() + b"\n")
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # the agent waits for a reply that will not come
            raise
        finally:
            run.ready.set()
            run.returncode = await proc.wait()
            if run.returncode == -signal.SIGKILL and not run.stopped:
                self.c.oom_kills += 1
                self.event(run, "oom")
            # On the way out of an interrupted run the broker may be gone (its leases with it).
            with contextlib.suppress(Exception):
                await self.session_shrink(run, 0)

    def declared_max_bytes(self, plan: AgentPlan) -> int:
        """The session maximum ``plan``'s agent declares (``ReplayOptions.session_max``)."""
        if self.opts.session_max == "none":
            return 0
        if self.opts.session_max in ("cap", "learn"):
            return max(p.peak_bytes for p in self.plans) + SESSION_MAX_MARGIN_BYTES
        return plan.peak_bytes + SESSION_MAX_MARGIN_BYTES

    def event(self, run: AgentRun, kind: str) -> None:
        self.events.append((time.monotonic() - self.go_at, run.plan.index, kind))

    # -- session reservations (agentcg) -------------------------------------------------------

    async def session_grow(self, run: AgentRun, target: int) -> int:
        assert self.client is not None
        if run.leased_bytes < target:
            want = target - run.leased_bytes
            asked = time.monotonic()
            try:
                lease = await self.client.reserve(
                    run.tenant,
                    want,
                    session="s",
                    command_class="session",
                    ttl_ms=SESSION_TTL_MS,
                    queue_timeout_ms=QUEUE_TIMEOUT_MS,
                    session_max_bytes=run.session_max_bytes,
                    session_class=run.session_class,
                )
            except QuotaExceededError:
                self.c.denied += 1
                self.event(run, "denied")
                self.c.unleased_session_growths += 1
                return target  # goes ahead unleased: the kernel may have to decide
            waited = time.monotonic() - asked
            if run.started_at is not None:
                run.grow_wait_s += waited
            if waited > 0.02:
                self.c.queued += 1
            run.leases.append((lease.lease_id, lease.memory_bytes))
        return run.leased_bytes

    async def session_shrink(self, run: AgentRun, target: int) -> int:
        if self.client is None:
            return target
        released = False
        while run.leases and run.leased_bytes - run.leases[-1][1] >= target:
            lease_id, _ = run.leases.pop()
            await self.client.release(lease_id)
            released = True
        if released:
            await self.notify_freed()
        return run.leased_bytes

    async def wait_freed(self) -> None:
        async with self.freed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.freed.wait(), 0.25)

    async def notify_freed(self) -> None:
        async with self.freed:
            self.freed.notify_all()

    # -- tool calls -----------------------------------------------------------------------------

    def worker_argv(self, curve: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agentcg.clients.worker",
            "--curve",
            curve,
            "--minus-own-rss",
        ]

    async def run_call(self, run: AgentRun, call: Any) -> None:
        argv = self.worker_argv(call.curve_arg)
        if self.policy != "agentcg":
            proc = await asyncio.create_subprocess_exec(
                *gated_command(argv),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            assert proc.stdin is not None
            try:
                self.driver.attach(run.cgroup, proc.pid)
            except CgroupError:
                proc.stdin.close()  # the agent's cgroup is gone with the agent
                await proc.wait()
                return
            proc.stdin.write(GATE_RELEASE)
            proc.stdin.close()
            if await proc.wait() == -signal.SIGKILL:
                self.c.oom_kills += 1
                run.lost_calls += 1
                self.event(run, "oom")
            return
        assert self.client is not None
        intent = max(call.peak_rise_bytes + CALL_MARGIN_BYTES, CALL_FLOOR_BYTES)
        while True:
            run.call_budget_bytes = intent
            try:
                result = await self.client.run(
                    run.tenant,
                    intent,
                    argv,
                    session="s",
                    command_class=call.command_class,
                    queue_timeout_ms=QUEUE_TIMEOUT_MS,
                    session_max_bytes=run.session_max_bytes,
                    session_class=run.session_class,
                )
            except AgentcgError as exc:
                # e.g. the node cannot create the call's cgroup while the pool is at its limit
                # (the kernel charges a new memcg to its parent): the call did not start; retry.
                log.debug("agent %d call %d not started: %s", run.plan.index, call.index, exc)
                self.c.start_failures += 1
                run.call_budget_bytes = 0
                await self.wait_freed()
                continue
            if result.outcome != "denied":
                break
            run.call_budget_bytes = 0
            self.c.denied += 1
            self.event(run, "denied")
            await self.wait_freed()
        run.call_budget_bytes = 0
        run.call_admission_s += result.admission_s
        await self.notify_freed()
        for action in result.actions:
            if action == "pause":
                self.c.paused += 1
                self.event(run, "pause")
            elif action == "grow":
                self.c.grown += 1
                self.event(run, "grow")
        if result.outcome == "killed":
            run.lost_calls += 1
            if "kernel OOM" in result.reason:
                self.c.oom_kills += 1
                self.event(run, "oom")
            else:
                self.c.killed += 1
                self.event(run, "kill")

    # -- sampling -------------------------------------------------------------------------------

    def usage(self, path: Path) -> int:
        try:
            return self.driver.read_stats(Cgroup(rel=(), path=path)).usage_bytes
        except (CgroupError, OSError):
            return 0

    def watch_pool(self, now: float) -> None:
        """agentcg: break a stall of the whole pool (every task waiting for memory)."""
        try:
            under_oom = self.driver.read_stats(self.pool).under_oom
        except CgroupError:
            return
        if not under_oom:
            if self.stalled_since is not None:
                self.stalled_since = None
                self.driver.set_pause_at_limit(self.pool, True)
            return
        if self.stalled_since is None:
            self.stalled_since = now
        elif now - self.stalled_since > POOL_STALL_S and self.stall_broken_at != self.stalled_since:
            self.stall_broken_at = self.stalled_since
            self.c.pool_stalls += 1
            self.driver.set_pause_at_limit(self.pool, False)

    async def sample(self) -> None:
        tick = 0
        while True:
            now = time.monotonic() - self.go_at
            self.pool_samples.append((now, self.usage(self.pool.path)))
            if self.policy == "agentcg":
                self.watch_pool(now)
            if self.opts.plot and tick % 5 == 0:
                mem, budget = [], []
                for r in self.runs:
                    used = self.usage(r.cgroup.path)
                    if self.node_root is not None:
                        used += self.usage(self.node_root / r.tenant)
                    mem.append(used)
                    if self.policy == "static":
                        budget.append(self.pool_bytes // len(self.plans))
                    elif self.policy == "agentcg":
                        budget.append(r.leased_bytes + r.call_budget_bytes)
                    else:
                        budget.append(0)
                self.agent_samples.append((now, mem, budget))
            done = sum(r.returncode is not None for r in self.runs)
            self.on_progress(now, done)
            tick += 1
            await asyncio.sleep(SAMPLE_S)

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> None:
        for plan in self.plans:
            await self.start_agent(plan)
        drivers = [asyncio.create_task(self.drive(r)) for r in self.runs]
        await asyncio.gather(*(r.ready.wait() for r in self.runs))
        self.go_at = time.monotonic()
        self.go.set()
        sampler = asyncio.create_task(self.sample())
        try:
            done, left = await asyncio.wait(
                drivers,
                timeout=self.opts.deadline_s or None,
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for task in done:
                task.result()  # an agent's driver failed: the replay did
            if left:
                self.deadline_passed = True
                for r in self.runs:
                    r.stopped = r.returncode is None
                for task in left:
                    task.cancel()
                await asyncio.gather(*left, return_exceptions=True)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    def result(self) -> dict[str, Any]:
        completed = [
            r
            for r in self.runs
            if r.returncode == 0
            and r.ended_at is not None
            and r.started_at is not None
            and r.lost_calls == 0
        ]
        # Replayed duration from when the agent's first sample is in place (an agent admitted
        # later starts later; its wait to start is reported apart, as start_wait_*).
        ran = [(r.ended_at or 0.0) - (r.started_at or 0.0) for r in completed]
        inflation = [d / r.plan.duration_s for d, r in zip(ran, completed, strict=True)]
        delay = [d - r.plan.duration_s for d, r in zip(ran, completed, strict=True)]
        waits = [(r.started_at or 0.0) - self.go_at for r in completed]
        whole = [((r.ended_at or 0.0) - self.go_at) / r.plan.duration_s for r in completed]
        end = max((t for t, _ in self.pool_samples), default=0.0)
        util = [min(1.0, b / self.pool_bytes) for t, b in self.pool_samples if t <= end]
        try:
            self.c.oom_kills = max(self.c.oom_kills, self.driver.read_stats(self.pool).oom_kills)
        except CgroupError:
            pass
        return {
            "policy": self.policy,
            "agents": len(self.plans),
            # the run was stopped at --deadline-s: the agents not done by then count as lost
            "deadline_passed": self.deadline_passed,
            "agents_completed": len(completed),
            "agents_lost": len(self.plans) - len(completed),
            "oom_kills": self.c.oom_kills,
            "inflation_p50": round(statistics.median(inflation), 3) if inflation else None,
            "inflation_p95": round(percentile(inflation, 95), 3) if inflation else None,
            "delay_p95_s": round(percentile(delay, 95), 2) if delay else None,
            "start_wait_p50_s": round(statistics.median(waits), 2) if waits else None,
            "start_wait_p95_s": round(percentile(waits, 95), 2) if waits else None,
            "inflation_with_start_wait_p95": round(percentile(whole, 95), 3) if whole else None,
            "makespan_s": round(max((r.ended_at or 0.0) for r in completed) - self.go_at, 1)
            if completed
            else None,
            "pool_utilisation_mean": round(statistics.fmean(util), 3) if util else 0.0,
            "pool_utilisation_p95": round(percentile(util, 95), 3) if util else 0.0,
            "denied": self.c.denied,
            "grown": self.c.grown,
            "paused": self.c.paused,
            "killed": self.c.killed,
            "unleased_session_growths": self.c.unleased_session_growths,
            "queued": self.c.queued,
            "pool_stalls": self.c.pool_stalls,
            "call_start_failures": self.c.start_failures,
            "pool_bytes": self.pool_bytes,
            # agentcg's broker: declared session maxima may add up to the pool x this
            "session_overcommit_ratio": self.opts.session_overcommit_ratio
            if self.policy == "agentcg"
            else None,
            # agentcg: what each agent declares as its session's maximum
            "session_max": self.opts.session_max if self.policy == "agentcg" else None,
            "session_percentile": (
                self.opts.session_percentile
                if self.policy == "agentcg" and self.opts.session_max == "learn"
                else None
            ),
            "sessions_known_at_start": self.sessions_known_at_start,
            "per_agent": [
                {
                    "agent": r.plan.index,
                    "trace_s": round(r.plan.duration_s, 2),
                    "start_wait_s": None
                    if r.started_at is None
                    else round(r.started_at - self.go_at, 2),
                    "ran_s": None
                    if r.started_at is None or r.ended_at is None
                    else round(r.ended_at - r.started_at, 2),
                    "lost_calls": r.lost_calls,
                    "grow_wait_s": round(r.grow_wait_s, 2),
                    "call_s": round(r.call_s, 2),
                    "call_plan_s": round(r.call_plan_s, 2),
                    "call_admission_s": round(r.call_admission_s, 2),
                }
                for r in self.runs
            ],
        }


async def _run_async(
    plans: Sequence[AgentPlan],
    policy: str,
    pool_bytes: int,
    driver: CgroupV1Driver,
    pool: Cgroup,
    opts: ReplayOptions,
    on_progress: Callable[[float, int], None],
    broker: str | None,
    node_root: Path | None,
) -> _Replay:
    client = AsyncClient(broker) if broker else None
    try:
        if client is not None:
            await client.set_tenant(ORG, pool_bytes * len(plans))
            for plan in plans:
                await client.set_tenant(f"agent-{plan.index}", pool_bytes, parent=ORG)
        replay = _Replay(
            plans, policy, pool_bytes, driver, pool, opts, client, node_root, on_progress
        )
        if client is not None and opts.session_max == "learn":
            known = await client.list_session_sizing(tenant=ORG)
            replay.sessions_known_at_start = sum(
                p.samples for p in known if (p.tenant, p.command_class) == (ORG, SESSION_CLASS)
            )
        await replay.run()
        return replay
    finally:
        if client is not None:
            await client.close()


def run_policy(
    plans: Sequence[AgentPlan],
    policy: str,
    pool_bytes: int,
    opts: ReplayOptions,
    on_progress: Callable[[float, int], None] = lambda t, n: None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One replay of ``plans`` under ``policy`` in a pool of ``pool_bytes``.

    Returns (result keys, timeline for the plot).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: one of {', '.join(POLICIES)} (got {policy!r})")
    if opts.session_max not in SESSION_MAX_CHOICES:
        raise ValueError(
            f"session_max: one of {', '.join(SESSION_MAX_CHOICES)} (got {opts.session_max!r})"
        )
    driver = CgroupV1Driver(f"agentcg-replay-{os.getpid()}")
    driver.clear()
    pool = driver.create()
    driver.set_memory_limit(pool, pool_bytes)
    if policy == "agentcg":
        driver.set_pause_at_limit(pool, True)
    cluster: _NodeCluster | None = None
    node_root: Path | None = None
    try:
        if policy == "agentcg":
            opts.workdir.mkdir(parents=True, exist_ok=True)
            cluster = _NodeCluster(opts.workdir / "cluster", log_level=opts.log_level)
            cluster.database_url = opts.broker_db
            cluster.cgroup_base = pool.path
            cluster.cgroup_root = "node"
            cluster.broker_args = (
                *("--overcommit-ratio", str(opts.session_overcommit_ratio)),
                *("--session-percentile", str(opts.session_percentile)),
            )
            cluster.node_memory = str(pool_bytes)
            cluster.node_policy_args = (
                "--growth-factor",
                "1.25",
                "--min-growth-bytes",
                str(16 * MiB),
            )
            cluster.__enter__()
            node_root = pool.path / "node"
        replay = asyncio.run(
            _run_async(
                plans,
                policy,
                pool_bytes,
                driver,
                pool,
                opts,
                on_progress,
                cluster.broker_address if cluster else None,
                node_root,
            )
        )
        result = replay.result()
    finally:
        if cluster is not None:
            cluster.stop()
        driver.clear()
    timeline = {
        "policy": policy,
        "pool_bytes": pool_bytes,
        "pool": replay.pool_samples,
        "agents": replay.agent_samples,
        "events": replay.events,
    }
    return result, timeline


@dataclass
class Prepared:
    plans: list[AgentPlan]
    oracle_bytes: int
    sum_peaks_bytes: int


def prepare(traces_path: Path, agents: int, seed: int, speed: float, scale: float) -> Prepared:
    traces = list(load_traces(traces_path))
    if not traces:
        raise ValueError(f"{traces_path}: no traces")
    chosen = pick_traces(traces, agents, seed)
    plans = [plan_agent(i, t, speed=speed, scale=scale) for i, t in enumerate(chosen)]
    return Prepared(plans, oracle_pool_bytes(plans), sum(p.peak_bytes for p in plans))


def _common(prep: Prepared, pool_bytes: int) -> dict[str, Any]:
    return {
        "oracle_pool_bytes": prep.oracle_bytes,
        "sum_peaks_bytes": prep.sum_peaks_bytes,
        "peak_static_fit": peak_static_fit([p.peak_bytes for p in prep.plans], pool_bytes),
        "traces": [p.task for p in prep.plans],
        "pool_of_oracle": round(pool_bytes / prep.oracle_bytes, 4),
    }


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[agents_done]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def run_replay(
    prep: Prepared,
    policies: Sequence[str],
    pool_bytes: int,
    opts: ReplayOptions,
    console: Console,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results, timelines = [], []
    longest = max(p.duration_s for p in prep.plans)
    with _progress(console) as progress:
        for policy in policies:
            task = progress.add_task(
                f"{policy} pool {format_bytes(pool_bytes)}",
                total=longest,
                agents_done=f"0/{len(prep.plans)} agents done",
            )

            def update(t: float, done: int, task: Any = task) -> None:
                progress.update(
                    task, completed=min(t, longest), agents_done=f"{done}/{len(prep.plans)} done"
                )

            result, timeline = run_policy(prep.plans, policy, pool_bytes, opts, update)
            progress.update(task, completed=longest)
            results.append({**result, **_common(prep, pool_bytes)})
            timelines.append(timeline)
    return results, timelines


def meets_goal(result: dict[str, Any], reference_p95: float, slack: float = 1.25) -> bool:
    """0 OOM kills, every agent completed, inflation_p95 within ``slack`` of the reference."""
    p95 = result["inflation_p95"]
    return (
        result["oom_kills"] == 0
        and result["agents_completed"] == result["agents"]
        and p95 is not None
        and p95 <= slack * reference_p95
    )


def find_min_pool(
    prep: Prepared,
    policies: Sequence[str],
    opts: ReplayOptions,
    console: Console,
    *,
    steps: int = 2,
    low: float = 0.6,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Bisect per policy the smallest pool-of-oracle fraction meeting the goal (see
    ``meets_goal``) against ``unlimited`` at the oracle pool. Returns (summary per policy,
    every run made)."""
    runs: list[dict[str, Any]] = []

    def trial(policy: str, fraction: float) -> dict[str, Any]:
        pool = int(prep.oracle_bytes * fraction)
        (result,), _ = run_replay(prep, [policy], pool, opts, console)
        runs.append(result)
        console.print(
            f"  {policy} at {fraction:.3f} x oracle: oom_kills {result['oom_kills']}, "
            f"completed {result['agents_completed']}/{result['agents']}, "
            f"inflation_p95 {result['inflation_p95']}"
        )
        return result

    reference = trial("unlimited", 1.0)
    ref_p95 = reference["inflation_p95"] or float("inf")
    summary: list[dict[str, Any]] = []
    for policy in policies:
        at_one = reference if policy == "unlimited" else trial(policy, 1.0)
        if not meets_goal(at_one, ref_p95):
            summary.append({"policy": policy, "min_pool_of_oracle": None, "note": "> 1.0"})
            continue
        lo, hi = low, 1.0
        for _ in range(steps):
            mid = round((lo + hi) / 2, 4)
            if meets_goal(trial(policy, mid), ref_p95):
                hi = mid
            else:
                lo = mid
        summary.append(
            {
                "policy": policy,
                "min_pool_of_oracle": hi,
                "reference_inflation_p95": ref_p95,
                "note": f"in ({lo}, {hi}]",
            }
        )
    return summary, runs


def write_plot(timelines: Sequence[dict[str, Any]], oracle_bytes: int, path: Path) -> None:
    """Per policy: per-agent memory (solid) vs budget (dashed) with enforcement events, and the
    pool total against the pool limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(timelines)
    fig, axes = plt.subplots(2, n, figsize=(7 * n, 8), squeeze=False, sharex="col")
    markers: dict[str, tuple[str, str]] = {
        "oom": ("X", "red"),
        "kill": ("x", "black"),
        "grow": ("^", "green"),
        "pause": ("o", "orange"),
        "denied": (".", "grey"),
        "start": ("|", "blue"),
    }
    gib = float(1 << 30)
    for col, tl in enumerate(timelines):
        top, bottom = axes[0][col], axes[1][col]
        samples = tl["agents"]
        if samples:
            times = [t for t, _, _ in samples]
            agents = len(samples[0][1])
            cmap = plt.get_cmap("tab20")
            for i in range(agents):
                line = cmap(i % 20)
                top.plot(times, [m[i] / MiB for _, m, _ in samples], lw=0.7, color=line)
                budgets = [b[i] / MiB for _, _, b in samples]
                if any(budgets):
                    top.plot(times, budgets, lw=0.5, ls="--", color=line)
            level = {i: [(t, m[i]) for t, m, _ in samples] for i in range(agents)}
            for t, i, kind in tl["events"]:
                mk, colour = markers.get(kind, ("*", "blue"))
                series: list[tuple[float, int]] = level.get(i) or [(t, 0)]
                near = min(series, key=lambda p: abs(p[0] - t))
                top.scatter([t], [near[1] / MiB], marker=mk, color=colour, s=18, zorder=3)
        for kind, (mk, colour) in markers.items():
            top.scatter([], [], marker=mk, color=colour, label=kind)
        top.set_title(f"{tl['policy']}: per-agent memory (—) vs budget (--)")
        top.set_ylabel("MiB")
        top.legend(loc="upper right", fontsize=7)
        pool = tl["pool"]
        bottom.plot([t for t, _ in pool], [b / gib for _, b in pool], label="pool usage")
        bottom.axhline(tl["pool_bytes"] / gib, color="red", ls="--", label="pool limit")
        bottom.axhline(oracle_bytes / gib, color="grey", ls=":", label="oracle pool")
        bottom.set_xlabel("seconds since start")
        bottom.set_ylabel("GiB")
        bottom.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
