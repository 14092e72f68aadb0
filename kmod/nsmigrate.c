// SPDX-License-Identifier: GPL-2.0
/*
 * nsmigrate: live migration of a process into another PID namespace.
 *
 * A caller with CAP_SYS_ADMIN over both namespaces and ptrace access to a
 * process asks, through an ioctl on /dev/nsmigrate, that the process move
 * into a target PID namespace, all its threads in one step. The process
 * keeps its memory, files and credentials; each thread gets a new struct
 * pid allocated in the target (numbers in the target and all its
 * ancestors), the process a parent there, a new session and process group,
 * and its future children and threads are born there.
 * What it owns that names it by its struct pid (POSIX timers, F_SETOWN
 * owners) follows it; what cannot follow is refused or documented in
 * kmod/README.md, with every refusal.
 *
 * The switch never writes the pid links of a task that could be running:
 * a task work queued with task_work_add(TWA_SIGNAL) on every thread parks
 * each thread in its own context on its way back to user space, where it
 * cannot be cloning; the last thread to arrive relinks them all under
 * tasklist_lock, and each thread then switches its own nsproxy. The ioctl
 * waits for it, bounded and interruptibly.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/capability.h>
#include <linux/delay.h>
#include <linux/completion.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/fs_struct.h>
#include <linux/kprobes.h>
#include <linux/ktime.h>
#include <linux/magic.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/nsproxy.h>
#include <linux/pid.h>
#include <linux/pid_namespace.h>
#include <linux/posix-timers.h>
#include <linux/proc_fs.h>
#include <linux/proc_ns.h>
#include <linux/ptrace.h>
#include <linux/refcount.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/task_work.h>
#include <linux/fdtable.h>
#include <linux/timerqueue.h>
#include <linux/tty.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include "nsmigrate.h"

#define NSM_VERSION "2.0"
/* Attempts while the set of threads changes under the move. */
#define NSM_ATTEMPTS 50

/* Kernel symbols this module needs but the kernel does not export. */
static struct {
	typeof(alloc_pid) *alloc_pid;
	typeof(free_pid) *free_pid;
	typeof(change_pid) *change_pid;
	typeof(switch_task_namespaces) *switch_task_namespaces;
	typeof(free_nsproxy) *free_nsproxy;
	typeof(pidfd_get_pid) *pidfd_get_pid;
	typeof(proc_flush_pid) *proc_flush_pid;
	typeof(proc_clear_tty) *proc_clear_tty;
	typeof(ptrace_may_access) *ptrace_may_access;
	typeof(copy_fs_struct) *copy_fs_struct;
	typeof(free_fs_struct) *free_fs_struct;
	typeof(set_fs_root) *set_fs_root;
	typeof(set_fs_pwd) *set_fs_pwd;
	typeof(task_work_cancel) *task_work_cancel;
	typeof(send_sigqueue) *send_sigqueue;
	struct nsproxy *(*create_new_namespaces)(unsigned long flags,
						 struct task_struct *tsk,
						 struct user_namespace *user_ns,
						 struct fs_struct *new_fs);
	rwlock_t *tasklist_lock;
} ksym;

struct nsm_symbol {
	const char *name;
	void **addr;
	bool is_function;
};

#define NSM_FUNC(sym) { #sym, (void **)&ksym.sym, true }

static const struct nsm_symbol nsm_symbols[] = {
	NSM_FUNC(alloc_pid),
	NSM_FUNC(free_pid),
	NSM_FUNC(change_pid),
	NSM_FUNC(switch_task_namespaces),
	NSM_FUNC(free_nsproxy),
	NSM_FUNC(pidfd_get_pid),
	NSM_FUNC(proc_flush_pid),
	NSM_FUNC(proc_clear_tty),
	NSM_FUNC(ptrace_may_access),
	NSM_FUNC(copy_fs_struct),
	NSM_FUNC(free_fs_struct),
	NSM_FUNC(set_fs_root),
	NSM_FUNC(set_fs_pwd),
	NSM_FUNC(task_work_cancel),
	NSM_FUNC(send_sigqueue),
	NSM_FUNC(create_new_namespaces),
	{ "tasklist_lock", (void **)&ksym.tasklist_lock, false },
};

/* Why a request failed, for the counters in /proc/nsmigrate. */
enum nsm_reason {
	NSM_R_ESRCH,
	NSM_R_EINVAL,
	NSM_R_EPERM,
	NSM_R_EBUSY,
	NSM_R_ENXIO,
	NSM_R_EINTR,
	NSM_R_ETIMEDOUT,
	NSM_R_OTHER,
	NSM_R_MAX,
};

static const char * const nsm_reason_names[NSM_R_MAX] = {
	"esrch", "einval", "eperm", "ebusy", "enxio", "eintr", "etimedout",
	"other",
};

/* Why a request was refused with EBUSY, counted apart in /proc/nsmigrate. */
enum nsm_busy {
	NSM_B_THREADS,
	NSM_B_CHILDREN,
	NSM_B_PTRACE,
	NSM_B_VFORK,
	NSM_B_PARENT,
	NSM_B_CPU_TIMER,
	NSM_B_IO_WORKER,
	NSM_B_EXEC,
	NSM_B_MQUEUE,
	NSM_B_MAX,
};

static const char * const nsm_busy_names[NSM_B_MAX] = {
	"threads", "children", "ptrace", "vfork", "parent", "foreign_cpu_timer",
	"io_worker", "exec", "mqueue",
};

static atomic_long_t nsm_busy[NSM_B_MAX];
static atomic_long_t nsm_done;
static atomic_long_t nsm_retried;
static atomic_long_t nsm_in_flight;
static atomic_long_t nsm_refused[NSM_R_MAX];

/* One request: what the caller asked, shared by its attempts. */
struct nsm_work {
	refcount_t ref;
	struct pid_namespace *target;
	struct pid *parent;
	struct pid *caller;
	struct ns_common *mntns;	/* held by the waiter's file */
	u32 flags;
	u64 t_queued;
};

static void nsm_work_put(struct nsm_work *w)
{
	if (!refcount_dec_and_test(&w->ref))
		return;
	put_pid(w->parent);
	put_pid(w->caller);
	put_pid_ns(w->target);
	kfree(w);
}

/*
 * One attempt to move every thread of a process. The waiter and each queued
 * task work hold a reference. @state goes GATHER -> COMMIT -> DONE, or
 * GATHER/COMMIT -> ABORTED, each step taken once under @lock: threads
 * arrive and wait while it is GATHER; the last to arrive commits; the waiter
 * or a dying thread may abort only while it is GATHER.
 */
enum nsm_state { NSM_GATHER, NSM_COMMIT, NSM_DONE, NSM_ABORTED };

struct nsm_group;

