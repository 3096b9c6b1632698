"""What the node does about a tool call's memory: pure decisions, no I/O, no clock.

The ladder: running -> (crosses its soft threshold) throttled, for at most a deadline ->
(hits its budget: the kernel pauses it; or still above the threshold at the throttle deadline:
the node freezes it) paused, asking the broker -> grown (resume with a larger budget) or killed
(that one call only). If the broker does not answer by its deadline, the node falls back to its
local rule: kill, or grow from node headroom.

What a call writes to its output is not what it needs: its spool's pages are cached in (charged
to) its memory cgroup until written to disk, and a call printing hundreds of MiB under a small
budget reached its limit with its output alone. Before the ladder asks for more, it has the node
write that output out and drop it from the call's memory (``FlushOutput``), and looks again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agentcg.quantity import format_bytes

__all__ = [
    "AskBroker",
    "CallPhase",
    "CallView",
    "Defer",
    "FLUSH_OUTPUT_MIN_BYTES",
    "FlushOutput",
    "HoldOutput",
    "Ignore",
    "MIN_MAX_OUTPUT_BYTES",
    "Kill",
    "Pause",
    "Recheck",
    "Throttle",
    "Unthrottle",
    "LeaseView",
    "NodePolicy",
    "at_limit",
    "expiry_on_node_clock",
    "Refresh",
    "ReleaseOutput",
    "Resize",
    "Update",
    "Wake",
    "on_deadline",
    "on_denied",
    "on_decision_grow",
    "on_lease_refresh",
    "on_lease_tick",
    "on_limit",
    "on_output",
    "on_pause_notice",
    "on_soft",
    "on_throttle_deadline",
    "soft_threshold",
]


# The smallest output limit: a call is released at half of it, and its spool keeps the last
# 16 MiB its caller had (node.spool.KEEP_DELIVERED_BYTES) plus up to 1 MiB not yet freed.
MIN_MAX_OUTPUT_BYTES = 64 << 20

# A call held at its v1 limit shows usage a little below it: charges come in per-CPU batches of
# up to 64 pages, precharged and counted; a megabyte covers them on any machine size we run.
AT_LIMIT_SLACK_BYTES = 1 << 20

# Output cached in a call's memory (written since the node last flushed it, and still held in
# its spool) from which the node flushes it before asking for more room: below it, a flush (a
# disk write) could not make the room an ask is for.
FLUSH_OUTPUT_MIN_BYTES = 4 << 20


class CallPhase(enum.Enum):
    RUNNING = "running"
    THROTTLED = "throttled"  # above its soft threshold, reclaimed/slowed, until a deadline
    PAUSED = "paused"  # at its budget, waiting for the broker
    KILLED = "killed"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class NodePolicy:
    growth_factor: float = 2.0  # ask for budget x this ...
    min_growth_bytes: int = 32 << 20  # ... but at least this much more
    soft_fraction: float = 0.8  # soft threshold = budget x this
    # The in-kernel per-page accounting of a call runs only while its usage is above
    # soft threshold x this (the kernel's own usage threshold arms it): calls well below their
    # budget cost the host's allocations nothing.
    arm_fraction: float = 0.5
    # In-kernel pause (0: off; needs an in-kernel usage estimate): the kernel SIGSTOPs the
    # process whose charge takes the call to budget x this (bpf_send_signal, microseconds after
    # the crossing, before any reclaim at the limit); the node then freezes the call and asks
    # the broker, as at the limit. Off, the kernel pauses the charging task at the limit itself
    # (v1 oom_kill_disable) after its reclaim retries there (`agentcg bench reaction` pause_*:
    # ~0.7 ms from the first reclaim for a task touching its pages; a charge made outside a
    # user fault, e.g. inside MAP_POPULATE, fails instead and the task pauses at its next fault).
    stop_fraction: float = 0.0
    broker_timeout_s: float = 5.0
    on_timeout: str = "kill"  # "kill" | "grow-local"
    dry_run: bool = False
    # Throttle at the soft threshold, for at most this long (memory.high alone stalled a call
    # for minutes): then pause and ask the broker if still above it, else lift the throttle.
    throttle: bool = True
    throttle_deadline_s: float = 2.0
    lease_check_interval_s: float = 1.0
    lease_refresh_margin_ms: int = 2000  # ask the broker this long before a lease expires
    # A task found waiting below its (raised) limit is woken only if still waiting this much
    # later: a raise wakes it by itself, and it may just not have run since.
    pause_settle_s: float = 0.05
    # An Exec'd call whose caller's stream broke runs on this long for the caller to follow it
    # again (Resume: an agent restart, a dropped connection); then it is stopped. An ended
    # call's exit is kept as long for it.
    resume_grace_s: float = 30.0
    # An Exec'd call whose spooled output takes more of the node's disk than this (0: no limit;
    # else at least MIN_MAX_OUTPUT_BYTES) is held (frozen) until its caller has had enough of
    # it (``on_output``): nobody follows it, or its caller reads slower than it writes (a pipe
    # would have made it wait; a spool file does not).
    max_output_bytes: int = 256 << 20


@dataclass(frozen=True, slots=True)
class CallView:
    lease_id: str
    phase: CallPhase
    budget_bytes: int
    peak_bytes: int
    # Its output in its memory cgroup's page cache, as far as the node can tell (written since
    # it last flushed it, and not yet freed from the spool).
    output_cached_bytes: int = 0


@dataclass(frozen=True, slots=True)
class AskBroker:
    requested_bytes: int


@dataclass(frozen=True, slots=True)
class Recheck:
    """Re-arm the call's limit report and decide again from its usage now."""

    reason: str


