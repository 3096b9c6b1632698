"""An Exec'd tool call outlives its node agent (real broker and node processes, real cgroups,
real BPF): the agent is SIGKILLed, or stopped with --keep-calls, while a call runs under the
SDK's ``run``; a new agent re-adopts the call and the SDK follows it again (the node's Resume).
The caller gets every byte of output exactly once, in order, and the call's own exit code; the
call runs once. A caller that goes away leaves its call running for the node's resume grace.
A lease someone else releases stops its call at once, followed or not.
Output a caller had is freed from the node's disk; a call too far ahead of its caller (or with
none) is held until its caller has had more, as a pipe's writer waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client, Lease, RunResult
from agentcg.v1 import node_pb2, node_pb2_grpc, types_pb2

from ..conftest import wait_until

MiB = 1 << 20
OUT, ERR = node_pb2.Output.STREAM_STDOUT, node_pb2.Output.STREAM_STDERR
LINES = 40  # per stream; the call waits for its go file after half of them
MAX_OUTPUT_MIB = 64  # the node's --max-output
# The budget of a call writing that much: its spool's page cache is charged to it, as the files
# any tool call writes are, up to what it holds (what its caller had is freed).
WRITER_MIB = 256


@pytest.fixture
def cluster(tmp_path: Path, cgroup_write: Path, bcc_available: None) -> Iterator[LocalCluster]:
    # The grace: a caller whose agent restarted finds it again within ~2 s (the SDK looks the
    # node's new address up once a second and retries at most a second apart), on a busy host too.
    args = [
        *("--keep-calls", "--resume-grace", "6", "--spool-dir", str(tmp_path / "spool")),
        *("--max-output", f"{MAX_OUTPUT_MIB}M"),
    ]
    with LocalCluster(tmp_path / "cluster", node_memory="2G", node_args=args) as c:
        yield c
    # Stopped with --keep-calls, the agent leaves its cgroup root: empty, every call done.
    name = f"agentcg-n0-{os.getpid()}"
    root = cgroup_write / name
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())
    others = list(other_roots(name))
    for state in (s for other in others for s in other.rglob("freezer.state")):
        state.write_text("THAWED")  # a call left frozen dies only once thawed (v1)
    remove_tree(root)
    for other in others:
        remove_tree(other)
    assert left == [], f"cgroups left behind: {left}"
    assert spooled(tmp_path) == []


def other_roots(name: str) -> Iterator[Path]:
    """The agent's cgroup root ``name`` in the v1 hierarchies it uses besides memory."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in ("cpu", "pids", "freezer"):
            if controller in controllers.split(","):
                yield Path("/sys/fs/cgroup", controller, path.lstrip("/"), name)


def remove_tree(root: Path) -> None:
    """A cgroup tree's tasks killed, its dirs removed, deepest first."""
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        for pid in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (d / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.02)
        d.rmdir()
    root.rmdir()


def tool(tmp_path: Path) -> list[str]:
    """A tool call that writes numbered lines to stdout and stderr, waits for ``go`` halfway,
    records each start (its pid) and its end, and exits 7."""
    code = f"""
import os, sys, time
with open({str(tmp_path / "starts")!r}, "a") as f:
    f.write(f"{{os.getpid()}}\\n")
for i in range({LINES}):
    if i == {LINES // 2}:
        while not os.path.exists({str(tmp_path / "go")!r}):
            time.sleep(0.01)
    print(f"out {{i}}", flush=True)
    print(f"err {{i}}", file=sys.stderr, flush=True)
    time.sleep(0.01)
open({str(tmp_path / "ended")!r}, "w").close()
sys.exit(7)
"""
    return [sys.executable, "-c", code]


