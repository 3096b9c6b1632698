"""Which broker RPCs a client sends again after UNAVAILABLE (agentcg.channels.RESENT): every
method of the client-facing services is decided, so a new RPC cannot be left out unnoticed."""

from __future__ import annotations

from agentcg.channels import RESENT
from agentcg.v1 import broker_pb2

# Sent again it would not give the same result, or it is the node's own (it reconnects itself).
NOT_RESENT = {
    ("agentcg.v1.TenantAdmin", "DeleteTenant"),  # a second one: NOT_FOUND
    ("agentcg.v1.NodeGateway", "RegisterNode"),
    ("agentcg.v1.NodeGateway", "Connect"),
}


def test_every_broker_method_is_resent_or_said_not_to_be() -> None:
    methods = {
        (service.full_name, method.name)
        for service in broker_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    resent = {(service, m) for service, names in RESENT.items() for m in names}
    assert resent <= methods, resent - methods  # no stale names
    assert methods - resent == NOT_RESENT
