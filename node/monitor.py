"""eBPF memory monitor: the typed face of bpf/memwatch.bpf.c. The only module importing bcc.

The BPF program aggregates every memcg charge of a watched cgroup in-kernel and sends only
crossings (soft threshold, first reclaim at the limit, OOM victim, exec, exit) through a ring
buffer. One daemon thread polls it and calls `on_event` with a `MemEvent`.

    python -m agentcg.node.monitor --ebpf        # print the BPF program and its cflags
    python -m agentcg.node.monitor [CGROUP_DIR]  # live demo: print events of a v1 memcg
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import agentcg.bpf

from .btf import VMLINUX_BTF, Btf, BtfError, load_btf

__all__ = [
    "BPF_SOURCE",
    "DropCounts",
    "EventKind",
    "MemEvent",
    "MemoryMonitor",
    "MonitorError",
    "UsageSource",
    "WatchStats",
    "check_header",
    "counter_offsets",
    "describe_program",
    "exit_reports_group_dead",
    "program_cflags",
    "read_header_constants",
    "resolve_usage_source",
    "supported_usage_source",
    "tracepoint_fields",
]

log = logging.getLogger(__name__)

BPF_DIR = Path(agentcg.bpf.__file__).resolve().parent
BPF_SOURCE = BPF_DIR / "memwatch.bpf.c"
BPF_HEADER = BPF_DIR / "memwatch.h"

DEFAULT_MAX_WATCHES = 4096
DEFAULT_MAX_PIDS = 65536
DEFAULT_RINGBUF_PAGES = 16  # 64 KiB: ~1600 events of 40 bytes in flight
DEFAULT_POLL_TIMEOUT_MS = 50  # bounds how long close() waits for the poller
FILTER_SLOTS = 4096  # watch_filter size (power of two)
# The COUNTER program looks at every 2**this-th charge on a CPU (its usage read is absolute, so
# skipping charges loses nothing but up to that many pages of reaction). Armed, it measured
# 19% -> 8.5% on the worst-case MAP_POPULATE loop (an empty program there: 6.6%).
COUNTER_SAMPLE_SHIFT = 4


class EventKind(enum.IntEnum):
    SOFT = 1  # estimated usage crossed the soft threshold
    LIMIT = 2  # a watched task started memcg reclaim: the call hit its budget
    OOM_KILL = 3
    EXEC = 4
    EXIT = 5
    STOP = 6  # SIGSTOP sent in-kernel at the stop threshold
    STOPPED = 7  # a watched process dequeued SIGSTOP: the stop is in effect


class UsageSource(enum.IntEnum):
    """Where the in-kernel usage estimate comes from (values as in bpf/memwatch.h)."""

    # memcg:count_memcg_events PGPGIN - PGPGOUT: ~2 events per page, but one PGPGIN per
    # folio whatever its size: THP and large page-cache folios are undercounted (a 64 MiB
    # read on ext4 showed as ~1 MiB).
    PGPGIN = 1
    # memcg:mod_memcg_lruvec_state, LRU items: pages on the memcg's LRU lists, exact for
    # large folios; ~4 events per page over its life.
    LRU = 2
    # No per-page tracepoint at all: only the limit (reclaim), OOM, exec and exit events; no
    # in-kernel usage estimate and no SOFT events. The cheapest: per-page tracepoints cost every
    # allocation on the host something even when their program returns at once.
    NONE = 3
    # The raw tracepoint memcg count_memcg_events, PGPGIN/PGPGOUT only (~1 event per 4 KiB
    # page): no argument record built per event (the perf path of a TRACEPOINT_PROBE does),
    # and the usage is the memcg's own page counter read at each, exact for large folios and
    # kernel memory. Needs the kernel's BTF for struct offsets. The default.
    COUNTER = 4


# The COUNTER program (attached by the loader while a watch is armed) and its raw tracepoint.
_COUNTER_FN = b"memwatch_counter"
_COUNTER_TP = b"count_memcg_events"

# Preference order when the requested source is not available on this kernel.
_FALLBACK = {
    UsageSource.COUNTER: UsageSource.LRU,
    UsageSource.LRU: UsageSource.NONE,
    UsageSource.PGPGIN: UsageSource.NONE,
}


@dataclass(frozen=True, slots=True)
class MemEvent:
    kind: EventKind
    cgroup_id: int
    pid: int
    usage_bytes: int  # in-kernel estimate: net pages added since the watch (see UsageSource)
    threshold_bytes: int  # soft threshold for SOFT, the budget (limit) for the others
    kernel_time_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns() scale)


@dataclass(frozen=True, slots=True)
class WatchStats:
    usage_bytes: int
    peak_bytes: int
    reclaims: int
    charge_events: int  # usage updates looked at (COUNTER: one charge in 2**COUNTER_SAMPLE_SHIFT)


@dataclass(frozen=True, slots=True)
class DropCounts:
    events: int  # ring buffer full
    pids: int  # pids map full: a forked child went untracked
    malformed: int = 0  # records user space could not decode (size or kind)


class MonitorError(Exception):
    """The BPF program could not be loaded or a map operation failed."""


class _Event(ctypes.Structure):
    # Mirrors struct memwatch_event in bpf/memwatch.h (size checked against MW_EVENT_SIZE).
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("usage_bytes", ctypes.c_uint64),
        ("threshold_bytes", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
    ]


_DEFINE_RE = re.compile(r"^\s*#define\s+(MW_[A-Z0-9_]+)\s+(\d+)\b", re.MULTILINE)


def read_header_constants(text: str) -> dict[str, int]:
    """The `#define MW_NAME <integer>` constants of bpf/memwatch.h."""
    return {name: int(value) for name, value in _DEFINE_RE.findall(text)}


def check_header(constants: dict[str, int]) -> None:
    """Raise MonitorError if the header and this module disagree on kinds or layout."""
    for kind in EventKind:
        seen = constants.get(f"MW_{kind.name}")
        if seen != kind.value:
            raise MonitorError(f"memwatch.h: MW_{kind.name} is {seen}, monitor expects {kind}")
    for source in UsageSource:
        seen = constants.get(f"MW_USAGE_{source.name}")
        if seen != source.value:
            raise MonitorError(f"memwatch.h: MW_USAGE_{source.name} is {seen}, expected {source}")
    size = constants.get("MW_EVENT_SIZE")
    if size != ctypes.sizeof(_Event):
        raise MonitorError(f"memwatch.h: MW_EVENT_SIZE {size} != {ctypes.sizeof(_Event)}")


TRACEFS = Path("/sys/kernel/tracing")
_USAGE_TRACEPOINTS = {
    UsageSource.PGPGIN: "memcg/count_memcg_events",
    UsageSource.LRU: "memcg/mod_memcg_lruvec_state",
    UsageSource.COUNTER: "memcg/count_memcg_events",
}

# The raw tracepoint the COUNTER source attaches to, and the prototype it was written against.
COUNTER_TRACEPOINT = "count_memcg_events"
_COUNTER_ARGS = ("struct mem_cgroup *", "int")
# -D name -> (struct, member path, size in bytes) read by the COUNTER program.
_COUNTER_FIELDS = {
    "MW_OFF_CSS_CGROUP": ("mem_cgroup", "css.cgroup", 8),
    "MW_OFF_CGROUP_KN": ("cgroup", "kn", 8),
    "MW_OFF_KN_ID": ("kernfs_node", "id", 8),
    "MW_OFF_MEMCG_USAGE": ("mem_cgroup", "memory.usage", 8),
}


def counter_offsets(btf: Btf) -> dict[str, int]:
    """The struct offsets of the COUNTER program, from the running kernel's BTF.

    Raises BtfError when a member is missing or has another size, or when the raw tracepoint's
    prototype is not (struct mem_cgroup *, int, <integer>): another kernel's layout.
    """
    args = tuple(btf.raw_tracepoint_args(COUNTER_TRACEPOINT))
    if args[:2] != _COUNTER_ARGS or len(args) != 3:
        raise BtfError(f"raw tracepoint {COUNTER_TRACEPOINT} has arguments {args}")
    offsets: dict[str, int] = {}
    for name, (struct_name, path, size) in _COUNTER_FIELDS.items():
        seen = btf.member_size(struct_name, path)
        if seen != size:
            raise BtfError(f"struct {struct_name}.{path} is {seen} bytes, expected {size}")
        offsets[name] = btf.member_offset(struct_name, path)
    return offsets


EXIT_TRACEPOINT = "sched/sched_process_exit"


def tracepoint_fields(format_text: str) -> set[str]:
    """The field names in a tracepoint's ``format`` file (``field:bool group_dead;`` ...)."""
    names: set[str] = set()
    for line in format_text.splitlines():
        decl = line.strip().partition(";")[0]
        if decl.startswith("field:"):
            names.add(decl.rsplit(None, 1)[-1].partition("[")[0])
    return names