class Caller:
    """``Client.run`` of ``tool`` in a thread, collecting its output."""

    def __init__(self, client: Client, tmp_path: Path, resume_timeout_s: float = 60) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.result: RunResult | BaseException | None = None

        def sink(stream: int, data: bytes) -> None:
            (self.err if stream == ERR else self.out).extend(data)

        def run() -> None:
            try:
                self.result = client.run(
                    "rs",
                    64 * MiB,
                    tool(tmp_path),
                    on_output=sink,
                    resume_timeout_s=resume_timeout_s,
                )
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                self.result = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def wait_output(self, lines: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.out.count(b"\n") < lines or self.err.count(b"\n") < lines:
            assert time.monotonic() < deadline, (bytes(self.out), bytes(self.err), self.result)
            time.sleep(0.02)

    def finish(self, timeout_s: float = 90) -> RunResult:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "run never returned"
        assert isinstance(self.result, RunResult), self.result
        return self.result


def assert_whole_run(caller: Caller, result: RunResult, tmp_path: Path) -> None:
    assert (result.exit_code, result.outcome) == (7, "completed"), result
    assert bytes(caller.out) == b"".join(b"out %d\n" % i for i in range(LINES))
    assert bytes(caller.err) == b"".join(b"err %d\n" % i for i in range(LINES))
    assert len((tmp_path / "starts").read_text().split()) == 1  # it ran once


@pytest.mark.parametrize("how", ["sigkill", "keep-calls-stop"])
def test_an_execd_call_outlives_its_node_agent(
    cluster: LocalCluster, client: Client, tmp_path: Path, how: str
) -> None:
    caller = Caller(client, tmp_path)
    caller.wait_output(LINES // 2)
    cluster.stop("node0", sig=signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    assert not (tmp_path / "ended").exists()
    cluster.start_node(0)  # on another port: the SDK asks the broker where it is now
    assert "re-adopted 1 running call" in cluster.log("node0")
    (tmp_path / "go").touch()
    result = caller.finish()
    assert_whole_run(caller, result, tmp_path)
    assert f"resume call {result.lease_id}" in cluster.log("node0")
    lease = client.get_lease(result.lease_id)
    assert (lease.state, lease.outcome) == ("released", "completed")


def test_a_call_that_ends_while_no_agent_runs_reports_its_own_exit(
    cluster: LocalCluster, client: Client, tmp_path: Path
) -> None:
    caller = Caller(client, tmp_path)
    caller.wait_output(LINES // 2)
    cluster.stop("node0", sig=signal.SIGKILL)
    (tmp_path / "go").touch()
    deadline = time.monotonic() + 30
    while not (tmp_path / "ended").exists():
        assert time.monotonic() < deadline, "the call did not go on without its agent"
        time.sleep(0.02)
    time.sleep(0.2)  # and exited: its gate shell wrote the status
    cluster.start_node(0)
    result = caller.finish()
    # Its exit code came from the status its gate shell wrote while no agent ran.
    assert_whole_run(caller, result, tmp_path)


def output_of(events: list[node_pb2.ExecEvent], stream: int) -> bytes:
    return b"".join(
        e.output.data for e in events if e.HasField("output") and e.output.stream == stream
    )


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.broker_address) as c:
        c.set_tenant("rs", 1024 * MiB)
        yield c


@pytest.fixture
def node(cluster: LocalCluster) -> Iterator[node_pb2_grpc.NodeAgentStub]:
    """The node's own API, as a caller without the SDK sees it."""
    with grpc.insecure_channel(cluster.node_addresses[0]) as channel:
        yield node_pb2_grpc.NodeAgentStub(channel)


def start(
    client: Client, node: node_pb2_grpc.NodeAgentStub, argv: list[str], memory_mib: int = 64
) -> tuple[Lease, Iterator[node_pb2.ExecEvent]]:
    """Reserve and Exec ``argv`` with its output captured: the lease and the stream."""
    lease = client.reserve("rs", memory_mib * MiB)
    request = node_pb2.ExecRequest(lease_id=lease.lease_id, argv=argv, capture_output=True)
    return lease, node.Exec(request)


def test_a_caller_that_goes_away_has_the_resume_grace_to_come_back(
    cluster: LocalCluster, client: Client, node: node_pb2_grpc.NodeAgentStub, tmp_path: Path
) -> None:
    lease, stream = start(client, node, tool(tmp_path))
    got = bytearray()
    for ev in stream:
        if ev.HasField("output") and ev.output.stream == OUT:
            got.extend(ev.output.data)
        if got.count(b"\n") >= 3:
            break
    stream.cancel()  # the caller goes away with the call half done
    time.sleep(1.0)
    assert not (tmp_path / "ended").exists()
    (tmp_path / "go").touch()
    # Back within the grace, from the stdout it had (and no stderr): the rest, once.
    resumed = list(
        node.Resume(node_pb2.ResumeRequest(lease_id=lease.lease_id, stdout_offset=len(got)))
    )
    assert resumed[0].started.resumed and resumed[0].started.call_id == lease.lease_id
    assert bytes(got) + output_of(resumed, OUT) == b"".join(b"out %d\n" % i for i in range(LINES))
    assert output_of(resumed, ERR) == b"".join(b"err %d\n" % i for i in range(LINES))
    assert resumed[-1].exited.exit_code == 7
    # Delivered: the call and its spool are gone.
    with pytest.raises(grpc.RpcError) as gone:
        list(node.Resume(node_pb2.ResumeRequest(lease_id=lease.lease_id)))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert spooled(tmp_path) == []

    # A caller that does not come back: its call is stopped once the grace is over.
    (tmp_path / "go").unlink()
    (tmp_path / "ended").unlink()
    other, stream = start(client, node, tool(tmp_path))
    assert next(stream).started.pid > 0
    stream.cancel()
    deadline = time.monotonic() + 30
    while (after := client.get_lease(other.lease_id)).state == "active":
        assert time.monotonic() < deadline, "an unfollowed call was never stopped"
        time.sleep(0.1)
    assert after.outcome == "killed", after
    assert not (tmp_path / "ended").exists()
    assert "its caller did not follow it again within 6 s" in cluster.log("node0")
    # How it ended is kept for as long: a caller that comes back late still learns it.
    [started, *_, last] = node.Resume(node_pb2.ResumeRequest(lease_id=other.lease_id))
    assert started.started.resumed and last.exited.outcome == types_pb2.OUTCOME_KILLED
    assert "did not follow it again" in last.exited.reason, last.exited
    assert spooled(tmp_path) == []


def test_a_caller_that_gives_up_on_its_call_has_it_stopped_before_the_grace(
    client: Client, node: node_pb2_grpc.NodeAgentStub, tmp_path: Path
) -> None:
    """An agent framework cancels a tool call's ``run`` (its own timeout): the SDK releases the
    lease and the broker gives its budget to others. The call must not run on for the resume
    grace meant for a caller that comes back: the node asks about the lease of every call
    nobody follows and stops this one as released."""
    seen = threading.Event()
    run = asyncio.run_coroutine_threadsafe(
        client._async.run("rs", 64 * MiB, tool(tmp_path), on_output=lambda s, d: seen.set()),
        client._loop,
    )
    assert seen.wait(60), run
    [call] = node.ListCalls(node_pb2.ListCallsRequest(tenant="rs")).calls
    run.cancel()  # the caller gives up: its task is cancelled, the SDK releases the lease
    wait_until(lambda: client.get_lease(call.lease_id).state == "released", "the release")
    wait_until(
        lambda: not node.ListCalls(node_pb2.ListCallsRequest(tenant="rs")).calls,
        "the call stopped",
        timeout_s=30,
    )
    [started, *_, last] = node.Resume(node_pb2.ResumeRequest(lease_id=call.lease_id))
    assert started.started.resumed
    assert last.exited.outcome == types_pb2.OUTCOME_KILLED, last.exited
    # Stopped for its lease (released), not at the end of the grace (6 s).
    assert "lease is released at the broker" in last.exited.reason, last.exited
    assert not (tmp_path / "ended").exists()
    [pid] = (tmp_path / "starts").read_text().split()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), "the call's process reaped")
    assert spooled(tmp_path) == []


@pytest.mark.parametrize("how", ["release", "release_batch"])
def test_a_lease_released_under_a_followed_call_stops_it_at_once(
    cluster: LocalCluster,
    client: Client,
    node: node_pb2_grpc.NodeAgentStub,
    tmp_path: Path,
    how: str,
) -> None:
    """Someone else releases the lease of a call its caller still follows (an operator, the
    orchestrator's own clean-up): the broker has given the budget to others, so the call must
    stop now. The node's lease check would see it only near the lease's expiry (10 minutes by
    default); the broker pushes the release on the node's stream (LeaseUpdate)."""
    lease = client.reserve("rs", 64 * MiB)
    request = node_pb2.ExecRequest(
        lease_id=lease.lease_id, argv=tool(tmp_path), capture_output=True
    )
    # Still followed, the Exec stream ends with the call stopped, long before the lease expires
    # (the old node stopped it 2 s before: this deadline ran out first).
    events = iter(node.Exec(request, timeout=60))
    got = bytearray()
    while got.count(b"\n") < 3:
        ev = next(events)
        if ev.HasField("output") and ev.output.stream == OUT:
            got.extend(ev.output.data)
    if how == "release":
        client.release(lease.lease_id)
    else:
        [released] = client.release_batch([lease.lease_id])
        assert released.state == "released"
    *_, last = events
    assert last.HasField("exited"), last
    assert last.exited.outcome == types_pb2.OUTCOME_KILLED, last.exited
    assert "lease is released at the broker" in last.exited.reason, last.exited
    assert not (tmp_path / "ended").exists()
    [pid] = (tmp_path / "starts").read_text().split()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), "the call's process reaped")
    told = f"lease {lease.lease_id} tenant rs released: sent to node n0-{os.getpid()}, which asked"
    assert told in cluster.log("broker")
    assert lease.expires_at_unix_ms - time.time() * 1000 > 300_000  # still minutes to go
    assert client.get_lease(lease.lease_id).state == "released"


