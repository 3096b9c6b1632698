"""Per-tool-call cgroups: one driver Protocol, and its cgroup v1 implementation.

This is the only module that knows control-file names. Everything else talks to a
`CgroupDriver`, chosen once at start-up by `detect_driver`. The v1 driver manages the memory
hierarchy (required) plus cpu, pids and freezer (each if mounted), each rooted at this process's
own cgroup in that hierarchy + a root name, so the node agent nests under whatever cgroup it was
started in.

The `parse_*` functions are pure (text in, values out) and tested against fixture files.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agentcg.names import validate_name

__all__ = [
    "AGENT_LEAF",
    "Cgroup",
    "CgroupDriver",
    "CgroupError",
    "CgroupStats",
    "CgroupV1Driver",
    "CgroupV2Driver",
    "OomControl",
    "current_cgroup_dir",
    "detect_driver",
    "format_cpu_max",
    "parse_cgroup_procs",
    "parse_cgroup_v2_path",
    "parse_flat_keyed",
    "parse_int",
    "parse_memory_limit",
    "parse_mountinfo",
    "parse_oom_control",
    "parse_proc_cgroup",
    "parse_v2_mount",
    "read_label",
    "set_label",
]

log = logging.getLogger(__name__)

CGROUP_FS = Path("/sys/fs/cgroup")
MEMORY = "memory"
OPTIONAL_CONTROLLERS: tuple[str, ...] = ("cpu", "pids", "freezer")

# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on x86-64 with 4 KiB
# pages); any value this large is treated as unlimited.
_V1_UNLIMITED_MIN = 1 << 62
_V1_CFS_PERIOD_US = 100_000
_V1_DEFAULT_SHARES = 1024
_DEFAULT_CPU_WEIGHT = 100  # v2 scale, 1..10000


class CgroupError(Exception):
    """A cgroup operation failed; the message names the cgroup, the file and what was seen."""


@dataclass(frozen=True, slots=True)
class Cgroup:
    """A cgroup managed by a driver: its names below the driver root, and its memory dir."""

    rel: tuple[str, ...]
    path: Path


@dataclass(frozen=True, slots=True)
class CgroupStats:
    usage_bytes: int
    peak_bytes: int
    limit_bytes: int | None  # None: no limit
    oom_kills: int
    under_oom: bool  # a task is paused at the limit (v1 memory.oom_control)
    pids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OomControl:
    oom_kill_disable: bool
    under_oom: bool
    oom_kill: int


class CgroupDriver(Protocol):
    """What the node agent needs from a cgroup version. One implementation per version."""

    @property
    def version(self) -> int: ...

    @property
    def root(self) -> Path: ...

    def create(self, *names: str) -> Cgroup:
        """mkdir -p root/names... (validated first); idempotent. No names: the root itself."""
        ...

    def set_memory_limit(self, cg: Cgroup, limit_bytes: int | None) -> None:
        """Hard memory limit; None removes it."""
        ...

    def set_memory_throttle(self, cg: Cgroup, high_bytes: int | None) -> None:
        """Throttle above this usage (v2 memory.high: reclaim and stall the allocating tasks;
        v1 memory.soft_limit_in_bytes: reclaimed first under host pressure). None removes it.
        Never leave a call throttled without a deadline: memory.high can stall it for minutes."""
        ...

    def read_memory_throttle(self, cg: Cgroup) -> int | None: ...

    def set_pause_at_limit(self, cg: Cgroup, enabled: bool) -> None:
        """Tasks reaching the limit wait (instead of being OOM-killed) until it is raised."""
        ...

    def wake_paused(self, cg: Cgroup) -> None:
        """Wake the tasks waiting at the memory limit so that they charge again (v1: the
        kernel wakes them when the limit is raised, and not otherwise). A no-op where the
        cgroup version pauses otherwise (v2)."""
        ...

    def watch_usage(self, cg: Cgroup, threshold_bytes: int) -> int | None:
        """An eventfd the kernel signals when the cgroup's memory usage crosses threshold_bytes
        (either way), checked by the kernel itself on its charge path at no extra cost (v1
        memory thresholds); the caller owns and closes it (closing unregisters it). None when
        the cgroup version has no such notification (v2)."""
        ...

    def watch_pause(self, cg: Cgroup) -> int | None:
        """An eventfd the kernel signals when a task of the cgroup is paused at its limit
        (v1 memory.oom_control notification with set_pause_at_limit); the caller closes it.
        None when the cgroup version has no such notification (v2)."""
        ...

    def set_cpu(
        self, cg: Cgroup, *, weight: int | None = None, quota_millis: int | None = None
    ) -> None:
        """CPU weight (v2 scale 1..10000, None: default 100), quota in millicores (None: none)."""
        ...

    def set_pids_max(self, cg: Cgroup, n: int | None) -> None: ...

    def set_frozen(self, cg: Cgroup, frozen: bool) -> None:
        """Freeze (stop scheduling) or thaw every task of the cgroup; returns once settled."""
        ...

    def attach(self, cg: Cgroup, pid: int) -> None: ...

    def cgroup_id(self, cg: Cgroup) -> int:
        """The id the BPF program sees for this cgroup's memory charges."""
        ...

    def read_stats(self, cg: Cgroup) -> CgroupStats: ...

    def read_usage(self, cg: Cgroup) -> int:
        """Memory charged to the cgroup now (one control file: cheaper than read_stats)."""
        ...

    def kill(self, cg: Cgroup, *, timeout_s: float = 5.0) -> None:
        """SIGKILL every task of the cgroup and its descendants; return once none is left."""
        ...

    def remove(self, cg: Cgroup) -> None:
        """rmdir the cgroup and its (empty) descendants; already gone is fine; busy raises."""
        ...

    def children(self, cg: Cgroup | None = None) -> list[str]: ...

    def clear(self) -> int:
        """Kill and remove everything under the root (leftovers of an earlier run), the root
        included; return how many cgroups below the root were removed."""
        ...