@dataclass(frozen=True, slots=True)
class Defer:
    """Look again after ``after_s``."""

    after_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Wake:
    """Wake the call's tasks waiting at its limit: the limit is above their usage already."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str


@dataclass(frozen=True, slots=True)
class FlushOutput:
    """Write the call's spooled output to disk and drop it from the call's memory, then decide
    again from its usage then."""

    reason: str


def _flush_first(call: CallView) -> FlushOutput | None:
    """Its cached output is what takes it there: flush it rather than ask for more."""
    if call.output_cached_bytes < FLUSH_OUTPUT_MIN_BYTES:
        return None
    return FlushOutput(
        f"{format_bytes(call.output_cached_bytes)} of its usage is its output, cached: written "
        "out and dropped from its memory first"
    )


@dataclass(frozen=True, slots=True)
class Resize:
    new_budget_bytes: int
    reason: str


@dataclass(frozen=True, slots=True)
class Kill:
    reason: str


@dataclass(frozen=True, slots=True)
class Throttle:
    high_bytes: int
    deadline_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Unthrottle:
    reason: str


@dataclass(frozen=True, slots=True)
class Pause:
    """Freeze the call and ask the broker for `requested_bytes`."""

    requested_bytes: int
    reason: str


def soft_threshold(budget_bytes: int, policy: NodePolicy) -> int:
    return int(budget_bytes * policy.soft_fraction)


def stop_threshold(budget_bytes: int, policy: NodePolicy) -> int:
    """Usage at which the kernel stops the call in-kernel (0: never)."""
    return int(budget_bytes * policy.stop_fraction) if policy.stop_fraction > 0 else 0


def arm_threshold(budget_bytes: int, policy: NodePolicy) -> int:
    """Usage from which a call's per-page in-kernel accounting runs (at least one page)."""
    return max(4096, int(soft_threshold(budget_bytes, policy) * policy.arm_fraction))


def _growth(budget_bytes: int, policy: NodePolicy) -> int:
    return max(int(budget_bytes * policy.growth_factor), budget_bytes + policy.min_growth_bytes)


def on_limit(
    call: CallView, policy: NodePolicy, event_ns: int = 0, limit_set_ns: int = 0
) -> AskBroker | Recheck | FlushOutput | Ignore:
    """The call hit its budget (and is paused by the kernel): ask the broker for more, unless
    its cached output is what fills it (``FlushOutput``).

    An event from before the limit was last raised (``event_ns`` < ``limit_set_ns``, both
    CLOCK_MONOTONIC) is about the old limit: a grow moves the in-kernel thresholds first and
    the limit after, and a task still reclaiming at the old limit in between reports a hit
    that the grow already answered. Asking on it doubled a budget twice for one spike (64 ->
    128 -> 256 MiB for a 105 MiB peak). It is not simply dropped: that report used the
    watch's one LIMIT report for its budget, so the caller re-arms it and looks at the usage.
    """
    if call.phase not in (CallPhase.RUNNING, CallPhase.THROTTLED):
        return Ignore(f"call is {call.phase.value}")
    if event_ns and event_ns < limit_set_ns:
        return Recheck(f"limit event {(limit_set_ns - event_ns) / 1e6:.1f} ms older than its limit")
    return _flush_first(call) or AskBroker(requested_bytes=_growth(call.budget_bytes, policy))


