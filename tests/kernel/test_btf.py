"""The BTF reader against the running kernel's own BTF (/sys/kernel/btf/vmlinux)."""

from __future__ import annotations

import pytest
from agentcg.node.btf import VMLINUX_BTF, BtfError, load_btf
from agentcg.node.monitor import counter_offsets

from tests.conftest import kernel_missing


@pytest.fixture(scope="module")
def btf():  # type: ignore[no-untyped-def]
    if not VMLINUX_BTF.exists():
        kernel_missing(f"no kernel BTF at {VMLINUX_BTF}")
    return load_btf()


def test_offsets_of_the_memcg_path(btf) -> None:  # type: ignore[no-untyped-def]
    offsets = counter_offsets(btf)
    assert set(offsets) == {
        "MW_OFF_CSS_CGROUP",
        "MW_OFF_CGROUP_KN",
        "MW_OFF_KN_ID",
        "MW_OFF_MEMCG_USAGE",
    }
    # css is the first member of struct mem_cgroup and cgroup the first of the css in every
    # kernel since memcg moved to css; the others are whatever this kernel says.
    assert offsets["MW_OFF_CSS_CGROUP"] == 0
    assert all(v >= 0 for v in offsets.values())
    assert btf.raw_tracepoint_args("count_memcg_events")[:2] == ["struct mem_cgroup *", "int"]


def test_missing_members_and_types_are_errors(btf) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BtfError, match="no member"):
        btf.member_offset("mem_cgroup", "css.no_such_member")
    with pytest.raises(BtfError, match="no BTF type"):
        btf.member_offset("no_such_struct_agentcg", "x")
    with pytest.raises(BtfError, match="no BTF type"):
        btf.raw_tracepoint_args("no_such_tracepoint_agentcg")
