/* SPDX-License-Identifier: Apache-2.0 */
/*
 * memwatch: in-kernel per-cgroup memory accounting for agentcg tool calls (bcc C).
 *
 * Tracepoints only (no kprobes/fentry on our hosts). No kernel struct is read through the build
 * headers (ours are 6.1's): the tracepoint sources use tracepoint fields; the raw-tracepoint
 * source (MW_USAGE_COUNTER, the default) reads a few struct members at offsets taken from the
 * running kernel's BTF and passed as -D cflags.
 *
 *   raw memcg count_memcg_events      PGPGIN/PGPGOUT -> usage = memcg->memory.usage (exact)
 *   memcg:mod_memcg_lruvec_state      LRU page-count updates -> usage estimate in `watch_state`
 *     (or memcg:count_memcg_events, PGPGIN/PGPGOUT, with -DMW_USAGE_SOURCE=MW_USAGE_PGPGIN;
 *     or nothing with MW_USAGE_NONE: every tracepoint on the per-page charge path costs the
 *     host's allocations even when empty, so this mode keeps only the rare tracepoints below,
 *     with no usage estimate and no MW_SOFT; usage comes from the cgroup's own counters)
 *   vmscan:mm_vmscan_memcg_reclaim_begin  a watched task hit a memcg limit -> MW_LIMIT
 *   oom:mark_victim                   a watched task was chosen as OOM victim -> MW_OOM_KILL
 *   task:task_newtask                 a watched process forked -> child inherits its watch
 *   sched:sched_process_exec/exit     exec / last-thread exit of a watched process
 *   signal:signal_deliver             a watched process dequeued SIGSTOP -> MW_STOPPED
 *
 * In-kernel action: a watch with stop_bytes set sends SIGSTOP (bpf_send_signal) to the watched
 * process whose own charge crosses it, from inside that charge: the allocator stops on its
 * return to user space, microseconds after the crossing, with no user-space round trip. The
 * node then freezes the whole call (cgroup freezer) and resumes it with SIGCONT when thawed.
 *
 * A 150 MiB allocation is ~40k usage updates (~80k tracepoint hits): they only update maps;
 * user space gets the crossings through the `events` ring buffer. Usage updates only count
 * from the watch's creation on, and only pages on the LRU lists (not kernel memory).
 *
 * Two maps per watched cgroup, so that neither side ever overwrites what the other writes:
 * `watches` (thresholds, written by user space only) and `watch_state` (counters, created zeroed
 * by user space, then written by the kernel only). Re-arming is a generation number: user space
 * bumps watch.arm_gen, and the first handler that sees the new generation clears the fired bits.
 *
 * Build-time settings come from cflags (-D...), never from editing this text:
 *   MAX_WATCHES, MAX_PIDS, MW_PAGE_SHIFT, MW_RINGBUF_PAGES, MW_FILTER_SLOTS, MW_USAGE_SOURCE,
 *   MW_SAMPLE_SHIFT,
 *   and for MW_USAGE_COUNTER MW_OFF_CSS_CGROUP, MW_OFF_CGROUP_KN, MW_OFF_KN_ID, MW_OFF_MEMCG_USAGE.
 */
#include <uapi/linux/bpf.h>

#include "memwatch.h"

#ifndef MAX_WATCHES
#define MAX_WATCHES 4096
#endif
#ifndef MAX_PIDS
#define MAX_PIDS 65536
#endif
#ifndef MW_PAGE_SHIFT
#define MW_PAGE_SHIFT 12
#endif
#ifndef MW_RINGBUF_PAGES
#define MW_RINGBUF_PAGES 16
#endif
#ifndef MW_USAGE_SOURCE
#define MW_USAGE_SOURCE MW_USAGE_LRU
#endif
#ifndef MW_SAMPLE_SHIFT
#define MW_SAMPLE_SHIFT 0 /* MW_USAGE_COUNTER: look at every 2^this-th charge on a CPU */
#endif
#ifndef MW_FILTER_SLOTS
#define MW_FILTER_SLOTS 4096 /* power of two */
#endif

#define MW_CLONE_THREAD 0x00010000ULL /* uapi/linux/sched.h CLONE_THREAD */

_Static_assert(sizeof(struct memwatch_event) == MW_EVENT_SIZE, "memwatch_event layout changed");

/* Thresholds of one watched cgroup. Written by user space only. */
struct watch {
	u64 soft_bytes;  /* MW_SOFT when the estimate reaches this; 0 = no soft threshold */
	u64 limit_bytes; /* the budget, reported with MW_LIMIT/MW_OOM_KILL/MW_EXEC/MW_EXIT */
	u64 arm_gen;     /* bumped by user space to re-arm the fired bits */
	u64 stop_bytes;  /* SIGSTOP the crossing process at this usage (MW_STOP); 0 = never */
};

