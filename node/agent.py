"""The node agent: runs each tool call in its own cgroup under its lease's budget, watches it
with the eBPF monitor and applies the graduated policy (``enforcement``) within milliseconds.

The loop is oomd's: an in-kernel event arrives (snapshot) -> the policy decides (detect/rank) ->
the node acts (pause is the kernel's own; grow/kill here) -> it reports upstream. Every action
has an id that appears in the log, the span, the ExecEvent and the event sent to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from agentcg.access import OPEN
from agentcg.errors import (
    AgentcgError,
    ConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from agentcg.gate import current_principal
from agentcg.names import InvalidNameError, validate_name
from agentcg.rpcstatus import error_from_rpc, to_status
from agentcg.tracecontext import parent_context, traceparent
from agentcg.v1 import broker_pb2, node_pb2, node_pb2_grpc, types_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from .cgroup import Cgroup, CgroupDriver, CgroupError, read_label, set_label
from .enforcement import (
    AskBroker,
    CallPhase,
    CallView,
    Defer,
    FlushOutput,
    HoldOutput,
    Kill,
    LeaseView,
    NodePolicy,
    Pause,
    Recheck,
    Refresh,
    ReleaseOutput,
    Resize,
    Throttle,
    Unthrottle,
    Update,
    Wake,
    arm_threshold,
    at_limit,
    expiry_on_node_clock,
    on_deadline,
    on_decision_grow,
    on_denied,
    on_lease_refresh,
    on_lease_tick,
    on_limit,
    on_output,
    on_pause_notice,
    on_soft,
    on_throttle_deadline,
    soft_threshold,
    stop_threshold,
)
from .metrics import NodeMetrics
from .monitor import EventKind, MemEvent, MemoryMonitor, UsageSource
from .spawn import spawn_gated
from .spool import CallSpool, OutputTail, default_spool_root, list_spooled
from .uplink import Uplink

__all__ = ["Call", "NodeAgent", "lease_view"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_OUTPUT_CHUNK = 64 * 1024
# A follower looks at a call's output files this often: at once after it found output, then
# backing off to the longest wait while the call is quiet.
_TAIL_FIRST_S = 0.01
_TAIL_LONGEST_S = 0.25

_T = TypeVar("_T")
_Req = TypeVar("_Req")


def _tenant_chain(lease: types_pb2.Lease) -> list[str]:
    return [lease.tenant, *lease.tenant_ancestors]


def authorize_lease(lease: types_pb2.Lease) -> None:
    """The caller may run or attach under ``lease``: its tenant (or an ancestor, as the broker
    told in GetLease) is in the caller's scope (agentcg.access). Free without an access file."""
    caller = current_principal()
    if caller is not OPEN and not caller.covers(_tenant_chain(lease)):
        raise caller.outside_scope(f"lease {lease.lease_id} (tenant {lease.tenant!r})")


def lease_view(lease: types_pb2.Lease) -> LeaseView:
    return LeaseView(
        epoch=lease.epoch,
        expires_at_unix_ms=lease.expires_at_unix_ms,
        active=lease.state == types_pb2.LEASE_STATE_ACTIVE,
        node_id=lease.node_id,
        budget_bytes=lease.budget.memory_bytes,
        state=types_pb2.LeaseState.Name(lease.state).removeprefix("LEASE_STATE_").lower(),
    )


def _onto_node_clock(lease: types_pb2.Lease, asked_at_unix_ms: int) -> None:
    """Move the broker's ``lease`` expiry onto this node's clock (``as_of`` cleared: done)."""
    lease.expires_at_unix_ms = expiry_on_node_clock(
        lease.expires_at_unix_ms, lease.as_of_unix_ms, asked_at_unix_ms
    )
    lease.as_of_unix_ms = 0


def _check_command(request: node_pb2.ExecRequest) -> None:
    """What the kernel cannot take in an argv, environment or working directory."""
    if not request.argv or not request.argv[0]:
        raise InvalidArgumentError("argv", "must not be empty")
    for i, arg in enumerate(request.argv):
        if "\0" in arg:
            raise InvalidArgumentError("argv", f"argv[{i}] holds a NUL character")
    for name, value in request.env.items():
        if not name or "=" in name or "\0" in name:
            raise InvalidArgumentError("env", f"bad variable name {name!r}")
        if "\0" in value:
            raise InvalidArgumentError("env", f"{name}: the value holds a NUL character")
    if "\0" in request.cwd:
        raise InvalidArgumentError("cwd", "holds a NUL character")


@dataclass
class _Pending:
    action_id: str
    event_id: str
    kernel_time_ns: int
    timer: asyncio.TimerHandle
    decision_ns: int = 0  # kernel event -> the broker's decision received here
    decision_trace: Context | None = None  # the broker decision's span: the action's parent
    ask: broker_pb2.NodeMessage | None = None  # the request to grow, as sent
    connection: int = 0  # the uplink connection it went out on (``ask_again``)
    asked_again: int = 0


# How many times one pause's ask is sent again after the link to the broker was lost
# (``NodeAgent.ask_again``): a link that keeps breaking cannot keep a call paused forever.
MAX_ASKS_AGAIN = 2
PUSHED_KEPT = 1024  # leases pushed for no call of ours, kept for a call being set up

# The cgroup label (node.cgroup.set_label) holding the traceparent of the RPC that started a call.
TRACE_LABEL = "traceparent"


_OUTCOME_LABEL = {
    types_pb2.OUTCOME_COMPLETED: "completed",
    types_pb2.OUTCOME_GROWN: "grown",
    types_pb2.OUTCOME_KILLED: "killed",
}

RECENT_ACTIONS = 8  # enforcement actions per call shown by ListCalls
KEPT_ACTIONS = 1024  # enforcement actions per call kept for a caller that resumes


@dataclass
class Call:
    call_id: str
    lease: types_pb2.Lease
    cgroup: Cgroup
    cgroup_id: int
    budget_bytes: int
    phase: CallPhase = CallPhase.RUNNING
    grown: int = 0
    kill_reason: str = ""
    peak_bytes: int = 0
    limit_set_ns: int = 0  # CLOCK_MONOTONIC when its limit was last raised (stale LIMIT events)
    pending: _Pending | None = None
    killing: asyncio.Future[None] | None = None  # a kill in flight (tasks not yet gone)
    reactions_ns: list[int] = field(default_factory=list)
    frozen: bool = False  # paused by the node (freezer), not by the kernel at its limit
    stopped: bool = False  # SIGSTOPped in-kernel at its stop threshold: SIGCONT when thawed
    throttle_timer: asyncio.TimerHandle | None = None
    adopted: bool = False  # not our child (re-adopted after a restart, or attached)
    # Its enforcement actions, oldest first, each with its seq (its place among them): the
    # last KEPT_ACTIONS, for its followers (ResumeRequest.actions_seen) and ListCalls.
    actions: deque[node_pb2.Enforcement] = field(default_factory=lambda: deque(maxlen=KEPT_ACTIONS))
    actions_total: int = 0  # taken so far: the next one's seq
    actions_sent: int = 0  # how far in them any follower got (a Resume that does not say)
    arm_fd: int = -1  # eventfd of the kernel usage threshold that arms per-page accounting
    arm_bytes: int = 0
    arm_gen: int = 0  # bumped per (re-)registration and at unwatch: a late one is dropped
    pause_fd: int = -1  # eventfd of the kernel's notice of a task waiting at the limit (v1)
    removed: asyncio.Future[None] | None = None  # its cgroup's removal, once it has ended
    started_s: float = field(default_factory=time.monotonic)
    # The trace of the RPC that started it (Exec, Attach): its actions' spans join the caller's
    # trace (a re-adopted call's comes from its cgroup's label). None: untraced.
    trace: Context | None = None
    # Exec'd calls: where their output and exit go (node.spool), so a restarted agent and a
    # caller that comes back (Resume) can follow them again.
    spool: CallSpool | None = None
    pid: int = 0  # the process Exec started (the gate's shell); 0 if not known
    exited: node_pb2.Exited | None = None  # its final report, once it ended and its cgroup is gone
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # news for its follower
    follower: object | None = None  # the stream (Exec or Resume) following it now
    unfollowed: asyncio.TimerHandle | None = None  # nobody follows it: the resume grace runs
    output_held: bool = False  # frozen (also) while its spooled output is above the limit
    output_flushed_bytes: int = 0  # what it had written when its output was last flushed
    # A flush of its output in flight: what to decide again once it is done (_flush_output).
    after_flush: list[Callable[[], None]] | None = None

    def view(self) -> CallView:
        cached = 0
        if self.spool is not None:
            written, held = self.spool.output_written_and_held()
            cached = min(held, max(0, written - self.output_flushed_bytes))
        return CallView(self.lease.lease_id, self.phase, self.budget_bytes, self.peak_bytes, cached)

    def add_action(self, action: node_pb2.Enforcement) -> None:
        action.seq = self.actions_total
        self.actions.append(action)
        self.actions_total += 1

    def restore_actions(self, actions: list[node_pb2.Enforcement]) -> None:
        """The actions an earlier agent took (its spool's log): a Resume that says how many
        it has is sent the rest; one that does not, none of them."""
        for action in actions:
            if action.seq >= self.actions_total:
                self.actions.append(action)
                self.actions_total = action.seq + 1
        self.actions_sent = self.actions_total

    def action_at(self, seq: int) -> node_pb2.Enforcement | None:
        """Its action ``seq``, or the oldest kept after it (dropped ones are skipped); None
        once there is none after it."""
        if seq >= self.actions_total:
            return None
        first = self.actions_total - len(self.actions)
        return self.actions[max(seq, first) - first]