def exit_reports_group_dead(tracefs: Path = TRACEFS) -> bool:
    """Whether ``sched_process_exit`` says when a process's last thread exits (its
    ``group_dead`` field: 6.18 has it, 6.12 does not)."""
    try:
        text = (tracefs / "events" / EXIT_TRACEPOINT / "format").read_text()
    except OSError:
        return False
    return "group_dead" in tracepoint_fields(text)


def _source_available(
    source: UsageSource, tracefs: Path, btf_path: Path
) -> tuple[bool, str, dict[str, int]]:
    tracepoint = _USAGE_TRACEPOINTS.get(source)
    if tracepoint is not None and not (tracefs / "events" / tracepoint).is_dir():
        return False, f"no tracepoint {tracepoint}", {}
    if source is not UsageSource.COUNTER:
        return True, "", {}
    try:
        return True, "", counter_offsets(load_btf(btf_path))
    except BtfError as e:
        return False, f"kernel BTF: {e}", {}


def resolve_usage_source(
    requested: UsageSource, tracefs: Path = TRACEFS, btf_path: Path = VMLINUX_BTF
) -> tuple[UsageSource, dict[str, int]]:
    """The first available source from `requested` down its fallbacks (COUNTER > LRU > NONE;
    PGPGIN > NONE), with the struct offsets it needs (COUNTER only)."""
    source = requested
    while True:
        ok, why, offsets = _source_available(source, tracefs, btf_path)
        if ok:
            return source, offsets
        fallback = _FALLBACK[source]
        log.warning(
            "memwatch: usage source %s unavailable (%s); trying %s", source.name, why, fallback.name
        )
        source = fallback