# --- pure parsers -------------------------------------------------------------------------


def parse_int(text: str, *, what: str = "value") -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise CgroupError(f"{what}: expected an integer, got {text.strip()[:40]!r}") from None


def parse_memory_limit(text: str) -> int | None:
    """memory.limit_in_bytes (v1) or memory.max (v2): bytes, or None for no limit."""
    value = text.strip()
    if value == "max":
        return None
    n = parse_int(value, what="memory limit")
    return None if n >= _V1_UNLIMITED_MIN else n


def parse_oom_control(text: str) -> OomControl:
    """v1 memory.oom_control: 'oom_kill_disable 0\\nunder_oom 0\\noom_kill 0\\n'."""
    fields = _parse_flat_keyed(text, what="memory.oom_control")
    return OomControl(
        oom_kill_disable=fields.get("oom_kill_disable", 0) != 0,
        under_oom=fields.get("under_oom", 0) != 0,
        oom_kill=fields.get("oom_kill", 0),
    )


def parse_cgroup_procs(text: str) -> tuple[int, ...]:
    return tuple(parse_int(line, what="cgroup.procs") for line in text.split() if line)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup -> {controller: path}; the v2 line ('0::/x') is under key ''.

    'name=systemd'-style named hierarchies keep their 'name=' key.
    """
    result: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise CgroupError(f"/proc/self/cgroup: malformed line {line!r}")
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            result[""] = path
            continue
        for controller in controllers.split(","):
            result[controller] = path
    return result


def parse_mountinfo(text: str) -> dict[str, tuple[Path, str]]:
    """/proc/self/mountinfo -> {v1 controller: (mount point, root of the mount)}.

    The root is the cgroup path mounted there ('/' unless a container bind-mounts a subtree).
    """
    result: dict[str, tuple[Path, str]] = {}
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < sep + 4 or sep < 5 or fields[sep + 1] != "cgroup":
            continue
        root = _unescape_mount(fields[3])
        mount_point = Path(_unescape_mount(fields[4]))
        for option in fields[sep + 3].split(","):
            if option in ("rw", "ro") or "=" in option and not option.startswith("name="):
                continue
            result.setdefault(option, (mount_point, root))
    return result


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field) >= i + 4:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse_flat_keyed(text: str, *, what: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise CgroupError(f"{what}: malformed line {line!r}")
        result[parts[0]] = parse_int(parts[1], what=f"{what} {parts[0]}")
    return result


def current_cgroup_dir(
    controller: str,
    *,
    proc_cgroup: str | None = None,
    mountinfo: str | None = None,
) -> Path | None:
    """The directory of this process's cgroup in the v1 hierarchy of `controller`, if mounted."""
    if proc_cgroup is None:
        proc_cgroup = _read_text(Path("/proc/self/cgroup"))
    if mountinfo is None:
        mountinfo = _read_text(Path("/proc/self/mountinfo"))
    own = parse_proc_cgroup(proc_cgroup).get(controller)
    mount = parse_mountinfo(mountinfo).get(controller)
    if own is None or mount is None:
        return None
    mount_point, mount_root = mount
    if mount_root != "/" and (own == mount_root or own.startswith(mount_root + "/")):
        own = own[len(mount_root) :]
    return mount_point.joinpath(*[part for part in own.split("/") if part])


# --- file helpers ---------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError as e:
        raise CgroupError(f"{path}: cannot read: {e.strerror}") from e