/* One thread of the process, its task work and what it moves to. */
struct nsm_thread {
	struct callback_head cb;
	struct nsm_group *g;
	struct task_struct *task;
	struct nsproxy *nsp;
	struct pid *old;
	struct pid *pid;
	pid_t old_vnr;
	bool queued;
};

struct nsm_group {
	refcount_t ref;
	spinlock_t lock;	/* serializes the steps of @state, with @err */
	int state;
	int err;
	atomic_t arrived;
	atomic_t finished;
	wait_queue_head_t wq;
	struct nsm_work *w;
	struct task_struct *leader;
	struct nsm_thread *lead;	/* the leader's slot */
	struct nsm_thread *self;	/* the waiter's, if it is a thread */
	struct files_struct *files;	/* whose F_SETOWN owners are done */
	struct fs_struct *fs;		/* with NSMIGRATE_F_MNTNS */
	struct pid *new_pid;
	u64 t_start;
	int n;
	struct nsm_thread th[];
};

static void nsm_group_put(struct nsm_group *g)
{
	int i;

	if (!refcount_dec_and_test(&g->ref))
		return;
	for (i = 0; i < g->n; i++) {
		put_pid(g->th[i].old);
		if (g->th[i].task)
			put_task_struct(g->th[i].task);
	}
	put_pid(g->new_pid);
	nsm_work_put(g->w);
	kvfree(g);
}

static struct nsm_group *nsm_group_alloc(struct nsm_work *w,
					 struct task_struct *leader, int n)
{
	struct nsm_group *g;
	int i;

	g = kvzalloc(struct_size(g, th, n), GFP_KERNEL);
	if (!g)
		return NULL;
	refcount_set(&g->ref, 1);
	spin_lock_init(&g->lock);
	g->state = NSM_GATHER;
	init_waitqueue_head(&g->wq);
	refcount_inc(&w->ref);
	g->w = w;
	g->leader = leader;
	g->n = n;
	for (i = 0; i < n; i++)
		g->th[i].g = g;
	return g;
}

static int nsm_state(struct nsm_group *g)
{
	/* Pairs with nsm_step(): what the step's taker wrote is visible. */
	return smp_load_acquire(&g->state);
}

static bool nsm_settled(struct nsm_group *g)
{
	int state = nsm_state(g);

	return state == NSM_DONE || state == NSM_ABORTED;
}

/* Take the step @from -> @to (recording @err); false if another took one. */
static bool nsm_step(struct nsm_group *g, int from, int to, int err)
{
	bool ok;

	spin_lock(&g->lock);
	ok = g->state == from;
	if (ok) {
		g->err = err;
		/* Publishes what was done before the step (nsm_state()). */
		smp_store_release(&g->state, to);
	}
	spin_unlock(&g->lock);
	if (ok && to != NSM_COMMIT)
		wake_up_all(&g->wq);
	return ok;
}

static int nsm_group_err(struct nsm_group *g)
{
	int err;

	spin_lock(&g->lock);
	err = g->err;
	spin_unlock(&g->lock);
	return err;
}

static void nsm_count_refusal(int err)
{
	enum nsm_reason r;

	switch (err) {
	case -ESRCH:
		r = NSM_R_ESRCH;
		break;
	case -EINVAL:
		r = NSM_R_EINVAL;
		break;
	case -EPERM:
		r = NSM_R_EPERM;
		break;
	case -EBUSY:
		r = NSM_R_EBUSY;
		break;
	case -ENXIO:
		r = NSM_R_ENXIO;
		break;
	case -EINTR:
		r = NSM_R_EINTR;
		break;
	case -ETIMEDOUT:
		r = NSM_R_ETIMEDOUT;
		break;
	default:
		r = NSM_R_OTHER;
	}
	atomic_long_inc(&nsm_refused[r]);
}

/* put_nsproxy() is inline and calls free_nsproxy(), which is not exported. */
static void nsm_put_nsproxy(struct nsproxy *ns)
{
#ifdef NSM_NSPROXY_REFCOUNT
	if (refcount_dec_and_test(&ns->count))
		ksym.free_nsproxy(ns);
#else
	if (atomic_dec_and_test(&ns->count))
		ksym.free_nsproxy(ns);
#endif
}

static bool nsm_pidns_within(struct pid_namespace *ns,
			     struct pid_namespace *ancestor)
{
	while (ns->level > ancestor->level)
		ns = ns->parent;
	return ns == ancestor;
}

static bool nsm_target_alive(struct pid_namespace *target)
{
	/* zap_pid_namespace() clears PIDNS_ADDING once its init is dying. */
	return READ_ONCE(target->pid_allocated) & PIDNS_ADDING;
}

static int nsm_refuse_busy(enum nsm_busy why)
{
	atomic_long_inc(&nsm_busy[why]);
	return -EBUSY;
}

/*
 * A PID namespace init reaps orphans by vocation and the caller asked for
 * the move; any other parent would see its child vanish without an exit
 * status, and a shell would take that for success.
 */
static bool nsm_parent_may_lose(struct task_struct *tsk,
				const struct nsm_work *w)
{
	struct task_struct *parent;

	if (w->flags & NSMIGRATE_F_LEAVE_PARENT)
		return true;
	parent = rcu_dereference_check(tsk->real_parent,
				       lockdep_is_held(ksym.tasklist_lock));
	return is_child_reaper(task_tgid(parent)) ||
	       task_tgid(parent) == w->caller;
}

/* What makes process @tsk impossible to move now; tasklist_lock or RCU. */
static int nsm_check_task(struct task_struct *tsk, const struct nsm_work *w)
{
	/* NULL once the task has been released, which RCU does not prevent. */
	struct pid *pid = READ_ONCE(tsk->thread_pid);

	RCU_LOCKDEP_WARN(!rcu_read_lock_held() &&
			 !lockdep_is_held(ksym.tasklist_lock),
			 "needs RCU or tasklist_lock");
	if (tsk->flags & PF_KTHREAD)
		return -EINVAL;
	if (!pid || tsk->flags & PF_EXITING || tsk->exit_state ||
	    fatal_signal_pending(tsk) ||
	    tsk->signal->flags & SIGNAL_GROUP_EXIT)
		return -ESRCH;
	if (is_child_reaper(pid))
		return -EINVAL;
	if (ns_of_pid(pid) == w->target)
		return -EINVAL;
	if (READ_ONCE(tsk->signal->group_exec_task))
		return nsm_refuse_busy(NSM_B_EXEC);
	/* Checked again, exactly, once the threads are parked (nsm_copy_fs). */
	if (w->mntns && READ_ONCE(tsk->signal->nr_threads) != 1)
		return -EINVAL;
	if (!nsm_parent_may_lose(tsk, w))
		return nsm_refuse_busy(NSM_B_PARENT);
	/* No init yet: alloc_pid() would make the mover PID 1 (see README). */
	if (!nsm_target_alive(w->target) || !READ_ONCE(w->target->child_reaper))
		return -ENXIO;
	return 0;
}

