"""The gated spawn: nothing of the call runs before release, and the pid is the call's pid."""

from __future__ import annotations

import subprocess
import sys

import pytest
from agentcg.node.spawn import GATE_ABORTED_EXIT, gated_command, spawn_gated


def test_gated_command_keeps_argv_verbatim() -> None:
    argv = ["printf", "%s|", "two words", "$HOME", "'quoted'", '"dq"', "a;b"]
    out = subprocess.run(gated_command(argv), input=b"\n", capture_output=True, check=True)
    assert out.stdout == b"two words|$HOME|'quoted'|\"dq\"|a;b|"


def test_gated_command_needs_argv() -> None:
    with pytest.raises(ValueError, match="argv must not be empty"):
        gated_command([])


def test_call_waits_at_the_gate_and_keeps_its_pid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    code = f"import os, pathlib; pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))"
    gated = spawn_gated([sys.executable, "-c", code])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            gated.process.wait(timeout=0.3)
        assert not marker.exists()
        assert not gated.released
        gated.release()
        assert gated.process.wait(timeout=10) == 0
    finally:
        gated.abort()
        if gated.process.poll() is None:
            gated.process.kill()
            gated.process.wait()
    assert marker.read_text() == str(gated.pid)


def test_released_call_sees_stdin_at_eof() -> None:
    gated = spawn_gated(["cat"], stdout=subprocess.PIPE)
    gated.release()
    out, _ = gated.process.communicate(timeout=10)
    assert out == b""
    assert gated.process.returncode == 0


def test_abort_never_runs_the_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "ran"
    gated = spawn_gated(["touch", str(marker)])
    gated.abort()
    assert gated.process.wait(timeout=10) == GATE_ABORTED_EXIT
    assert not marker.exists()
    gated.release()  # no-op after abort


def test_release_after_the_gate_died_is_not_an_error() -> None:
    gated = spawn_gated(["true"])
    gated.process.kill()
    gated.process.wait()
    gated.release()


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["sh", "-c", "exit 3"], 3),
        (["true"], 0),
        (["sh", "-c", "kill -TERM $$"], 128 + 15),  # signalled: 128 + signal, as a shell says
        (["/nonexistent/tool"], 127),
    ],
)
def test_with_a_status_path_the_exit_code_outlives_the_parent(
    tmp_path, argv: list[str], code: int
) -> None:  # type: ignore[no-untyped-def]
    status = tmp_path / "status"
    gated = spawn_gated(argv, status_path=status)
    gated.release()
    assert gated.process.wait(timeout=10) == code
    assert status.read_text() == f"{code}\n"


def test_with_a_status_path_argv_stays_verbatim(tmp_path) -> None:  # type: ignore[no-untyped-def]
    argv = ["printf", "%s|", "two words", "$1", "'quoted'", "a;b"]
    status = tmp_path / "status"
    out = subprocess.run(gated_command(argv, status), input=b"\n", capture_output=True, check=True)
    assert out.stdout == b"two words|$1|'quoted'|a;b|"
    assert status.read_text() == "0\n"


def test_an_aborted_call_writes_no_status(tmp_path) -> None:  # type: ignore[no-untyped-def]
    status = tmp_path / "status"
    gated = spawn_gated(["true"], status_path=status)
    gated.abort()
    assert gated.process.wait(timeout=10) == GATE_ABORTED_EXIT
    assert not status.exists()