def _write_text(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # as the shell's `>`
    except OSError as e:
        raise CgroupError(f"{path}: cannot open for writing: {e.strerror}") from e
    try:
        os.write(fd, value.encode("ascii"))
    except OSError as e:
        raise CgroupError(f"{path}: writing {value!r} failed: {e.strerror}") from e
    finally:
        os.close(fd)


# A label is a trusted.* extended attribute of the cgroup's directory (the memory one on v1):
# kernfs keeps it for as long as the cgroup lives, on v1 and v2 alike (systemd keeps its units'
# invocation ids so), and only a process with CAP_SYS_ADMIN can set it.
_LABEL_PREFIX = "trusted.agentcg."


def set_label(cg: Cgroup, name: str, value: str) -> None:
    """Keep ``value`` with the cgroup, for the agent that re-adopts it after a restart."""
    try:
        os.setxattr(cg.path, _LABEL_PREFIX + name, value.encode("ascii"))
    except OSError as e:
        raise CgroupError(f"cgroup {cg.path}: cannot set label {name}: {e.strerror}") from e


def read_label(cg: Cgroup, name: str) -> str:
    """A label kept by ``set_label``; "" if it has none (or it is not ASCII)."""
    try:
        return os.getxattr(cg.path, _LABEL_PREFIX + name).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return ""


def _mkdir_p(path: Path, stop: Path) -> None:
    """mkdir path and any missing parents below `stop` (which must exist)."""
    try:
        os.mkdir(path)
        return
    except FileExistsError:
        return
    except FileNotFoundError:
        if path == stop or path.parent == path:
            raise
    _mkdir_p(path.parent, stop)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass


# --- cgroup v1 ------------------------------------------------------------------------------


class CgroupV1Driver:
    """cgroup v1: memory (required) + cpu, pids, freezer hierarchies (each if mounted).

    Every hierarchy is rooted at `<this process's cgroup in it>/<root_name>`; `base` overrides
    the memory hierarchy's starting directory.
    """

    version = 1

    def __init__(
        self,
        root_name: str,
        *,
        base: Path | None = None,
        controllers: Iterable[str] = OPTIONAL_CONTROLLERS,
    ) -> None:
        validate_name("cgroup", root_name)
        proc_cgroup = _read_text(Path("/proc/self/cgroup"))
        mountinfo = _read_text(Path("/proc/self/mountinfo"))
        if base is None:
            base = current_cgroup_dir(MEMORY, proc_cgroup=proc_cgroup, mountinfo=mountinfo)
        if base is None or not (base / "memory.limit_in_bytes").exists():
            raise CgroupError(f"no cgroup v1 memory hierarchy for this process (base {base})")
        roots: dict[str, Path] = {MEMORY: base / root_name}
        for controller in controllers:
            if controller == MEMORY:
                continue
            own = current_cgroup_dir(controller, proc_cgroup=proc_cgroup, mountinfo=mountinfo)
            if own is not None and own.is_dir():
                roots[controller] = own / root_name
        self._roots = roots
        self._bases = {c: r.parent for c, r in roots.items()}
        self._root = roots[MEMORY]

    @property
    def root(self) -> Path:
        return self._root

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(self._roots)

    def paths(self, cg: Cgroup | None = None) -> dict[str, Path]:
        """{controller: directory} of a cgroup (default: the root) in every managed hierarchy."""
        rel = () if cg is None else cg.rel
        return {controller: root.joinpath(*rel) for controller, root in self._roots.items()}

    def create(self, *names: str) -> Cgroup:
        for name in names:
            validate_name("cgroup", name)
        for controller, root in self._roots.items():
            path = root.joinpath(*names)
            try:
                _mkdir_p(path, self._bases[controller])
            except OSError as e:
                raise CgroupError(f"cgroup {path}: mkdir failed: {e.strerror}") from e
        return Cgroup(rel=tuple(names), path=self._root.joinpath(*names))

    def set_memory_limit(self, cg: Cgroup, limit_bytes: int | None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"cgroup {cg.path}: memory limit must be >= 0, got {limit_bytes}")
        value = "-1" if limit_bytes is None else str(limit_bytes)
        self._write(cg, MEMORY, "memory.limit_in_bytes", value)

    def set_memory_throttle(self, cg: Cgroup, high_bytes: int | None) -> None:
        if high_bytes is not None and high_bytes < 0:
            raise ValueError(f"cgroup {cg.path}: throttle must be >= 0, got {high_bytes}")
        value = "-1" if high_bytes is None else str(high_bytes)
        self._write(cg, MEMORY, "memory.soft_limit_in_bytes", value)

    def read_memory_throttle(self, cg: Cgroup) -> int | None:
        return parse_memory_limit(_read_text(cg.path / "memory.soft_limit_in_bytes"))

    def set_pause_at_limit(self, cg: Cgroup, enabled: bool) -> None:
        self._write(cg, MEMORY, "memory.oom_control", "1" if enabled else "0")

    def wake_paused(self, cg: Cgroup) -> None:
        # Raising the limit is what wakes the waiters (re-enabling the OOM killer would too,
        # and could kill them): one page up, then back. Should a task have charged that page
        # meanwhile, putting it back fails and the limit stays a page above the budget.
        limit = parse_memory_limit(_read_text(cg.path / "memory.limit_in_bytes"))
        if limit is None:
            return  # unlimited: nothing waits at a limit
        self.set_memory_limit(cg, limit + mmap.PAGESIZE)
        try:
            self.set_memory_limit(cg, limit)
        except CgroupError:
            pass

    def watch_usage(self, cg: Cgroup, threshold_bytes: int) -> int | None:
        if threshold_bytes <= 0:
            raise ValueError(f"cgroup {cg.path}: usage threshold must be > 0")
        return self._event_fd(cg, "memory.usage_in_bytes", f" {threshold_bytes}")

    def watch_pause(self, cg: Cgroup) -> int | None:
        return self._event_fd(cg, "memory.oom_control", "")

    def _event_fd(self, cg: Cgroup, filename: str, args: str) -> int:
        """A v1 memcg notification (cgroup.event_control) on `filename`, as an eventfd."""
        memdir = self._dir(cg, MEMORY)
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            try:
                cfd = os.open(memdir / filename, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CgroupError(f"{memdir}: {filename}: {e.strerror}") from e
            try:
                _write_text(memdir / "cgroup.event_control", f"{efd} {cfd}{args}")
            finally:
                os.close(cfd)
        except BaseException:
            os.close(efd)
            raise
        return efd

    def set_cpu(
        self, cg: Cgroup, *, weight: int | None = None, quota_millis: int | None = None
    ) -> None:
        if weight is not None and not 1 <= weight <= 10_000:
            raise ValueError(f"cgroup {cg.path}: cpu weight must be 1..10000, got {weight}")
        if quota_millis is not None and quota_millis <= 0:
            raise ValueError(f"cgroup {cg.path}: cpu quota must be > 0 millis, got {quota_millis}")
        shares = max(2, (weight or _DEFAULT_CPU_WEIGHT) * _V1_DEFAULT_SHARES // 100)
        self._write(cg, "cpu", "cpu.shares", str(shares))
        self._write(cg, "cpu", "cpu.cfs_period_us", str(_V1_CFS_PERIOD_US))
        # The kernel refuses quotas under 1 ms per period.
        quota_us = (
            -1 if quota_millis is None else max(1000, quota_millis * _V1_CFS_PERIOD_US // 1000)
        )
        self._write(cg, "cpu", "cpu.cfs_quota_us", str(quota_us))

    def set_pids_max(self, cg: Cgroup, n: int | None) -> None:
        if n is not None and n < 0:
            raise ValueError(f"cgroup {cg.path}: pids.max must be >= 0, got {n}")
        self._write(cg, "pids", "pids.max", "max" if n is None else str(n))

    def set_frozen(self, cg: Cgroup, frozen: bool, *, timeout_s: float = 5.0) -> None:
        want = "FROZEN" if frozen else "THAWED"
        self._write(cg, "freezer", "freezer.state", want)
        path = self._dir(cg, "freezer") / "freezer.state"
        deadline = time.monotonic() + timeout_s
        delay_s = 0.0001  # freezing usually settles within a few hundred microseconds
        while (state := _read_text(path).strip()) != want:
            if frozen and state == "FREEZING" and self.read_stats(cg).under_oom:
                # A task waiting at the memory limit (oom_kill_disable) sleeps where the
                # freezer cannot reach it: the cgroup would stay FREEZING until the limit
                # is raised. The kernel holds that task already; leave the others running.
                self._write(cg, "freezer", "freezer.state", "THAWED")
                raise CgroupError(
                    f"cgroup {cg.path}: a task waits at the memory limit and cannot be "
                    "frozen; left thawed"
                )
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {cg.path}: freezer state {state}, wanted {want}")
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.02)

    def attach(self, cg: Cgroup, pid: int) -> None:
        for controller in self._roots:
            self._write(cg, controller, "cgroup.procs", str(pid))

    def cgroup_id(self, cg: Cgroup) -> int:
        try:
            return os.stat(cg.path).st_ino
        except OSError as e:
            raise CgroupError(f"cgroup {cg.path}: stat failed: {e.strerror}") from e

    def read_usage(self, cg: Cgroup) -> int:
        return parse_int(_read_text(cg.path / "memory.usage_in_bytes"), what="usage")

    def read_stats(self, cg: Cgroup) -> CgroupStats:
        d = cg.path
        oom = parse_oom_control(_read_text(d / "memory.oom_control"))
        return CgroupStats(
            usage_bytes=self.read_usage(cg),
            peak_bytes=parse_int(_read_text(d / "memory.max_usage_in_bytes"), what="peak"),
            limit_bytes=parse_memory_limit(_read_text(d / "memory.limit_in_bytes")),
            oom_kills=oom.oom_kill,
            under_oom=oom.under_oom,
            pids=parse_cgroup_procs(_read_text(d / "cgroup.procs")),
        )

    def kill(self, cg: Cgroup, *, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        delay_s = 0.0002
        while True:
            pids = self._subtree_pids(cg)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if "freezer" in self._roots:
                # A frozen task only dies once thawed (thawing a cgroup thaws its subtree).
                try:
                    self._write(cg, "freezer", "freezer.state", "THAWED")
                except CgroupError:
                    pass
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {cg.path}: {len(pids)} task(s) still present {timeout_s}s after "
                    f"SIGKILL: {sorted(pids)[:10]}"
                )
            time.sleep(delay_s)
            delay_s = _kill_poll_delay(delay_s, deadline - timeout_s)

    def remove(self, cg: Cgroup) -> None:
        for controller in reversed(self._roots):
            top = self._dir(cg, controller)
            if not top.is_dir():
                continue
            _rmdir_tree(top)

    def children(self, cg: Cgroup | None = None) -> list[str]:
        return _child_dirs(self._root if cg is None else cg.path)

    def clear(self) -> int:
        return _clear(self)

    # -- helpers --

    def _dir(self, cg: Cgroup, controller: str) -> Path:
        root = self._roots.get(controller)
        if root is None:
            raise CgroupError(f"cgroup {cg.path}: the {controller} controller is not available")
        return root.joinpath(*cg.rel)

    def _write(self, cg: Cgroup, controller: str, filename: str, value: str) -> None:
        _write_text(self._dir(cg, controller) / filename, value)

    def _subtree_pids(self, cg: Cgroup) -> set[int]:
        pids: set[int] = set()
        for dirpath, _, _ in os.walk(cg.path):
            try:
                text = _read_text(Path(dirpath) / "cgroup.procs")
            except CgroupError:
                if not os.path.isdir(dirpath):
                    continue  # removed while walking
                raise
            pids.update(parse_cgroup_procs(text))
        return pids


# --- cgroup v2 ------------------------------------------------------------------------------

V2_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "pids")
_V2_CPU_PERIOD_US = 100_000


def parse_cgroup_v2_path(proc_cgroup: str) -> str | None:
    """The v2 path ('0::/x') of /proc/<pid>/cgroup, if the process has one."""
    return parse_proc_cgroup(proc_cgroup).get("")


def parse_v2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup2 file system in /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) > sep + 1 and fields[sep + 1] == "cgroup2":
            return Path(_unescape_mount(fields[4]))
    return None


def parse_flat_keyed(text: str, *, what: str) -> dict[str, int]:
    """'key value' lines (memory.events, cgroup.events, memory.stat) -> {key: value}."""
    return _parse_flat_keyed(text, what=what)


def format_cpu_max(quota_millis: int | None, period_us: int = _V2_CPU_PERIOD_US) -> str:
    """v2 cpu.max: 'max 100000' or '<quota_us> <period_us>' (at least 1 ms per period)."""
    if quota_millis is None:
        return f"max {period_us}"
    return f"{max(1000, quota_millis * period_us // 1000)} {period_us}"


AGENT_LEAF = "_agent"  # no root name can be it: a validated name starts with a letter or digit


def _leave_for_leaf(base: Path) -> None:
    """Move the processes of ``base`` into its leaf ``AGENT_LEAF`` (made if missing), so that
    ``base`` can delegate controllers to its children; a process that ends meanwhile is
    skipped."""
    pids = _read_text(base / "cgroup.procs").split()
    if not pids:
        return
    leaf = base / AGENT_LEAF
    _mkdir_p(leaf, base)
    for pid in pids:
        try:
            _write_text(leaf / "cgroup.procs", pid)
        except CgroupError:
            if Path(f"/proc/{pid}").exists():
                raise
    log.info(
        "moved %d process(es) of %s into %s (v2: no internal processes)", len(pids), base, leaf
    )


class CgroupV2Driver:
    """cgroup v2: one unified hierarchy; memory, cpu and pids enabled down to each call.

    Rooted at `<this process's v2 cgroup>/<root_name>` (or `base/<root_name>`). v2 forbids
    processes in a cgroup that delegates controllers to children ("no internal processes"), so
    the base must be the v2 root or a delegated cgroup the agent does not itself sit in. Rooted
    at its own cgroup (a systemd unit's with ``Delegate=yes``), the agent first moves the
    cgroup's processes (itself) into the leaf ``AGENT_LEAF`` below it, as systemd asks of a
    delegated unit.

    v2 has no oom_kill_disable. With pause at limit on, the budget is memory.high (allocators
    above it are stalled in reclaim, and that reclaim is the limit event the BPF program sees)
    and memory.max sits a backstop above it; the node then freezes the call (cgroup.freeze)
    while it asks the broker. memory.high alone can stall a call for minutes: the node always
    puts a deadline on it.
    """

    version = 2

    def __init__(
        self,
        root_name: str,
        *,
        base: Path | None = None,
        controllers: Iterable[str] = V2_CONTROLLERS,
        backstop_fraction: float = 0.25,
        min_backstop_bytes: int = 16 << 20,
    ) -> None:
        validate_name("cgroup", root_name)
        if base is None:
            mount = parse_v2_mount(_read_text(Path("/proc/self/mountinfo")))
            own = parse_cgroup_v2_path(_read_text(Path("/proc/self/cgroup")))
            if mount is None or own is None:
                raise CgroupError("no cgroup v2 hierarchy for this process")
            base = mount.joinpath(*[p for p in own.split("/") if p])
            # The root alone may hold processes and delegate; it has no cgroup.type. (A cgroup
            # namespace's root, a container's, is not the root and has one.)
            if (base / "cgroup.type").exists():
                _leave_for_leaf(base)
        if not (base / "cgroup.controllers").exists():
            raise CgroupError(f"{base}: not a cgroup v2 directory (no cgroup.controllers)")
        available = set(_read_text(base / "cgroup.controllers").split())
        wanted = [c for c in controllers if c in available]
        if "memory" not in wanted:
            raise CgroupError(f"{base}: the v2 memory controller is not available ({available})")
        self._controllers = tuple(wanted)
        self._base = base
        self._root = base / root_name
        self._backstop_fraction = backstop_fraction
        self._min_backstop_bytes = min_backstop_bytes
        self._pausing: set[tuple[str, ...]] = set()  # cgroups with pause at limit on
        self._delegating: set[tuple[str, ...]] = set()  # subtree_control written
        self._enable(self._base)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def controllers(self) -> tuple[str, ...]:
        return self._controllers

    def _enable(self, path: Path) -> None:
        """Delegate the controllers to path's children (idempotent in the kernel)."""
        enabled = set(_read_text(path / "cgroup.subtree_control").split())
        missing = [c for c in self._controllers if c not in enabled]
        if not missing:
            return
        try:
            _write_text(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        except CgroupError as e:
            raise CgroupError(
                f"{e}; a v2 cgroup with processes of its own cannot delegate controllers: "
                "start the agent in a leaf and give it a delegated base"
            ) from e

    def create(self, *names: str) -> Cgroup:
        for name in names:
            validate_name("cgroup", name)
        path = self._root.joinpath(*names)
        try:
            _mkdir_p(path, self._base)
        except OSError as e:
            raise CgroupError(f"cgroup {path}: mkdir failed: {e.strerror}") from e
        # Every level above a call delegates the controllers (the root included).
        for depth in range(len(names)):
            rel = tuple(names[:depth])
            if rel not in self._delegating:
                self._enable(self._root.joinpath(*rel))
                self._delegating.add(rel)
        return Cgroup(rel=tuple(names), path=path)

    def _backstop(self, limit_bytes: int) -> int:
        return limit_bytes + max(
            self._min_backstop_bytes, int(limit_bytes * self._backstop_fraction)
        )

    def set_memory_limit(self, cg: Cgroup, limit_bytes: int | None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"cgroup {cg.path}: memory limit must be >= 0, got {limit_bytes}")
        if limit_bytes is None:
            _write_text(cg.path / "memory.max", "max")
            if cg.rel in self._pausing:
                _write_text(cg.path / "memory.high", "max")
            return
        if cg.rel in self._pausing:
            # Raise max before high, lower high before max: high never exceeds max.
            _write_text(cg.path / "memory.max", str(self._backstop(limit_bytes)))
            _write_text(cg.path / "memory.high", str(limit_bytes))
            _write_text(cg.path / "memory.max", str(self._backstop(limit_bytes)))
        else:
            _write_text(cg.path / "memory.max", str(limit_bytes))

    def set_memory_throttle(self, cg: Cgroup, high_bytes: int | None) -> None:
        if high_bytes is not None and high_bytes < 0:
            raise ValueError(f"cgroup {cg.path}: throttle must be >= 0, got {high_bytes}")
        if high_bytes is None and cg.rel in self._pausing:
            # Lifting the throttle goes back to the pause point (the budget), not to none.
            limit = parse_memory_limit(_read_text(cg.path / "memory.max"))
            if limit is not None:
                budget = self._budget_from_backstop(limit)
                _write_text(cg.path / "memory.high", str(budget))
                return
        _write_text(cg.path / "memory.high", "max" if high_bytes is None else str(high_bytes))

    def _budget_from_backstop(self, backstop: int) -> int:
        by_fraction = int(backstop / (1 + self._backstop_fraction))
        if backstop - by_fraction >= self._min_backstop_bytes:
            return by_fraction
        return backstop - self._min_backstop_bytes

    def read_memory_throttle(self, cg: Cgroup) -> int | None:
        return parse_memory_limit(_read_text(cg.path / "memory.high"))

    def _pauses(self, cg: Cgroup, max_bytes: int | None) -> bool:
        """Whether ``cg`` pauses at its budget: set up so here, or (a call cgroup an earlier
        agent set up, being re-adopted) its memory.max sits at the backstop above a memory.high
        no higher than the budget that backstop stands for (a throttle may have lowered it)."""
        if cg.rel in self._pausing:
            return True
        if max_bytes is None:
            return False
        try:
            high = parse_memory_limit(_read_text(cg.path / "memory.high"))
        except CgroupError:
            return False
        if high is None or high >= max_bytes:
            return False
        if self._backstop(high) != max_bytes and high > self._budget_from_backstop(max_bytes):
            return False
        self._pausing.add(cg.rel)
        return True

    def set_pause_at_limit(self, cg: Cgroup, enabled: bool) -> None:
        current = parse_memory_limit(_read_text(cg.path / "memory.max"))
        was = self._pauses(cg, current)
        if enabled == was:
            return
        if enabled:
            self._pausing.add(cg.rel)
            self.set_memory_limit(cg, current)
        else:
            budget = None if current is None else self._budget_from_backstop(current)
            self._pausing.discard(cg.rel)
            _write_text(cg.path / "memory.high", "max")
            self.set_memory_limit(cg, budget)

    def watch_usage(self, cg: Cgroup, threshold_bytes: int) -> int | None:
        return None  # v2 has no usage thresholds (memory.events only reports high/max/oom)

    def wake_paused(self, cg: Cgroup) -> None:
        return None  # nothing waits in the charge path: v2 pauses with the freezer

    def watch_pause(self, cg: Cgroup) -> int | None:
        return None  # v2 pauses with the freezer at memory.high, not in the charge path

    def set_cpu(
        self, cg: Cgroup, *, weight: int | None = None, quota_millis: int | None = None
    ) -> None:
        if weight is not None and not 1 <= weight <= 10_000:
            raise ValueError(f"cgroup {cg.path}: cpu weight must be 1..10000, got {weight}")
        if quota_millis is not None and quota_millis <= 0:
            raise ValueError(f"cgroup {cg.path}: cpu quota must be > 0 millis, got {quota_millis}")
        self._need("cpu", cg)
        _write_text(cg.path / "cpu.weight", str(weight or _DEFAULT_CPU_WEIGHT))
        _write_text(cg.path / "cpu.max", format_cpu_max(quota_millis))

    def set_pids_max(self, cg: Cgroup, n: int | None) -> None:
        if n is not None and n < 0:
            raise ValueError(f"cgroup {cg.path}: pids.max must be >= 0, got {n}")
        self._need("pids", cg)
        _write_text(cg.path / "pids.max", "max" if n is None else str(n))

    def set_frozen(self, cg: Cgroup, frozen: bool, *, timeout_s: float = 5.0) -> None:
        _write_text(cg.path / "cgroup.freeze", "1" if frozen else "0")
        want = 1 if frozen else 0
        deadline = time.monotonic() + timeout_s
        delay_s = 0.0001
        while (
            state := _parse_flat_keyed(
                _read_text(cg.path / "cgroup.events"), what="cgroup.events"
            ).get("frozen", 0)
        ) != want:
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {cg.path}: frozen {state}, wanted {want}")
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.02)

    def attach(self, cg: Cgroup, pid: int) -> None:
        _write_text(cg.path / "cgroup.procs", str(pid))

    def cgroup_id(self, cg: Cgroup) -> int:
        try:
            return os.stat(cg.path).st_ino  # the kernfs id: what the memcg tracepoints report
        except OSError as e:
            raise CgroupError(f"cgroup {cg.path}: stat failed: {e.strerror}") from e

    def read_usage(self, cg: Cgroup) -> int:
        return parse_int(_read_text(cg.path / "memory.current"), what="memory.current")

    def read_stats(self, cg: Cgroup) -> CgroupStats:
        d = cg.path
        usage = self.read_usage(cg)
        try:
            peak = parse_int(_read_text(d / "memory.peak"), what="memory.peak")
        except CgroupError:
            if (d / "memory.peak").exists():
                raise
            peak = usage  # memory.peak is 5.19+
        limit = parse_memory_limit(_read_text(d / "memory.max"))
        events = _parse_flat_keyed(_read_text(d / "memory.events"), what="memory.events")
        under = False
        if limit is not None and self._pauses(cg, limit):
            limit = self._budget_from_backstop(limit)
            under = usage >= limit
        return CgroupStats(
            usage_bytes=usage,
            peak_bytes=max(peak, usage),
            limit_bytes=limit,
            oom_kills=events.get("oom_kill", 0),
            under_oom=under,
            pids=parse_cgroup_procs(_read_text(d / "cgroup.procs")),
        )

    def kill(self, cg: Cgroup, *, timeout_s: float = 5.0) -> None:
        if not cg.path.is_dir():
            return
        if (cg.path / "cgroup.kill").exists():
            _write_text(cg.path / "cgroup.kill", "1")  # the subtree, frozen tasks included
        deadline = time.monotonic() + timeout_s
        delay_s = 0.0002
        while True:
            events = _parse_flat_keyed(_read_text(cg.path / "cgroup.events"), what="cgroup.events")
            if not events.get("populated", 0):
                return
            pids = _subtree_pids(cg.path)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise CgroupError(
                    f"cgroup {cg.path}: {len(pids)} task(s) still present {timeout_s}s after "
                    f"kill: {sorted(pids)[:10]}"
                )
            time.sleep(delay_s)
            delay_s = _kill_poll_delay(delay_s, deadline - timeout_s)

    def remove(self, cg: Cgroup) -> None:
        top = cg.path
        if not top.is_dir():
            return
        _rmdir_tree(top)
        gone = {rel for rel in self._pausing | self._delegating if rel[: len(cg.rel)] == cg.rel}
        self._pausing -= gone
        self._delegating -= gone

    def children(self, cg: Cgroup | None = None) -> list[str]:
        return _child_dirs(self._root if cg is None else cg.path)

    def clear(self) -> int:
        return _clear(self)

    def _need(self, controller: str, cg: Cgroup) -> None:
        if controller not in self._controllers:
            raise CgroupError(f"cgroup {cg.path}: the {controller} controller is not available")


def _subtree_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, _ in os.walk(top):
        try:
            pids.update(parse_cgroup_procs(_read_text(Path(dirpath) / "cgroup.procs")))
        except CgroupError:
            if os.path.isdir(dirpath):
                raise
    return pids


def _rmdir_tree(top: Path) -> None:
    """rmdir a cgroup directory and its descendants, children before parents."""
    for dirpath, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise CgroupError(
                    f"cgroup {dirpath}: cannot remove: still has tasks (EBUSY)"
                ) from e
            raise CgroupError(f"cgroup {dirpath}: rmdir failed: {e.strerror}") from e


def _child_dirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CgroupError(f"cgroup {path}: cannot list: {e.strerror}") from e


def _clear(driver: CgroupDriver) -> int:
    """Kill and remove everything under a driver's root, the root included."""
    root = Cgroup(rel=(), path=driver.root)
    below = sum(len(dirs) for _, dirs, _ in os.walk(driver.root))
    if driver.root.is_dir():
        driver.kill(root)
    driver.remove(root)
    return below


def _kill_poll_delay(delay_s: float, started: float) -> float:
    """Next wait while killed tasks exit: 1 ms steps for the first 100 ms (a paused call takes a
    few ms to die; a doubling backoff overshot that to ~15 ms), then back off to 20 ms."""
    cap = 0.001 if time.monotonic() - started < 0.1 else 0.02
    return min(delay_s * 2, cap)


def detect_driver(root_name: str, *, cgroup_fs: Path = CGROUP_FS) -> CgroupDriver:
    """The driver for this host: v1 when a v1 memory hierarchy is mounted, else v2."""
    if (cgroup_fs / MEMORY / "memory.limit_in_bytes").exists():
        return CgroupV1Driver(root_name)
    if (cgroup_fs / "cgroup.controllers").exists():
        # The agent nests under its own v2 cgroup; a cgroup_fs other than the host's is taken
        # as the base itself (a delegated subtree, or a fixture).
        return CgroupV2Driver(root_name, base=None if cgroup_fs == CGROUP_FS else cgroup_fs)
    raise CgroupError(f"no cgroup v1 memory hierarchy or cgroup v2 root under {cgroup_fs}")


def _check_protocol(v1: CgroupV1Driver, v2: CgroupV2Driver) -> tuple[CgroupDriver, CgroupDriver]:
    return v1, v2  # mypy checks here that both drivers satisfy the Protocol
