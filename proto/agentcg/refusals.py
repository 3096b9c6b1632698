"""Counting the access gate's refusals, alike on the broker and the node agent.

Its own module, light on purpose: the broker's metrics module is imported by its database
writer process too, which must not pull in gRPC or OpenTelemetry (13 MB of its resident set).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from agentcg.access import REFUSALS

__all__ = ["access_refusals"]


def access_refusals(registry: CollectorRegistry, prefix: str) -> Callable[[str], None]:
    """``<prefix>access_refused_total{reason}`` in ``registry``; returns what counts one
    refusal of a ``REFUSALS`` reason."""
    refused = Counter(
        prefix + "access_refused",
        "Calls refused by the access gate (with --access): unknown or no token "
        "(unauthenticated), a method outside the role (role), a tenant, lease or node "
        "outside the scope (scope)",
        ["reason"],
        registry=registry,
    )
    children = {reason: refused.labels(reason) for reason in REFUSALS}

    def count(reason: str) -> None:
        children[reason].inc()

    return count
