// SPDX-License-Identifier: GPL-2.0
/*
 * nsmigrate: live migration of a process into another PID namespace.
 *
 * A caller with CAP_SYS_ADMIN over both namespaces and ptrace access to a
 * single-threaded process asks, through an ioctl on /dev/nsmigrate, that
 * the process move into a target PID namespace. The process keeps its
 * memory, files and credentials; it gets a new struct pid allocated in the
 * target (numbers in the target and all its ancestors), a parent there, a
 * new session and process group, and its future children are born there.
 * What it owns that names it by its struct pid (POSIX timers, F_SETOWN
 * owners) follows it; what cannot follow is refused or documented in
 * kmod/README.md, with every refusal.
 *
 * The switch never writes another task's pid links or nsproxy from outside:
 * it is queued with task_work_add(TWA_SIGNAL) and runs in the migrating
 * task's own context on its way back to user space, where it cannot be
 * forking. The ioctl waits for it, bounded and interruptibly.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/capability.h>
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
	NSM_B_MAX,
};

static const char * const nsm_busy_names[NSM_B_MAX] = {
	"threads", "children", "ptrace", "vfork", "parent", "foreign_cpu_timer",
};

static atomic_long_t nsm_busy[NSM_B_MAX];
static atomic_long_t nsm_done;
static atomic_long_t nsm_in_flight;
static atomic_long_t nsm_refused[NSM_R_MAX];

/*
 * One queued switch. The waiter and the task work each hold a reference;
 * @state decides, exactly once, whether the switch runs or is abandoned.
 */
enum nsm_state { NSM_QUEUED, NSM_RUNNING, NSM_ABANDONED };

struct nsm_work {
	struct callback_head cb;
	refcount_t ref;
	atomic_t state;
	struct completion done;
	struct pid_namespace *target;
	struct pid *parent;
	struct pid *caller;
	struct ns_common *mntns;	/* held by the waiter's file */
	u32 flags;
	struct pid *new_pid;
	int err;
	u64 t_queued;
	u64 t_start;
	u64 t_done;
};