static bool nsm_is_worker(struct task_struct *t)
{
#ifdef PF_USER_WORKER
	if (t->flags & PF_USER_WORKER)
		return true;
#endif
	return t->flags & PF_IO_WORKER;
}

/*
 * What keeps thread @t from moving with its process; tasklist_lock or RCU.
 * A thread on its way out makes the attempt retry (-EAGAIN) without it.
 */
static int nsm_check_thread(struct task_struct *t)
{
	/* io_uring's io-wq and SQPOLL threads never return to user space. */
	if (nsm_is_worker(t))
		return nsm_refuse_busy(NSM_B_IO_WORKER);
	if (t->ptrace || !list_empty(&t->ptraced))
		return nsm_refuse_busy(NSM_B_PTRACE);
	if (!list_empty(&t->children))
		return nsm_refuse_busy(NSM_B_CHILDREN);
	if (t->vfork_done)
		return nsm_refuse_busy(NSM_B_VFORK);
	if (t->flags & PF_EXITING)
		return -EAGAIN;
	return 0;
}

/* The process-wide checks, then every thread's; tasklist_lock or RCU. */
static int nsm_check_process(struct task_struct *leader,
			     const struct nsm_work *w)
{
	struct task_struct *t;
	int err;

	err = nsm_check_task(leader, w);
	if (err)
		return err;
	for_each_thread(leader, t) {
		err = nsm_check_thread(t);
		if (err)
			return err;
	}
	return 0;
}

static bool nsm_unfit_parent(struct task_struct *p)
{
	return p->flags & PF_KTHREAD || nsm_is_worker(p);
}

/* The task that will be @tsk's parent in @target; tasklist_lock held. */
static int nsm_new_parent(struct nsm_work *w, struct task_struct **parent)
{
	struct task_struct *p = w->target->child_reaper;

	lockdep_assert_held_write(ksym.tasklist_lock);
	if (w->parent) {
		p = pid_task(w->parent, PIDTYPE_TGID);
		if (!p || p->flags & PF_EXITING ||
		    p->signal->flags & SIGNAL_GROUP_EXIT)
			return -ESRCH;
		if (task_active_pid_ns(p) != w->target || nsm_unfit_parent(p))
			return -EINVAL;
	}
	if (!p || p->flags & PF_EXITING)
		return -ENXIO;
	*parent = p;
	return 0;
}

/*
 * A CPU-clock timer of another process armed on @tsk's clocks: its owner
 * would find no task behind the old pid when deleting it and leave the
 * freed timer queued (review F1). Own timers are retargeted instead.
 */
static bool nsm_foreign_cpu_timers(struct posix_cputimers *pct,
				   struct signal_struct *sig)
{
	struct timerqueue_node *node;
	struct k_itimer *t;
	int i;

	for (i = 0; i < CPUCLOCK_MAX; i++) {
		node = timerqueue_getnext(&pct->bases[i].tqhead);
		for (; node; node = timerqueue_iterate_next(node)) {
			t = container_of(node, struct k_itimer, it.cpu.node);
			if (t->it_signal != sig)
				return true;
		}
	}
	return false;
}

#ifdef NSM_POSIX_TIMERS_HLIST
#define nsm_for_each_timer(t, sig) \
	hlist_for_each_entry(t, &(sig)->posix_timers, list)
#else
#define nsm_for_each_timer(t, sig) \
	list_for_each_entry(t, &(sig)->posix_timers, list)
#endif

/*
 * A periodic hrtimer-based timer that expired between the relinking and
 * its retargeting found no task behind the old pid: posix_timer_fn()
 * dropped the signal and, as the rearm happens when the signal is
 * dequeued, the timer stopped. Its signal is neither pending nor the timer
 * armed: send the signal it was due, which rearms it. CPU-clock timers
 * expire in the task's own context, not concurrently with this.
 */
static void nsm_resend_lost_signal(struct k_itimer *t)
{
	enum pid_type type;

	lockdep_assert_held(&t->it_lock);
	if (t->it_clock < 0 || !t->it_interval || t->it_active ||
	    t->it_sigev_notify == SIGEV_NONE || !list_empty(&t->sigq->list))
		return;
	type = t->it_sigev_notify & SIGEV_THREAD_ID ? PIDTYPE_PID : PIDTYPE_TGID;
	ksym.send_sigqueue(t->sigq, t->it_pid, type);
}

/* The new pid of the thread whose pid was @old, or NULL. */
static struct pid *nsm_new_pid_of(struct nsm_group *g, struct pid *old)
{
	int i;

	for (i = 0; i < g->n; i++)
		if (g->th[i].old == old)
			return g->th[i].pid;
	return NULL;
}

/* Foreign CPU-clock timers on the process clock or on any thread's clock. */
static bool nsm_group_foreign_cpu_timers(struct nsm_group *g)
{
	struct signal_struct *sig = g->leader->signal;
	int i;

	if (nsm_foreign_cpu_timers(&sig->posix_cputimers, sig))
		return true;
	for (i = 0; i < g->n; i++)
		if (nsm_foreign_cpu_timers(&g->th[i].task->posix_cputimers,
					   sig))
			return true;
	return false;
}

static void nsm_swap_pid(struct pid **slot, struct pid *pid)
{
	struct pid *old = *slot;

	*slot = get_pid(pid);
	put_pid(old);
}

/*
 * Point the process's own POSIX timers at the new pids: the signal target
 * of every timer (the process, or a thread for SIGEV_THREAD_ID) and the
 * clock of CPU-clock timers (it_clock < 0). Only the process adds or
 * deletes its timers, and all its threads are parked. The references to
 * old pids dropped here cannot be their last: the group holds one each.
 */
static void nsm_retarget_timers(struct nsm_group *g)
{
	struct k_itimer *t;
	struct pid *pid;

	lockdep_assert_held_write(ksym.tasklist_lock);
	nsm_for_each_timer(t, g->leader->signal) {
		spin_lock(&t->it_lock);
		pid = nsm_new_pid_of(g, t->it_pid);
		if (pid)
			nsm_swap_pid(&t->it_pid, pid);
		pid = t->it_clock < 0 ? nsm_new_pid_of(g, t->it.cpu.pid) : NULL;
		if (pid)
			nsm_swap_pid(&t->it.cpu.pid, pid);
		nsm_resend_lost_signal(t);
		spin_unlock(&t->it_lock);
	}
	/* /proc/PID/timers reads it_pid under siglock only: let it finish. */
	spin_lock(&g->leader->sighand->siglock);
	spin_unlock(&g->leader->sighand->siglock);
}