def supported_usage_source(
    requested: UsageSource, tracefs: Path = TRACEFS, btf_path: Path = VMLINUX_BTF
) -> UsageSource:
    """`requested`, or the first fallback the kernel supports (the memcg tracepoints are newer
    than 6.12: Debian trixie's kernel has vmscan's memcg reclaim ones but no memcg/)."""
    return resolve_usage_source(requested, tracefs, btf_path)[0]


def program_cflags(
    *,
    max_watches: int = DEFAULT_MAX_WATCHES,
    max_pids: int = DEFAULT_MAX_PIDS,
    ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
    page_size: int | None = None,
    usage_source: UsageSource = UsageSource.COUNTER,
    offsets: dict[str, int] | None = None,
    group_dead: bool = False,
) -> list[str]:
    """The program's -D defines. ``group_dead``: the exit tracepoint has that field (a process's
    exit is then its last thread's, not its leader thread's)."""
    if page_size is None:
        page_size = os.sysconf("SC_PAGE_SIZE")
    if page_size <= 0 or page_size & (page_size - 1):
        raise MonitorError(f"page size {page_size} is not a power of two")
    if ringbuf_pages <= 0 or ringbuf_pages & (ringbuf_pages - 1):
        raise MonitorError(f"ringbuf_pages {ringbuf_pages} is not a power of two")
    return [
        f"-I{BPF_DIR}",
        f"-DMAX_WATCHES={max_watches}",
        f"-DMAX_PIDS={max_pids}",
        f"-DMW_PAGE_SHIFT={page_size.bit_length() - 1}",
        f"-DMW_RINGBUF_PAGES={ringbuf_pages}",
        f"-DMW_FILTER_SLOTS={FILTER_SLOTS}",
        f"-DMW_SAMPLE_SHIFT={COUNTER_SAMPLE_SHIFT}",
        f"-DMW_USAGE_SOURCE={int(usage_source)}",
        *(["-DMW_EXIT_GROUP_DEAD=1"] if group_dead else []),
        *(f"-D{name}={value}" for name, value in sorted((offsets or {}).items())),
    ]


def describe_program(cflags: Sequence[str]) -> str:
    """The program as bcc compiles it: cflags, then the header and the source."""
    return (
        f"// cflags: {' '.join(cflags)}\n"
        f"// ---- {BPF_HEADER.name}\n{BPF_HEADER.read_text()}"
        f"// ---- {BPF_SOURCE.name}\n{BPF_SOURCE.read_text()}"
    )


