"""Bad input gets a clear error and loses nothing: every unary RPC of a real broker process
(SQLite and PostgreSQL) is sent requests whose every field is drawn at random (names with
slashes, dots, NULs and 300 characters, int64 and int32 extremes, unknown enum values, nested
messages and batches), mixed with names and ids that exist so that the deeper checks run too.

Half the requests are valid ones (a Reserve, a tenant, a node, a release...) with one field
overridden at random, so that the checks past the first reach their own bad values.

Each answer is OK or a status a caller can act on; INVALID_ARGUMENT names the field. Never
INTERNAL, UNKNOWN or UNAVAILABLE; the broker logs no internal error and stays up; and what it
answered was durable: restarted on its database, it holds the same tenants and leases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentcg.clients.cluster import LocalCluster
from agentcg.clients.sdk import Client
from agentcg.clients.simnode import SimNode
from agentcg.errors import InvalidArgumentError
from agentcg.rpcstatus import error_from_rpc
from agentcg.v1 import broker_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MiB = 1 << 20
QUOTA = 1 << 50  # never the limit: Reserves go on being granted (and persisted)
SERVICES = ("Broker", "TenantAdmin", "NodeAdmin", "AuditLog", "Sizing", "NodeGateway")
# Answers a caller can act on. DEADLINE_EXCEEDED only for a Reserve that may wait in the queue
# (the client's deadline is shorter than a queue timeout it sent).
ACTIONABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
}


@dataclass
class Target:
    cluster: LocalCluster
    channel: grpc.Channel
    lease_id: str  # released along the way
    kept_id: str  # renewed, never released: only the Renew template names it


@pytest.fixture
def target(tmp_path: Path, database_url: str) -> Iterator[Target]:
    """A broker with a tenant ``t`` (1 PiB), a node ``sim`` and two leases."""
    with (
        LocalCluster(tmp_path, nodes=0, database_url=database_url, log_level="INFO") as cluster,
        SimNode(cluster.broker_address, "sim", memory_bytes=1 << 50),
        Client(cluster.broker_address) as client,
        grpc.insecure_channel(cluster.broker_address) as channel,
    ):
        client.set_tenant("t", QUOTA)
        lease = client.reserve("t", 16 * MiB, session="s")
        kept = client.reserve("t", 16 * MiB, session="s", ttl_ms=600_000)
        yield Target(cluster, channel, lease.lease_id, kept.lease_id)


def _methods() -> list[MethodDescriptor]:
    return [
        m
        for name in SERVICES
        for m in broker_pb2.DESCRIPTOR.services_by_name[name].methods
        if not m.client_streaming and not m.server_streaming
    ]


METHODS = _methods()
EXTREME64 = [0, 1, -1, 16 * MiB, QUOTA, QUOTA + 1, 2**31, 2**62, 2**63 - 2, 2**63 - 1, -(2**63)]
INT64 = st.one_of(
    st.sampled_from(EXTREME64), st.sampled_from(EXTREME64), st.integers(-(2**63), 2**63 - 1)
)
INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 5, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)


def _text(known: list[str]) -> st.SearchStrategy[str]:
    odd = ["", "..", ".", "a/b", "-x", " ", "x" * 300, "é", "a\x00b", "*", "default", "sim"]
    return st.one_of(st.sampled_from(known + odd), st.text(max_size=24))


def _fill(
    data: st.DataObject,
    msg: Any,
    desc: Descriptor,
    text: st.SearchStrategy[str],
    depth: int,
) -> None:
    """Set about half of ``msg``'s fields, at random."""
    for field in desc.fields:
        if not data.draw(st.booleans()):
            continue  # left unset: the default
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                target = getattr(msg, field.name)
                for _ in range(data.draw(st.integers(0, 2))):
                    target[data.draw(text)] = data.draw(text)
                continue
            for _ in range(data.draw(st.integers(0, 3))):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth < 3:
                        _fill(
                            data,
                            getattr(msg, field.name).add(),
                            field.message_type,
                            text,
                            depth + 1,
                        )
                else:
                    getattr(msg, field.name).append(_scalar(data, field, text))
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < 3:
                _fill(data, getattr(msg, field.name), field.message_type, text, depth + 1)
            continue
        setattr(msg, field.name, _scalar(data, field, text))


def _override_one(
    data: st.DataObject, msg: Any, desc: Descriptor, text: st.SearchStrategy[str]
) -> None:
    """Set one field of ``msg`` (or of a message in it) to a value drawn at random."""
    field = data.draw(st.sampled_from(list(desc.fields)))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            getattr(msg, field.name)[data.draw(text)] = data.draw(text)
        elif field.is_repeated:
            items = getattr(msg, field.name)
            if len(items):
                item = items[data.draw(st.integers(0, len(items) - 1))]
                _override_one(data, item, field.message_type, text)
        else:
            _override_one(data, getattr(msg, field.name), field.message_type, text)
    elif field.is_repeated:
        getattr(msg, field.name).append(_scalar(data, field, text))
    else:
        setattr(msg, field.name, _scalar(data, field, text))