/* A thread's parent links follow its process's; tasklist_lock held. */
static void nsm_set_parent(struct task_struct *t, struct task_struct *parent)
{
	lockdep_assert_held_write(ksym.tasklist_lock);
	rcu_assign_pointer(t->real_parent, parent);
	rcu_assign_pointer(t->parent, parent);
	t->parent_exec_id = parent->self_exec_id;
	/* It was armed against the old parent, which is not the parent now. */
	t->pdeath_signal = 0;
}

/*
 * Move every thread's pid link, then the process's TGID, PGID and SID
 * links, parent and session, as one step under the write side of
 * tasklist_lock, like release_task() and setsid(). An old struct pid is
 * freed by change_pid() once its last link is gone, which releases its
 * numbers in the source namespaces. Returns the controlling tty the
 * process had, with its reference.
 */
static struct tty_struct *nsm_move_locked(struct nsm_group *g,
					  struct task_struct *parent)
{
	struct task_struct *leader = g->leader;
	struct pid *tgid = g->lead->pid;
	struct tty_struct *tty;
	int i;

	lockdep_assert_held_write(ksym.tasklist_lock);
	lockdep_assert_held(&leader->sighand->siglock);
	/* A waiter in the old parent rescans and finds the process gone. */
	__wake_up_sync_key(&leader->real_parent->signal->wait_chldexit,
			   TASK_INTERRUPTIBLE, leader);

	for (i = 0; i < g->n; i++) {
		ksym.change_pid(g->th[i].task, PIDTYPE_PID, g->th[i].pid);
		WRITE_ONCE(g->th[i].task->pid, pid_nr(g->th[i].pid));
	}
	ksym.change_pid(leader, PIDTYPE_TGID, tgid);
	for (i = 0; i < g->n; i++) {
		WRITE_ONCE(g->th[i].task->tgid, pid_nr(tgid));
		nsm_set_parent(g->th[i].task, parent);
	}

	leader->signal->leader = 1;
	ksym.change_pid(leader, PIDTYPE_PGID, tgid);
	ksym.change_pid(leader, PIDTYPE_SID, tgid);
	/* proc_clear_tty() would take the siglock we hold. */
	tty = leader->signal->tty;
	leader->signal->tty = NULL;

	leader->exit_signal = SIGCHLD;
	/* As copy_process(): orphans go to the nearest subreaper above. */
	leader->signal->has_child_subreaper =
		parent->signal->has_child_subreaper ||
		parent->signal->is_child_subreaper;
	list_move_tail(&leader->sibling, &parent->children);
	return tty;
}

/*
 * Every thread is parked: check the process again, and that its threads
 * are exactly the parked ones (a clone() that raced the queueing added
 * one: retry), then relink them all.
 */
static int nsm_relink(struct nsm_group *g, struct tty_struct **tty,
		      bool *sid_leader)
{
	struct task_struct *leader = g->leader;
	struct task_struct *parent;
	int err;

	write_lock_irq(ksym.tasklist_lock);
	err = nsm_check_process(leader, g->w);
	if (!err && leader->signal->nr_threads != g->n)
		err = -EAGAIN;
	if (!err)
		err = nsm_new_parent(g->w, &parent);
	if (err)
		goto out;
	spin_lock(&leader->sighand->siglock);
	if (nsm_group_foreign_cpu_timers(g)) {
		spin_unlock(&leader->sighand->siglock);
		err = nsm_refuse_busy(NSM_B_CPU_TIMER);
		goto out;
	}
	*sid_leader = leader->signal->leader &&
		      task_session(leader) == g->lead->old;
	*tty = nsm_move_locked(g, parent);
	spin_unlock(&leader->sighand->siglock);
	nsm_retarget_timers(g);
out:
	write_unlock_irq(ksym.tasklist_lock);
	return err;
}

/*
 * A session leader leaves its session: as its exit would
 * (disassociate_ctty()), the terminal forgets the session, its foreground
 * group gets SIGHUP and SIGCONT, the other members lose it as controlling
 * terminal. The mover itself already left that group.
 */
static void nsm_leave_tty(struct tty_struct *tty, struct pid *old_sid)
{
	struct task_struct *p;
	unsigned long flags;
	struct pid *fg;

	read_lock(ksym.tasklist_lock);
	do_each_pid_task(old_sid, PIDTYPE_SID, p) {
		ksym.proc_clear_tty(p);
	} while_each_pid_task(old_sid, PIDTYPE_SID, p);
	read_unlock(ksym.tasklist_lock);

	fg = tty_get_pgrp(tty);
	if (fg) {
		kill_pgrp(fg, SIGHUP, 1);
		kill_pgrp(fg, SIGCONT, 1);
		put_pid(fg);
	}
	tty_lock(tty);
	spin_lock_irqsave(&tty->ctrl.lock, flags);
	if (tty->ctrl.session == old_sid) {
		put_pid(tty->ctrl.session);
		put_pid(tty->ctrl.pgrp);
		tty->ctrl.session = NULL;
		tty->ctrl.pgrp = NULL;
	}
	spin_unlock_irqrestore(&tty->ctrl.lock, flags);
	tty_unlock(tty);
}

static struct fown_struct *nsm_f_owner(struct file *file)
{
#ifdef NSM_F_OWNER_PTR
	return file_f_owner(file);
#else
	return &file->f_owner;
#endif
}

/*
 * libc may cache its TID at the set_tid_address() address (glibc does;
 * musl registers a lock word there): rewrite it only where it holds the
 * old TID.
 */
static void nsm_fix_tid_cache(struct task_struct *tsk, pid_t old_vnr)
{
	u32 __user *uaddr = (u32 __user *)tsk->clear_child_tid;
	u32 cur;

	if (uaddr && !get_user(cur, uaddr) && cur == old_vnr)
		put_user(task_pid_vnr(tsk), uaddr);
}

/*
 * F_SETOWN/F_SETOWN_EX owners naming the process or one of its threads
 * follow them (SIGIO, SIGURG).
 */
static int nsm_retarget_owner(const void *arg, struct file *file,
			      unsigned int fd)
{
	struct nsm_group *g = (struct nsm_group *)arg;
	struct fown_struct *fown = nsm_f_owner(file);
	enum pid_type type;
	struct pid *pid;

	if (!fown)
		return 0;
	read_lock_irq(&fown->lock);
	type = fown->pid_type;
	pid = type == PIDTYPE_PGID ? NULL : nsm_new_pid_of(g, fown->pid);
	read_unlock_irq(&fown->lock);
	if (pid)
		__f_setown(file, pid, type, 1);
	return 0;
}

/*
 * Root and cwd must be the process's alone, as for setns(CLONE_NEWNS): a
 * shared fs_struct (a second thread, or CLONE_FS with another process) is
 * refused. Stable 6.12 checks this in the namespace's own install, on the
 * calling task ("mount: refuse setns() with a shared fs_struct again");
 * checking it here gives one rule on every kernel. Copy them for the join.
 */