class MemoryMonitor:
    """Loads memwatch, keeps its maps, and delivers its events from one poller thread.

    Map updates (`watch`, `add_pid`, `unwatch`) may be called from any one thread at a time
    (they are serialised by a lock); `on_event` runs on the poller thread and must be quick
    (hand the event to a queue or an event loop).
    """

    def __init__(
        self,
        on_event: Callable[[MemEvent], None],
        *,
        print_program: bool = False,
        max_watches: int = DEFAULT_MAX_WATCHES,
        max_pids: int = DEFAULT_MAX_PIDS,
        ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
        poll_timeout_ms: int = DEFAULT_POLL_TIMEOUT_MS,
        usage_source: UsageSource = UsageSource.COUNTER,
    ) -> None:
        constants = read_header_constants(BPF_HEADER.read_text())
        check_header(constants)
        self._drop_slots = (constants["MW_DROP_EVENTS"], constants["MW_DROP_PIDS"])
        self._on_event = on_event
        self._poll_timeout_ms = poll_timeout_ms
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        try:
            from bcc import BPF
        except ImportError as e:
            raise MonitorError(f"bcc python module not importable: {e}") from e
        source, offsets = resolve_usage_source(usage_source)
        group_dead = exit_reports_group_dead()
        self._bpf: Any = None
        while True:
            self._cflags = program_cflags(
                max_watches=max_watches,
                max_pids=max_pids,
                ringbuf_pages=ringbuf_pages,
                usage_source=source,
                offsets=offsets,
                group_dead=group_dead,
            )
            if print_program:
                print(describe_program(self._cflags))  # the hidden --ebpf flag (as runqlat)
            try:
                # bcc wants the path as bytes (str: DeprecationWarning), the cflags as str.
                self._bpf = BPF(src_file=os.fsencode(BPF_SOURCE), cflags=self._cflags)
                if source is UsageSource.COUNTER:
                    # Verified and attached once now, so a kernel that refuses it falls back
                    # here rather than at the first arming.
                    self._bpf.load_func(_COUNTER_FN, BPF.RAW_TRACEPOINT)
                    self._bpf.attach_raw_tracepoint(tp=_COUNTER_TP, fn_name=_COUNTER_FN)
                    self._bpf.detach_raw_tracepoint(tp=_COUNTER_TP)
                break
            except Exception as e:  # bcc raises bare Exception on compile/load/attach errors
                if self._bpf is not None:
                    self._bpf.cleanup()
                    self._bpf = None
                fallback = _FALLBACK.get(source)
                if fallback is None:
                    raise MonitorError(f"loading {BPF_SOURCE.name} failed: {e}") from e
                # A kernel whose tracepoint or verifier disagrees with what BTF promised: the
                # monitor degrades (down to NONE: no per-page program), it does not fail.
                log.warning(
                    "memwatch: loading with usage source %s failed (%s); trying %s",
                    source.name,
                    e,
                    fallback.name,
                )
                source, offsets = resolve_usage_source(fallback)
        self.usage_source = source
        if source is not usage_source:
            log.warning("memwatch: usage source %s, not %s", source.name, usage_source.name)
        try:
            self._watches: Any = self._bpf[b"watches"]
            self._state: Any = self._bpf[b"watch_state"]
            self._pids: Any = self._bpf[b"pids"]
            self._drops: Any = self._bpf[b"drops"]
            self._filter: Any = self._bpf[b"watch_filter"]
            self._bpf[b"events"].open_ring_buffer(self._on_ringbuf)
        except Exception as e:
            self._bpf.cleanup()
            raise MonitorError(f"opening the maps of {BPF_SOURCE.name} failed: {e}") from e
        self._lock = threading.Lock()
        self._armed: set[int] = set()
        self._counter_attached = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._malformed = 0

    # -- lifecycle --

    def start(self) -> None:
        if self._closed:
            raise MonitorError("monitor is closed")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll_loop, name="memwatch-poll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._bpf.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maps --

    def watch(
        self,
        cgroup_id: int,
        *,
        soft_bytes: int,
        limit_bytes: int,
        stop_bytes: int = 0,
        armed: bool = True,
    ) -> None:
        """Watch a cgroup, or update its thresholds and re-arm its crossings (usage is kept).

        soft_bytes=0 disables the soft threshold. stop_bytes>0: the kernel SIGSTOPs the watched
        process whose charge takes the estimate there (EventKind.STOP, then STOPPED once in
        effect); needs a usage source with an estimate (not NONE).

        armed: with the COUNTER source, the per-page program runs only while at least one
        watch is armed (see `arm`); armed=False leaves arming to the caller, typically on a
        kernel usage threshold below soft/stop (cgroup driver `watch_usage`). The limit, OOM,
        exec and exit events do not depend on arming. Other sources are always armed.
        """
        if soft_bytes < 0 or limit_bytes < 0 or stop_bytes < 0:
            raise ValueError(f"cgroup {cgroup_id}: thresholds must be >= 0")
        key = self._watches.Key(cgroup_id)
        with self._lock:
            try:
                old = self._watches[key]
            except KeyError:
                old = None
            try:
                if old is None:
                    # Counters first (written by the kernel from now on), then the thresholds
                    # and the filter slot that make the handlers look at this cgroup.
                    self._state[key] = self._state.Leaf()
                    self._watches[key] = self._watches.Leaf(soft_bytes, limit_bytes, 0, stop_bytes)
                    self._bump_filter(cgroup_id, +1)
                else:
                    self._watches[key] = self._watches.Leaf(
                        soft_bytes, limit_bytes, old.arm_gen + 1, stop_bytes
                    )
            except Exception as e:  # bcc: "Could not update table: <strerror>"
                raise MonitorError(f"cgroup {cgroup_id}: watch failed: {e}") from e
        if armed:
            self.arm(cgroup_id)

    def arm(self, cgroup_id: int) -> None:
        """Let the per-page program look at this cgroup (attached while any watch is armed)."""
        with self._lock:
            self._armed.add(cgroup_id)
            self._sync_counter()

    def disarm(self, cgroup_id: int) -> None:
        with self._lock:
            self._armed.discard(cgroup_id)
            self._sync_counter()

    @property
    def per_page_attached(self) -> bool:
        """Whether a per-page program is attached now (always, for LRU and PGPGIN)."""
        if self.usage_source is UsageSource.COUNTER:
            return self._counter_attached
        return self.usage_source is not UsageSource.NONE

    def _sync_counter(self) -> None:
        # Under self._lock. Attach/detach is a bpf(2) call on an already verified program.
        if self.usage_source is not UsageSource.COUNTER or self._closed:
            return
        want = bool(self._armed)
        if want == self._counter_attached:
            return
        try:
            if want:
                self._bpf.attach_raw_tracepoint(tp=_COUNTER_TP, fn_name=_COUNTER_FN)
            else:
                self._bpf.detach_raw_tracepoint(tp=_COUNTER_TP)
        except Exception as e:
            what = "attaching" if want else "detaching"
            raise MonitorError(f"{what} memwatch_counter: {e}") from e
        self._counter_attached = want
        log.debug("memwatch: per-page program %s", "attached" if want else "detached")

    def add_pid(self, pid: int, cgroup_id: int) -> None:
        """Attribute process `pid` (and, in-kernel, every process it forks) to a cgroup."""
        with self._lock:
            try:
                self._pids[self._pids.Key(pid)] = self._pids.Leaf(cgroup_id)
            except Exception as e:
                raise MonitorError(f"pid {pid}: add to cgroup {cgroup_id} failed: {e}") from e

    def remove_pid(self, pid: int) -> None:
        with self._lock:
            try:
                del self._pids[self._pids.Key(pid)]
            except KeyError:
                pass

    def unwatch(self, cgroup_id: int) -> None:
        """Forget a cgroup: its thresholds, counters and every pid attributed to it."""
        key = self._watches.Key(cgroup_id)
        with self._lock:
            self._armed.discard(cgroup_id)
            self._sync_counter()
            # Thresholds first: from then on no handler looks at this cgroup.
            try:
                del self._watches[key]
            except KeyError:
                pass
            else:
                self._bump_filter(cgroup_id, -1)
            try:
                del self._state[key]
            except KeyError:
                pass
            stale = [k for k, v in self._pids.items() if v.value == cgroup_id]
            for k in stale:
                try:
                    del self._pids[k]
                except KeyError:
                    pass  # exited meanwhile

    def _bump_filter(self, cgroup_id: int, delta: int) -> None:
        # Only user space writes watch_filter, under self._lock: read-modify-write is safe.
        slot = cgroup_id & (FILTER_SLOTS - 1)
        count = self._filter[slot].value + delta
        self._filter[slot] = self._filter.Leaf(max(0, count))

    def stats(self, cgroup_id: int) -> WatchStats | None:
        try:
            st = self._state[self._state.Key(cgroup_id)]
        except KeyError:
            return None
        return WatchStats(
            usage_bytes=max(0, st.usage_pages) * self._page_size,
            peak_bytes=max(0, st.peak_pages) * self._page_size,
            reclaims=st.reclaims,
            charge_events=st.charge_events,
        )

    def entry_counts(self) -> tuple[int, int]:
        """(watched cgroups, attributed pids): for leak checks."""
        return len(self._watches), len(self._pids)

    def drop_counts(self) -> DropCounts:
        return DropCounts(
            events=int(self._drops[self._drop_slots[0]].value),
            pids=int(self._drops[self._drop_slots[1]].value),
            malformed=self._malformed,
        )

    # -- poller --

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._bpf.ring_buffer_poll(self._poll_timeout_ms)

    def _on_ringbuf(self, _ctx: object, data: int | None, size: int) -> int:
        if data is None or size < ctypes.sizeof(_Event):
            self._malformed += 1
            return 0
        raw = _Event.from_address(data)
        try:
            kind = EventKind(raw.kind)
        except ValueError:
            self._malformed += 1
            return 0
        event = MemEvent(
            kind=kind,
            cgroup_id=raw.cgroup_id,
            pid=raw.pid,
            usage_bytes=raw.usage_bytes,
            threshold_bytes=raw.threshold_bytes,
            kernel_time_ns=raw.ts_ns,
        )
        try:
            self._on_event(event)
        except Exception:
            log.exception("memwatch: on_event failed for %s", event)
        return 0


