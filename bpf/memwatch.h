/* SPDX-License-Identifier: Apache-2.0 */
/*
 * memwatch: per-cgroup memory watch, shared by bpf/memwatch.bpf.c and its Python loader
 * (agentcg.node.monitor), in the manner of bcc's libbpf-tools/oomkill.h.
 *
 * Python reads the MW_* defines of this file (simple "#define NAME <integer>" lines) and checks
 * them and sizeof(struct memwatch_event) against its own definitions when it loads the program.
 * Keep every define on one line with a plain integer value.
 */
#ifndef AGENTCG_MEMWATCH_H
#define AGENTCG_MEMWATCH_H

/* Event kinds (struct memwatch_event.kind). */
#define MW_SOFT 1      /* estimated usage crossed the soft threshold (once per arming) */
#define MW_LIMIT 2     /* first memcg reclaim by a watched task since (re)arming: at its budget */
#define MW_OOM_KILL 3  /* the kernel chose a watched task as OOM victim */
#define MW_EXEC 4      /* a watched task called execve */
#define MW_EXIT 5      /* the last thread of a watched process exited (group_dead) */
#define MW_STOP 6      /* usage crossed the stop threshold: SIGSTOP sent in-kernel to the
                          watched process whose charge crossed it (once per arming) */
#define MW_STOPPED 7   /* a watched process dequeued SIGSTOP: the stop is in effect */

/* struct watch_state.fired bits: a crossing already reported in the current arming. */
#define MW_FIRED_SOFT 1
#define MW_FIRED_LIMIT 2
#define MW_FIRED_STOP 4

#define MW_SIGSTOP 19  /* x86-64 / generic */

/* Soft threshold hysteresis: re-armed once usage drops below soft * NUM / DEN. */
#define MW_REARM_NUM 9
#define MW_REARM_DEN 10

/* Where the in-kernel usage estimate comes from (-DMW_USAGE_SOURCE=...). */
#define MW_USAGE_PGPGIN 1  /* memcg:count_memcg_events PGPGIN - PGPGOUT: folios, not pages */
#define MW_USAGE_LRU 2     /* memcg:mod_memcg_lruvec_state LRU items: pages (the default) */
#define MW_USAGE_NONE 3    /* no per-page tracepoint: limit/OOM/exec/exit only, no SOFT */
#define MW_USAGE_COUNTER 4 /* raw tracepoint count_memcg_events, PGPGIN/PGPGOUT only: reads the
                              memcg's own page counter (exact usage); needs BTF offsets */

/* memcg:count_memcg_events items (enum vm_event_item; first since memcg stats began). */
#define MW_ITEM_PGPGIN 0   /* a folio was charged to the memcg (val 1 whatever its size) */
#define MW_ITEM_PGPGOUT 1  /* folios were uncharged */

/* memcg:mod_memcg_lruvec_state items (enum node_stat_item starts with the LRU lists:
 * inactive anon, active anon, inactive file, active file, unevictable; val in pages). */
#define MW_ITEM_LRU_FIRST 0
#define MW_ITEM_LRU_LAST 4

/* Index into the `drops` array map. */
#define MW_DROP_EVENTS 0   /* ring buffer full: an event was lost */
#define MW_DROP_PIDS 1     /* pids map full: a forked child is not tracked */
#define MW_DROP_SLOTS 2

#define MW_EVENT_SIZE 40

struct memwatch_event {
	u64 ts_ns;           /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	u64 cgroup_id;       /* v1: inode of the memcg directory; v2: cgroup id */
	u64 usage_bytes;     /* in-kernel estimate at the time of the event */
	u64 threshold_bytes; /* soft threshold (MW_SOFT) or budget (others) */
	u32 pid;             /* tgid of the task concerned */
	u32 kind;            /* MW_* */
};

#endif /* AGENTCG_MEMWATCH_H */
