"""Bad input to a node agent gets a clear error and loses nothing: every RPC of a real node
agent (real cgroups, real BPF, a real broker) is sent requests whose fields are drawn at random
(ids with slashes, dots, NULs and 300 characters, int extremes, env names with '=', cwds that
do not exist), half of them valid ones with one field overridden at random.

Each answer is OK or a status a caller can act on (INVALID_ARGUMENT naming the field); never
INTERNAL, UNKNOWN or UNAVAILABLE. A refused Exec started nothing and left its lease active;
the node logs no internal error and stays up; once the calls that did start have ended, no
call, cgroup or lease is left behind.

The commands an Exec may run are drawn from a harmless few (``true``, an exit code, a missing
file), and the pids an Attach may name are a child of this test's and pids no process has:
random argv or pids would run or move whatever they named."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client, Lease
from agentcg.errors import InvalidArgumentError
from agentcg.rpcstatus import error_from_rpc
from agentcg.v1 import node_pb2
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..broker.test_bad_input import INT64, _text
from ..conftest import wait_until

MiB = 1 << 20
ACTIONABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
SERVICE = node_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
ARGVS = [["true"], ["sh", "-c", "exit 3"], ["/nonexistent/tool"], [], [""], ["a\x00b"]]


@dataclass
class Target:
    cluster: LocalCluster
    client: Client
    channel: grpc.Channel
    sleeper: subprocess.Popen[bytes]  # a process of ours an Attach may move


@pytest.fixture
def target(tmp_path: Path, cgroup_write: Path, bcc_available: None) -> Iterator[Target]:
    args = ["--spool-dir", str(tmp_path / "spool"), "--resume-grace", "2"]
    with (
        LocalCluster(tmp_path / "cluster", node_memory="2G", node_args=args) as cluster,
        Client(cluster.broker_address) as client,
        grpc.insecure_channel(cluster.node_addresses[0]) as channel,
    ):
        client.set_tenant("t", 1 << 40)
        sleeper = subprocess.Popen(["sleep", "600"])
        try:
            yield Target(cluster, client, channel, sleeper)
        finally:
            sleeper.kill()
            sleeper.wait()


def _field_values(
    data: st.DataObject, name: str, text: st.SearchStrategy[str], target: Target
) -> Any:
    """A drawn value for the field ``name`` of any NodeAgent request."""
    if name == "argv":
        return data.draw(st.sampled_from(ARGVS))
    if name == "env":
        keys = st.one_of(st.sampled_from(["A", "A=B", "", "a\x00", "PATH"]), text)
        return data.draw(st.dictionaries(keys, text, max_size=2))
    if name == "pid":
        return data.draw(st.sampled_from([target.sleeper.pid, 0, -1, 2**31 - 1, 4_000_000]))
    if name in ("stdout_offset", "stderr_offset", "actions_seen"):
        return data.draw(INT64)
    if name == "capture_output":
        return data.draw(st.booleans())
    if name in ("lease_id", "tenant", "cwd"):
        return data.draw(text)
    raise AssertionError(f"no strategy for {name}")


def _set(request: Any, name: str, value: Any) -> None:
    field = getattr(request, name)
    if name == "argv":
        del field[:]
        field.extend(value)
    elif name == "env":
        field.clear()
        field.update(value)
    else:
        setattr(request, name, value)


def _call(target: Target, method: Any, request: Any) -> tuple[grpc.RpcError | None, list[Any]]:
    out = message_factory.GetMessageClass(method.output_type)
    path = f"/{SERVICE.full_name}/{method.name}"
    args = {"request_serializer": lambda m: m.SerializeToString()}
    try:
        if method.server_streaming:
            stream = target.channel.unary_stream(path, **args, response_deserializer=out.FromString)
            return None, list(stream(request, timeout=20))
        unary = target.channel.unary_unary(path, **args, response_deserializer=out.FromString)
        return None, [unary(request, timeout=20)]
    except grpc.RpcError as exc:
        return exc, []


def test_no_request_makes_the_node_fail_or_lose_anything(target: Target) -> None:
    client = target.client
    methods = list(SERVICE.methods)
    seen: dict[str, set[str]] = {}

    @settings(
        max_examples=600,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def one_request(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(methods))
        lease = client.reserve("t", 16 * MiB) if method.name in ("Exec", "Attach") else None
        try:
            send(data, method, lease)
        finally:  # also when hypothesis gives up on an example halfway (its data ran out)
            if lease is not None and client.get_lease(lease.lease_id).state == "active":
                _move_home(target)  # an Attach may have moved the sleeper into the call
                client.release(lease.lease_id)

    def send(data: st.DataObject, method: Any, lease: Lease | None) -> None:
        request = message_factory.GetMessageClass(method.input_type)()
        known = [lease.lease_id] if lease is not None else []
        text = _text([*known, "t", "default", "/tmp"])
        names = [f.name for f in method.input_type.fields]
        if lease is not None and data.draw(st.booleans()):
            # A valid request, then one field overridden at random.
            request.lease_id = lease.lease_id
            if method.name == "Exec":
                _set(request, "argv", ["true"])
                request.capture_output = True
            else:
                request.pid = target.sleeper.pid
            name = data.draw(st.sampled_from(names))
            _set(request, name, _field_values(data, name, text, target))
        else:
            for name in names:
                if data.draw(st.booleans()):
                    _set(request, name, _field_values(data, name, text, target))
        exc, answers = _call(target, method, request)
        code = grpc.StatusCode.OK if exc is None else exc.code()  # type: ignore[attr-defined]
        seen.setdefault(method.name, set()).add(code.name)
        assert code in ACTIONABLE, f"{method.name}({request}) -> {code}: {exc}"
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            error = error_from_rpc(exc)  # type: ignore[arg-type]
            assert isinstance(error, InvalidArgumentError) and error.field, exc
        if method.name == "Exec" and code is not grpc.StatusCode.OK:
            # Refused: nothing was started, and its lease still holds.
            assert lease is not None and client.get_lease(lease.lease_id).state == "active"
            assert lease.lease_id not in {c.lease_id for c in list_calls(target)}
        if method.name == "Exec" and code is grpc.StatusCode.OK:
            assert answers[0].HasField("started") and answers[-1].HasField("exited"), answers

    one_request()
    assert set(seen) == {m.name for m in methods}, seen  # every RPC was tried
    assert "OK" in seen["Exec"] and "OK" in seen["Attach"], seen
    cluster = target.cluster
    assert cluster.procs["node0"].poll() is None
    log = cluster.log("node0")
    assert "internal error" not in log and "Traceback" not in log
    # Nothing left behind: no call on the node, no active lease at the broker.
    wait_until(lambda: not list_calls(target), "the node's calls to end", timeout_s=30)
    wait_until(lambda: not client.list_leases(), "every lease to end", timeout_s=30)
    assert target.sleeper.poll() is None  # attached and given back, never killed


def list_calls(target: Target) -> list[Any]:
    return list(target.client.node_calls(target.cluster.node_addresses[0]).calls)


def _move_home(target: Target) -> None:
    """Put the sleeper back in this test's own cgroups (an Attach moved it into a call's)."""
    pid = str(target.sleeper.pid)
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            home = Path("/sys/fs/cgroup", controller, path.lstrip("/"), "cgroup.procs")
            if controller and home.exists():
                home.write_text(pid)