def test_resume_refuses_bad_requests_and_the_node_goes_on(
    client: Client, node: node_pb2_grpc.NodeAgentStub, tmp_path: Path
) -> None:
    lease, stream = start(client, node, tool(tmp_path))
    assert next(stream).HasField("started")
    cases = [
        (node_pb2.ResumeRequest(lease_id="../x"), grpc.StatusCode.INVALID_ARGUMENT, "lease_id"),
        (node_pb2.ResumeRequest(lease_id="nope"), grpc.StatusCode.NOT_FOUND, "lease_id"),
        (
            node_pb2.ResumeRequest(lease_id=lease.lease_id, stdout_offset=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stdout_offset",
        ),
        (
            node_pb2.ResumeRequest(lease_id=lease.lease_id, stderr_offset=1 << 40),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stderr_offset",
        ),
        (
            node_pb2.ResumeRequest(lease_id=lease.lease_id, actions_seen=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "actions_seen",
        ),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.RpcError) as refused:
            list(node.Resume(request))
        assert refused.value.code() == code, refused.value
        assert (refused.value.details() or "").startswith(field), refused.value
    # The call and its first follower were not disturbed.
    (tmp_path / "go").touch()
    events = list(stream)
    assert events[-1].exited.exit_code == 7
    assert output_of(events, OUT).count(b"\n") == output_of(events, ERR).count(b"\n") == LINES


def test_exec_refuses_what_the_kernel_cannot_take_and_loses_nothing(
    client: Client, node: node_pb2_grpc.NodeAgentStub, tmp_path: Path
) -> None:
    lease = client.reserve("rs", 64 * MiB)
    ok = ["sh", "-c", "echo fine"]
    bad = [
        (node_pb2.ExecRequest(lease_id=lease.lease_id), "argv"),
        (node_pb2.ExecRequest(lease_id=lease.lease_id, argv=["echo", "a\0b"]), "argv"),
        (node_pb2.ExecRequest(lease_id=lease.lease_id, argv=ok, env={"A=B": "1"}), "env"),
        (node_pb2.ExecRequest(lease_id=lease.lease_id, argv=ok, env={"A": "\0"}), "env"),
        (node_pb2.ExecRequest(lease_id=lease.lease_id, argv=ok, cwd="/tmp\0x"), "cwd"),
        (node_pb2.ExecRequest(lease_id=lease.lease_id, argv=ok, cwd="/nonexistent"), "cwd"),
        (node_pb2.ExecRequest(lease_id="../up", argv=ok), "lease_id"),
    ]
    for request, field in bad:
        with pytest.raises(grpc.RpcError) as refused:
            list(node.Exec(request))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        assert (refused.value.details() or "").startswith(field), refused.value
    # Nothing was started or lost: the lease still holds and runs a call.
    assert client.get_lease(lease.lease_id).state == "active"
    assert spooled(tmp_path) == []
    request = node_pb2.ExecRequest(lease_id=lease.lease_id, argv=ok, capture_output=True)
    events = list(node.Exec(request))
    assert events[-1].exited.exit_code == 0
    assert output_of(events, OUT) == b"fine\n"


def writer(tmp_path: Path, mib: int, pace_s: float = 0.0) -> list[str]:
    """A tool call that writes ``mib`` MiB to stdout (MiB i all of byte i % 251, one each
    ``pace_s``), then waits for ``go`` and exits 0."""
    code = f"""
import os, sys, time
for i in range({mib}):
    sys.stdout.buffer.write(bytes([i % 251]) * {MiB})
    sys.stdout.flush()
    time.sleep({pace_s})
while not os.path.exists({str(tmp_path / "go")!r}):
    time.sleep(0.01)
"""
    return [sys.executable, "-c", code]


def written(mib: int) -> bytes:
    return b"".join(bytes([i % 251]) * MiB for i in range(mib))


def spool_bytes(tmp_path: Path, lease: Lease) -> int:
    """The disk space the call's stdout takes in the node's spool."""
    return (tmp_path / "spool" / lease.lease_id / "stdout").stat().st_blocks * 512


def start_unfollowed_until_held(
    cluster: LocalCluster, client: Client, node: node_pb2_grpc.NodeAgentStub, argv: list[str]
) -> Lease:
    """Exec ``argv``, go away once it started, and wait for the node to hold it."""
    lease, stream = start(client, node, argv, WRITER_MIB)
    assert next(stream).started.pid > 0
    stream.cancel()
    wait_until(lambda: f"hold call {lease.lease_id}" in cluster.log("node0"), "never held")
    return lease


def test_output_is_freed_once_had_and_a_call_too_far_ahead_of_its_caller_waits(
    cluster: LocalCluster, client: Client, node: node_pb2_grpc.NodeAgentStub, tmp_path: Path
) -> None:
    limit = MAX_OUTPUT_MIB * MiB
    # Followed: 160 MiB as fast as it can write, through a node that holds at most 64 MiB.
    # The caller gets every byte, once; the spool keeps only the last 16 MiB it had.
    mib = 160
    lease, stream = start(client, node, writer(tmp_path, mib), WRITER_MIB)
    got = bytearray()
    for ev in stream:
        if ev.HasField("output"):
            got.extend(ev.output.data)
        if len(got) >= mib * MiB:
            break
    assert got == written(mib)
    wait_until(lambda: spool_bytes(tmp_path, lease) <= 18 * MiB, "delivered output not freed")
    assert spool_bytes(tmp_path, lease) >= 15 * MiB  # kept for a caller that missed some
    # A caller that comes back for bytes already freed is told so; what is kept is there.
    with pytest.raises(grpc.RpcError) as freed:
        list(node.Resume(node_pb2.ResumeRequest(lease_id=lease.lease_id, stdout_offset=MiB)))
    assert freed.value.code() == grpc.StatusCode.FAILED_PRECONDITION, freed.value
    assert (freed.value.details() or "").startswith("stdout_offset"), freed.value
    tail_from = (mib - 8) * MiB
    resumed = node.Resume(node_pb2.ResumeRequest(lease_id=lease.lease_id, stdout_offset=tail_from))
    (tmp_path / "go").touch()
    events = list(resumed)
    assert output_of(events, OUT) == got[tail_from:]
    assert events[-1].exited.exit_code == 0, events[-1]
    assert events[-1].exited.outcome == types_pb2.OUTCOME_COMPLETED, events[-1]
    assert client.get_lease(lease.lease_id).outcome == "completed"
    (tmp_path / "go").unlink()

    # Nobody follows: the call is held (frozen) once its spool passes the limit, and stays
    # there; its caller comes back within the grace and gets all of it, and the call goes on.
    waiting = start_unfollowed_until_held(cluster, client, node, writer(tmp_path, mib, 0.005))
    held = spool_bytes(tmp_path, waiting)
    assert limit < held <= limit + 32 * MiB, held
    time.sleep(0.3)
    assert spool_bytes(tmp_path, waiting) == held  # frozen: it writes nothing more
    resumed = node.Resume(node_pb2.ResumeRequest(lease_id=waiting.lease_id))
    (tmp_path / "go").touch()
    events = list(resumed)
    assert output_of(events, OUT) == written(mib)
    assert events[-1].exited.exit_code == 0, events[-1]
    assert events[-1].exited.outcome == types_pb2.OUTCOME_COMPLETED, events[-1]
    actions = [e.enforcement.action for e in events if e.HasField("enforcement")]
    assert actions == ["hold", "release"], actions  # the hold was kept for its caller
    assert client.get_lease(waiting.lease_id).outcome == "completed"
    (tmp_path / "go").unlink()

    # Nobody comes back: the held call is stopped when the grace is over (a frozen call too).
    gone = start_unfollowed_until_held(cluster, client, node, writer(tmp_path, mib, 0.005))
    wait_until(
        lambda: client.get_lease(gone.lease_id).state != "active", "never stopped", timeout_s=30
    )
    assert client.get_lease(gone.lease_id).outcome == "killed"
    last = list(node.Resume(node_pb2.ResumeRequest(lease_id=gone.lease_id)))[-1]
    assert last.exited.outcome == types_pb2.OUTCOME_KILLED, last
    assert "did not follow it again" in last.exited.reason, last


class Follower:
    """A caller of the node's own API following one call: every byte once, in order, from
    Resume to Resume, and the enforcement actions it received."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.out = bytearray()
        self.actions: list[node_pb2.Enforcement] = []

    def resume(
        self, node: node_pb2_grpc.NodeAgentStub, actions_seen: int
    ) -> Iterator[node_pb2.ExecEvent]:
        request = node_pb2.ResumeRequest(
            lease_id=self.lease.lease_id, stdout_offset=len(self.out), actions_seen=actions_seen
        )
        stream = node.Resume(request)
        try:
            for ev in stream:
                if ev.HasField("output"):
                    self.out.extend(ev.output.data)
                elif ev.HasField("enforcement"):
                    self.actions.append(ev.enforcement)
                yield ev
        finally:
            stream.cancel()

    def until_action(self, node: node_pb2_grpc.NodeAgentStub, actions_seen: int) -> None:
        """Resume until the first enforcement action comes, then go away."""
        had = len(self.actions)
        for _ in self.resume(node, actions_seen):
            if len(self.actions) > had:
                return
        raise AssertionError("the stream ended with no action")


def test_a_caller_is_sent_the_actions_it_missed_even_across_an_agent_restart(
    cluster: LocalCluster, client: Client, node: node_pb2_grpc.NodeAgentStub, tmp_path: Path
) -> None:
    limit = MAX_OUTPUT_MIB * MiB
    mib = 90  # so that once released it cannot pass the limit again
    lease = start_unfollowed_until_held(cluster, client, node, writer(tmp_path, mib, 0.005))
    # The node shows the call held, and how much of its output waits on its disk.
    [status] = [c for c in node.ListCalls(node_pb2.ListCallsRequest()).calls]
    assert (status.lease_id, status.state) == (lease.lease_id, "held"), status
    assert limit < status.output_bytes == spool_bytes(tmp_path, lease), status
    follower = Follower(lease)
    # The caller comes back and is sent the hold; its stream then breaks before it says so.
    follower.until_action(node, actions_seen=0)
    [hold] = follower.actions
    assert (hold.action, hold.seq) == ("hold", 0), hold
    # The agent is killed and restarted: the new one thaws the call, and holds it again.
    cluster.stop("node0", sig=signal.SIGKILL)
    with grpc.insecure_channel(cluster.start_node(0)) as channel:
        node = node_pb2_grpc.NodeAgentStub(channel)
        holds = f"hold call {lease.lease_id}"
        wait_until(lambda: cluster.log("node0").count(holds) == 2, "not held again")
        # A caller that had the first action is sent the ones after it: the new agent's hold.
        follower.until_action(node, actions_seen=1)
        assert [(a.action, a.seq) for a in follower.actions[1:]] == [("hold", 1)]
        # One whose stream broke before it had any is sent them all, from the old agent's log
        # (the same action, by its id), then the rest as they come, and every byte once.
        (tmp_path / "go").touch()
        follower.actions.clear()
        events = list(follower.resume(node, actions_seen=0))
    assert events[-1].exited.outcome == types_pb2.OUTCOME_COMPLETED, events[-1]
    assert follower.out == written(mib)
    assert [(a.action, a.seq) for a in follower.actions] == [
        ("hold", 0),
        ("hold", 1),
        ("release", 2),
    ], follower.actions
    assert follower.actions[0].action_id == hold.action_id
    assert client.get_lease(lease.lease_id).outcome == "completed"


def spooled(tmp_path: Path) -> list[str]:
    """The calls the node keeps in its spool now."""
    return sorted(os.listdir(tmp_path / "spool"))
