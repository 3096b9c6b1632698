"""bpf/memwatch.h and agentcg.node.monitor agree (no bcc or kernel needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentcg.node.monitor import (
    BPF_SOURCE,
    EventKind,
    MonitorError,
    UsageSource,
    check_header,
    describe_program,
    exit_reports_group_dead,
    program_cflags,
    read_header_constants,
    tracepoint_fields,
)


def header_constants() -> dict[str, int]:
    return read_header_constants((BPF_SOURCE.parent / "memwatch.h").read_text())


def test_header_matches_event_kinds_and_layout() -> None:
    constants = header_constants()
    assert {k.name: k.value for k in EventKind} == {
        name.removeprefix("MW_"): constants[name]
        for name in (
            "MW_SOFT",
            "MW_LIMIT",
            "MW_OOM_KILL",
            "MW_EXEC",
            "MW_EXIT",
            "MW_STOP",
            "MW_STOPPED",
        )
    }
    check_header(constants)


def test_check_header_rejects_a_mismatch() -> None:
    constants = header_constants() | {"MW_LIMIT": 7}
    with pytest.raises(MonitorError, match="MW_LIMIT is 7"):
        check_header(constants)
    constants = header_constants() | {"MW_USAGE_LRU": 0}
    with pytest.raises(MonitorError, match="MW_USAGE_LRU is 0"):
        check_header(constants)
    constants = header_constants() | {"MW_EVENT_SIZE": 48}
    with pytest.raises(MonitorError, match="MW_EVENT_SIZE 48"):
        check_header(constants)


def test_read_header_constants_only_takes_integer_defines() -> None:
    text = "#define MW_A 1\n  #define MW_B 22 /* c */\n#define MW_C (1 << 2)\n#define OTHER 3\n"
    assert read_header_constants(text) == {"MW_A": 1, "MW_B": 22}


def test_program_cflags_are_defines_not_text_edits() -> None:
    cflags = program_cflags(max_watches=16, max_pids=64, ringbuf_pages=4, page_size=4096)
    assert cflags[0].startswith("-I") and cflags[0].endswith("bpf")
    assert cflags[1:] == [
        "-DMAX_WATCHES=16",
        "-DMAX_PIDS=64",
        "-DMW_PAGE_SHIFT=12",
        "-DMW_RINGBUF_PAGES=4",
        "-DMW_FILTER_SLOTS=4096",
        "-DMW_SAMPLE_SHIFT=4",
        "-DMW_USAGE_SOURCE=4",  # UsageSource.COUNTER by default
    ]
    assert program_cflags(usage_source=UsageSource.PGPGIN)[-1] == "-DMW_USAGE_SOURCE=1"
    # Struct offsets (from BTF) are defines too, in a stable order.
    assert program_cflags(offsets={"MW_OFF_KN_ID": 96, "MW_OFF_CGROUP_KN": 256})[-2:] == [
        "-DMW_OFF_CGROUP_KN=256",
        "-DMW_OFF_KN_ID=96",
    ]
    assert program_cflags(group_dead=True)[-1] == "-DMW_EXIT_GROUP_DEAD=1"
    assert "-DMW_EXIT_GROUP_DEAD=1" not in program_cflags()
    with pytest.raises(MonitorError, match="power of two"):
        program_cflags(ringbuf_pages=3)
    text = describe_program(cflags)
    assert "-DMAX_WATCHES=16" in text and "TRACEPOINT_PROBE(memcg, mod_memcg_lruvec_state)" in text
    assert "int memwatch_counter(struct bpf_raw_tracepoint_args *ctx)" in text


def test_usage_source_falls_back_when_the_kernel_lacks_its_tracepoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agentcg.node.monitor import supported_usage_source

    # 6.12 (Debian trixie): vmscan's memcg reclaim tracepoints, no memcg/ category.
    (tmp_path / "events" / "vmscan" / "mm_vmscan_memcg_reclaim_begin").mkdir(parents=True)
    assert supported_usage_source(UsageSource.LRU, tmp_path) is UsageSource.NONE
    assert supported_usage_source(UsageSource.PGPGIN, tmp_path) is UsageSource.NONE
    assert supported_usage_source(UsageSource.NONE, tmp_path) is UsageSource.NONE
    (tmp_path / "events" / "memcg" / "mod_memcg_lruvec_state").mkdir(parents=True)
    assert supported_usage_source(UsageSource.LRU, tmp_path) is UsageSource.LRU
    assert supported_usage_source(UsageSource.PGPGIN, tmp_path) is UsageSource.NONE
    # COUNTER needs its tracepoint and BTF; without either it falls back to LRU.
    no_btf = tmp_path / "no-btf"
    assert supported_usage_source(UsageSource.COUNTER, tmp_path, no_btf) is UsageSource.LRU
    (tmp_path / "events" / "memcg" / "count_memcg_events").mkdir(parents=True)
    assert supported_usage_source(UsageSource.COUNTER, tmp_path, no_btf) is UsageSource.LRU
    bad_btf = tmp_path / "bad-btf"
    bad_btf.write_bytes(b"\0" * 64)
    assert supported_usage_source(UsageSource.COUNTER, tmp_path, bad_btf) is UsageSource.LRU


# sched_process_exit's format file on 6.18 (group_dead) and on Debian trixie's 6.12 (none).
EXIT_FORMAT_6_18 = """name: sched_process_exit
ID: 369
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;

print fmt: "comm=%s pid=%d prio=%d group_dead=%s", REC->comm, REC->pid, REC->prio, \
REC->group_dead ? "true" : "false"
"""
EXIT_FORMAT_6_12 = (
    "\n".join(line for line in EXIT_FORMAT_6_18.splitlines() if "group_dead" not in line)
    + '\nprint fmt: "comm=%s pid=%d prio=%d", REC->comm, REC->pid, REC->prio\n'
)


def test_tracepoint_fields_and_the_exit_tracepoints_group_dead(tmp_path: Path) -> None:
    assert tracepoint_fields(EXIT_FORMAT_6_18) == {
        "common_type",
        "common_pid",
        "comm",
        "pid",
        "prio",
        "group_dead",
    }
    assert "group_dead" not in tracepoint_fields(EXIT_FORMAT_6_12)
    fmt = tmp_path / "events" / "sched" / "sched_process_exit" / "format"
    assert not exit_reports_group_dead(tmp_path)  # no tracefs there: the leader-thread rule
    fmt.parent.mkdir(parents=True)
    fmt.write_text(EXIT_FORMAT_6_12)
    assert not exit_reports_group_dead(tmp_path)
    fmt.write_text(EXIT_FORMAT_6_18)
    assert exit_reports_group_dead(tmp_path)
