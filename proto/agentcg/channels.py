"""gRPC channel options for a broker target: one address, or every replica of a broker
(``ipv4:A:port,B:port``; one serves, the others stand by, broker/leadership.py). Used by the
SDK (and so the CLI) and by the node agent's uplink."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["broker_channel_options"]

RECONNECT_BACKOFF_MS = (100, 500)  # (first and least, most) with several brokers

# Calls that give the same result when sent twice: with several brokers one that fails with
# UNAVAILABLE (the leader died with it in flight) is sent again, to the new leader. A Reserve
# is one of them because the SDK sends every Reserve with an idempotency key (sdk.reserve):
# sent again it returns the lease the first attempt got if that one was committed. Not
# DeleteTenant (sent again: NOT_FOUND) nor the node's Connect stream (it reconnects itself).
RESENT = {
    "agentcg.v1.Broker": (
        "Reserve",
        "ReserveBatch",
        "Release",
        "ReleaseBatch",
        "Renew",
        "GetLease",
        "ListLeases",
        "Ping",
    ),
    "agentcg.v1.TenantAdmin": ("SetTenant", "GetTenant", "ListTenants"),
}
RESEND_POLICY = {
    "maxAttempts": 5,  # gRPC's cap
    "initialBackoff": "0.1s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def broker_channel_options(broker: str) -> list[tuple[str, Any]]:
    """gRPC channel options for the broker target ``broker``.

    A target naming several brokers (``ipv4:A:port,B:port``: replicas of which one serves and
    the others stand by without listening, see broker/leadership.py) gets, through gRPC's
    service config:

    - ``waitForReady``: a call made while the leader is being replaced waits, within its
      deadline, for the new one to listen instead of failing at once with UNAVAILABLE, and the
      channel tries to connect again every 0.1-0.5 s;
    - a ``retryPolicy`` for the calls in ``RESENT``: one that fails with UNAVAILABLE (in flight
      when the leader died) is sent again, up to 5 attempts within its deadline.

    A single address keeps gRPC's defaults: fail fast while nothing listens, never resend."""
    if "," not in broker:
        return []
    resent = [{"service": s, "method": m} for s, methods in RESENT.items() for m in methods]
    config = {
        "methodConfig": [
            {"name": [{}], "waitForReady": True},
            {"name": resent, "waitForReady": True, "retryPolicy": RESEND_POLICY},
        ]
    }
    # gRPC's reconnect backoff starts at 1 s and grows 1.6x: a client then saw the new leader
    # up to ~1.3 s after it served (`agentcg bench failover`). Retry connecting sooner.
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]