static int nsm_copy_fs(struct nsm_group *g)
{
	struct fs_struct *fs = g->leader->fs;
	int users;

	spin_lock(&fs->lock);
	users = fs->users;
	spin_unlock(&fs->lock);
	if (g->n != 1 || users != 1)
		return -EINVAL;
	g->fs = ksym.copy_fs_struct(fs);
	return g->fs ? 0 : -ENOMEM;
}

/*
 * Join w->mntns in @nsp and in the group's copy of the fs_struct, as
 * setns() does (prepare_nsset(), mntns_install()): the namespace's own
 * install checks the task's credentials (CAP_SYS_ADMIN over the
 * namespace's owner, CAP_SYS_CHROOT and CAP_SYS_ADMIN in its user
 * namespace). Nothing a thread sees changes until the move is committed.
 */
static int nsm_prepare_mntns(struct nsm_group *g, struct nsproxy *nsp)
{
	struct nsset nss = {
		.flags = CLONE_NEWNS,
		.nsproxy = nsp,
		.cred = current_cred(),
		.fs = g->fs,
	};

	return g->w->mntns->ops->install(&nss, g->w->mntns);
}

/*
 * A parked thread's new nsproxy (its own namespaces, except that children
 * and threads are born in the target, as copy_process() requires of
 * CLONE_THREAD) and its new pid. The thread cannot change its nsproxy
 * while parked.
 */
static int nsm_prepare_thread(struct nsm_group *g, struct nsm_thread *th)
{
	struct pid_namespace *target = g->w->target;
	struct task_struct *t = th->task;
	struct nsproxy *nsp;
	struct pid *pid;
	int err;

	nsp = ksym.create_new_namespaces(0, t, current_user_ns(), t->fs);
	if (IS_ERR(nsp))
		return PTR_ERR(nsp);
	put_pid_ns(nsp->pid_ns_for_children);
	nsp->pid_ns_for_children = get_pid_ns(target);
	th->nsp = nsp;
	if (g->fs) {
		err = nsm_prepare_mntns(g, nsp);
		if (err)
			return err;
	}
	th->old = get_pid(task_pid(t));
	/* The TID as the thread itself sees it (libc's cache). */
	th->old_vnr = pid_nr_ns(th->old, ns_of_pid(th->old));
	pid = ksym.alloc_pid(target, NULL, 0);
	if (IS_ERR(pid))
		return nsm_target_alive(target) ? PTR_ERR(pid) : -ENXIO;
	th->pid = pid;
	return 0;
}

/* Undo nsm_prepare(): nothing of it was linked to any task. */
static void nsm_unprepare(struct nsm_group *g)
{
	struct nsm_thread *th;

	for (th = g->th; th < g->th + g->n; th++) {
		if (th->pid)
			ksym.free_pid(th->pid);
		th->pid = NULL;
		if (th->nsp)
			nsm_put_nsproxy(th->nsp);
		th->nsp = NULL;
	}
	if (g->fs)
		ksym.free_fs_struct(g->fs);
	g->fs = NULL;
}

static int nsm_is_mqueue(const void *arg, struct file *file, unsigned int fd)
{
	return !strcmp(file_inode(file)->i_sb->s_type->name, "mqueue");
}

/*
 * An mq_notify() registration keeps its owner's struct pid in the queue's
 * inode, private to ipc/mqueue.c, and is dropped when the owner closes the
 * queue: a process that holds no queue has none, one that holds a queue may
 * have one the module cannot reach, so it is refused. Every thread is
 * parked, so no thread's files_struct changes under us.
 */
static int nsm_check_mqueues(struct nsm_group *g)
{
	struct files_struct *files;
	int i;

	for (i = 0; i < g->n; i++) {
		files = READ_ONCE(g->th[i].task->files);
		if (!files || (i && files == g->th[0].task->files))
			continue;
		if (iterate_fd(files, 0, nsm_is_mqueue, NULL))
			return nsm_refuse_busy(NSM_B_MQUEUE);
	}
	return 0;
}

/* Everything the relinking needs, allocated first (the leader's pid first). */
static int nsm_prepare(struct nsm_group *g)
{
	struct nsm_thread *th;
	int err;

	/* Before alloc_pid(), which would make the mover a missing init. */
	if (!READ_ONCE(g->w->target->child_reaper))
		return -ENXIO;
	err = nsm_check_mqueues(g);
	if (err)
		return err;
	if (g->w->mntns) {
		err = nsm_copy_fs(g);
		if (err)
			return err;
	}
	err = nsm_prepare_thread(g, g->lead);
	for (th = g->th; !err && th < g->th + g->n; th++)
		if (th != g->lead)
			err = nsm_prepare_thread(g, th);
	return err;
}

/* After the relinking, in the committing thread (these sleep). */
static void nsm_after_relink(struct nsm_group *g, struct tty_struct *tty,
			     bool sid_leader)
{
	struct nsm_thread *th;

	if (g->fs) {
		/* As commit_nsset() does with setns()'s temporary fs_struct. */
		ksym.set_fs_root(current->fs, &g->fs->root);
		ksym.set_fs_pwd(current->fs, &g->fs->pwd);
		ksym.free_fs_struct(g->fs);
		g->fs = NULL;
	}
	for (th = g->th; th < g->th + g->n; th++) {
		ksym.proc_flush_pid(th->old);
		/* pidfd pollers of the old pid: 6.12 wakes them in change_pid(). */
		wake_up_all(&th->old->wait_pidfd);
	}
	if (tty) {
		if (sid_leader)
			nsm_leave_tty(tty, g->lead->old);
		tty_kref_put(tty);
	}
	g->files = current->files;
	if (g->files)
		iterate_fd(g->files, 0, nsm_retarget_owner, g);
	g->new_pid = get_pid(g->lead->pid);
}

/* The last thread to arrive moves them all, or none. */
static void nsm_commit(struct nsm_group *g)
{
	struct tty_struct *tty = NULL;
	bool sid_leader = false;
	int err;

	if (!nsm_step(g, NSM_GATHER, NSM_COMMIT, 0))
		return;
	g->t_start = ktime_get_ns();
	err = nsm_prepare(g);
	if (!err)
		err = nsm_relink(g, &tty, &sid_leader);
	if (err) {
		nsm_unprepare(g);
		nsm_step(g, NSM_COMMIT, NSM_ABORTED, err);
		return;
	}
	nsm_after_relink(g, tty, sid_leader);
	nsm_step(g, NSM_COMMIT, NSM_DONE, 0);
}

/*
 * A parked thread that is exiting or killed stops the attempt: exec kills
 * the other threads (EBUSY), a fatal signal the process (ESRCH); a single
 * thread's exit makes the attempt retry without it.
 */