/* Counters of one watched cgroup. Created zeroed by user space, then written by the kernel. */
struct watch_state {
	s64 usage_pages;   /* net pages added since the watch was created (see MW_USAGE_SOURCE) */
	s64 peak_pages;
	u64 reclaims;      /* memcg reclaim passes started by watched tasks of this cgroup */
	u64 charge_events; /* usage updates seen (approximate: plain increment) */
	u64 armed_gen;     /* the watch.arm_gen the fired bits belong to */
	u64 fired;         /* MW_FIRED_* */
};

/* Pre-filter for the per-page handler: watch_filter[id % MW_FILTER_SLOTS] counts the watched
 * cgroups in that slot (maintained by user space). An array lookup is inlined by the JIT, so
 * charges of unwatched cgroups (every other process on the host) skip the hash lookup. */
BPF_ARRAY(watch_filter, u32, MW_FILTER_SLOTS);
BPF_HASH(watches, u64, struct watch, MAX_WATCHES);
BPF_HASH(watch_state, u64, struct watch_state, MAX_WATCHES);
BPF_HASH(pids, u32, u64, MAX_PIDS); /* tgid -> cgroup id */
BPF_ARRAY(drops, u64, MW_DROP_SLOTS);
BPF_RINGBUF_OUTPUT(events, MW_RINGBUF_PAGES);

static __always_inline u32 current_tgid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline u64 pages_to_bytes(s64 pages)
{
	return pages > 0 ? ((u64)pages) << MW_PAGE_SHIFT : 0;
}