class NodeAgent(node_pb2_grpc.NodeAgentServicer):
    def __init__(
        self,
        node_id: str,
        driver: CgroupDriver,
        monitor: MemoryMonitor,
        uplink: Uplink,
        capacity_bytes: int,
        policy: NodePolicy | None = None,
        cgroup_io: Executor | None = None,
        metrics: NodeMetrics | None = None,
        spool_root: Path | None = None,
    ) -> None:
        self.node_id = node_id
        self.metrics = metrics or NodeMetrics()
        self.driver = driver
        # The cgroup operations that can block for milliseconds run here, not on the event
        # loop that applies every call's decisions: creating, attaching to and removing call
        # cgroups (moving a task in cgroup.procs waits for an RCU grace period, 9.1 ms p50
        # here, unless the host mounts cgroup2 with favordynmods: 0.11 ms). One thread, so they
        # happen in the order submitted: a call's cgroup is created before it is attached to
        # and removed after, a session's dir removed before a later call creates it again.
        # The actions themselves (raise a limit, thaw, kill) stay direct.
        self._cgroup_io = cgroup_io or ThreadPoolExecutor(1, thread_name_prefix="cgroup-io")
        # Registering a v1 usage threshold waits for an RCU grace period (8.0-11.9 ms p50 here
        # per write to cgroup.event_control, 5-35 ms seen): on the one thread above that made
        # 79-97 registrations a second the most, and a node ran 61-74 calls a second (agentcg
        # bench calls; 233-235 with this pool). Grace periods are shared: 64 registrations
        # took 656-814 ms on one thread, 124 ms on 8, 64-68 ms on 16. A registration needs only
        # its call's cgroup to exist (it is created first).
        self._cgroup_watch = ThreadPoolExecutor(16, thread_name_prefix="cgroup-watch")
        # Writing a call's cached output to disk (FlushOutput) waits for the disk.
        self._output_flush = ThreadPoolExecutor(1, thread_name_prefix="output-flush")
        self.monitor = monitor
        self.uplink = uplink
        self.capacity_bytes = capacity_bytes
        self.policy = policy or NodePolicy()
        self.calls: dict[str, Call] = {}  # by lease id
        self._by_cgroup: dict[int, Call] = {}
        self._starting: dict[str, asyncio.Event] = {}  # lease id -> its call being set up
        # Leases the broker pushed for no call of ours (on this node's clock), newest last (at
        # most PUSHED_KEPT): one that came while its call was being set up (after the lease was
        # checked) is applied when the call is registered: an end stops the start, a renewal
        # counts. A lease's end is final, so it is never wrong, only forgotten; a renewal is
        # dropped when a call's check asks again.
        self._pushed_leases: dict[str, types_pb2.Lease] = {}
        self._users: Counter[tuple[str, ...]] = Counter()  # tenant / session dirs in use
        self.loop: asyncio.AbstractEventLoop | None = None
        self._has_estimate = monitor.usage_source is not UsageSource.NONE
        if self.policy.stop_fraction > 0 and not self._has_estimate:
            log.warning("in-kernel stop off: usage source NONE has no in-kernel usage estimate")
        self._adopt_poll: asyncio.Task[None] | None = None
        # Exec'd calls' output and exit (node.spool); per cgroup root, so the agent that
        # follows this one (same node, same root) finds them.
        self.spool_root = spool_root or default_spool_root(driver.root.name)
        # Exec'd calls that ended, kept (with their spool) until a follower has their Exited or
        # for policy.resume_grace_s, for a caller that comes back (Resume).
        self._ended: dict[str, Call] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # calls' reapers and conclusions
        # Stopping with its calls left running for the next agent: their followers are told to
        # resume (UNAVAILABLE) and nothing is stopped for want of a caller.
        self.leaving = False
        # Set once the calls a previous agent left are taken over (``adopt``, which the
        # composition root calls as it starts serving): a Resume that comes first waits for it
        # rather than miss its call.
        self.adopted = asyncio.Event()

    def _io(self, fn: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        """Run a slow cgroup operation on the cgroup-I/O thread (in submission order). Await it
        shielded: a cancelled caller must not cancel (or lose the result of) the operation."""
        assert self.loop is not None
        return self.loop.run_in_executor(self._cgroup_io, fn, *args)

    # -- monitor events (from the poller thread) -----------------------------------------------

    def on_mem_event(self, ev: MemEvent) -> None:
        """Called on the monitor's poller thread: hop onto the event loop."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._handle_mem_event, ev)

    def _handle_mem_event(self, ev: MemEvent) -> None:
        call = self._by_cgroup.get(ev.cgroup_id)
        if call is None:
            return
        call.peak_bytes = max(call.peak_bytes, ev.usage_bytes)
        if ev.kind is EventKind.LIMIT:
            self._on_limit(call, ev)
        elif ev.kind is EventKind.STOP:
            self._on_stop(call, ev)
        elif ev.kind is EventKind.SOFT:
            log.debug("call %s crossed soft threshold at %d bytes", call.call_id, ev.usage_bytes)
            self._send_pressure(call, broker_pb2.PRESSURE_KIND_SOFT_THRESHOLD, ev, "", 0)
            self._on_soft(call, ev)
        elif ev.kind is EventKind.EXIT and call.adopted:
            self._check_adopted(call)
        elif ev.kind is EventKind.OOM_KILL:
            log.warning("call %s: kernel OOM-killed pid %d", call.call_id, ev.pid)
            self.metrics.oom_kills.inc()
            call.kill_reason = call.kill_reason or (
                f"kernel OOM kill at budget {call.budget_bytes} bytes (pid {ev.pid})"
            )
            self._send_pressure(call, broker_pb2.PRESSURE_KIND_OOM_KILL, ev, "", 0)

    def _on_limit(self, call: Call, ev: MemEvent) -> None:
        stats = self.driver.read_stats(call.cgroup)
        call.peak_bytes = max(call.peak_bytes, stats.peak_bytes, stats.usage_bytes)
        decision = on_limit(call.view(), self.policy, ev.kernel_time_ns, call.limit_set_ns)
        if isinstance(decision, Recheck):
            usage = self._rearmed_usage(call)
            if not at_limit(usage, call.budget_bytes):
                log.debug(
                    "call %s: %s; usage %d below its limit", call.call_id, decision.reason, usage
                )
                return
            decision = on_limit(call.view(), self.policy)
        if isinstance(decision, FlushOutput):
            self._flush_output(call, decision.reason, lambda: self._after_flush_at_limit(call))
            return
        if not isinstance(decision, AskBroker):
            log.debug("call %s: limit event ignored: %s", call.call_id, decision.reason)
            return
        self._pause_and_ask(
            call,
            ev,
            decision.requested_bytes,
            stats.usage_bytes,
            "budget reached; asking the broker to grow it",
            freeze=False,  # the kernel holds it at its limit (pause at limit)
        )

    def _rearmed_usage(self, call: Call) -> int:
        """Re-arm the call's limit report first, then read its usage: a hit at its limit from
        here on is reported, and one in between shows as usage at the limit now."""
        self._watch_thresholds(call, call.budget_bytes)
        return self.driver.read_usage(call.cgroup)

    def _after_flush_at_limit(self, call: Call) -> None:
        """Its output flushed at its limit: decide from its usage now (``_rearmed_usage``), as
        for a LIMIT event then."""
        if call.phase not in (CallPhase.RUNNING, CallPhase.THROTTLED):
            return
        try:
            usage = self._rearmed_usage(call)
        except CgroupError:
            return  # being removed
        if at_limit(usage, call.budget_bytes):
            now = MemEvent(
                EventKind.LIMIT, call.cgroup_id, 0, usage, call.budget_bytes, time.monotonic_ns()
            )
            self._on_limit(call, now)

    def _flush_output(self, call: Call, reason: str, then: Callable[[], None]) -> None:
        """Write the call's spooled output to disk and drop it from its memory (on the
        output-flush thread), then call ``then`` on the loop. One flush at a time per call:
        asked again meanwhile, it calls each ``then`` after it."""
        if call.after_flush is not None:
            call.after_flush.append(then)
            return
        spool = call.spool
        assert self.loop is not None and spool is not None
        call.after_flush = [then]
        cached = call.view().output_cached_bytes
        log.info(
            "flush output of call %s lease %s tenant %s: %s",
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            reason,
        )
        flushing = self.loop.run_in_executor(self._output_flush, spool.flush_output)

        def flushed(fut: asyncio.Future[int]) -> None:
            thens, call.after_flush = call.after_flush or [], None
            if fut.cancelled():  # the agent is stopping
                return
            if (exc := fut.exception()) is not None:
                # Decided again as if flushed, or it would be flushed again and again: a call
                # at its limit is then asked for.
                log.warning("call %s: output not flushed: %s", call.call_id, exc)
                written = spool.output_written_and_held()[0]
            else:
                written = fut.result()
                self.metrics.output_flushed_bytes.inc(cached)
            call.output_flushed_bytes = max(call.output_flushed_bytes, written)
            for then in thens:
                then()

        flushing.add_done_callback(flushed)

    def _on_stop(self, call: Call, ev: MemEvent) -> None:
        """The kernel SIGSTOPped the charging process at the stop threshold: freeze the rest
        of the call and ask the broker, as at the limit."""
        call.stopped = True
        decision = on_limit(call.view(), self.policy)
        if isinstance(decision, FlushOutput):  # then go on: a STOP comes again if it must

            def go_on() -> None:
                if call.phase in (CallPhase.RUNNING, CallPhase.THROTTLED):  # not ended meanwhile
                    self._watch_thresholds(call, call.budget_bytes)
                    self._resume_stopped(call)

            self._flush_output(call, decision.reason, go_on)
            return
        if not isinstance(decision, AskBroker):
            log.debug("call %s: stop event: %s", call.call_id, decision.reason)
            self._resume_stopped(call)
            return
        self._pause_and_ask(
            call,
            ev,
            decision.requested_bytes,
            ev.usage_bytes,
            "stopped in-kernel at its stop threshold; asking the broker to grow it",
            freeze=True,
        )

    def _resume_stopped(self, call: Call) -> None:
        """SIGCONT what the kernel stopped (after a thaw: a frozen task ignores it; a call
        held for its output is sent it when released)."""
        if not call.stopped or call.output_held:
            return
        call.stopped = False
        try:
            pids = self.driver.read_stats(call.cgroup).pids
        except CgroupError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _pause_and_ask(
        self,
        call: Call,
        ev: MemEvent,
        requested_bytes: int,
        usage_bytes: int,
        reason: str,
        *,
        freeze: bool,
    ) -> None:
        action_id = uuid.uuid4().hex[:12]
        event_id = uuid.uuid4().hex[:12]
        if call.throttle_timer is not None:
            call.throttle_timer.cancel()
            call.throttle_timer = None
        if freeze and not self.policy.dry_run:
            try:
                self.driver.set_frozen(call.cgroup, True)
                call.frozen = True
            except CgroupError as exc:  # e.g. a task of it already held at its limit (v1)
                log.warning("call %s: not frozen, asking anyway: %s", call.call_id, exc)
        call.phase = CallPhase.PAUSED
        assert self.loop is not None
        timer = self.loop.call_later(
            self.policy.broker_timeout_s, self._on_deadline, call, action_id
        )
        call.pending = pending = _Pending(action_id, event_id, ev.kernel_time_ns, timer)
        log.info(
            "pause call %s lease %s tenant %s at budget %d (usage %d) action %s: asking broker "
            "for %d%s",
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            call.budget_bytes,
            usage_bytes,
            action_id,
            requested_bytes,
            " (dry run)" if self.policy.dry_run else "",
        )
        paused = self._announce(call, action_id, "pause", reason, usage_bytes=usage_bytes)
        uplink = self.uplink
        # Sent on the open stream, or buffered for the next one.
        pending.connection = uplink.connections + (0 if uplink.connected else 1)
        pending.ask = self._send_pressure(
            call,
            broker_pb2.PRESSURE_KIND_LIMIT_REACHED,
            ev,
            action_id,
            requested_bytes,
            event_id=event_id,
            usage_bytes=usage_bytes,
            trace_parent=paused,
        )

    # -- throttle: the first step of the ladder, always with a deadline ----------------------

    def _on_soft(self, call: Call, ev: MemEvent) -> None:
        decision = on_soft(call.view(), self.policy)
        if not isinstance(decision, Throttle):
            log.debug("call %s: soft event, no throttle: %s", call.call_id, decision.reason)
            return
        action_id = uuid.uuid4().hex[:12]
        if not self.policy.dry_run:
            self.driver.set_memory_throttle(call.cgroup, decision.high_bytes)
        call.phase = CallPhase.THROTTLED
        assert self.loop is not None
        call.throttle_timer = self.loop.call_later(
            decision.deadline_s, self._on_throttle_deadline, call, ev
        )
        self._report_local(
            call, action_id, "throttle", broker_pb2.ACTION_KIND_THROTTLE, decision.reason, ev
        )

    def _on_throttle_deadline(self, call: Call, ev: MemEvent) -> None:
        call.throttle_timer = None
        try:
            usage = self.driver.read_stats(call.cgroup).usage_bytes
        except CgroupError as exc:
            log.warning("call %s: throttle deadline: %s", call.call_id, exc)
            return
        decision = on_throttle_deadline(call.view(), usage, self.policy)
        if isinstance(decision, FlushOutput):
            self._flush_output(call, decision.reason, lambda: self._on_throttle_deadline(call, ev))
            return
        if isinstance(decision, Pause):
            call.peak_bytes = max(call.peak_bytes, usage)
            now = MemEvent(
                ev.kind, ev.cgroup_id, ev.pid, usage, ev.threshold_bytes, time.monotonic_ns()
            )
            self._pause_and_ask(
                call, now, decision.requested_bytes, usage, decision.reason, freeze=True
            )
        elif isinstance(decision, Unthrottle):
            if not self.policy.dry_run:
                self.driver.set_memory_throttle(call.cgroup, None)
            call.phase = CallPhase.RUNNING
            self._report_local(
                call,
                uuid.uuid4().hex[:12],
                "unthrottle",
                broker_pb2.ACTION_KIND_RESUME,
                decision.reason,
                ev,
            )

    def _announce(
        self,
        call: Call,
        action_id: str,
        action: str,
        reason: str,
        *,
        usage_bytes: int,
        reaction_ns: int = 0,
        decision_ns: int = 0,
        span: str = "",
        parent: Context | None = None,
    ) -> str:
        """An enforcement action's span, metrics and its ExecEvent to the caller (same action
        id). The span's parent is ``parent`` (the broker decision it carries out), else the
        call's own trace; returns the span's traceparent (for a request it makes)."""
        kind = span or action
        self.metrics.action(kind, self.policy.dry_run)
        if reaction_ns:
            self.metrics.reaction(kind, reaction_ns / 1e9)
        context = parent or call.trace
        with tracer.start_as_current_span(f"agentcg.enforce.{kind}", context=context) as sp:
            sp.set_attribute("agentcg.action_id", action_id)
            sp.set_attribute("agentcg.lease_id", call.lease.lease_id)
            sp.set_attribute("agentcg.tenant", call.lease.tenant)
            sp.set_attribute("agentcg.reason", reason)
            if reaction_ns:
                sp.set_attribute("agentcg.reaction_ms", reaction_ns / 1e6)
            span_trace = traceparent()
        enforcement = node_pb2.Enforcement(
            action_id=action_id,
            action=action,
            budget_bytes=call.budget_bytes,
            usage_bytes=usage_bytes,
            reason=reason,
            reaction_ns=reaction_ns,
            decision_ns=decision_ns,
        )
        call.add_action(enforcement)
        if call.spool is not None:
            try:
                call.spool.append_action(enforcement)
            except OSError as exc:  # a full disk must not stop enforcement
                log.warning("call %s: action %s not logged: %s", call.call_id, action_id, exc)
        call.wake.set()
        return span_trace

    def _report_local(
        self,
        call: Call,
        action_id: str,
        action: str,
        kind: broker_pb2.ActionKind.ValueType,
        reason: str,
        ev: MemEvent,
    ) -> None:
        """An action the node took on its own: log, span, ExecEvent, ActionReport."""
        reaction_ns = max(0, time.monotonic_ns() - ev.kernel_time_ns)
        log.info(
            "%s call %s lease %s tenant %s budget %d action %s: %s%s",
            action,
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            call.budget_bytes,
            action_id,
            reason,
            " (dry run)" if self.policy.dry_run else "",
        )
        self._announce(
            call, action_id, action, reason, usage_bytes=ev.usage_bytes, reaction_ns=reaction_ns
        )
        self.uplink.send(
            broker_pb2.NodeMessage(
                action=broker_pb2.ActionReport(
                    action_id=action_id,
                    lease_id=call.lease.lease_id,
                    kind=kind,
                    budget_bytes=call.budget_bytes,
                    reason=reason,
                    dry_run=self.policy.dry_run,
                    reaction_ns=reaction_ns,
                )
            )
        )

    def _send_pressure(
        self,
        call: Call,
        kind: broker_pb2.PressureKind.ValueType,
        ev: MemEvent,
        action_id: str,
        requested_bytes: int,
        *,
        event_id: str = "",
        usage_bytes: int = 0,
        trace_parent: str = "",
    ) -> broker_pb2.NodeMessage:
        msg = broker_pb2.NodeMessage(
            pressure=broker_pb2.PressureEvent(
                event_id=event_id or uuid.uuid4().hex[:12],
                lease_id=call.lease.lease_id,
                epoch=call.lease.epoch,
                kind=kind,
                usage_bytes=usage_bytes or ev.usage_bytes,
                budget_bytes=call.budget_bytes,
                peak_bytes=call.peak_bytes,
                requested_memory_bytes=requested_bytes,
                kernel_time_ns=ev.kernel_time_ns,
                action_id=action_id,
                traceparent=trace_parent,
            )
        )
        self.uplink.send(msg)
        return msg

    # -- decisions ----------------------------------------------------------------------------

    async def on_decision(self, d: broker_pb2.Decision) -> None:
        call = self.calls.get(d.lease_id)
        if d.kind == broker_pb2.DECISION_KIND_PREEMPT:
            # The broker revoked the lease (preempted, or its drain deadline passed): stop the
            # call, paused or not.
            if call is None or call.phase in (CallPhase.KILLED, CallPhase.EXITED):
                return
            if d.epoch and d.epoch < call.lease.epoch:
                log.warning(
                    "preempt %s of lease %s: stale epoch; ignored", d.decision_id, d.lease_id
                )
                return
            self._stop(call, d.reason or "preempted by the broker for higher-priority work")
            return
        if call is None or call.pending is None:
            log.debug("decision %s for lease %s: no waiting call", d.decision_id, d.lease_id)
            return
        if d.epoch and d.epoch < call.lease.epoch:
            log.warning(
                "decision %s for lease %s: stale epoch %d < %d; ignored",
                d.decision_id,
                d.lease_id,
                d.epoch,
                call.lease.epoch,
            )
            return
        if d.kind == broker_pb2.DECISION_KIND_WAIT:
            # No room now: the broker holds the ask and answers within wait_ms. Stay paused
            # that long, plus the usual time for an answer, before the local rule.
            pending = call.pending
            pending.timer.cancel()
            assert self.loop is not None
            pending.timer = self.loop.call_later(
                d.wait_ms / 1000 + self.policy.broker_timeout_s,
                self._on_deadline,
                call,
                pending.action_id,
            )
            log.info(
                "call %s lease %s stays paused (action %s): the broker holds its growth up to "
                "%d ms: %s",
                call.call_id,
                call.lease.lease_id,
                pending.action_id,
                d.wait_ms,
                d.reason,
            )
            # The caller sees it wait (and why), in its events and in the trace.
            self._announce(
                call,
                pending.action_id,
                "wait",
                f"waiting up to {d.wait_ms} ms for room: {d.reason}",
                usage_bytes=call.peak_bytes,
                parent=parent_context(d.traceparent),
            )
            return
        call.pending.decision_ns = time.monotonic_ns() - call.pending.kernel_time_ns
        call.pending.decision_trace = parent_context(d.traceparent)
        if d.kind == broker_pb2.DECISION_KIND_GROW:
            grow = on_decision_grow(call.view(), d.new_budget_bytes)
            if isinstance(grow, Resize):
                call.lease.epoch = d.epoch
                self._resize(call, grow.new_budget_bytes, grow.reason)
            else:
                log.warning("call %s: grow decision ignored: %s", call.call_id, grow.reason)
        elif d.kind == broker_pb2.DECISION_KIND_KILL:
            self._deny(call, d.reason)

    def _on_deadline(self, call: Call, action_id: str) -> None:
        if call.pending is None or call.pending.action_id != action_id:
            return
        used = sum(c.budget_bytes for c in self.calls.values())
        decision = on_deadline(call.view(), self.capacity_bytes - used, self.policy)
        if isinstance(decision, Resize):
            self._resize(call, decision.new_budget_bytes, decision.reason)
        elif isinstance(decision, Kill):
            self._deny(call, decision.reason)

    def _deny(self, call: Call, reason: str) -> None:
        decision = on_denied(call.view(), not call.frozen, reason)
        if isinstance(decision, Kill):
            self._kill(call, decision.reason)
        elif isinstance(decision, Unthrottle):
            if not self.policy.dry_run:
                self.driver.set_memory_throttle(call.cgroup, None)
                if call.frozen and not call.output_held:
                    self.driver.set_frozen(call.cgroup, False)
                self._resume_stopped(call)
            call.frozen = False
            call.phase = CallPhase.RUNNING
            self._finish_action(call, broker_pb2.ACTION_KIND_RESUME, decision.reason)

    def _finish_action(
        self, call: Call, kind: broker_pb2.ActionKind.ValueType, reason: str
    ) -> None:
        pending = call.pending
        if pending is None:  # the call ended first (e.g. its caller went away)
            return
        pending.timer.cancel()
        call.pending = None
        reaction_ns = time.monotonic_ns() - pending.kernel_time_ns
        call.reactions_ns.append(reaction_ns)
        action = {
            broker_pb2.ACTION_KIND_GROW: "grow",
            broker_pb2.ACTION_KIND_RESUME: "resume",
        }.get(kind, "kill")
        log.info(
            "%s call %s lease %s tenant %s budget %d action %s reaction %.3f ms: %s%s",
            action,
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            call.budget_bytes,
            pending.action_id,
            reaction_ns / 1e6,
            reason,
            " (dry run)" if self.policy.dry_run else "",
        )
        self._announce(
            call,
            pending.action_id,
            action,
            reason,
            usage_bytes=call.peak_bytes,
            reaction_ns=reaction_ns,
            decision_ns=pending.decision_ns,
            parent=pending.decision_trace,
        )
        self.uplink.send(
            broker_pb2.NodeMessage(
                action=broker_pb2.ActionReport(
                    action_id=pending.action_id,
                    lease_id=call.lease.lease_id,
                    kind=kind,
                    budget_bytes=call.budget_bytes,
                    reason=reason,
                    dry_run=self.policy.dry_run,
                    reaction_ns=reaction_ns,
                )
            )
        )

    def _resize(self, call: Call, new_budget: int, reason: str) -> None:
        if not self.policy.dry_run:
            # The in-kernel thresholds first, then raise the limit: a call that hits the new
            # budget at once must produce a fresh event. The kernel usage threshold that arms
            # per-page accounting is moved after the call runs again, off the loop (the kernel
            # takes an RCU grace period, ms, to register it); at its budget the call is above
            # any arm threshold, so it stays armed until the new threshold is in place.
            self._watch_thresholds(call, new_budget)
            self.driver.set_memory_limit(call.cgroup, new_budget)
            call.limit_set_ns = time.monotonic_ns()
            self.driver.set_memory_throttle(call.cgroup, None)
            if call.frozen:
                if not call.output_held:
                    self.driver.set_frozen(call.cgroup, False)
                call.frozen = False
            self._resume_stopped(call)
            self.monitor.arm(call.cgroup_id)
            self._watch_arming(call, new_budget)
        call.budget_bytes = new_budget
        call.grown += 1
        call.phase = CallPhase.RUNNING
        self._finish_action(call, broker_pb2.ACTION_KIND_GROW, reason)

    # -- watching: thresholds in the monitor, per-page accounting armed by the kernel ----------

    def _watch(self, call: Call, budget: int) -> asyncio.Future[int | None]:
        """Watch a call. Its per-page in-kernel accounting is armed by the kernel's own usage
        threshold at arm_threshold(budget) where the cgroup version has one (v1), else always.
        Returns the threshold's registration (an RCU grace period on v1, ~12 ms here): await
        it, shielded, before the call runs."""
        self._watch_thresholds(call, budget)
        return self._watch_arming(call, budget)

    def _watch_thresholds(self, call: Call, budget: int) -> None:
        self.monitor.watch(
            call.cgroup_id,
            soft_bytes=soft_threshold(budget, self.policy),
            limit_bytes=budget,
            stop_bytes=stop_threshold(budget, self.policy) if self._has_estimate else 0,
            armed=False,
        )

    def _watch_arming(self, call: Call, budget: int) -> asyncio.Future[int | None]:
        """(Re-)register the kernel usage threshold at arm_threshold(budget) on a cgroup-watch
        thread; once registered, its eventfd is read on the loop. A registration that a later
        one or the call's end overtook (the call's cgroup may be gone: it fails) is closed
        unused. The future returned is done once the registration is in place on the loop
        (not merely back from its thread: a caller woken in the same loop iteration would run
        the call before its eventfd is read), with the registration's result or error."""
        assert self.loop is not None
        loop = self.loop
        self._close_arm(call)
        call.arm_gen += 1
        gen, threshold = call.arm_gen, arm_threshold(budget, self.policy)
        registering = loop.run_in_executor(
            self._cgroup_watch, self.driver.watch_usage, call.cgroup, threshold
        )
        landed: asyncio.Future[int | None] = loop.create_future()

        def registered(fut: asyncio.Future[int | None]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            fd = None if fut.cancelled() or exc is not None else fut.result()
            try:
                if gen != call.arm_gen or loop.is_closed():
                    if fd is not None:
                        os.close(fd)
                        fd = None
                elif exc is not None:
                    log.warning("call %s: cannot watch its usage: %s", call.call_id, exc)
                elif fd is None:
                    self.monitor.arm(call.cgroup_id)  # no kernel usage threshold (v2): always
                else:
                    call.arm_fd, call.arm_bytes = fd, threshold
                    loop.add_reader(fd, self._on_usage_threshold, call)
                    self._on_usage_threshold(call)  # it may be above already
            finally:
                if not landed.done() and not loop.is_closed():
                    if fut.cancelled():
                        landed.cancel()
                    elif exc is not None:
                        landed.set_exception(exc)
                        landed.exception()  # logged above or overtaken: not "never retrieved"
                    else:
                        landed.set_result(fd)

        registering.add_done_callback(registered)
        return landed

    def _on_usage_threshold(self, call: Call) -> None:
        """The kernel saw the call's usage cross its arm threshold (either way)."""
        if call.arm_fd < 0:
            return
        try:
            os.eventfd_read(call.arm_fd)
        except BlockingIOError:
            pass
        try:
            usage = self.driver.read_usage(call.cgroup)
        except CgroupError:
            return  # being removed
        if usage >= call.arm_bytes:
            self.monitor.arm(call.cgroup_id)
        else:
            self.monitor.disarm(call.cgroup_id)

    def _close_arm(self, call: Call) -> None:
        if call.arm_fd < 0:
            return
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(call.arm_fd)
        os.close(call.arm_fd)
        call.arm_fd = -1

    def _watch_pause(self, call: Call) -> None:
        """Have the kernel's own notice of a task of the call going to wait at its limit (v1
        memory.oom_control) read on the loop: the backstop of the LIMIT report (see
        on_pause_notice). Unlike a usage threshold its registration waits for no RCU grace
        period (0.03-0.1 ms measured), so it is made here; it fires at once if one waits
        already."""
        assert self.loop is not None
        fd = self.driver.watch_pause(call.cgroup)
        if fd is None:
            return  # v2: no such notice (and no waiting at the limit)
        call.pause_fd = fd
        self.loop.add_reader(fd, self._on_pause_notice, call)

    def _on_pause_notice(self, call: Call, settled: bool = False) -> None:
        if call.pause_fd < 0:
            return  # unwatched (ended) meanwhile
        if not settled:
            try:
                os.eventfd_read(call.pause_fd)
            except BlockingIOError:
                pass
        try:
            stats = self.driver.read_stats(call.cgroup)
        except CgroupError:
            return  # being removed
        call.peak_bytes = max(call.peak_bytes, stats.peak_bytes, stats.usage_bytes)
        decision = on_pause_notice(
            call.view(), stats.usage_bytes, stats.under_oom, self.policy, settled=settled
        )
        if isinstance(decision, Defer):
            log.debug("call %s: pause notice: %s", call.call_id, decision.reason)
            assert self.loop is not None
            self.loop.call_later(decision.after_s, self._on_pause_notice, call, True)
            return
        if isinstance(decision, Wake):
            log.warning("call %s: %s: waking it", call.call_id, decision.reason)
            self.metrics.pause_notice("wake")
            try:
                self.driver.wake_paused(call.cgroup)
            except CgroupError as exc:
                log.warning("call %s: cannot wake it: %s", call.call_id, exc)
            return
        if isinstance(decision, FlushOutput):
            self._flush_output(call, decision.reason, lambda: self._after_flush_at_limit(call))
            return
        if not isinstance(decision, AskBroker):
            log.debug("call %s: pause notice ignored: %s", call.call_id, decision.reason)
            return
        # Its LIMIT report lost, or not handled yet (the two signals race: seen 1 in 12 runs of
        # 8 concurrent spikes): this ask is the call's one either way.
        log.info("call %s: waits at its limit, not asked for yet: asking", call.call_id)
        self.metrics.pause_notice("ask")
        ev = MemEvent(
            EventKind.LIMIT,
            call.cgroup_id,
            0,
            stats.usage_bytes,
            call.budget_bytes,
            time.monotonic_ns(),
        )
        self._pause_and_ask(
            call,
            ev,
            decision.requested_bytes,
            stats.usage_bytes,
            "waits at its budget (kernel notice); asking the broker to grow it",
            freeze=False,
        )

    def _close_pause(self, call: Call) -> None:
        if call.pause_fd < 0:
            return
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(call.pause_fd)
        os.close(call.pause_fd)
        call.pause_fd = -1

    def _unwatch(self, call: Call) -> None:
        call.arm_gen += 1  # a registration still in flight is closed when it lands
        self._close_arm(call)
        self._close_pause(call)
        self.monitor.unwatch(call.cgroup_id)

    def _kill(self, call: Call, reason: str) -> None:
        call.kill_reason = reason
        if self.policy.dry_run:
            self._finish_action(call, broker_pb2.ACTION_KIND_KILL, reason)
            return
        call.phase = CallPhase.KILLED
        assert self.loop is not None
        # SIGKILL and wait for the tasks to be gone off the event loop: the action is in effect
        # (and its reaction time taken) when the cgroup is empty.
        done = call.killing = self.loop.run_in_executor(None, self.driver.kill, call.cgroup)

        def killed(fut: asyncio.Future[None]) -> None:
            if fut.exception() is not None:
                log.error("call %s: kill failed: %s", call.call_id, fut.exception())
            self._finish_action(call, broker_pb2.ACTION_KIND_KILL, reason)

        done.add_done_callback(killed)

    # -- output: the node's disk -----------------------------------------------------------

    async def watch_output(self) -> None:
        """Check every Exec'd call's spooled output each OUTPUT_CHECK_S (runs until
        cancelled)."""
        while True:
            await asyncio.sleep(self.OUTPUT_CHECK_S)
            try:
                self.check_output()
            except Exception:
                log.exception("output check failed")

    # How often the spool is looked at: a call writing faster than its caller reads goes this
    # long at most past the node's output limit before it is held (one stat of its two files).
    OUTPUT_CHECK_S = 0.1

    def check_output(self) -> None:
        """Hold the calls whose spooled output is above the node's limit; release those whose
        caller has had enough of it (``on_output``)."""
        for call in list(self.calls.values()):
            if call.spool is None or call.phase in (CallPhase.KILLED, CallPhase.EXITED):
                continue
            held_bytes = call.spool.output_bytes()
            verdict = on_output(held_bytes, call.output_held, self.policy)
            if isinstance(verdict, HoldOutput):
                self._hold_output(call, held_bytes, verdict.reason)
            elif isinstance(verdict, ReleaseOutput):
                self._release_output(call, held_bytes, verdict.reason)

    def _hold_output(self, call: Call, held_bytes: int, reason: str) -> None:
        if not self.policy.dry_run and not call.frozen:  # frozen: paused for memory already
            try:
                self.driver.set_frozen(call.cgroup, True)
            except CgroupError as exc:  # a task held at its v1 limit: it writes nothing now
                log.debug("call %s: not held for its output: %s", call.call_id, exc)
                return
        call.output_held = True
        self._output_action(call, "hold", held_bytes, reason)

    def _release_output(self, call: Call, held_bytes: int, reason: str) -> None:
        if not self.policy.dry_run and not call.frozen:  # frozen: still paused for memory
            try:
                self.driver.set_frozen(call.cgroup, False)
            except CgroupError as exc:  # tried again at the next check
                log.warning("call %s: not released: %s", call.call_id, exc)
                return
        call.output_held = False
        if not call.frozen:
            self._resume_stopped(call)
        self._output_action(call, "release", held_bytes, reason)

    def _output_action(self, call: Call, action: str, held_bytes: int, reason: str) -> None:
        action_id = self._log_action(action, call, reason)
        self._announce(call, action_id, action, reason, usage_bytes=held_bytes)

    def _log_action(self, action: str, call: Call, reason: str) -> str:
        """One INFO line for an action the node takes on its own; returns its new id."""
        action_id = uuid.uuid4().hex[:12]
        log.info(
            "%s call %s lease %s tenant %s action %s: %s%s",
            action,
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            action_id,
            reason,
            " (dry run)" if self.policy.dry_run else "",
        )
        return action_id

    # -- leases: enforced locally ------------------------------------------------------------

    async def watch_leases(self) -> None:
        """Check every call's lease each policy.lease_check_interval_s (runs until cancelled)."""
        while True:
            await asyncio.sleep(self.policy.lease_check_interval_s)
            try:
                await self.check_leases()
            except Exception:
                log.exception("lease check failed")

    async def check_leases(self, now_unix_ms: int | None = None, *, every: bool = False) -> None:
        """One pass: refresh leases about to expire (``every``: all of them) from the broker;
        stop expired/stale ones.

        The lease of a call nobody follows (its caller went away: the resume grace runs) is
        asked about on every pass. A caller that gave up on its call (``run`` cancelled: the
        SDK releases the lease) wants it gone, and the broker has already given its budget to
        others: the call is stopped within a pass, not at the end of the grace.

        The broker is asked about every lease due at once, not one after another: a broker that
        is slow or taking over (each question waits up to its timeout) then delays the pass by
        one timeout, not by one per call, and an expired call is stopped on time."""
        due = []
        for call in list(self.calls.values()):
            if call.phase in (CallPhase.KILLED, CallPhase.EXITED):
                continue
            now = int(time.time() * 1000) if now_unix_ms is None else now_unix_ms
            held = lease_view(call.lease)
            tick = on_lease_tick(held, now, self.policy.lease_refresh_margin_ms)
            if every or isinstance(tick, Refresh) or call.unfollowed is not None:
                due.append(self._refresh_lease(call, held, now_unix_ms))
        await asyncio.gather(*due)

    RECHECK_SPREAD_S = 2.0

    async def on_uplink_connected(self) -> None:
        """The stream to the broker (re)opened: what it pushed while the link was down (a
        revocation by preemption or a drain, a renewal) is lost, so every lease is asked
        about again. After a random wait of up to RECHECK_SPREAD_S: after a failover every
        node reconnects to the new leader at once, and their questions are spread out. Paused
        calls ask again first (``ask_again``)."""
        self.ask_again()
        if self.calls:
            await asyncio.sleep(random.uniform(0, self.RECHECK_SPREAD_S))
            await self.check_leases(every=True)
            log.info("stream to the broker (re)opened: asked it about the lease of every call")

    def ask_again(self) -> None:
        """Send again the asks to grow that went out on a stream that has since broken: the
        broker that had them may never answer (it died or restarted, or lost its leadership,
        holding the ask while room was to free), and the one connected now has never heard of
        them. Same event and action ids; the broker decides it as a new ask (a growth the old
        one granted comes back as that grant). The call gets at least ``broker_timeout_s`` more
        for the answer, at most MAX_ASKS_AGAIN times per pause."""
        uplink = self.uplink
        assert self.loop is not None
        for call in self.calls.values():
            pending = call.pending
            if (
                pending is None
                or pending.ask is None
                or call.phase is not CallPhase.PAUSED
                or pending.connection >= uplink.connections  # on this stream, or buffered
                or pending.asked_again >= MAX_ASKS_AGAIN
            ):
                continue
            pending.asked_again += 1
            pending.connection = uplink.connections
            uplink.send(pending.ask)
            timeout_s = self.policy.broker_timeout_s
            if pending.timer.when() - self.loop.time() < timeout_s:
                pending.timer.cancel()
                pending.timer = self.loop.call_later(
                    timeout_s, self._on_deadline, call, pending.action_id
                )
            log.info(
                "call %s lease %s still paused (action %s): asked the broker again after the "
                "link to it was lost",
                call.call_id,
                call.lease.lease_id,
                pending.action_id,
            )

    async def _refresh_lease(self, call: Call, held: LeaseView, now_unix_ms: int | None) -> None:
        """Ask the broker about one lease and act on its answer, judged at the time it came."""
        fresh: LeaseView | None
        now = int(time.time() * 1000) if now_unix_ms is None else now_unix_ms
        try:
            lease = await self._get_lease(call.lease.lease_id, 2, asked_at_unix_ms=now)
            fresh = lease_view(lease)
        except grpc.aio.AioRpcError as exc:
            # PERMISSION_DENIED: a broker with an access file lets a node read only the leases
            # placed on it; this one is not (any more).
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                fresh = LeaseView(0, 0, active=False, state="unknown")
            else:
                log.warning("lease %s: cannot refresh: %s", call.lease.lease_id, exc.code())
                fresh = None
        if now_unix_ms is None:  # judged when the answer came
            now = int(time.time() * 1000)
        self.apply_lease(call, held, fresh, now)

    async def _get_lease(
        self, lease_id: str, timeout_s: float, *, asked_at_unix_ms: int | None = None
    ) -> types_pb2.Lease:
        """The broker's lease, its expiry moved onto this node's clock (``as_of`` cleared).
        Asked as this node, for a call it runs: the broker pushes the lease's renewals and its
        end on the stream (``on_lease_update``)."""
        asked = int(time.time() * 1000) if asked_at_unix_ms is None else asked_at_unix_ms
        lease = await self.uplink.broker.GetLease(
            broker_pb2.GetLeaseRequest(lease_id=lease_id, node_id=self.node_id), timeout=timeout_s
        )
        _onto_node_clock(lease, asked)
        return lease

    def on_lease_update(self, lease: types_pb2.Lease) -> None:
        """The broker pushed a lease change on the stream (a call's lease renewed, released by a
        caller, or expired): applied as the answer to a lease check. A lease with no call here
        is kept: its call may be being set up, and then it is applied when the call is
        registered (``_start``)."""
        now = int(time.time() * 1000)
        _onto_node_clock(lease, now)
        call = self.calls.get(lease.lease_id)
        if call is not None:
            self.apply_lease(call, lease_view(call.lease), lease_view(lease), now)
            return
        pushed = self._pushed_leases
        kept = pushed.pop(lease.lease_id, None)
        if kept is not None and kept.state != types_pb2.LEASE_STATE_ACTIVE:
            lease = kept  # ended: final, whatever comes after
        pushed[lease.lease_id] = lease
        if len(pushed) > PUSHED_KEPT:
            del pushed[next(iter(pushed))]

    def apply_lease(
        self, call: Call, held: LeaseView, fresh: LeaseView | None, now_unix_ms: int
    ) -> None:
        if call.phase in (CallPhase.KILLED, CallPhase.EXITED):
            return
        verdict = on_lease_refresh(held, fresh, now_unix_ms, self.node_id)
        if isinstance(verdict, Kill):
            self._stop(call, verdict.reason)
        elif isinstance(verdict, Update):
            call.lease.epoch = verdict.lease.epoch
            call.lease.expires_at_unix_ms = verdict.lease.expires_at_unix_ms
            log.debug("call %s: %s", call.call_id, verdict.reason)

    def _stop(self, call: Call, reason: str) -> None:
        """Stop a call on the node's own authority (its lease no longer holds)."""
        action_id = self._log_action("stop", call, reason)
        self._announce(call, action_id, "kill", reason, usage_bytes=call.peak_bytes, span="stop")
        self.uplink.send(
            broker_pb2.NodeMessage(
                action=broker_pb2.ActionReport(
                    action_id=action_id,
                    lease_id=call.lease.lease_id,
                    kind=broker_pb2.ACTION_KIND_KILL,
                    budget_bytes=call.budget_bytes,
                    reason=reason,
                    dry_run=self.policy.dry_run,
                )
            )
        )
        if self.policy.dry_run:
            return
        if call.pending is not None:
            call.pending.timer.cancel()
            call.pending = None
        call.kill_reason = reason
        call.phase = CallPhase.KILLED
        assert self.loop is not None
        done = call.killing = self.loop.run_in_executor(None, self.driver.kill, call.cgroup)

        def killed(fut: asyncio.Future[None]) -> None:
            if fut.exception() is not None:
                log.error("call %s: kill failed: %s", call.call_id, fut.exception())

        done.add_done_callback(killed)

    # -- Exec -----------------------------------------------------------------------------------

    async def Exec(
        self,
        request: node_pb2.ExecRequest,
        context: grpc.aio.ServicerContext[node_pb2.ExecRequest, node_pb2.ExecEvent],
    ) -> AsyncIterator[node_pb2.ExecEvent]:
        try:
            call = await self._start(request)
            assert call.spool is not None
            tail = OutputTail(call.spool, 0, 0)
        except AgentcgError as exc:
            await context.abort_with_status(to_status(exc))
            return
        except Exception as exc:
            log.exception("exec failed to start")
            await context.abort_with_status(to_status(exc))
            return
        async for ev in self._follow(call, tail, context, resumed=False):
            yield ev

    async def Resume(
        self,
        request: node_pb2.ResumeRequest,
        context: grpc.aio.ServicerContext[node_pb2.ResumeRequest, node_pb2.ExecEvent],
    ) -> AsyncIterator[node_pb2.ExecEvent]:
        await self.adopted.wait()
        try:
            call, tail = self._resumable(request)
        except AgentcgError as exc:
            await context.abort_with_status(to_status(exc))
            return
        if request.HasField("actions_seen"):
            next_action = min(request.actions_seen, call.actions_total)
        else:
            next_action = call.actions_sent
        log.info(
            "resume call %s lease %s tenant %s from stdout %d stderr %d%s",
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            request.stdout_offset,
            request.stderr_offset,
            " (ended)" if call.exited is not None else "",
        )
        async for ev in self._follow(call, tail, context, resumed=True, next_action=next_action):
            yield ev

    def _resumable(self, request: node_pb2.ResumeRequest) -> tuple[Call, OutputTail]:
        try:
            lease_id = validate_name("lease_id", request.lease_id)
        except InvalidNameError as e:
            raise InvalidArgumentError("lease_id", str(e)) from None
        if request.HasField("actions_seen") and request.actions_seen < 0:
            raise InvalidArgumentError("actions_seen", f"must be >= 0 (got {request.actions_seen})")
        call = self.calls.get(lease_id) or self._ended.get(lease_id)
        if call is None:
            raise NotFoundError("call", lease_id, field="lease_id")
        authorize_lease(call.lease)
        if call.spool is None:
            raise FailedPreconditionError(
                f"lease {lease_id}: its call was attached, not started by Exec: nothing to resume"
            )
        return call, OutputTail(call.spool, request.stdout_offset, request.stderr_offset)

    async def _follow(
        self,
        call: Call,
        tail: OutputTail,
        context: grpc.aio.ServicerContext[_Req, node_pb2.ExecEvent],
        *,
        resumed: bool,
        next_action: int = 0,
    ) -> AsyncIterator[node_pb2.ExecEvent]:
        """Stream a call to its caller (Exec, Resume): Started, then its output (read from its
        spool) and its enforcement actions from seq ``next_action`` as they come, then exactly
        one Exited. A newer follower takes over (this one ends ABORTED); one whose caller went
        away leaves the call running for policy.resume_grace_s, for the caller to come back."""
        me = object()
        call.follower = me
        self._cancel_unfollowed(call)
        assert self.loop is not None
        delivered = False
        try:
            yield node_pb2.ExecEvent(
                started=node_pb2.Started(
                    call_id=call.call_id,
                    pid=call.pid,
                    cgroup_path=str(call.cgroup.path),
                    resumed=resumed,
                )
            )
            wait_s = _TAIL_FIRST_S
            while True:
                if call.follower is not me:  # the actions not sent yet are the newer one's
                    await context.abort(
                        grpc.StatusCode.ABORTED,
                        f"call {call.call_id}: followed by a newer Resume",
                    )
                call.wake.clear()
                # Taken before the output is read: once a call has ended, all it wrote is there.
                exited = call.exited
                sent = False
                while chunks := tail.read(_OUTPUT_CHUNK):
                    for kind, data in chunks:
                        yield node_pb2.ExecEvent(output=node_pb2.Output(stream=kind, data=data))
                    sent = True
                    tail.free_delivered()
                    if exited is None:
                        break  # actions in between; the rest after
                while call.follower is me and (action := call.action_at(next_action)) is not None:
                    yield node_pb2.ExecEvent(enforcement=action)
                    next_action = action.seq + 1
                    call.actions_sent = max(call.actions_sent, next_action)
                    sent = True
                if exited is not None and call.follower is me:
                    yield node_pb2.ExecEvent(exited=exited)
                    delivered = True
                    return
                if self.leaving:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"node {self.node_id}: agent restarting; call {call.call_id} runs on: "
                        "Resume it",
                    )
                if sent:
                    wait_s = _TAIL_FIRST_S
                    continue
                timer = self.loop.call_later(wait_s, call.wake.set)
                try:
                    await call.wake.wait()
                finally:
                    timer.cancel()
                wait_s = min(wait_s * 2, _TAIL_LONGEST_S)
        finally:
            tail.close()
            if call.follower is me:
                call.follower = None
                if delivered:
                    self._forget(call)
                elif not self.leaving:
                    if call.exited is None:
                        log.info(
                            "call %s: caller gone; it runs on for %.1f s for a Resume",
                            call.call_id,
                            self.policy.resume_grace_s,
                        )
                    self._start_unfollowed(call)

    def _start_unfollowed(self, call: Call) -> None:
        """Nobody follows ``call``: stop it (or, ended, forget it) unless a caller resumes it
        within policy.resume_grace_s."""
        self._cancel_unfollowed(call)
        assert self.loop is not None
        call.unfollowed = self.loop.call_later(
            self.policy.resume_grace_s, self._on_unfollowed, call
        )

    @staticmethod
    def _cancel_unfollowed(call: Call) -> None:
        if call.unfollowed is not None:
            call.unfollowed.cancel()
            call.unfollowed = None

    def _on_unfollowed(self, call: Call) -> None:
        call.unfollowed = None
        if call.follower is not None or self.leaving:
            return
        if call.exited is not None:
            self._forget(call)
        elif call.phase not in (CallPhase.KILLED, CallPhase.EXITED):
            self._stop(
                call,
                f"its caller did not follow it again within {self.policy.resume_grace_s:g} s",
            )

    def _forget(self, call: Call) -> None:
        """An ended call's Exited was delivered (or nobody came for it): drop it and its spool."""
        self._cancel_unfollowed(call)
        if self._ended.get(call.lease.lease_id) is call:
            del self._ended[call.lease.lease_id]
        if call.spool is not None:
            call.spool.remove()

    def clear_spool(self) -> None:
        """At a stop that stops the calls: no caller can resume them, nothing to keep."""
        shutil.rmtree(self.spool_root, ignore_errors=True)

    def leave(self) -> None:
        """The agent stops and leaves its calls running for the next one (--keep-calls): their
        followers are told to resume, and no call is stopped for want of a caller."""
        self.leaving = True
        for call in [*self.calls.values(), *self._ended.values()]:
            self._cancel_unfollowed(call)
            call.wake.set()

    def _spawn_task(self, coro: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, call: Call, process: subprocess.Popen[bytes]) -> None:
        """Wait for the Exec'd call's process to exit, then end the call."""
        returncode = await self._exit_of(process)
        if call.killing is not None:
            await asyncio.wait({call.killing})  # its report goes out before the exit
        self._conclude(call, self._finish(call, returncode, call.started_s))

    async def _exit_of(self, process: subprocess.Popen[bytes]) -> int:
        """Its exit code, awaited on a pidfd (readable once it exits): no SIGCHLD handler and
        no child watcher, which would kill it when the agent leaves it to its successor."""
        assert self.loop is not None
        fd = os.pidfd_open(process.pid)
        exited: asyncio.Future[None] = self.loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        self.loop.add_reader(fd, readable)
        try:
            await exited
        finally:
            self.loop.remove_reader(fd)
            os.close(fd)
        return process.wait()

    def _conclude(self, call: Call, exited: node_pb2.Exited) -> None:
        """Hand ``exited`` to the call's follower once its cgroup is gone."""

        async def conclude() -> None:
            await self._removed(call)
            call.exited = exited
            call.wake.set()
            if call.spool is not None and call.follower is None and call.unfollowed is None:
                self._start_unfollowed(call)

        self._spawn_task(conclude(), f"conclude-{call.call_id}")

    async def _start(self, request: node_pb2.ExecRequest) -> Call:
        try:
            lease_id = validate_name("lease_id", request.lease_id)
        except InvalidNameError as e:
            raise InvalidArgumentError("lease_id", str(e)) from None
        _check_command(request)
        if lease_id in self.calls or lease_id in self._starting:
            raise ConflictError(f"lease {lease_id}: a call is already running under it")
        kept = self._pushed_leases.get(lease_id)
        if kept is not None and kept.state == types_pb2.LEASE_STATE_ACTIVE:
            del self._pushed_leases[lease_id]  # the check below has it, or a newer one
        lease, tenant, session = await self._fetch_lease(lease_id)
        if lease_id in self.calls or lease_id in self._starting:  # a concurrent Exec won
            raise ConflictError(f"lease {lease_id}: a call is already running under it")
        budget = lease.budget.memory_bytes
        call_id = lease_id
        self._users[(tenant,)] += 1
        self._users[(tenant, session)] += 1
        starting = self._starting[lease_id] = asyncio.Event()
        cg = self._dir(tenant, session, call_id)
        spool = CallSpool(self.spool_root, lease_id)
        if (before := self._ended.pop(lease_id, None)) is not None:
            self._cancel_unfollowed(before)  # an ended call under the same lease: superseded
        spool.remove()  # left from an earlier call under this lease
        call: Call | None = None
        try:
            call = Call(
                call_id=call_id,
                lease=lease,
                cgroup=cg,
                cgroup_id=await asyncio.shield(
                    self._io(self._create_call_cgroup, cg, budget, traceparent())
                ),
                budget_bytes=budget,
                trace=otel_context.get_current(),
                spool=spool,
            )
            # Its usage threshold registers (an RCU grace period) while the call is spooled,
            # spawned and placed: it runs once both are done.
            arming = self._watch(call, budget)
            env = dict(os.environ)
            # A traced tool (OpenTelemetry's environment carrier) continues the call's trace.
            if span_trace := traceparent():
                env["TRACEPARENT"] = span_trace
            env.update(request.env)
            try:
                out, err = spool.create(request.capture_output)
            except OSError as exc:
                raise FailedPreconditionError(
                    f"node {self.node_id}: cannot spool call {call_id} in {spool.dir}: {exc}"
                ) from None
            # Gated: the call waits on its stdin until it sits in its cgroup and is watched.
            try:
                gated = spawn_gated(
                    list(request.argv),
                    cwd=request.cwd or None,
                    env=env,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    status_path=spool.status_path,
                )
            except OSError as exc:
                raise InvalidArgumentError(
                    "cwd", f"cannot start in {request.cwd!r}: {exc.strerror}"
                ) from None
            finally:
                os.close(out)
                os.close(err)
            call.pid = gated.pid
            try:
                spool.write_started(lease, gated.pid)
                await asyncio.shield(self._io(self.driver.attach, cg, gated.pid))
                await asyncio.shield(arming)
                self._watch_pause(call)
                self.monitor.add_pid(gated.pid, call.cgroup_id)
                self._apply_pushed(call)
            except BaseException:
                gated.abort()  # never released: sh exits without running the call
                await asyncio.shield(self._exit_of(gated.process))
                raise
            self.calls[lease_id] = call
            self._by_cgroup[call.cgroup_id] = call
            gated.release()
        except BaseException:
            if call is not None:
                self._unwatch(call)
            spool.remove()
            await asyncio.shield(self._release_dirs(tenant, session, cg))
            raise
        finally:
            del self._starting[lease_id]
            starting.set()
        self._spawn_task(self._reap(call, gated.process), f"reap-{call_id}")
        self._start_unfollowed(call)  # until its Exec stream follows it
        log.info(
            "start call %s lease %s tenant %s session %s budget %d pid %d argv %r",
            call_id,
            lease_id,
            tenant,
            session,
            budget,
            gated.pid,
            list(request.argv)[:4],
        )
        self.metrics.calls_started.inc()
        return call

    def _apply_pushed(self, call: Call) -> None:
        """What the broker pushed about ``call``'s lease after its check for Exec, before the
        call was registered: a renewal counts, an end (or any verdict that would stop a call)
        stops the start."""
        pushed = self._pushed_leases.pop(call.lease.lease_id, None)
        if pushed is None:
            return
        now = int(time.time() * 1000)
        verdict = on_lease_refresh(lease_view(call.lease), lease_view(pushed), now, self.node_id)
        if isinstance(verdict, Kill):
            raise FailedPreconditionError(
                f"lease {call.lease.lease_id} changed at the broker while its call was set up: "
                f"{verdict.reason}"
            )
        if isinstance(verdict, Update):
            call.lease.epoch = verdict.lease.epoch
            call.lease.expires_at_unix_ms = verdict.lease.expires_at_unix_ms

    async def _fetch_lease(self, lease_id: str) -> tuple[types_pb2.Lease, str, str]:
        """The lease from the broker, checked active and placed here; its tenant and session."""
        try:
            lease = await self._get_lease(lease_id, 5)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        if lease.state != types_pb2.LEASE_STATE_ACTIVE:
            raise FailedPreconditionError(
                f"lease {lease_id}: is {types_pb2.LeaseState.Name(lease.state)}, not active"
            )
        if lease.node_id != self.node_id:
            raise FailedPreconditionError(
                f"lease {lease_id}: placed on node {lease.node_id}, not {self.node_id}"
            )
        try:
            tenant = validate_name("tenant", lease.tenant)
            session = validate_name("session", lease.session)
        except InvalidNameError as e:
            raise FailedPreconditionError(f"lease {lease_id}: {e}") from None
        authorize_lease(lease)
        return lease, tenant, session

    # -- ListCalls (read-only) ------------------------------------------------------------------

    async def ListCalls(
        self,
        request: node_pb2.ListCallsRequest,
        context: grpc.aio.ServicerContext[node_pb2.ListCallsRequest, node_pb2.ListCallsResponse],
    ) -> node_pb2.ListCallsResponse:
        return self.list_calls(request.tenant)

    def list_calls(self, tenant: str = "") -> node_pb2.ListCallsResponse:
        """The calls running now: lease, budget, the cgroup's usage and peak, state, actions."""
        now = time.monotonic()
        reply = node_pb2.ListCallsResponse(node_id=self.node_id, capacity_bytes=self.capacity_bytes)
        caller = current_principal()
        for call in list(self.calls.values()):
            if tenant and call.lease.tenant != tenant:
                continue
            if caller is not OPEN and not caller.covers(_tenant_chain(call.lease)):
                continue  # another tenant's: not shown to this caller
            try:
                stats = self.driver.read_stats(call.cgroup)
            except CgroupError:
                continue  # finished meanwhile
            peak = max(call.peak_bytes, stats.peak_bytes, stats.usage_bytes)
            state = call.phase.value
            if call.frozen or stats.under_oom:
                state = CallPhase.PAUSED.value
            elif call.output_held:
                state = "held"  # see CallStatus.state
            reply.calls.append(
                node_pb2.CallStatus(
                    lease_id=call.lease.lease_id,
                    tenant=call.lease.tenant,
                    session=call.lease.session,
                    command_class=call.lease.command_class,
                    budget_bytes=call.budget_bytes,
                    usage_bytes=stats.usage_bytes,
                    peak_bytes=peak,
                    state=state,
                    grown=call.grown,
                    running_ms=int((now - call.started_s) * 1000),
                    recent_actions=list(call.actions)[-RECENT_ACTIONS:],
                    adopted=call.adopted,
                    output_bytes=call.spool.output_bytes() if call.spool is not None else 0,
                )
            )
        return reply

    # -- Attach ---------------------------------------------------------------------------------

    async def Attach(
        self,
        request: node_pb2.AttachRequest,
        context: grpc.aio.ServicerContext[node_pb2.AttachRequest, node_pb2.AttachResponse],
    ) -> node_pb2.AttachResponse:
        try:
            return await self.attach(request.lease_id, request.pid)
        except AgentcgError as exc:
            await context.abort_with_status(to_status(exc))
        except Exception as exc:
            log.exception("attach failed")
            await context.abort_with_status(to_status(exc))
        raise AssertionError("unreachable: abort_with_status raises")

    async def attach(self, lease_id: str, pid: int) -> node_pb2.AttachResponse:
        """Move process `pid` into the lease's call cgroup (validate -> load -> act)."""
        try:
            lease_id = validate_name("lease_id", lease_id)
        except InvalidNameError as e:
            raise InvalidArgumentError("lease_id", str(e)) from None
        if pid <= 1 or pid == os.getpid():
            raise InvalidArgumentError("pid", f"cannot attach pid {pid}")
        if not os.path.exists(f"/proc/{pid}"):
            raise NotFoundError("process", str(pid), field="pid")
        call = self.calls.get(lease_id)
        created = False
        if call is None:
            lease, tenant, session = await self._fetch_lease(lease_id)
            while (setting_up := self._starting.get(lease_id)) is not None:
                await setting_up.wait()  # a concurrent Exec/Attach is creating its cgroup
            call = self.calls.get(lease_id)  # a concurrent Exec/Attach may have won
        if call is None:
            self._users[(tenant,)] += 1
            self._users[(tenant, session)] += 1
            starting = self._starting[lease_id] = asyncio.Event()
            cg = self._dir(tenant, session, lease_id)
            try:
                budget = lease.budget.memory_bytes
                call = Call(
                    call_id=lease_id,
                    lease=lease,
                    cgroup=cg,
                    cgroup_id=await asyncio.shield(
                        self._io(self._create_call_cgroup, cg, budget, traceparent())
                    ),
                    budget_bytes=budget,
                    adopted=True,
                    trace=otel_context.get_current(),
                )
                await asyncio.shield(self._watch(call, budget))
                self._watch_pause(call)
                # Its events are handled from the move on (it runs; it is not gated).
                self._by_cgroup[call.cgroup_id] = call
                await self._attach_pid(call, pid)
            except BaseException:
                if call is not None:
                    self._by_cgroup.pop(call.cgroup_id, None)
                    self._unwatch(call)
                await asyncio.shield(self._release_dirs(tenant, session, cg))
                raise
            finally:
                del self._starting[lease_id]
                starting.set()
            self.calls[lease_id] = call
            self._by_cgroup[call.cgroup_id] = call
            created = True
            self.metrics.calls_started.inc()
            self._ensure_adopt_poll()
        else:
            authorize_lease(call.lease)
            await self._attach_pid(call, pid)
        log.info(
            "attach pid %d to call %s lease %s tenant %s budget %d%s",
            pid,
            call.call_id,
            lease_id,
            call.lease.tenant,
            call.budget_bytes,
            " (new call)" if created else "",
        )
        return node_pb2.AttachResponse(
            call_id=call.call_id, cgroup_path=str(call.cgroup.path), created=created
        )

    async def _attach_pid(self, call: Call, pid: int) -> None:
        # Watched first: a child forked right after the move is attributed in-kernel.
        self.monitor.add_pid(pid, call.cgroup_id)
        try:
            await asyncio.shield(self._io(self.driver.attach, call.cgroup, pid))
        except CgroupError as exc:
            self.monitor.remove_pid(pid)
            if not os.path.exists(f"/proc/{pid}"):
                raise NotFoundError("process", str(pid), field="pid") from None
            raise FailedPreconditionError(f"pid {pid}: cannot move it: {exc}") from None

    def _ensure_adopt_poll(self) -> None:
        if self._adopt_poll is None or self._adopt_poll.done():
            self._adopt_poll = asyncio.create_task(self._poll_adopted(), name="adopted-calls")

    def _finish(self, call: Call, returncode: int, started: float) -> node_pb2.Exited:
        """Collect the result, tear the cgroup down, report upstream. Idempotent."""
        if call.phase is CallPhase.EXITED:
            raise RuntimeError("finished twice")
        if call.pending is not None:
            call.pending.timer.cancel()
            call.pending = None
        if call.throttle_timer is not None:
            call.throttle_timer.cancel()
            call.throttle_timer = None
        try:
            stats = self.driver.read_stats(call.cgroup)
            call.peak_bytes = max(call.peak_bytes, stats.peak_bytes)
            if stats.oom_kills and not call.kill_reason:
                call.kill_reason = f"kernel OOM kill at budget {call.budget_bytes} bytes"
        except CgroupError as exc:
            log.warning("call %s: cannot read final stats: %s", call.call_id, exc)
        exit_code = 128 - returncode if returncode < 0 else returncode
        # Signalled: the gate's shell itself (killed with the cgroup), or the call under it (the
        # shell exits 128 + signal).
        killed = bool(call.kill_reason) and exit_code > 128
        if killed:
            outcome = types_pb2.OUTCOME_KILLED
            reason = call.kill_reason
        elif call.grown:
            outcome = types_pb2.OUTCOME_GROWN
            reason = f"grown {call.grown} time(s) to {call.budget_bytes} bytes"
        else:
            outcome = types_pb2.OUTCOME_COMPLETED
            reason = ""
        call.phase = CallPhase.EXITED
        self.metrics.call_finished(_OUTCOME_LABEL.get(outcome, "unknown"))
        self.calls.pop(call.lease.lease_id, None)
        self._by_cgroup.pop(call.cgroup_id, None)
        self._unwatch(call)
        call.removed = self._release_dirs(call.lease.tenant, call.lease.session, call.cgroup)
        exited = node_pb2.Exited(
            exit_code=exit_code,
            outcome=outcome,
            peak_bytes=call.peak_bytes,
            budget_bytes=call.budget_bytes,
            reason=reason,
            duration_ms=int((time.monotonic() - started) * 1000),
        )
        if call.spool is not None:
            # Kept for a caller that comes back (Resume), by this agent or the next one.
            self._ended[call.lease.lease_id] = call
            try:
                call.spool.write_exited(exited)
            except OSError as exc:
                log.warning(
                    "call %s: cannot keep its exit in %s: %s", call.call_id, call.spool.dir, exc
                )
        self.uplink.send(
            broker_pb2.NodeMessage(
                finished=broker_pb2.CallFinished(
                    lease_id=call.lease.lease_id,
                    exit_code=exit_code,
                    outcome=outcome,
                    peak_memory_bytes=call.peak_bytes,
                    budget_bytes=call.budget_bytes,
                    reason=reason,
                )
            )
        )
        log.info(
            "end call %s lease %s tenant %s exit %d outcome %s peak %d budget %d",
            call.call_id,
            call.lease.lease_id,
            call.lease.tenant,
            exit_code,
            types_pb2.Outcome.Name(outcome),
            call.peak_bytes,
            call.budget_bytes,
        )
        return exited

    def _create_call_cgroup(self, cg: Cgroup, budget_bytes: int, trace: str) -> int:
        """On the cgroup-I/O thread: a call's cgroup, limited, pausing at its limit (unless
        dry run), labelled with the ``traceparent`` of the RPC that starts it (if traced: an
        agent that re-adopts the call continues its trace); returns its id."""
        self.driver.create(*cg.rel)
        self.driver.set_memory_limit(cg, budget_bytes)
        self.driver.set_pause_at_limit(cg, not self.policy.dry_run)
        if trace:
            try:
                set_label(cg, TRACE_LABEL, trace)
            except CgroupError as exc:  # the call runs; a re-adopted one starts new traces
                log.debug("%s", exc)
        return self.driver.cgroup_id(cg)

    def _release_dirs(self, tenant: str, session: str, cg: Cgroup | None) -> asyncio.Future[None]:
        """Remove the call's cgroup, then session and tenant dirs no other call uses (counted
        here, removed on the cgroup-I/O thread after whatever was submitted before)."""
        unused = []
        for key in ((tenant, session), (tenant,)):
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                unused.append(self._dir(*key))
        return self._io(self._remove_cgroups, cg, unused)

    def _remove_cgroups(self, cg: Cgroup | None, unused: list[Cgroup]) -> None:
        """On the cgroup-I/O thread: kill and remove a call's cgroup, then remove `unused`."""
        if cg is not None:
            try:
                self.driver.kill(cg)  # stray daemonised children die with the call
                self.driver.remove(cg)
            except CgroupError as exc:
                log.error("cannot remove cgroup %s: %s", cg.path, exc)
        for d in unused:
            try:
                self.driver.remove(d)
            except CgroupError as exc:
                log.warning("cannot remove cgroup %s: %s", d.path, exc)

    @staticmethod
    async def _removed(call: Call) -> None:
        if call.removed is not None:
            await asyncio.shield(call.removed)

    # -- restart: re-adopt the calls a previous agent left running -----------------------------

    async def adopt(self) -> int:
        """Take over every call cgroup under the root that still has tasks and a live lease;
        stop the others and remove empty leftovers. An Exec'd call that ended while no agent
        ran is taken over to be finished (its exit status is in its spool). Returns how many
        calls were adopted."""
        try:
            return await self._adopt_all()
        finally:
            self.adopted.set()

    async def _adopt_all(self) -> int:
        adopted = 0
        for tenant in self.driver.children():
            for session in self.driver.children(self._dir(tenant)):
                for call_id in self.driver.children(self._dir(tenant, session)):
                    if await self._adopt_one(tenant, session, call_id):
                        adopted += 1
                if (tenant, session) not in self._users:
                    await self._remove_leftover(None, [self._dir(tenant, session)])
            if (tenant,) not in self._users:
                await self._remove_leftover(None, [self._dir(tenant)])
        for call in list(self.calls.values()):
            if call.adopted:
                self._check_adopted(call)  # those that ended meanwhile end now
        self._recover_ended()
        self._ensure_adopt_poll()
        return adopted

    def _recover_ended(self) -> None:
        """Spools with no call: an ended call whose Exited the previous agent had not handed to
        its caller yet is kept for a Resume (for policy.resume_grace_s); the rest is removed."""
        for lease_id in list_spooled(self.spool_root):
            if lease_id in self.calls or lease_id in self._ended:
                continue
            spool = CallSpool(self.spool_root, lease_id)
            exited = spool.read_exited()
            lease, pid = spool.read_started()
            if lease is not None and lease.node_id != self.node_id:
                continue  # another agent's (a --spool-dir given to two): not ours to touch
            if exited is None or lease is None:
                spool.remove()
                continue
            call = Call(
                call_id=lease_id,
                lease=lease,
                cgroup=self._dir(lease.tenant, lease.session, lease_id),
                cgroup_id=0,
                budget_bytes=exited.budget_bytes,
                phase=CallPhase.EXITED,
                adopted=True,
                spool=spool,
                pid=pid,
                exited=exited,
            )
            call.restore_actions(spool.read_actions())
            self._ended[lease_id] = call
            self._start_unfollowed(call)
            log.info("call %s ended before this agent started: kept for a Resume", lease_id)

    def _dir(self, *names: str) -> Cgroup:
        return Cgroup(rel=names, path=self.driver.root.joinpath(*names))

    async def _remove_leftover(self, cg: Cgroup | None, unused: list[Cgroup]) -> None:
        await asyncio.shield(self._io(self._remove_cgroups, cg, unused))

    async def _adopt_one(self, tenant: str, session: str, call_id: str) -> bool:
        cg = self._dir(tenant, session, call_id)
        try:
            validate_name("tenant", tenant)
            validate_name("session", session)
            validate_name("lease_id", call_id)
            stats = self.driver.read_stats(cg)
        except (InvalidNameError, CgroupError) as exc:
            log.warning("leftover cgroup %s not adoptable: %s", cg.path, exc)
            stats = None
        spool = CallSpool(self.spool_root, call_id) if stats is not None else None
        if spool is not None and not spool.exists():
            spool = None
        if stats is None or not (stats.pids or spool):
            await self._remove_leftover(cg, [])
            if spool is not None:
                spool.remove()
            return False
        now_ms = int(time.time() * 1000)
        try:
            lease = await self._get_lease(call_id, 5, asked_at_unix_ms=now_ms)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                lease = types_pb2.Lease(lease_id=call_id, state=types_pb2.LEASE_STATE_UNSPECIFIED)
            else:
                # Keep it for now: the lease check asks again and stops it if still unknown
                # at this (local) expiry.
                log.warning("lease %s: broker unreachable at adoption: %s", call_id, exc.code())
                lease = types_pb2.Lease(
                    lease_id=call_id,
                    tenant=tenant,
                    session=session,
                    node_id=self.node_id,
                    state=types_pb2.LEASE_STATE_ACTIVE,
                    budget=types_pb2.Resources(memory_bytes=stats.limit_bytes or 0),
                    expires_at_unix_ms=now_ms + self.policy.lease_refresh_margin_ms,
                )
        verdict = on_lease_refresh(
            LeaseView(lease.epoch, 0, node_id=self.node_id), lease_view(lease), now_ms, self.node_id
        )
        if not lease.tenant:  # unknown to the broker: it ends here all the same
            lease.tenant, lease.session = tenant, session
        moved = (lease.tenant, lease.session) != (tenant, session)
        # An Exec'd call that ended while no agent ran is finished (its caller may resume it).
        if stats.pids and (isinstance(verdict, Kill) or moved):
            log.info(
                "stop leftover call %s (%s): %s",
                call_id,
                cg.path,
                getattr(verdict, "reason", "moved"),
            )
            await self._remove_leftover(cg, [])
            if spool is not None:
                spool.remove()
            return False
        # The limit in force is the kernel's (it may have been grown by the previous agent).
        budget = stats.limit_bytes or lease.budget.memory_bytes
        call = Call(
            call_id=call_id,
            lease=lease,
            cgroup=cg,
            cgroup_id=self.driver.cgroup_id(cg),
            budget_bytes=budget,
            peak_bytes=stats.peak_bytes,
            adopted=True,
            trace=parent_context(read_label(cg, TRACE_LABEL)),
            spool=spool,
            pid=spool.read_started()[1] if spool is not None else 0,
        )
        if spool is not None:
            call.restore_actions(spool.read_actions())
            self._start_unfollowed(call)  # until its caller resumes following it
        if budget > lease.budget.memory_bytes:
            call.grown = 1
        self.driver.set_pause_at_limit(cg, not self.policy.dry_run)
        # A throttle the previous agent left has no deadline any more: lifted (a throttle
        # needs one; memory.high alone can stall a call for minutes). So is a freeze (a pause
        # whose ask died with that agent, an output hold): this agent decides both again.
        self.driver.set_memory_throttle(cg, None)
        try:
            self.driver.set_frozen(cg, False)
        except CgroupError as exc:
            log.warning("call %s: could not thaw it at adoption: %s", call_id, exc)
        self._watch_thresholds(call, budget)
        self._watch_pause(call)
        self.monitor.arm(call.cgroup_id)  # at an unknown usage: until its arm threshold is read
        for pid in stats.pids:
            self.monitor.add_pid(pid, call.cgroup_id)
        self.calls[call_id] = call
        self._by_cgroup[call.cgroup_id] = call
        self._users[(tenant,)] += 1
        self._users[(tenant, session)] += 1
        self.metrics.calls_started.inc()
        log.info(
            "adopt call %s lease %s tenant %s session %s budget %d pids %s",
            call_id,
            call_id,
            tenant,
            session,
            budget,
            list(stats.pids)[:8],
        )
        # Tasks may have forked between the read and the watch: add the ones seen since.
        for pid in self.driver.read_stats(cg).pids:
            if pid not in stats.pids:
                self.monitor.add_pid(pid, call.cgroup_id)
        if stats.under_oom:  # paused at its limit while nobody was watching: ask now
            self._on_limit(
                call, MemEvent(EventKind.LIMIT, call.cgroup_id, 0, 0, budget, time.monotonic_ns())
            )
        try:
            await asyncio.shield(self._watch_arming(call, budget))
        except CgroupError:
            pass  # logged; it stays armed
        return True

    async def _poll_adopted(self, interval_s: float = 1.0) -> None:
        """Adopted calls are not our children: their end is seen as an empty cgroup (checked
        on each EXIT event of theirs, and here as a fallback)."""
        while True:
            await asyncio.sleep(interval_s)
            for call in list(self.calls.values()):
                if call.adopted:
                    self._check_adopted(call)

    def _check_adopted(self, call: Call) -> None:
        """End an adopted call whose tasks are gone, or (re-adopted Exec'd call) whose gate
        shell wrote its exit status: tasks it left behind go with its cgroup."""
        if call.phase is CallPhase.EXITED:
            return
        status = call.spool.read_status() if call.spool is not None else None
        if status is None:
            try:
                pids = self.driver.read_stats(call.cgroup).pids
            except CgroupError:
                pids = ()
            if pids:
                return
            if call.spool is not None:  # its shell may have written it and gone meanwhile
                status = call.spool.read_status()
        if status is not None:
            returncode = status
        elif call.spool is not None:
            # The gate's shell wrote nothing: it went with the whole cgroup (killed).
            returncode = -9
            call.kill_reason = call.kill_reason or "killed while no node agent watched it"
        else:
            # The exit code of a process that is not our child is not known: 137 if we killed it.
            returncode = -9 if call.kill_reason else 0
        self._conclude(call, self._finish(call, returncode, call.started_s))

    # -- node-level ---------------------------------------------------------------------------

    def heartbeat(self) -> broker_pb2.Heartbeat:
        """Capacity and what the calls' cgroups use now (measured, not their budgets)."""
        used = 0
        for call in list(self.calls.values()):
            with contextlib.suppress(CgroupError):  # finished meanwhile
                used += self.driver.read_stats(call.cgroup).usage_bytes
        return broker_pb2.Heartbeat(
            capacity=types_pb2.Resources(memory_bytes=self.capacity_bytes),
            used=types_pb2.Resources(memory_bytes=used),
            running_calls=len(self.calls),
            dropped_events=self.uplink.dropped,
        )

    def kill_all(self, reason: str) -> None:
        for call in list(self.calls.values()):
            call.kill_reason = reason
            try:
                self.driver.kill(call.cgroup)
            except CgroupError as exc:
                log.error("call %s: kill failed: %s", call.call_id, exc)