static void nsm_abort_dying(struct nsm_group *g)
{
	struct signal_struct *sig = current->signal;
	int err = sig->flags & SIGNAL_GROUP_EXIT ? -ESRCH : -EAGAIN;

	if (READ_ONCE(sig->group_exec_task))
		err = -EBUSY;
	if (nsm_step(g, NSM_GATHER, NSM_ABORTED, err) && err == -EBUSY)
		atomic_long_inc(&nsm_busy[NSM_B_EXEC]);
}

static void nsm_arrive(struct nsm_thread *th)
{
	struct nsm_group *g = th->g;

	if (current->flags & PF_EXITING || fatal_signal_pending(current))
		nsm_abort_dying(g);
	if (atomic_inc_return(&g->arrived) == g->n)
		nsm_commit(g);
}

/* A thread's own part, after the commit: its nsproxy and libc's TID. */
static void nsm_finish_thread(struct nsm_thread *th)
{
	struct nsm_group *g = th->g;

	ksym.switch_task_namespaces(current, th->nsp);
	th->nsp = NULL;
	if (current->files && current->files != g->files)
		iterate_fd(current->files, 0, nsm_retarget_owner, g);
	nsm_fix_tid_cache(current, th->old_vnr);
	if (atomic_inc_return(&g->finished) == g->n)
		wake_up_all(&g->wq);
}

static void nsm_task_work(struct callback_head *cb)
{
	struct nsm_thread *th = container_of(cb, struct nsm_thread, cb);
	struct nsm_group *g = th->g;

	nsm_arrive(th);
	if (wait_event_killable(g->wq, nsm_settled(g))) {
		nsm_abort_dying(g);
		wait_event(g->wq, nsm_settled(g));
	}
	if (nsm_state(g) == NSM_DONE)
		nsm_finish_thread(th);
	nsm_group_put(g);
	/* Taken when this work was queued: the module stays while it is. */
	module_put(THIS_MODULE);
}

static int nsm_queue_one(struct nsm_thread *th)
{
	refcount_inc(&th->g->ref);
	__module_get(THIS_MODULE);
	init_task_work(&th->cb, nsm_task_work);
	if (task_work_add(th->task, &th->cb, TWA_SIGNAL)) {
		/* Past exit_task_work(): the thread is on its way out. */
		refcount_dec(&th->g->ref);
		module_put(THIS_MODULE);
		return -EAGAIN;
	}
	th->queued = true;
	return 0;
}

/*
 * Queue the work on every thread but the waiter's, under tasklist_lock: no
 * thread is added or released meanwhile (copy_process() and release_task()
 * take its write side). A clone() already past its signal check still adds
 * a thread after this; nsm_relink() sees it and the attempt is retried.
 */
static int nsm_queue(struct nsm_group *g)
{
	struct nsm_thread *th = g->th;
	struct task_struct *t;
	int err = 0;

	read_lock(ksym.tasklist_lock);
	if (!pid_alive(g->leader)) {
		err = -ESRCH;
		goto out;
	}
	if (g->leader->signal->nr_threads != g->n) {
		err = -EAGAIN;
		goto out;
	}
	for_each_thread(g->leader, t) {
		if (th == g->th + g->n) {
			err = -EAGAIN;
			break;
		}
		th->task = get_task_struct(t);
		if (t == g->leader)
			g->lead = th;
		if (t == current)
			g->self = th;
		else
			err = nsm_queue_one(th);
		if (err)
			break;
		th++;
	}
	if (!err && !g->lead)
		err = -ESRCH;
out:
	read_unlock(ksym.tasklist_lock);
	return err;
}

/* Abandon the attempt unless a thread is committing it; unqueue the rest. */
static void nsm_cancel(struct nsm_group *g, int err)
{
	struct nsm_thread *th;

	nsm_step(g, NSM_GATHER, NSM_ABORTED, err);
	if (nsm_state(g) != NSM_ABORTED)
		return;
	/* Nothing lingers on a stopped thread. */
	for (th = g->th; th < g->th + g->n; th++) {
		if (!th->queued || !ksym.task_work_cancel(th->task, &th->cb))
			continue;
		nsm_group_put(g);	/* not the last: the waiter holds one */
		module_put(THIS_MODULE);
	}
}

/* Park every thread and wait, bounded and interruptibly, for the commit. */
static int nsm_run_group(struct nsm_group *g, u64 timeout_ns)
{
	long left;
	int err;

	err = nsm_queue(g);
	if (err) {
		nsm_cancel(g, err);
		return err;
	}
	/* The waiter is a thread of the process: it is parked right here. */
	if (g->self)
		nsm_arrive(g->self);
	left = wait_event_interruptible_timeout(g->wq, nsm_settled(g),
						nsecs_to_jiffies(timeout_ns));
	if (left <= 0) {
		nsm_cancel(g, left ? -EINTR : -ETIMEDOUT);
		/* A commit cannot be undone, and does not block: wait for it. */
		wait_event(g->wq, nsm_settled(g));
	}
	if (nsm_state(g) != NSM_DONE)
		return nsm_group_err(g);
	if (g->self)
		nsm_finish_thread(g->self);
	wait_event(g->wq, atomic_read(&g->finished) == g->n);
	return 0;
}

/* One attempt: every thread of @leader moves, or none does. */
static int nsm_attempt(struct task_struct *leader, struct nsm_work *w,
		       u64 timeout_ns, struct nsmigrate_req *req)
{
	struct nsm_group *g;
	int n, err;

	rcu_read_lock();
	err = nsm_check_process(leader, w);
	n = READ_ONCE(leader->signal->nr_threads);
	rcu_read_unlock();
	if (err)
		return err;
	g = nsm_group_alloc(w, leader, n);
	if (!g)
		return -ENOMEM;
	err = nsm_run_group(g, timeout_ns);
	if (!err) {
		req->new_pid = pid_vnr(g->new_pid);
		req->new_pid_in_target = pid_nr_ns(g->new_pid, w->target);
		req->t_queued_ns = w->t_queued;
		req->t_switch_start_ns = g->t_start;
		req->t_switch_done_ns = ktime_get_ns();
	}
	nsm_group_put(g);
	return err;
}

/*
 * Attempts are retried while the set of threads changes under them (a
 * clone() racing the queueing, a thread exiting), within the timeout.
 */
static int nsm_move(struct task_struct *leader, struct nsm_work *w,
		    struct nsmigrate_req *req)
{
	u64 timeout = req->timeout_ns ?: NSMIGRATE_DEFAULT_TIMEOUT_NS;
	u64 deadline = ktime_get_ns() + timeout;
	int i, err;
	u64 now;