# --- demo / --ebpf ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agentcg.node.monitor",
        description="Print memwatch events for a v1 memory cgroup directory (a demo).",
    )
    parser.add_argument("cgroup_dir", nargs="?", type=Path, help="v1 memcg directory to watch")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--soft-bytes", type=int, default=64 << 20)
    parser.add_argument("--limit-bytes", type=int, default=0)
    parser.add_argument("--pid", type=int, action="append", default=[], help="attribute a pid")
    parser.add_argument("--seconds", type=float, default=0, help="stop after (0: until ^C)")
    parser.add_argument(
        "--usage-source", choices=[s.name for s in UsageSource], default=UsageSource.COUNTER.name
    )
    args = parser.parse_args(argv)

    source = UsageSource[args.usage_source]
    if args.ebpf:
        source, offsets = resolve_usage_source(source)
        cflags = program_cflags(
            usage_source=source, offsets=offsets, group_dead=exit_reports_group_dead()
        )
        print(describe_program(cflags))
        return 0
    if args.cgroup_dir is None:
        from agentcg.node.cgroup import current_cgroup_dir

        args.cgroup_dir = current_cgroup_dir("memory")
        if args.cgroup_dir is None:
            parser.error("no v1 memory cgroup for this process: give a cgroup directory")
    cgroup_id = os.stat(args.cgroup_dir).st_ino

    def show(event: MemEvent) -> None:
        print(
            f"{event.kernel_time_ns / 1e9:.6f} {event.kind.name:8} cgroup={event.cgroup_id} "
            f"pid={event.pid} usage={event.usage_bytes >> 20}MiB "
            f"threshold={event.threshold_bytes >> 20}MiB",
            flush=True,
        )

    with MemoryMonitor(show, usage_source=source) as monitor:
        monitor.watch(cgroup_id, soft_bytes=args.soft_bytes, limit_bytes=args.limit_bytes)
        for pid in args.pid:
            monitor.add_pid(pid, cgroup_id)
        monitor.start()
        print(f"watching {args.cgroup_dir} (id {cgroup_id}); ^C to stop", flush=True)
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(1.0)
                stats = monitor.stats(cgroup_id)
                if stats is not None:
                    print(
                        f"  usage~{stats.usage_bytes >> 20}MiB peak~{stats.peak_bytes >> 20}MiB"
                        f" charges={stats.charge_events} reclaims={stats.reclaims}",
                        file=sys.stderr,
                        flush=True,
                    )
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
