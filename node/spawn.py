"""Gated spawn: start a tool call that waits at a gate until it sits in its cgroup.

cgroup v1 has no CLONE_INTO_CGROUP, so a call is started under a tiny `sh` that blocks on
its stdin until released. Meanwhile the caller moves the process into its cgroup and registers
its pid with the monitor; then `release` lets `sh` exec the real argv, same pid. No page of the
call is charged, and no child forked, before it is placed and watched.

The gate is stdin on purpose. The obvious alternative, an extra pipe passed as fd 3, cannot
work with `subprocess`: `pass_fds` keeps the parent's fd number (rarely 3), and dash, Debian's
`/bin/sh`, cannot redirect fds above 9. After release the call's stdin is an empty pipe at EOF,
as with /dev/null. If the gate is closed without release (`abort`), `sh` exits 125 without
running the call.

With a ``status_path`` the shell does not exec the call but runs it and writes its exit code
there (128 + signal if a signal ended it) before exiting with the same code: the status
outlives the node agent, so an agent restarted while the call ran still learns how it ended
(the call is no longer its child). The call's pid is then the shell's child, not ``pid``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO

__all__ = [
    "GATE_ABORTED_EXIT",
    "GATE_ARGV0",
    "GATE_RELEASE",
    "GatedProcess",
    "gated_command",
    "spawn_gated",
]

GATE_ARGV0 = "agentcg-call"
GATE_RELEASE = b"\n"
GATE_ABORTED_EXIT = 125
_GATE_SCRIPT = f'read -r _ || exit {GATE_ABORTED_EXIT}; exec "$@"'
# $1 is the status file: run the call, write its exit code there, exit with it.
_GATE_STATUS_SCRIPT = (
    f'read -r _ || exit {GATE_ABORTED_EXIT}; s=$1; shift; "$@"; c=$?; echo "$c" >"$s"; exit "$c"'
)

StdStream = int | IO[bytes] | None


def gated_command(argv: Sequence[str], status_path: str | os.PathLike[str] = "") -> list[str]:
    """argv wrapped so that it runs once one line is written to its stdin, its exit code
    written to ``status_path`` if given (see module doc)."""
    if not argv:
        raise ValueError("gated_command: argv must not be empty")
    if status_path:
        return ["/bin/sh", "-c", _GATE_STATUS_SCRIPT, GATE_ARGV0, os.fspath(status_path), *argv]
    return ["/bin/sh", "-c", _GATE_SCRIPT, GATE_ARGV0, *argv]


class GatedProcess:
    """A started, not yet released tool call. `pid` stays the call's pid after release."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        if process.stdin is None:
            raise ValueError("GatedProcess: the process needs stdin=PIPE as its gate")
        self.process = process
        self._gate: IO[bytes] | None = process.stdin

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def released(self) -> bool:
        return self._gate is None

    def release(self) -> None:
        """Open the gate: the call execs now. A call that already died is not an error."""
        gate = self._take_gate()
        if gate is None:
            return
        try:
            gate.write(GATE_RELEASE)
            gate.flush()
        except BrokenPipeError:
            pass
        finally:
            _close_quietly(gate)

    def abort(self) -> None:
        """Close the gate without releasing: the call never runs (sh exits 125)."""
        gate = self._take_gate()
        if gate is not None:
            _close_quietly(gate)

    def _take_gate(self) -> IO[bytes] | None:
        # Popen.communicate() must not touch the gate (it is not the call's stdin).
        gate, self._gate = self._gate, None
        self.process.stdin = None
        return gate


def spawn_gated(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    stdout: StdStream = None,
    stderr: StdStream = None,
    start_new_session: bool = False,
    status_path: str | os.PathLike[str] = "",
) -> GatedProcess:
    """Start `argv` behind a gate (see module doc); call `release()` once it is placed."""
    process = subprocess.Popen(
        gated_command(argv, status_path),
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=start_new_session,
        close_fds=True,
    )
    return GatedProcess(process)


def _close_quietly(stream: IO[bytes]) -> None:
    try:
        stream.close()
    except BrokenPipeError:
        pass
