"""Public modules declare their API in __all__, and everything listed exists (httpx's check)."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "agentcg.clients.sdk",
    "agentcg.errors",
    "agentcg.gate",
    "agentcg.access",
    "agentcg.channels",
    "agentcg.cpuidle",
    "agentcg.heap",
    "agentcg.names",
    "agentcg.quantity",
    "agentcg.readyfile",
    "agentcg.rpcstatus",
    "agentcg.shutdown",
    "agentcg.tracecontext",
    "agentcg.notify",
    "agentcg.refusals",
    "agentcg.broker.admission",
    "agentcg.broker.fairshare",
    "agentcg.broker.sizing",
    "agentcg.broker.model",
    "agentcg.node.enforcement",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_members_exist_and_are_public(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported, f"{name} exports nothing"
    for member in exported:
        assert hasattr(module, member), f"{name}.__all__ lists missing {member}"
        assert not member.startswith("_"), f"{name}.__all__ lists private {member}"


def test_sdk_depends_only_on_stubs_and_grpcio() -> None:
    """The client SDK must not pull in the broker, the node or the database, nor the
    OpenTelemetry SDK (the API only: the application sets tracing up)."""
    import subprocess
    import sys

    code = (
        "import sys, agentcg.clients.sdk; "
        "bad = [m for m in sys.modules if m.startswith(('agentcg.broker', 'agentcg.node', "
        "'sqlalchemy', 'bcc', 'alembic', 'opentelemetry.sdk', 'prometheus_client'))]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