def on_pause_notice(
    call: CallView, usage_bytes: int, under_oom: bool, policy: NodePolicy, *, settled: bool = False
) -> AskBroker | FlushOutput | Wake | Defer | Ignore:
    """The kernel notified that a task of the call went to wait at its limit (v1 oom_control).

    The LIMIT event (reclaim at the limit) normally comes first and the call is then paused
    with its ask out, so this one is ignored. It matters when nothing is asking for a call that
    is held: its LIMIT report was lost or judged stale, or a limit raise landed while the task
    was on its way into the wait (the kernel wakes waiters when the limit is raised and checks
    no margin when a task starts to wait: it then sleeps below its new limit).

    Held at the limit: ask (or flush its output first), as for a LIMIT event. Waiting below
    it: wake it if it still waits ``pause_settle_s`` later (``settled``). The notice of a wait
    that a raise ended often arrives after that raise, before the woken task has run again.
    """
    if call.phase not in (CallPhase.RUNNING, CallPhase.THROTTLED):
        return Ignore(f"call is {call.phase.value}")
    if not under_oom:
        return Ignore("no task waits at its limit now")
    if not at_limit(usage_bytes, call.budget_bytes):
        if not settled:
            return Defer(policy.pause_settle_s, "a task waits below its limit: not run since?")
        return Wake(
            f"a task still waits at the limit with usage {format_bytes(usage_bytes)} below "
            f"its {format_bytes(call.budget_bytes)} budget"
        )
    return _flush_first(call) or AskBroker(requested_bytes=_growth(call.budget_bytes, policy))


def at_limit(usage_bytes: int, budget_bytes: int) -> bool:
    """Whether a call's usage is at its hard limit (the kernel holds it there, give or take
    the per-CPU charge batches it has precharged)."""
    return usage_bytes >= budget_bytes - AT_LIMIT_SLACK_BYTES


def on_soft(call: CallView, policy: NodePolicy) -> Throttle | Ignore:
    """The call crossed its soft threshold: throttle it there, with a deadline."""
    if not policy.throttle:
        return Ignore("throttling disabled")
    if call.phase is not CallPhase.RUNNING:
        return Ignore(f"call is {call.phase.value}")
    high = soft_threshold(call.budget_bytes, policy)
    return Throttle(
        high,
        policy.throttle_deadline_s,
        f"above {format_bytes(high)} of {format_bytes(call.budget_bytes)}: throttled for at most "
        f"{policy.throttle_deadline_s:g} s",
    )


def on_throttle_deadline(
    call: CallView, usage_bytes: int, policy: NodePolicy
) -> Pause | FlushOutput | Unthrottle | Ignore:
    """The throttle's deadline passed: still above the threshold -> pause and ask the broker
    (its cached output flushed first, when that is what keeps it there); back below it -> lift
    the throttle."""
    if call.phase is not CallPhase.THROTTLED:
        return Ignore(f"call is {call.phase.value}")
    high = soft_threshold(call.budget_bytes, policy)
    if usage_bytes >= high:
        if flush := _flush_first(call):
            return flush
        return Pause(
            _growth(call.budget_bytes, policy),
            f"still at {format_bytes(usage_bytes)} (>= {format_bytes(high)}) after "
            f"{policy.throttle_deadline_s:g} s throttled; asking the broker",
        )
    return Unthrottle(f"back to {format_bytes(usage_bytes)} (< {format_bytes(high)})")


def on_decision_grow(call: CallView, new_budget_bytes: int) -> Resize | Ignore:
    if call.phase is not CallPhase.PAUSED:
        return Ignore(f"call is {call.phase.value}, not waiting for growth")
    if new_budget_bytes <= call.budget_bytes:
        return Ignore(
            f"grow to {format_bytes(new_budget_bytes)} is not above {format_bytes(call.budget_bytes)}"
        )
    return Resize(new_budget_bytes, f"broker grew budget to {format_bytes(new_budget_bytes)}")


def on_denied(call: CallView, at_limit: bool, reason: str) -> Kill | Unthrottle | Ignore:
    """The broker refused growth (or did not answer and the local rule is kill).

    A call held by the kernel at its budget is killed. A call the node paused at its throttle
    deadline is still within its budget: it resumes (the hard limit still holds, and hitting it
    asks again) instead of being killed for using what it was granted.
    """
    if call.phase is not CallPhase.PAUSED:
        return Ignore(f"call is {call.phase.value}")
    if at_limit:
        return Kill(reason)
    return Unthrottle(f"{reason}; resumed within its budget of {format_bytes(call.budget_bytes)}")


def on_deadline(call: CallView, node_free_bytes: int, policy: NodePolicy) -> Resize | Kill | Ignore:
    """The broker did not answer in time: apply the local rule."""
    if call.phase is not CallPhase.PAUSED:
        return Ignore(f"call is {call.phase.value}")
    waited = f"broker did not answer within {policy.broker_timeout_s:g} s"
    if policy.on_timeout == "grow-local":
        requested = _growth(call.budget_bytes, policy)
        if node_free_bytes >= requested - call.budget_bytes:
            return Resize(requested, f"{waited}; grown from node headroom")
    return Kill(
        f"{waited}; budget {format_bytes(call.budget_bytes)}, peak {format_bytes(call.peak_bytes)}"
    )