def _scalar(data: st.DataObject, field: FieldDescriptor, text: st.SearchStrategy[str]) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return data.draw(text)
    if kind == FieldDescriptor.TYPE_BYTES:
        return data.draw(st.binary(max_size=16))
    if kind == FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans())
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return data.draw(INT64)
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM):
        return data.draw(INT32)  # an enum value the broker does not know included
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return data.draw(st.floats(allow_nan=True, width=32))
    raise AssertionError(f"no strategy for {field.full_name} (type {kind})")


def _templates(lease_id: str, kept_id: str) -> dict[str, Any]:
    """Valid requests of the RPCs that change state."""
    reserve = broker_pb2.ReserveRequest(
        tenant="t", session="s", command_class="pytest", ttl_ms=60_000
    )
    reserve.intent.memory_bytes = 16 * MiB
    tenant = broker_pb2.SetTenantRequest(name="u", parent="t", max_calls=4, weight=2)
    tenant.quota.memory_bytes = 64 * MiB
    node = broker_pb2.RegisterNodeRequest(node_id="sim-2", address="127.0.0.1:1")
    node.capacity.memory_bytes = 1 << 30
    return {
        "Reserve": reserve,
        "ReserveBatch": broker_pb2.ReserveBatchRequest(requests=[reserve, reserve]),
        "Release": broker_pb2.ReleaseRequest(lease_id=lease_id, peak_memory_bytes=MiB, outcome=1),
        "ReleaseBatch": broker_pb2.ReleaseBatchRequest(
            requests=[broker_pb2.ReleaseRequest(lease_id=lease_id)]
        ),
        "Renew": broker_pb2.RenewRequest(lease_id=kept_id, ttl_ms=600_000),
        "SetTenant": tenant,
        "RegisterNode": node,
        "CordonNode": broker_pb2.CordonNodeRequest(node_id="sim-2", reason="kernel upgrade"),
    }


def _may_wait(msg: Any) -> bool:
    """A Reserve (or batch item) that may wait in the queue."""
    if getattr(msg, "queue_timeout_ms", 0) > 0:
        return True
    return any(_may_wait(item) for item in getattr(msg, "requests", ()))


def _call(target: Target, method: MethodDescriptor, request: Any) -> grpc.RpcError | None:
    out = message_factory.GetMessageClass(method.output_type)
    call = target.channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=out.FromString,
    )
    try:
        call(request, timeout=5)
    except grpc.RpcError as exc:
        return exc
    return None


def _state(client: Client) -> tuple[list[Any], list[Any]]:
    tenants = sorted(client.list_tenants(), key=lambda x: x.name)
    leases = sorted(client.list_leases(include_inactive=True), key=lambda x: x.lease_id)
    return tenants, leases


def test_no_request_makes_the_broker_fail_or_lose_anything(target: Target) -> None:
    text = _text(["t", "s", "u", "sim-2", target.lease_id])
    templates = _templates(target.lease_id, target.kept_id)
    with_template = [m for m in METHODS if m.name in templates]
    seen: dict[str, set[str]] = {}

    @settings(
        max_examples=1500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def one_request(data: st.DataObject) -> None:
        valid = data.draw(st.booleans())
        method = data.draw(st.sampled_from(with_template if valid else METHODS))
        request = message_factory.GetMessageClass(method.input_type)()
        template = templates.get(method.name)
        if valid and template is not None:
            request.CopyFrom(template)  # valid, then one field overridden at random
            _override_one(data, request, method.input_type, text)
        else:
            _fill(data, request, method.input_type, text, 0)
        exc = _call(target, method, request)
        code = grpc.StatusCode.OK if exc is None else exc.code()  # type: ignore[attr-defined]
        seen.setdefault(method.name, set()).add(code.name)
        allowed = ACTIONABLE | (
            {grpc.StatusCode.DEADLINE_EXCEEDED} if _may_wait(request) else set()
        )
        assert code in allowed, f"{method.name}({request}) -> {code}: {exc}"
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            error = error_from_rpc(exc)  # type: ignore[arg-type]
            assert isinstance(error, InvalidArgumentError) and error.field, exc

    one_request()
    assert set(seen) == {m.name for m in METHODS}, seen  # every RPC was tried
    for name in templates:  # and each of the valid ones went through at least once
        assert "OK" in seen[name], (name, seen[name])
    cluster = target.cluster
    assert cluster.procs["broker"].poll() is None
    log = cluster.log("broker")
    assert "internal error" not in log and "Traceback" not in log
    with Client(cluster.broker_address) as client:
        tenants, leases = _state(client)
    # Nothing answered was lost: restarted on its database, the broker holds the same.
    cluster.stop("broker")
    assert cluster.procs["broker"].returncode == 0
    cluster.start_broker()
    with Client(cluster.broker_address) as client:
        tenants_after, leases_after = _state(client)
    assert tenants_after == tenants
    assert [x.lease_id for x in leases_after] == [x.lease_id for x in leases]
    for before, after in zip(leases, leases_after, strict=True):
        # Only time moves a lease on: an active one may have expired meanwhile.
        if (before.state, after.state) != ("active", "expired"):
            assert after == before