	w->t_queued = ktime_get_ns();
	for (i = 0; i < NSM_ATTEMPTS; i++) {
		now = ktime_get_ns();
		/* The first attempt runs even with no time left: ETIMEDOUT. */
		if (i && now >= deadline)
			break;
		err = nsm_attempt(leader, w, now < deadline ? deadline - now : 0,
				  req);
		if (err != -EAGAIN)
			return err;
		atomic_long_inc(&nsm_retried);
		if (signal_pending(current))
			return -EINTR;
		usleep_range(500, 1000);
	}
	return nsm_refuse_busy(NSM_B_THREADS);
}

static struct task_struct *nsm_get_task(const struct nsmigrate_req *req)
{
	struct task_struct *tsk;
	unsigned int f_flags;
	struct pid *pid;

	if (req->flags & NSMIGRATE_F_PIDFD) {
		if (req->pid < 0)
			return ERR_PTR(-EBADF);
		pid = ksym.pidfd_get_pid(req->pid, &f_flags);
		if (IS_ERR(pid))
			return ERR_CAST(pid);
	} else {
		if (req->pid <= 0)
			return ERR_PTR(-EINVAL);
		pid = find_get_pid(req->pid);
		if (!pid)
			return ERR_PTR(-ESRCH);
	}
	tsk = get_pid_task(pid, PIDTYPE_PID);
	/* A pidfd may name a process the caller cannot see. */
	if (tsk && !pid_vnr(pid)) {
		put_task_struct(tsk);
		tsk = ERR_PTR(-EPERM);
	}
	put_pid(pid);
	return tsk ? tsk : ERR_PTR(-ESRCH);
}

/* The target namespace from a /proc/PID/ns/pid fd or from a pidfd. */
static struct pid_namespace *nsm_get_target(int fd)
{
	struct pid_namespace *ns = ERR_PTR(-EINVAL);
	struct ns_common *nsc;
	unsigned int f_flags;
	struct file *file;
	struct pid *pid;

	if (fd < 0)
		return ERR_PTR(-EBADF);
	file = fget(fd);
	if (!file)
		return ERR_PTR(-EBADF);
	if (file_inode(file)->i_sb->s_magic == NSFS_MAGIC) {
		nsc = get_proc_ns(file_inode(file));
		if (nsc->ops->type == CLONE_NEWPID)
			ns = get_pid_ns(container_of(nsc, struct pid_namespace,
						     ns));
		fput(file);
		return ns;
	}
	fput(file);

	pid = ksym.pidfd_get_pid(fd, &f_flags);
	if (IS_ERR(pid))
		return ERR_PTR(-EINVAL);
	ns = get_pid_ns(ns_of_pid(pid));
	put_pid(pid);
	return ns;
}

/*
 * The mount namespace named by an fd of a /proc/PID/ns/mnt file; the file
 * keeps it alive while the caller holds it. As setns(2), the caller needs
 * CAP_SYS_ADMIN over the namespace's owner.
 */
static struct file *nsm_get_mntns(int fd, struct ns_common **nsc)
{
	struct file *file;
	int err = -EINVAL;

	if (fd < 0)
		return ERR_PTR(-EBADF);
	file = fget(fd);
	if (!file)
		return ERR_PTR(-EBADF);
	if (file_inode(file)->i_sb->s_magic != NSFS_MAGIC)
		goto out;
	*nsc = get_proc_ns(file_inode(file));
	if ((*nsc)->ops->type != CLONE_NEWNS)
		goto out;
	err = -EPERM;
	if (!ns_capable((*nsc)->ops->owner(*nsc), CAP_SYS_ADMIN))
		goto out;
	return file;
out:
	fput(file);
	return ERR_PTR(err);
}

/*
 * Permissions, checked before anything else so that a caller without them
 * learns nothing else about the process.
 */
static int nsm_permitted(struct task_struct *tsk, const struct nsm_work *w)
{
	struct pid_namespace *target = w->target;
	struct pid_namespace *src;
	struct pid *pid;
	int err = 0;

	rcu_read_lock();
	pid = READ_ONCE(tsk->thread_pid);
	src = pid ? get_pid_ns(ns_of_pid(pid)) : NULL;
	rcu_read_unlock();
	if (!src)
		return -ESRCH;

	if (!ns_capable(src->user_ns, CAP_SYS_ADMIN) ||
	    !ns_capable(target->user_ns, CAP_SYS_ADMIN))
		err = -EPERM;
	/* As setns(2): the caller must see the namespace it moves into. */
	else if (!nsm_pidns_within(target, task_active_pid_ns(current)))
		err = -EPERM;
	/* As pidfd_getfd(2) and setns(2) on another task. */
	else if (!ksym.ptrace_may_access(tsk, PTRACE_MODE_ATTACH_REALCREDS))
		err = -EPERM;
	put_pid_ns(src);
	return err;
}

static struct nsm_work *nsm_work_alloc(const struct nsmigrate_req *req,
				       struct pid_namespace *target)
{
	struct nsm_work *w;

	w = kzalloc(sizeof(*w), GFP_KERNEL);
	if (!w)
		return ERR_PTR(-ENOMEM);
	refcount_set(&w->ref, 1);
	w->target = get_pid_ns(target);
	w->caller = get_pid(task_tgid(current));
	w->flags = req->flags;
	return w;
}

/* The chosen parent, after the permission checks. */
static int nsm_work_parent(struct nsm_work *w, const struct nsmigrate_req *req)
{
	if (!(req->flags & NSMIGRATE_F_PARENT))
		return 0;
	w->parent = req->parent > 0 ? find_get_pid(req->parent) : NULL;
	return w->parent ? 0 : -ESRCH;
}

/* The process of the named task: its thread group leader. */
static struct task_struct *nsm_get_leader(struct task_struct *tsk)
{
	struct task_struct *leader;

	rcu_read_lock();
	leader = get_task_struct(READ_ONCE(tsk->group_leader));
	rcu_read_unlock();
	put_task_struct(tsk);
	return leader;
}

static int nsm_migrate(struct nsmigrate_req *req)
{
	struct pid_namespace *target;
	struct file *mnt_file = NULL;
	struct task_struct *tsk;
	struct nsm_work *w;
	int err;

	tsk = nsm_get_task(req);
	if (IS_ERR(tsk))
		return PTR_ERR(tsk);
	tsk = nsm_get_leader(tsk);
	target = nsm_get_target(req->target_fd);
	if (IS_ERR(target)) {
		err = PTR_ERR(target);
		goto out_task;
	}
	w = nsm_work_alloc(req, target);
	if (IS_ERR(w)) {
		err = PTR_ERR(w);
		goto out_target;
	}
	err = nsm_permitted(tsk, w);
	if (!err)
		err = nsm_work_parent(w, req);
	if (!err && req->flags & NSMIGRATE_F_MNTNS) {
		mnt_file = nsm_get_mntns(req->mntns_fd, &w->mntns);
		if (IS_ERR(mnt_file)) {
			err = PTR_ERR(mnt_file);
			mnt_file = NULL;
		}
	}
	if (err)
		goto out_work;

	atomic_long_inc(&nsm_in_flight);
	err = nsm_move(tsk, w, req);
	atomic_long_dec(&nsm_in_flight);
out_work:
	/* Only a committing thread uses w->mntns, and the waiter waits for it. */
	if (mnt_file)
		fput(mnt_file);
	nsm_work_put(w);
out_target:
	put_pid_ns(target);
out_task:
	put_task_struct(tsk);
	return err;
}

