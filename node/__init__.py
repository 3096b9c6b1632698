"""The node agent: per-tool-call cgroups, eBPF monitoring, graduated enforcement."""
