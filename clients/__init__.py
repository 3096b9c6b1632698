"""Clients: the SDK, the agentcg CLI, demos and benchmarks."""