#define NSM_F_VER2	(NSMIGRATE_F_LEAVE_PARENT | NSMIGRATE_F_MNTNS)
#define NSM_REPLY_END	offsetofend(struct nsmigrate_req, t_switch_done_ns)

static long nsm_ioctl_migrate(struct nsmigrate_req __user *ureq)
{
	struct nsmigrate_req req;
	u32 size;
	int err;

	if (get_user(size, &ureq->size))
		return -EFAULT;
	if (size < NSMIGRATE_REQ_SIZE_VER1 || size > PAGE_SIZE)
		return -EINVAL;
	err = copy_struct_from_user(&req, sizeof(req), ureq, size);
	if (err)
		return err;
	if (req.version < 1 || req.version > NSMIGRATE_ABI_VERSION ||
	    req.flags & ~NSMIGRATE_F_ALL || req.reserved ||
	    (req.version == 1 && req.flags & NSM_F_VER2) ||
	    req.timeout_ns > NSMIGRATE_MAX_TIMEOUT_NS)
		return -EINVAL;
	/* Fail on an unwritable reply before anything moves, not after. */
	if (clear_user(&ureq->new_pid, NSM_REPLY_END -
		       offsetof(struct nsmigrate_req, new_pid)))
		return -EFAULT;

	err = nsm_migrate(&req);
	if (err) {
		nsm_count_refusal(err);
		return err;
	}
	atomic_long_inc(&nsm_done);
	/* The reply fields all lie in the first version's struct. */
	if (copy_to_user(ureq, &req, NSM_REPLY_END))
		return -EFAULT;
	return 0;
}

static long nsm_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	switch (cmd) {
	case NSMIGRATE_IOC_VERSION:
		return NSMIGRATE_ABI_VERSION;
	case NSMIGRATE_IOC_MIGRATE:
		return nsm_ioctl_migrate((struct nsmigrate_req __user *)arg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations nsm_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = nsm_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice nsm_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "nsmigrate",
	.fops = &nsm_fops,
	.mode = 0600,
};

static int nsm_stats_show(struct seq_file *m, void *v)
{
	int i;

	seq_printf(m, "abi_version %d\n", NSMIGRATE_ABI_VERSION);
	seq_printf(m, "migrations %ld\n", atomic_long_read(&nsm_done));
	seq_printf(m, "in_flight %ld\n", atomic_long_read(&nsm_in_flight));
	seq_printf(m, "attempts_retried %ld\n", atomic_long_read(&nsm_retried));
	for (i = 0; i < NSM_R_MAX; i++)
		seq_printf(m, "refused_%s %ld\n", nsm_reason_names[i],
			   atomic_long_read(&nsm_refused[i]));
	for (i = 0; i < NSM_B_MAX; i++)
		seq_printf(m, "busy_%s %ld\n", nsm_busy_names[i],
			   atomic_long_read(&nsm_busy[i]));
	return 0;
}

static struct proc_dir_entry *nsm_proc;

/*
 * With indirect branch tracking on, calling a function through a pointer
 * needs an ENDBR at its start; objtool removes it from functions that the
 * kernel itself never calls indirectly.
 */
#ifdef CONFIG_X86_KERNEL_IBT
static bool nsm_is_endbr(unsigned long addr)
{
	u32 insn;

	if (copy_from_kernel_nofault(&insn, (void *)addr, sizeof(insn)))
		return false;
	return insn == 0xfa1e0ff3;	/* endbr64 */
}
#endif

static bool nsm_ibt_callable(unsigned long addr)
{
#ifdef CONFIG_X86_KERNEL_IBT
	if (cpu_feature_enabled(X86_FEATURE_IBT))
		return nsm_is_endbr(addr);
#endif
	return true;
}

static unsigned long nsm_kallsyms_lookup_name(const char *name)
{
	static unsigned long (*lookup)(const char *name);
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long addr;

	if (!lookup) {
		if (register_kprobe(&kp) < 0)
			return 0;
		addr = (unsigned long)kp.addr;
		unregister_kprobe(&kp);
#ifdef CONFIG_X86_KERNEL_IBT
		/* kprobes place themselves after the ENDBR (or its poison). */
		if (nsm_is_endbr(addr - 4))
			addr -= 4;
#endif
		/* A sealed function has no ENDBR: do not call it (#CP). */
		if (!nsm_ibt_callable(addr)) {
			pr_err("kallsyms_lookup_name cannot be called indirectly on this CPU (IBT)\n");
			return 0;
		}
		lookup = (void *)addr;
	}
	return lookup(name);
}

static int nsm_resolve_symbols(void)
{
	const struct nsm_symbol *s;
	unsigned long addr;

	for (s = nsm_symbols; s < nsm_symbols + ARRAY_SIZE(nsm_symbols); s++) {
		addr = nsm_kallsyms_lookup_name(s->name);
		if (!addr) {
			pr_err("kernel symbol %s not found; this kernel is not supported\n",
			       s->name);
			return -ENOENT;
		}
		if (s->is_function && !nsm_ibt_callable(addr)) {
			pr_err("%s cannot be called indirectly on this CPU (IBT)\n",
			       s->name);
			return -EOPNOTSUPP;
		}
		*s->addr = (void *)addr;
	}
	return 0;
}

static int __init nsm_init(void)
{
	int err;

	err = nsm_resolve_symbols();
	if (err)
		return err;
	nsm_proc = proc_create_single("nsmigrate", 0444, NULL, nsm_stats_show);
	if (!nsm_proc)
		return -ENOMEM;
	err = misc_register(&nsm_dev);
	if (err) {
		proc_remove(nsm_proc);
		return err;
	}
	pr_info("version %s loaded (ABI %d)\n", NSM_VERSION,
		NSMIGRATE_ABI_VERSION);
	return 0;
}

static void __exit nsm_exit(void)
{
	misc_deregister(&nsm_dev);
	proc_remove(nsm_proc);
	pr_info("unloaded\n");
}

module_init(nsm_init);
module_exit(nsm_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Live migration of a process into another PID namespace");
MODULE_VERSION(NSM_VERSION);
