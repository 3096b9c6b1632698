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
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agentcg.names import validate_name

__all__ = [
    "Cgroup",
    "CgroupDriver",
    "CgroupError",
    "CgroupStats",
    "CgroupV1Driver",
    "OomControl",
    "current_cgroup_dir",
    "detect_driver",
    "parse_cgroup_procs",
    "parse_int",
    "parse_memory_limit",
    "parse_mountinfo",
    "parse_oom_control",
    "parse_proc_cgroup",
]

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
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError(f"{path}: cannot open for writing: {e.strerror}") from e
    try:
        os.write(fd, value.encode("ascii"))
    except OSError as e:
        raise CgroupError(f"{path}: writing {value!r} failed: {e.strerror}") from e
    finally:
        os.close(fd)


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

    def read_stats(self, cg: Cgroup) -> CgroupStats:
        d = cg.path
        oom = parse_oom_control(_read_text(d / "memory.oom_control"))
        return CgroupStats(
            usage_bytes=parse_int(_read_text(d / "memory.usage_in_bytes"), what="usage"),
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
            delay_s = min(delay_s * 2, 0.02)

    def remove(self, cg: Cgroup) -> None:
        for controller in reversed(self._roots):
            top = self._dir(cg, controller)
            if not top.is_dir():
                continue
            for dirpath, _, _ in os.walk(top, topdown=False):  # children before parents
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

    def children(self, cg: Cgroup | None = None) -> list[str]:
        path = self._root if cg is None else cg.path
        try:
            return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CgroupError(f"cgroup {path}: cannot list: {e.strerror}") from e

    def clear(self) -> int:
        root = Cgroup(rel=(), path=self._root)
        below = sum(len(dirs) for _, dirs, _ in os.walk(self._root))
        if self._root.is_dir():
            self.kill(root)
        self.remove(root)
        return below

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


def detect_driver(root_name: str, *, cgroup_fs: Path = CGROUP_FS) -> CgroupDriver:
    """The driver for this host: v1 when a v1 memory hierarchy is mounted."""
    if (cgroup_fs / MEMORY / "memory.limit_in_bytes").exists():
        return CgroupV1Driver(root_name)
    if (cgroup_fs / "cgroup.controllers").exists():
        raise NotImplementedError("cgroup v2 driver not yet implemented")
    raise CgroupError(f"no cgroup v1 memory hierarchy or cgroup v2 root under {cgroup_fs}")


def _check_protocol(driver: CgroupV1Driver) -> CgroupDriver:
    return driver  # mypy checks here that CgroupV1Driver satisfies the Protocol