static void nsm_work_put(struct nsm_work *w)
{
	if (!refcount_dec_and_test(&w->ref))
		return;
	put_pid(w->new_pid);
	put_pid(w->parent);
	put_pid(w->caller);
	put_pid_ns(w->target);
	kfree(w);
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

/* What makes @tsk impossible to move right now; tasklist_lock or RCU held. */
static int nsm_check_task(struct task_struct *tsk, const struct nsm_work *w)
{
	/* NULL once the task has been released, which RCU does not prevent. */
	struct pid *pid = READ_ONCE(tsk->thread_pid);

	RCU_LOCKDEP_WARN(!rcu_read_lock_held() &&
			 !lockdep_is_held(ksym.tasklist_lock),
			 "needs RCU or tasklist_lock");
	if (tsk->flags & (PF_KTHREAD | PF_IO_WORKER))
		return -EINVAL;
	if (!pid || tsk->flags & PF_EXITING || tsk->exit_state ||
	    fatal_signal_pending(tsk))
		return -ESRCH;
	if (is_child_reaper(pid))
		return -EINVAL;
	if (ns_of_pid(pid) == w->target)
		return -EINVAL;
	/* Not supported in this version: see kmod/README.md. */
	if (!thread_group_empty(tsk))
		return nsm_refuse_busy(NSM_B_THREADS);
	if (!list_empty(&tsk->children))
		return nsm_refuse_busy(NSM_B_CHILDREN);
	if (tsk->ptrace || !list_empty(&tsk->ptraced))
		return nsm_refuse_busy(NSM_B_PTRACE);
	if (tsk->vfork_done)
		return nsm_refuse_busy(NSM_B_VFORK);
	if (!nsm_parent_may_lose(tsk, w))
		return nsm_refuse_busy(NSM_B_PARENT);
	/* No init yet: alloc_pid() would make the mover PID 1 (see README). */
	if (!nsm_target_alive(w->target) || !READ_ONCE(w->target->child_reaper))
		return -ENXIO;
	return 0;
}

static bool nsm_unfit_parent(struct task_struct *p)
{
#ifdef PF_USER_WORKER
	if (p->flags & PF_USER_WORKER)
		return true;
#endif
	return p->flags & (PF_KTHREAD | PF_IO_WORKER);
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

/*
 * Point @tsk's own POSIX timers at @pid: the signal target of every timer,
 * and the clock of CPU-clock timers (it_clock < 0). Only @tsk adds or
 * deletes its timers, and it is running this. The references to @old
 * dropped here cannot be its last: the caller holds one.
 */
static void nsm_retarget_timers(struct task_struct *tsk, struct pid *old,
				struct pid *pid)
{
	struct k_itimer *t;

	lockdep_assert_held_write(ksym.tasklist_lock);
	nsm_for_each_timer(t, tsk->signal) {
		spin_lock(&t->it_lock);
		if (t->it_pid == old) {
			t->it_pid = get_pid(pid);
			put_pid(old);
		}
		if (t->it_clock < 0 && t->it.cpu.pid == old) {
			t->it.cpu.pid = get_pid(pid);
			put_pid(old);
		}
		nsm_resend_lost_signal(t);
		spin_unlock(&t->it_lock);
	}
	/* /proc/PID/timers reads it_pid under siglock only: let it finish. */
	spin_lock(&tsk->sighand->siglock);
	spin_unlock(&tsk->sighand->siglock);
}

/*
 * Move @tsk's pid links, parent and session to @pid and @parent, as one
 * step under the write side of tasklist_lock, like release_task() and
 * setsid(). The old struct pid is freed by change_pid() once its last link
 * is gone, which releases its numbers in the source namespaces. Returns the
 * controlling tty @tsk had, with its reference.
 */
static struct tty_struct *nsm_move_locked(struct task_struct *tsk,
					  struct pid *pid,
					  struct task_struct *parent)
{
	struct task_struct *old_parent = tsk->real_parent;
	struct tty_struct *tty;

	lockdep_assert_held_write(ksym.tasklist_lock);
	lockdep_assert_held(&tsk->sighand->siglock);
	/* A waiter in the old parent rescans and finds @tsk gone. */
	__wake_up_sync_key(&old_parent->signal->wait_chldexit,
			   TASK_INTERRUPTIBLE, tsk);

	ksym.change_pid(tsk, PIDTYPE_PID, pid);
	WRITE_ONCE(tsk->pid, pid_nr(pid));
	ksym.change_pid(tsk, PIDTYPE_TGID, pid);
	WRITE_ONCE(tsk->tgid, tsk->pid);

	tsk->signal->leader = 1;
	ksym.change_pid(tsk, PIDTYPE_PGID, pid);
	ksym.change_pid(tsk, PIDTYPE_SID, pid);
	/* proc_clear_tty() would take the siglock we hold. */
	tty = tsk->signal->tty;
	tsk->signal->tty = NULL;

	rcu_assign_pointer(tsk->real_parent, parent);
	rcu_assign_pointer(tsk->parent, parent);
	tsk->parent_exec_id = parent->self_exec_id;
	tsk->exit_signal = SIGCHLD;
	/* As copy_process(): orphans go to the nearest subreaper above. */
	tsk->signal->has_child_subreaper =
		parent->signal->has_child_subreaper ||
		parent->signal->is_child_subreaper;
	/* It was armed against the old parent, which is not the parent now. */
	tsk->pdeath_signal = 0;
	list_move_tail(&tsk->sibling, &parent->children);
	return tty;
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

struct nsm_owner {
	struct pid *old;
	struct pid *pid;
};

static struct fown_struct *nsm_f_owner(struct file *file)
{
#ifdef NSM_F_OWNER_PTR
	return file_f_owner(file);
#else
	return &file->f_owner;
#endif
}

/* F_SETOWN/F_SETOWN_EX owners naming the mover follow it (SIGIO, SIGURG). */
static int nsm_retarget_owner(const void *arg, struct file *file,
			      unsigned int fd)
{
	const struct nsm_owner *o = arg;
	struct fown_struct *fown = nsm_f_owner(file);
	enum pid_type type;
	bool match;

	if (!fown)
		return 0;
	read_lock_irq(&fown->lock);
	type = fown->pid_type;
	match = fown->pid == o->old && type != PIDTYPE_PGID;
	read_unlock_irq(&fown->lock);
	if (match)
		__f_setown(file, o->pid, type, 1);
	return 0;
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
 * Join w->mntns in @nsp and in a copy of the task's fs_struct, as setns()
 * does (prepare_nsset(), mntns_install()): the namespace's own install
 * checks the task's credentials (CAP_SYS_ADMIN over the namespace's owner,
 * CAP_SYS_CHROOT and CAP_SYS_ADMIN in its user namespace). Nothing the
 * task sees changes until the copy is committed after the move.
 */
static int nsm_prepare_mntns(struct nsm_work *w, struct nsproxy *nsp,
			     struct fs_struct **fs)
{
	struct nsset nss = {
		.flags = CLONE_NEWNS,
		.nsproxy = nsp,
		.cred = current_cred(),
	};
	int err;

	/* Root and cwd are shared with another process (CLONE_FS). */
	if (current->fs->users != 1)
		return -EINVAL;
	nss.fs = ksym.copy_fs_struct(current->fs);
	if (!nss.fs)
		return -ENOMEM;
	err = w->mntns->ops->install(&nss, w->mntns);
	if (err) {
		ksym.free_fs_struct(nss.fs);
		return err;
	}
	*fs = nss.fs;
	return 0;
}

/* The switch itself, in the migrating task's own context. */
static int nsm_switch(struct nsm_work *w)
{
	struct task_struct *tsk = current;
	struct nsm_owner owner;
	struct fs_struct *fs;
	struct task_struct *parent;
	struct tty_struct *tty;
	struct nsproxy *nsp;
	struct pid *pid, *old;
	bool sid_leader;
	pid_t old_vnr;
	int err;

	w->t_start = ktime_get_ns();
	if (tsk->flags & PF_EXITING || fatal_signal_pending(tsk))
		return -ESRCH;
	/* Before alloc_pid(), which would make the mover a missing init. */
	if (!READ_ONCE(w->target->child_reaper))
		return -ENXIO;

	/* Same namespaces, except that children are born in the target. */
	nsp = ksym.create_new_namespaces(0, tsk, current_user_ns(), tsk->fs);
	if (IS_ERR(nsp))
		return PTR_ERR(nsp);
	put_pid_ns(nsp->pid_ns_for_children);
	nsp->pid_ns_for_children = get_pid_ns(w->target);
	fs = NULL;
	if (w->mntns) {
		err = nsm_prepare_mntns(w, nsp, &fs);
		if (err)
			goto out_nsp;
	}

	pid = ksym.alloc_pid(w->target, NULL, 0);
	if (IS_ERR(pid)) {
		err = nsm_target_alive(w->target) ? PTR_ERR(pid) : -ENXIO;
		goto out_nsp;
	}

	old = get_pid(task_pid(tsk));
	old_vnr = task_pid_vnr(tsk);
	write_lock_irq(ksym.tasklist_lock);
	err = nsm_check_task(tsk, w);
	if (err)
		goto out_unlock;
	err = nsm_new_parent(w, &parent);
	if (err)
		goto out_unlock;
	spin_lock(&tsk->sighand->siglock);
	if (nsm_foreign_cpu_timers(&tsk->signal->posix_cputimers,
				   tsk->signal)) {
		spin_unlock(&tsk->sighand->siglock);
		err = nsm_refuse_busy(NSM_B_CPU_TIMER);
		goto out_unlock;
	}
	sid_leader = tsk->signal->leader && task_session(tsk) == old;
	tty = nsm_move_locked(tsk, pid, parent);
	spin_unlock(&tsk->sighand->siglock);
	nsm_retarget_timers(tsk, old, pid);
	write_unlock_irq(ksym.tasklist_lock);

	ksym.switch_task_namespaces(tsk, nsp);
	if (fs) {
		/* As commit_nsset() does with setns()'s temporary fs_struct. */
		ksym.set_fs_root(tsk->fs, &fs->root);
		ksym.set_fs_pwd(tsk->fs, &fs->pwd);
		ksym.free_fs_struct(fs);
	}
	ksym.proc_flush_pid(old);
	/* pidfd pollers of the old pid: 6.12 wakes them in change_pid(). */
	wake_up_all(&old->wait_pidfd);
	if (tty) {
		if (sid_leader)
			nsm_leave_tty(tty, old);
		tty_kref_put(tty);
	}
	owner.old = old;
	owner.pid = pid;
	if (tsk->files)
		iterate_fd(tsk->files, 0, nsm_retarget_owner, &owner);
	nsm_fix_tid_cache(tsk, old_vnr);
	put_pid(old);

	w->new_pid = get_pid(pid);
	return 0;

out_unlock:
	write_unlock_irq(ksym.tasklist_lock);
	put_pid(old);
	ksym.free_pid(pid);
out_nsp:
	if (fs)
		ksym.free_fs_struct(fs);
	nsm_put_nsproxy(nsp);
	return err;
}

static void nsm_finish(struct nsm_work *w)
{
	w->err = nsm_switch(w);
	w->t_done = ktime_get_ns();
	complete(&w->done);
}

static void nsm_task_work(struct callback_head *cb)
{
	struct nsm_work *w = container_of(cb, struct nsm_work, cb);

	if (atomic_cmpxchg(&w->state, NSM_QUEUED, NSM_RUNNING) == NSM_QUEUED)
		nsm_finish(w);
	nsm_work_put(w);
	/* Taken when this work was queued: the module stays while it is. */
	module_put(THIS_MODULE);
}

/* Queue the switch on @tsk and wait for it, bounded and interruptibly. */
static int nsm_run_in_task(struct task_struct *tsk, struct nsm_work *w,
			   u64 timeout_ns)
{
	long left;
	int err;

	if (tsk == current) {
		nsm_finish(w);
		return w->err;
	}

	__module_get(THIS_MODULE);
	refcount_inc(&w->ref);
	err = task_work_add(tsk, &w->cb, TWA_SIGNAL);
	if (err) {
		refcount_dec(&w->ref);
		module_put(THIS_MODULE);
		return -ESRCH;
	}

	left = wait_for_completion_interruptible_timeout(&w->done,
							 nsecs_to_jiffies(timeout_ns));
	if (left > 0)
		return w->err;
	/* Give up, unless the switch has started: it cannot be undone. */
	if (atomic_cmpxchg(&w->state, NSM_QUEUED, NSM_ABANDONED) == NSM_QUEUED) {
		/* Unqueue it too: nothing lingers on a stopped task. */
		if (ksym.task_work_cancel(tsk, &w->cb)) {
			nsm_work_put(w);
			module_put(THIS_MODULE);
		}
		return left ? -EINTR : -ETIMEDOUT;
	}
	wait_for_completion(&w->done);
	return w->err;
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
 * Refusals that need no help from the task, checked before queueing;
 * permissions first, so that a caller without them learns nothing else.
 */
static int nsm_precheck(struct task_struct *tsk, const struct nsm_work *w)
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
	if (err)
		return err;

	rcu_read_lock();
	err = nsm_check_task(tsk, w);
	rcu_read_unlock();
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
	atomic_set(&w->state, NSM_QUEUED);
	init_completion(&w->done);
	init_task_work(&w->cb, nsm_task_work);
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

static int nsm_migrate(struct nsmigrate_req *req)
{
	struct pid_namespace *target;
	struct file *mnt_file = NULL;
	struct task_struct *tsk;
	struct nsm_work *w;
	u64 timeout;
	int err;

	tsk = nsm_get_task(req);
	if (IS_ERR(tsk))
		return PTR_ERR(tsk);
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
	err = nsm_precheck(tsk, w);
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

	timeout = req->timeout_ns ?: NSMIGRATE_DEFAULT_TIMEOUT_NS;
	atomic_long_inc(&nsm_in_flight);
	w->t_queued = ktime_get_ns();
	err = nsm_run_in_task(tsk, w, timeout);
	atomic_long_dec(&nsm_in_flight);
	if (!err) {
		req->new_pid = pid_vnr(w->new_pid);
		req->new_pid_in_target = pid_nr_ns(w->new_pid, target);
		req->t_queued_ns = w->t_queued;
		req->t_switch_start_ns = w->t_start;
		req->t_switch_done_ns = w->t_done;
	}
out_work:
	/* A queued work that was abandoned never runs: nothing uses w->mntns. */
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
