"""The broker process's own settings. ``--pin-cpus``: its process (event loop, gRPC threads) on
one CPU and its writer process on another, a restarted writer included; bad values are usage
errors. Its gRPC runs without the EventEngine experiments unless the operator set
GRPC_EXPERIMENTS."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from agentcg.broker.main import GRPC_EXPERIMENTS, pin_cpus
from agentcg.clients.cli import app
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from typer.testing import CliRunner

from .test_writer import _writers


@pytest.mark.parametrize(
    ("spec", "allowed", "expected"),
    [
        ("off", {0, 1, 2, 3}, None),
        ("auto", {0, 1, 2, 3}, (2, 3)),  # the last two it may use
        ("auto", {5, 9, 7}, (7, 9)),
        ("auto", {4}, None),  # one CPU: nothing to separate
        ("0,3", {0, 1, 2, 3}, (0, 3)),
        ("3, 1", {0, 1, 2, 3}, (3, 1)),
    ],
)
def test_pin_cpus(spec: str, allowed: set[int], expected: tuple[int, int] | None) -> None:
    assert pin_cpus(spec, allowed) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("1,1", "the two CPUs must differ"),
        ("0,4", "CPU 4 is not one this process may run on [0, 1, 2, 3]"),
        ("0", "expected off, auto or two CPU numbers A,B"),
        ("0,1,2", "expected off, auto or two CPU numbers A,B"),
        ("a,b", "expected off, auto or two CPU numbers A,B"),
        ("-1,2", "expected off, auto or two CPU numbers A,B"),
        ("", "expected off, auto or two CPU numbers A,B"),
    ],
)
def test_bad_pin_cpus(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pin_cpus(spec, {0, 1, 2, 3})


def test_a_bad_pin_cpus_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["broker", "--data-dir", str(tmp_path), "--pin-cpus", "1,1"], terminal_width=200
    )
    assert result.exit_code == 2, result.output
    assert "--pin-cpus" in result.output and "the two CPUs must differ" in result.output
    assert not any(tmp_path.iterdir())  # refused before anything was created


def _cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets of a process's threads."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.timeout(120)
def test_the_broker_and_its_writer_run_on_a_cpu_each(tmp_path: Path) -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    cpus = pin_cpus("auto", allowed)
    # On one CPU "auto" pins nothing: then every thread keeps what it may use.
    loop_cpus, writer_cpus = (allowed, allowed) if cpus is None else ({cpus[0]}, {cpus[1]})
    cluster = LocalCluster(
        tmp_path, nodes=0, log_level="WARNING", broker_args=("--pin-cpus", "auto")
    )
    with cluster:
        broker = cluster.procs["broker"].pid
        assert len(os.listdir(f"/proc/{broker}/task")) > 2  # gRPC's threads too
        assert _cpus(broker) == {frozenset(loop_cpus)}
        writers = _writers(broker)
        assert len(writers) == 1 and _cpus(writers[0]) == {frozenset(writer_cpus)}
        # A writer started after the first one died goes to the same CPU.
        os.kill(writers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _writers(broker) in ([], writers):
            assert time.monotonic() < deadline, "no second writer"
            time.sleep(0.05)
        second = _writers(broker)
        while True:  # its CPU is set once it has read its configuration
            if _cpus(second[0]) == {frozenset(writer_cpus)}:
                break
            assert time.monotonic() < deadline, _cpus(second[0])
            time.sleep(0.05)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("preset", [None, "", "-event_engine_client"])
def test_the_broker_runs_grpc_with_its_experiments_unless_the_operator_set_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str | None
) -> None:
    if preset is None:
        monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    else:
        monkeypatch.setenv("GRPC_EXPERIMENTS", preset)
    cluster = LocalCluster(tmp_path, nodes=0, log_level="WARNING")
    with cluster:
        broker = cluster.procs["broker"].pid  # started again in place: the same process
        expected = GRPC_EXPERIMENTS if preset is None else preset
        assert _environ(broker)["GRPC_EXPERIMENTS"] == expected
        with Client(cluster.broker_address) as client:
            client.set_tenant("t", 1 << 30)
            assert [t.name for t in client.list_tenants()] == ["t"]
        assert "Unknown experiment" not in cluster.log("broker")  # gRPC knows every one named
