"""agentcg: a gRPC resource broker for AI-agent tool calls.

This package root holds the wire contract: the versioned protos' generated stubs (``agentcg.v1``)
and the value rules every side applies to them (``agentcg.names``, ``agentcg.quantity``).
The broker, node agent and clients live in ``agentcg.broker``, ``agentcg.node`` and
``agentcg.clients``.
"""

__version__ = "0.1.0"