static __always_inline void count_drop(int slot)
{
	u64 *n = drops.lookup(&slot);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void emit(u32 kind, u64 cgroup_id, u32 pid, u64 usage_bytes,
				 u64 threshold_bytes)
{
	struct memwatch_event *e = events.ringbuf_reserve(sizeof(struct memwatch_event));
	if (!e) {
		count_drop(MW_DROP_EVENTS);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgroup_id;
	e->usage_bytes = usage_bytes;
	e->threshold_bytes = threshold_bytes;
	e->pid = pid;
	e->kind = kind;
	/* Crossings are rare and latency matters: wake the poller for each one. */
	events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
}

/* Apply a re-arm requested by user space: exactly one CPU wins the generation swap. */
static __always_inline void rearm(struct watch *w, struct watch_state *st)
{
	u64 gen = w->arm_gen;
	u64 seen = st->armed_gen;
	if (seen != gen && __sync_val_compare_and_swap(&st->armed_gen, seen, gen) == seen)
		__sync_fetch_and_and(&st->fired, 0);
}

/* Set `bit` in st->fired; true if this call set it (the crossing is to be reported). */
static __always_inline int fire_once(struct watch_state *st, u64 bit)
{
	if (st->fired & bit)
		return 0;
	return !(__sync_fetch_and_or(&st->fired, bit) & bit);
}

/* SIGSTOP the current process if it belongs to watched cgroup `id` (charges can be made on a
 * task's behalf elsewhere, e.g. by a kworker: never stop a bystander). */
static __always_inline void stop_current(u64 id, struct watch_state *st, u64 usage_bytes,
					 u64 stop_bytes)
{
	u32 tgid = current_tgid();
	u64 *cg = pids.lookup(&tgid);
	if (!cg || *cg != id)
		return;
	if (!fire_once(st, MW_FIRED_STOP))
		return;
	bpf_send_signal(MW_SIGSTOP);
	emit(MW_STOP, id, tgid, usage_bytes, stop_bytes);
}

/* The watch of cgroup `id`, if any; the array pre-filter first (inlined by the JIT). */
static __always_inline struct watch *lookup_watch(u64 id)
{
	u32 slot = id & (MW_FILTER_SLOTS - 1);
	u32 *in_slot = watch_filter.lookup(&slot);
	if (!in_slot || !*in_slot)
		return 0;
	return watches.lookup(&id);
}

/* Usage of watched cgroup `id` is now `usage` pages: peak, then the soft and stop thresholds. */
static __always_inline int check_usage(u64 id, struct watch *w, struct watch_state *st,
				       s64 usage)
{
	/* Diagnostics, not decisions: plain stores (a concurrent update may be lost) keep the
	 * per-page cost to at most one atomic. */
	st->charge_events++;
	if (usage > st->peak_pages)
		st->peak_pages = usage;

	u64 soft = w->soft_bytes;
	u64 stop = w->stop_bytes;
	if (!soft && !stop)
		return 0;
	u64 usage_bytes = pages_to_bytes(usage);
	if (stop && usage_bytes >= stop && !(st->fired & MW_FIRED_STOP))
		stop_current(id, st, usage_bytes, stop);
	if (!soft)
		return 0;
	if (usage_bytes >= soft) {
		if (fire_once(st, MW_FIRED_SOFT))
			emit(MW_SOFT, id, current_tgid(), usage_bytes, soft);
	} else if ((st->fired & MW_FIRED_SOFT) &&
		   usage_bytes < soft / MW_REARM_DEN * MW_REARM_NUM) {
		__sync_fetch_and_and(&st->fired, ~(u64)MW_FIRED_SOFT);
	}
	return 0;
}

/* One memory update of cgroup `id`: `delta` pages (the LRU and PGPGIN sources). */
static __always_inline int account(u64 id, s64 delta)
{
	struct watch *w = lookup_watch(id);
	if (!w)
		return 0;
	struct watch_state *st = watch_state.lookup(&id);
	if (!st)
		return 0;
	rearm(w, st);
	s64 usage = __sync_fetch_and_add(&st->usage_pages, delta) + delta;
	return check_usage(id, w, st, usage);
}

#if MW_USAGE_SOURCE == MW_USAGE_LRU
/* Pages on the memcg's LRU lists: `val` is in pages, so a large folio (THP, or the large
 * page-cache folios of ext4/xfs) counts in full. ~4 events per page over its life. */
TRACEPOINT_PROBE(memcg, mod_memcg_lruvec_state)
{
	if (args->item < MW_ITEM_LRU_FIRST || args->item > MW_ITEM_LRU_LAST)
		return 0;
	return account(args->id, args->val);
}
#elif MW_USAGE_SOURCE == MW_USAGE_PGPGIN
/* Charged minus uncharged folios: half the events of the LRU source, but the kernel counts
 * one PGPGIN per folio whatever its size, so large folios are undercounted. */
TRACEPOINT_PROBE(memcg, count_memcg_events)
{
	if (args->item == MW_ITEM_PGPGIN)
		return account(args->id, (s64)args->val);
	if (args->item == MW_ITEM_PGPGOUT)
		return account(args->id, -(s64)args->val);
	return 0;
}
#elif MW_USAGE_SOURCE == MW_USAGE_COUNTER
/*
 * Raw tracepoint count_memcg_events(struct mem_cgroup *memcg, int item, unsigned long val):
 * no argument record is built (the perf path of a TRACEPOINT_PROBE does that per event), so an
 * event costs little more than the call. Only PGPGIN (a folio charged) and PGPGOUT (a batch
 * uncharged) are looked at; at each, the memcg's own page counter (memcg->memory.usage, what
 * memory.usage_in_bytes reads) is the usage: exact, large folios and kernel memory included.
 *
 * The struct offsets come from the running kernel's BTF (agentcg.node.btf) as -D cflags; they
 * are read with bpf_probe_read_kernel, never through the build headers' struct layouts.
 */
#if !defined(MW_OFF_CSS_CGROUP) || !defined(MW_OFF_CGROUP_KN) || !defined(MW_OFF_KN_ID) || \
	!defined(MW_OFF_MEMCG_USAGE)
#error "MW_USAGE_COUNTER needs -DMW_OFF_CSS_CGROUP, _CGROUP_KN, _KN_ID and _MEMCG_USAGE"
#endif

/* cgroup_id(memcg->css.cgroup), as the memcg tracepoints compute it: the v1 memcg directory's
 * inode number, the v2 cgroup id. */
static __always_inline u64 memcg_cgroup_id(const void *memcg)
{
	const void *cgrp = 0;
	const void *kn = 0;
	u64 id = 0;
	if (bpf_probe_read_kernel(&cgrp, sizeof(cgrp), memcg + MW_OFF_CSS_CGROUP) || !cgrp)
		return 0;
	if (bpf_probe_read_kernel(&kn, sizeof(kn), cgrp + MW_OFF_CGROUP_KN) || !kn)
		return 0;
	if (bpf_probe_read_kernel(&id, sizeof(id), kn + MW_OFF_KN_ID))
		return 0;
	return id;
}

/* Not a RAW_TRACEPOINT_PROBE: bcc would attach it at load. The loader attaches it (to
 * count_memcg_events) only while some watch is armed: a per-page program costs every charge on
 * the host (~2 calls per 4 KiB page: PGFAULT and PGPGIN), so it runs only while a watched call is
 * within reach of a threshold. Its usage is absolute, so arming late loses nothing. */
/* Charges seen per CPU: the program looks at every 2^MW_SAMPLE_SHIFT-th one. The usage it reads
 * is absolute, so a skipped charge is caught up by the next one looked at: a crossing is seen at
 * most 2^MW_SAMPLE_SHIFT charges on that CPU late (64 KiB of 4 KiB pages at 4), and the program's
 * work (three reads for the cgroup id, the filter, the maps) runs on 1 charge in 16. What stays
 * per charge is the tracepoint's own call, which no program can save. */
BPF_PERCPU_ARRAY(sample_tick, u64, 1);

int memwatch_counter(struct bpf_raw_tracepoint_args *ctx)
{
	int item = (int)ctx->args[1];
	if (item != MW_ITEM_PGPGIN && item != MW_ITEM_PGPGOUT)
		return 0;
	u32 zero = 0;
	u64 *tick = sample_tick.lookup(&zero);
	if (!tick || ((*tick)++ & ((1 << MW_SAMPLE_SHIFT) - 1)))
		return 0;
	const void *memcg = (const void *)ctx->args[0];
	u64 id = memcg_cgroup_id(memcg);
	struct watch *w = lookup_watch(id);
	if (!w)
		return 0;
	struct watch_state *st = watch_state.lookup(&id);
	if (!st)
		return 0;
	rearm(w, st);
	long usage = 0;
	if (bpf_probe_read_kernel(&usage, sizeof(usage), memcg + MW_OFF_MEMCG_USAGE))
		return 0;
	st->usage_pages = usage;
	return check_usage(id, w, st, usage);
}
#endif

TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin)
{
	u32 tgid = current_tgid();
	u64 *cg = pids.lookup(&tgid);
	if (!cg)
		return 0;
	u64 id = *cg;
	struct watch *w = watches.lookup(&id);
	if (!w)
		return 0;
	struct watch_state *st = watch_state.lookup(&id);
	if (!st)
		return 0;
	rearm(w, st);
	__sync_fetch_and_add(&st->reclaims, 1);
	if (fire_once(st, MW_FIRED_LIMIT))
		emit(MW_LIMIT, id, tgid, pages_to_bytes(st->usage_pages), w->limit_bytes);
	return 0;
}

/* Emit `kind` for a process mapped to a watched cgroup. */
static __always_inline void emit_for_task(u32 kind, u64 id, u32 pid)
{
	struct watch *w = watches.lookup(&id);
	if (!w)
		return;
	struct watch_state *st = watch_state.lookup(&id);
	u64 usage_bytes = st ? pages_to_bytes(st->usage_pages) : 0;
	emit(kind, id, pid, usage_bytes, w->limit_bytes);
}

TRACEPOINT_PROBE(oom, mark_victim)
{
	/* `pid` is the victim thread's id; it is the tgid unless a non-leader thread was picked.
	 * For a memcg OOM the task running here is the one that hit the limit, in the same cgroup:
	 * fall back to it so a threaded victim is still attributed. */
	u32 pid = args->pid;
	u64 *cg = pids.lookup(&pid);
	if (!cg) {
		pid = current_tgid();
		cg = pids.lookup(&pid);
		if (!cg)
			return 0;
		pid = args->pid;
	}
	emit_for_task(MW_OOM_KILL, *cg, pid);
	return 0;
}

/* Runs in the parent after copy_process passed its last failure point and before the child
 * can run, so a child can neither exit before its entry exists nor leave one behind on a
 * failed fork. Threads share their process's entry. */
TRACEPOINT_PROBE(task, task_newtask)
{
	if (args->clone_flags & MW_CLONE_THREAD)
		return 0;
	u32 parent = current_tgid();
	u64 *cg = pids.lookup(&parent);
	if (!cg)
		return 0;
	u64 id = *cg;
	if (!watches.lookup(&id))
		return 0; /* being unwatched: do not add entries behind the sweep */
	u32 child = args->pid;
	if (pids.update(&child, &id))
		count_drop(MW_DROP_PIDS);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 tgid = current_tgid();
	u64 *cg = pids.lookup(&tgid);
	if (!cg)
		return 0;
	emit_for_task(MW_EXEC, *cg, tgid);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	/* Once per process: when its last thread exits, where the tracepoint says so (its
	 * group_dead field: 6.18 has it, 6.12 does not; the loader reads the format file). Without
	 * it, when its leader thread exits: a process whose leader exits first (pthread_exit in
	 * main) then loses its entry while its other threads still run. */
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32;
#ifdef MW_EXIT_GROUP_DEAD
	if (!args->group_dead)
		return 0;
#else
	if ((u32)pid_tgid != tgid)
		return 0;
#endif
	u64 *cg = pids.lookup(&tgid);
	if (!cg)
		return 0;
	u64 id = *cg;
	pids.delete(&tgid);
	emit_for_task(MW_EXIT, id, tgid);
	return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver)
{
	if (args->sig != MW_SIGSTOP)
		return 0;
	u32 tgid = current_tgid();
	u64 *cg = pids.lookup(&tgid);
	if (!cg)
		return 0;
	emit_for_task(MW_STOPPED, *cg, tgid);
	return 0;
}
