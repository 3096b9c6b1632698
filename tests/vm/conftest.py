"""Tests that run inside a qemu VM booted on a cgroup v2 kernel (Debian trixie's 6.12) by
tests/kernel/test_cgroup_v2_vm.py. Collected only there (AGENTCG_IN_VM=1)."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("AGENTCG_IN_VM") == "1" else ["test_*.py"]