# --- leases ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseView:
    """What the node knows of a call's lease (or what the broker says of it now)."""

    epoch: int
    expires_at_unix_ms: int  # 0: no expiry
    active: bool = True
    node_id: str = ""
    budget_bytes: int = 0
    state: str = "active"


@dataclass(frozen=True, slots=True)
class Refresh:
    """Ask the broker for the lease (it may have been renewed) before deciding."""

    reason: str


@dataclass(frozen=True, slots=True)
class Update:
    """The broker's newer view of the lease: adopt its epoch, expiry (and budget)."""

    lease: LeaseView
    reason: str


def expiry_on_node_clock(expires_at_unix_ms: int, as_of_unix_ms: int, asked_at_unix_ms: int) -> int:
    """A lease's expiry on this node's clock: the time it had left when the broker answered
    (its expiry less the broker's clock then, ``as_of``), counted from when the node asked.

    Never later than the broker's own expiry (the answer's travel time is counted as spent),
    whatever the two clocks' offset. No expiry (0), or no ``as_of`` (a broker that does not
    say), stays as it is: read on the node's clock, as before."""
    if expires_at_unix_ms <= 0 or as_of_unix_ms <= 0:
        return expires_at_unix_ms
    return asked_at_unix_ms + (expires_at_unix_ms - as_of_unix_ms)


def on_lease_tick(held: LeaseView, now_unix_ms: int, refresh_margin_ms: int) -> Refresh | Ignore:
    """Periodic local check: refresh a lease that expires within the margin (or has expired)."""
    if held.expires_at_unix_ms <= 0:
        return Ignore("lease has no expiry")
    left_ms = held.expires_at_unix_ms - now_unix_ms
    if left_ms > refresh_margin_ms:
        return Ignore(f"lease expires in {left_ms} ms")
    return Refresh(f"lease expires in {left_ms} ms")


def on_lease_refresh(
    held: LeaseView, fresh: LeaseView | None, now_unix_ms: int, node_id: str
) -> Update | Kill | Ignore:
    """The broker's answer (None: unreachable) about a call's lease: keep, update or stop it.

    Stop when the lease is no longer active, was moved to another node, carries an older epoch
    than the one enforced here (the broker's state went back: a fencing violation), or expired
    without renewal. A broker that cannot be reached does not stop a call before its expiry.
    """
    if fresh is None:
        if held.expires_at_unix_ms > 0 and now_unix_ms >= held.expires_at_unix_ms:
            late = now_unix_ms - held.expires_at_unix_ms
            return Kill(f"lease expired {late} ms ago without renewal (broker unreachable)")
        return Ignore("broker unreachable; lease not yet expired")
    if not fresh.active:
        return Kill(f"lease is {fresh.state} at the broker")
    if fresh.node_id and node_id and fresh.node_id != node_id:
        return Kill(f"lease now placed on node {fresh.node_id}, not {node_id}")
    if fresh.epoch < held.epoch:
        return Kill(f"stale epoch: broker has {fresh.epoch}, node enforces {held.epoch}")
    if fresh.expires_at_unix_ms > 0 and now_unix_ms >= fresh.expires_at_unix_ms:
        late = now_unix_ms - fresh.expires_at_unix_ms
        return Kill(f"lease expired {late} ms ago without renewal")
    if fresh == held:
        return Ignore("lease unchanged")
    return Update(fresh, f"lease epoch {fresh.epoch}, expires at {fresh.expires_at_unix_ms}")


@dataclass(frozen=True, slots=True)
class HoldOutput:
    reason: str


@dataclass(frozen=True, slots=True)
class ReleaseOutput:
    reason: str


def on_output(
    held_bytes: int, holding: bool, policy: NodePolicy
) -> HoldOutput | ReleaseOutput | Ignore:
    """A call's spooled output takes ``held_bytes`` of the node's disk (what its callers had is
    freed but for the last KEEP_DELIVERED_BYTES). Above the node's limit the call is held
    (frozen), as a pipe nobody reads makes its writer wait, until its caller has had enough
    to take it to half the limit (a caller that never comes back: the resume grace stops it)."""
    limit = policy.max_output_bytes
    if holding and (limit <= 0 or held_bytes <= limit // 2):
        return ReleaseOutput(
            f"output: {format_bytes(held_bytes)} held, half the node's limit or less: released"
        )
    if not holding and 0 < limit < held_bytes:
        return HoldOutput(
            f"output: {format_bytes(held_bytes)} not yet had by a caller, above the node's "
            f"{format_bytes(limit)}: held until its caller has had more of it"
        )
    return Ignore(f"output: {format_bytes(held_bytes)} held")
