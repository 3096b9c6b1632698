"""A tool call's spool: the files its output and its exit go to, so that both outlive the node
agent that started the call. An agent restarted while calls run (``--keep-calls``: an upgrade,
a crash) re-adopts them and a caller resumes following them (NodeAgent.Resume) from the byte
offsets it already has; nothing the call wrote is lost, and no call is run twice.

One directory per call, named by its lease id, under the node's spool root::

    <root>/<lease id>/stdout   the call's output, appended by the call itself (O_APPEND: its
                     /stderr   children write there too); read from an offset, never truncated
                     /lease    its lease and /pid its process, as the node started it
                     /status   its exit code, written by the gate's shell when it ends
                     /exited   the node's final report (an Exited), written when it finished
                     /actions  its enforcement actions (length-prefixed Enforcements), appended
                               as they are taken, so a caller resuming after an agent restart
                               is sent those it missed (ResumeRequest.actions_seen), up to
                               MAX_ACTION_LOG_BYTES; then /actions.last, the newest one

Output a caller has had is freed from the disk as it goes (``OutputTail.free_delivered``: a
hole punched in the file, so offsets stay valid), but for the last ``KEEP_DELIVERED_BYTES``,
which a caller whose stream broke may not have received and asks for again. What the files
still hold (``CallSpool.output_bytes``) is then the output nobody has had yet; the node holds
(freezes) a call that holds more than its limit until its caller has had more of it, as a pipe
makes its writer wait (``enforcement.on_output``). Pages cached on its behalf are charged to
the call's own memory cgroup. The files are removed once its Exited was handed to a caller,
or once no caller came back for it within the node's resume grace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import struct
from pathlib import Path

from agentcg.errors import FailedPreconditionError, InvalidArgumentError
from agentcg.v1 import node_pb2, types_pb2
from google.protobuf.message import DecodeError

__all__ = [
    "KEEP_DELIVERED_BYTES",
    "MAX_ACTION_LOG_BYTES",
    "SPOOL_BASE",
    "CallSpool",
    "OutputTail",
    "default_spool_root",
    "first_kept_byte",
    "list_spooled",
    "punch_hole",
]

log = logging.getLogger(__name__)

SPOOL_BASE = Path("/var/lib/agentcg/spool")
# Output sent to a caller is kept this long behind what was sent: bytes in flight when a stream
# broke (gRPC's flow-control windows hold a few MiB at most) can be asked for again (Resume).
KEEP_DELIVERED_BYTES = 16 << 20
_FREE_STEP_BYTES = 1 << 20  # free in steps of at least this much: one fallocate per MiB sent

# An action log stops growing at this size (over 10,000 actions): a call acted on that often is
# in a loop its caller has long been told about; later actions still go to a caller following
# it, and the newest replaces the one in actions.last, which keeps the numbering going.
MAX_ACTION_LOG_BYTES = 1 << 20
_RECORD = struct.Struct("<I")  # an action record's length, before its bytes

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_STREAMS = (
    ("stdout", node_pb2.Output.STREAM_STDOUT),
    ("stderr", node_pb2.Output.STREAM_STDERR),
)


class CallSpool:
    """The spool directory of one call (see module doc)."""

    def __init__(self, root: Path, lease_id: str) -> None:
        self.dir = root / lease_id
        self.status_path = self.dir / "status"
        self._exited_path = self.dir / "exited"
        self._lease_path = self.dir / "lease"
        self._pid_path = self.dir / "pid"
        self._actions_path = self.dir / "actions"
        self._last_action_path = self.dir / "actions.last"

    def create(self, capture_output: bool) -> tuple[int, int]:
        """Make the directory (and the output files if captured); returns the fds the call's
        stdout and stderr are opened on (os.devnull's when not captured): the caller closes
        them once the call is spawned."""
        self.dir.mkdir(mode=0o700, parents=True)
        if not capture_output:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            return null, os.dup(null)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        out = os.open(self.dir / "stdout", flags, 0o600)
        try:
            err = os.open(self.dir / "stderr", flags, 0o600)
        except BaseException:
            os.close(out)
            raise
        return out, err

    def exists(self) -> bool:
        return self.dir.is_dir()

    def output_bytes(self) -> int:
        """The disk space its output files take now (freed output not counted)."""
        return self.output_written_and_held()[1]

    def output_written_and_held(self) -> tuple[int, int]:
        """What the call has written to its output files, and the disk space they take now
        (``output_bytes``)."""
        written = held = 0
        for name, _ in _STREAMS:
            with contextlib.suppress(OSError):
                st = os.stat(self.dir / name)
                written += st.st_size
                held += st.st_blocks * 512
        return written, held

    def flush_output(self) -> int:
        """Write the output files' cached pages to disk and drop them from the page cache
        (and so from the memory cgroup of the call that wrote them; a later read caches them
        for the reader). Returns how much had been written by then. Blocks on the disk."""
        written = 0
        for name, _ in _STREAMS:
            try:
                fd = os.open(self.dir / name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # not captured
                continue
            try:
                written += os.fstat(fd).st_size
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the clean pages
            finally:
                os.close(fd)
        return written

    def read_status(self) -> int | None:
        """The exit code the gate's shell wrote; None if it did not (still running, or killed
        with the whole cgroup)."""
        try:
            text = self.status_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def write_exited(self, exited: node_pb2.Exited) -> None:
        """Keep the final report (written whole, then renamed into place)."""
        tmp = self._exited_path.with_suffix(".tmp")
        tmp.write_bytes(exited.SerializeToString())
        tmp.replace(self._exited_path)

    def read_exited(self) -> node_pb2.Exited | None:
        try:
            return node_pb2.Exited.FromString(self._exited_path.read_bytes())
        except (OSError, DecodeError):
            return None

    def write_started(self, lease: types_pb2.Lease, pid: int) -> None:
        """The call's lease and pid, for the agent that takes it over."""
        self._lease_path.write_bytes(lease.SerializeToString())
        self._pid_path.write_text(str(pid))

    def read_started(self) -> tuple[types_pb2.Lease | None, int]:
        try:
            lease = types_pb2.Lease.FromString(self._lease_path.read_bytes())
        except (OSError, DecodeError):
            lease = None
        try:
            pid = int(self._pid_path.read_text())
        except (OSError, ValueError):
            pid = 0
        return lease, pid

    def append_action(self, action: node_pb2.Enforcement) -> bool:
        """Add ``action`` to the call's action log (one write, no fsync: the log is for a
        restarted agent, not for a host that crashed); False once the log is full. Then it
        replaces the one action kept after the log (``actions.last``), so that a restarted
        agent numbers on from the newest action, not from the log's end (a caller would see
        two actions with one seq)."""
        record = _RECORD.pack(len(data := action.SerializeToString())) + data
        fd = os.open(
            self._actions_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            if os.fstat(fd).st_size + len(record) <= MAX_ACTION_LOG_BYTES:
                os.write(fd, record)
                return True
        finally:
            os.close(fd)
        fd = os.open(
            self._last_action_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, record)
        finally:
            os.close(fd)
        return False

    def read_actions(self) -> list[node_pb2.Enforcement]:
        """The action log, oldest first, then the newest action if the log was full by then;
        a record cut short (an agent killed mid-write) ends it."""
        actions = _read_records(self._actions_path)
        last = _read_records(self._last_action_path)[:1]
        if last and (not actions or last[0].seq > actions[-1].seq):
            actions += last
        return actions

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free ``length`` bytes of the file from ``offset`` (they read back as zeros; its size and
    the offsets after them are unchanged). False where the file system cannot."""
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def first_kept_byte(fd: int) -> int:
    """The offset of the first byte not freed (the end of the file if all of it was)."""
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past 0: empty, or freed to its end
            return os.fstat(fd).st_size
        raise


class _Stream:
    __slots__ = ("fd", "kind", "offset", "kept_from", "frees")

    def __init__(self, fd: int, kind: node_pb2.Output.Stream.ValueType, offset: int) -> None:
        self.fd = fd
        self.kind = kind
        self.offset = offset  # the next byte to read
        self.kept_from = first_kept_byte(fd)  # the bytes before it were freed
        self.frees = True  # False once the file system refused to free


class OutputTail:
    """Reads a spooled call's stdout and stderr from given byte offsets on, as they grow, and
    frees what it has read (``free_delivered``)."""

    def __init__(self, spool: CallSpool, stdout_offset: int, stderr_offset: int) -> None:
        self._streams: list[_Stream] = []
        try:
            for (name, kind), offset in zip(_STREAMS, (stdout_offset, stderr_offset), strict=True):
                field = f"{name}_offset"
                if offset < 0:
                    raise InvalidArgumentError(field, f"must not be negative (got {offset})")
                try:  # written to as well: freeing is a write (fallocate)
                    fd = os.open(spool.dir / name, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:  # not captured
                    if offset:
                        raise InvalidArgumentError(
                            field, "the call's output is not captured"
                        ) from None
                    continue
                stream = _Stream(fd, kind, offset)
                self._streams.append(stream)
                size = os.fstat(fd).st_size
                if offset > size:
                    raise InvalidArgumentError(
                        field, f"{offset} is past the {size} bytes the call has written"
                    )
                if offset < stream.kept_from:
                    raise FailedPreconditionError(
                        f"{field}: bytes before {stream.kept_from} were delivered and freed "
                        f"(asked from {offset})"
                    )
        except BaseException:
            self.close()
            raise

    def read(self, max_bytes: int) -> list[tuple[node_pb2.Output.Stream.ValueType, bytes]]:
        """What was written since the last read, up to ``max_bytes`` per stream."""
        chunks = []
        for stream in self._streams:
            data = os.pread(stream.fd, max_bytes, stream.offset)
            if data:
                stream.offset += len(data)
                chunks.append((stream.kind, data))
        return chunks

    def free_delivered(self, keep_bytes: int = KEEP_DELIVERED_BYTES) -> None:
        """Free the disk space of what was read, but for the last ``keep_bytes`` of it."""
        for stream in self._streams:
            # Whole steps only: a hole ends on a block boundary, so what SEEK_DATA finds after
            # it (``first_kept_byte``, after a restart too) is exactly where it ends.
            upto = (stream.offset - keep_bytes) // _FREE_STEP_BYTES * _FREE_STEP_BYTES
            if not stream.frees or upto - stream.kept_from < _FREE_STEP_BYTES:
                continue
            if punch_hole(stream.fd, stream.kept_from, upto - stream.kept_from):
                stream.kept_from = upto
            else:
                log.warning("spool: this file system cannot free delivered output; kept whole")
                stream.frees = False

    def close(self) -> None:
        for stream in self._streams:
            with contextlib.suppress(OSError):
                os.close(stream.fd)
        self._streams = []


def default_spool_root(cgroup_root_name: str) -> Path:
    """Where a node agent whose calls live under the cgroup ``cgroup_root_name`` spools them:
    the next agent on that root (same node) finds them there."""
    return SPOOL_BASE / cgroup_root_name


def list_spooled(root: Path) -> list[str]:
    """The lease ids with a spool directory under ``root``."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _read_records(path: Path) -> list[node_pb2.Enforcement]:
    """Length-prefixed Enforcements, up to the first one cut short."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    actions: list[node_pb2.Enforcement] = []
    at = 0
    while at + _RECORD.size <= len(raw):
        (size,) = _RECORD.unpack_from(raw, at)
        at += _RECORD.size
        if at + size > len(raw):
            break
        try:
            actions.append(node_pb2.Enforcement.FromString(raw[at : at + size]))
        except DecodeError:
            break
        at += size
    return actions
