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

The files of a call that nobody follows grow on the node's disk (pages cached on its behalf are
charged to the call's own memory cgroup); they are removed once its Exited was handed to a
caller, or once no caller came back for it within the node's resume grace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from agentcg.errors import InvalidArgumentError
from agentcg.v1 import node_pb2, types_pb2

__all__ = ["SPOOL_BASE", "CallSpool", "OutputTail", "default_spool_root", "list_spooled"]

SPOOL_BASE = Path("/var/lib/agentcg/spool")

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
        except (OSError, ValueError):
            return None

    def write_started(self, lease: types_pb2.Lease, pid: int) -> None:
        """The call's lease and pid, for the agent that takes it over."""
        self._lease_path.write_bytes(lease.SerializeToString())
        self._pid_path.write_text(str(pid))

    def read_started(self) -> tuple[types_pb2.Lease | None, int]:
        try:
            lease = types_pb2.Lease.FromString(self._lease_path.read_bytes())
        except (OSError, ValueError):
            lease = None
        try:
            pid = int(self._pid_path.read_text())
        except (OSError, ValueError):
            pid = 0
        return lease, pid

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class OutputTail:
    """Reads a spooled call's stdout and stderr from given byte offsets on, as they grow."""

    def __init__(self, spool: CallSpool, stdout_offset: int, stderr_offset: int) -> None:
        self._files: list[tuple[int, node_pb2.Output.Stream.ValueType, int]] = []
        try:
            for (name, kind), offset in zip(_STREAMS, (stdout_offset, stderr_offset), strict=True):
                field = f"{name}_offset"
                if offset < 0:
                    raise InvalidArgumentError(field, f"must not be negative (got {offset})")
                try:
                    fd = os.open(spool.dir / name, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # not captured
                    if offset:
                        raise InvalidArgumentError(
                            field, "the call's output is not captured"
                        ) from None
                    continue
                self._files.append((fd, kind, offset))
                size = os.fstat(fd).st_size
                if offset > size:
                    raise InvalidArgumentError(
                        field, f"{offset} is past the {size} bytes the call has written"
                    )
        except BaseException:
            self.close()
            raise

    def read(self, max_bytes: int) -> list[tuple[node_pb2.Output.Stream.ValueType, bytes]]:
        """What was written since the last read, up to ``max_bytes`` per stream."""
        chunks = []
        for i, (fd, kind, offset) in enumerate(self._files):
            data = os.pread(fd, max_bytes, offset)
            if data:
                self._files[i] = (fd, kind, offset + len(data))
                chunks.append((kind, data))
        return chunks

    def close(self) -> None:
        for fd, _, _ in self._files:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files = []


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
