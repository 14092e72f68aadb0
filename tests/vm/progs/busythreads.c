// SPDX-License-Identifier: GPL-2.0
/*
 * A process with 8 busy threads (a pthread program as most real ones are).
 * Commands, each answered with one line (see nsm_prog.h):
 *   info    the PID and every thread's TID, loop count and SIGUSR1 count,
 *           as the threads themselves see them
 *   tgkill  the main thread sends SIGUSR1 to every thread with tgkill()
 *   raise   every thread raise()s SIGUSR2 on itself (libc's cached TID)
 *   spawn   a new thread that stays, blocked (its TID)
 *   join    a new thread created and joined
 *   churn   a thread that creates and joins threads in a loop from now on
 *   churned how many it created, and how many creations failed
 *   vfork   a thread vfork()s a child that exits after 2 s
 *   robust  every busy thread locks its robust mutex and exits holding
 *           it; the main thread then locks each (EOWNERDEAD if the kernel
 *           released it at its owner's death)
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

#include "nsm_prog.h"

#define NTHREADS 8

static atomic_long loops[NTHREADS];
static atomic_int tids[NTHREADS];
static atomic_int usr1[NTHREADS];
static atomic_int raised[NTHREADS];
static atomic_int raise_rc[NTHREADS];
static atomic_int want_raise;
static atomic_int want_exit;
static atomic_int spawned_tid;
static atomic_long churned, churn_failed;
static pthread_mutex_t robust[NTHREADS];

static int index_of(pid_t tid)
{
	int i;

	for (i = 0; i < NTHREADS; i++)
		if (atomic_load(&tids[i]) == tid)
			return i;
	return -1;
}

static void on_usr1(int sig)
{
	int i = index_of(nsm_gettid());

	(void)sig;
	if (i >= 0)
		atomic_fetch_add(&usr1[i], 1);
}

/* Reached the thread that raised it: libc's TID was the thread's own. */
static void on_usr2(int sig)
{
	int i = index_of(nsm_gettid());

	(void)sig;
	if (i >= 0)
		atomic_store(&raised[i], 1);
}

static void *spin(void *arg)
{
	long i = (long)arg;
	int done_raise = 0;

	for (;;) {
		atomic_store(&tids[i], nsm_gettid());
		atomic_fetch_add(&loops[i], 1);
		if (atomic_load(&want_raise) && !done_raise) {
			done_raise = 1;
			atomic_store(&raise_rc[i], raise(SIGUSR2));
		}
		if (atomic_load(&want_exit)) {
			pthread_mutex_lock(&robust[i]);
			return NULL;	/* dies holding it */
		}
		usleep(200);	/* busy, but the 2-CPU guest stays usable */
	}
	return NULL;
}

static void *stay(void *arg)
{
	(void)arg;
	atomic_store(&spawned_tid, nsm_gettid());
	for (;;)
		pause();
	return NULL;
}

static void *report_tid(void *arg)
{
	(void)arg;
	return (void *)(long)nsm_gettid();
}

static void *churn(void *arg)
{
	pthread_t t;

	(void)arg;
	for (;;) {
		if (pthread_create(&t, NULL, report_tid, NULL)) {
			atomic_fetch_add(&churn_failed, 1);
			usleep(1000);
			continue;
		}
		pthread_join(t, NULL);
		atomic_fetch_add(&churned, 1);
	}
	return NULL;
}

static void *vforker(void *arg)
{
	struct timespec five = { 5, 0 };

	(void)arg;
	if (vfork() == 0) {
		syscall(SYS_nanosleep, &five, NULL);
		_exit(0);
	}
	return NULL;
}

static void ms_sleep(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static void cmd_info(void)
{
	int i;

	printf("pid=%d", getpid());
	for (i = 0; i < NTHREADS; i++)
		printf(" tid%d=%d loops%d=%ld usr1_%d=%d", i, atomic_load(&tids[i]), i,
		       atomic_load(&loops[i]), i, atomic_load(&usr1[i]));
	nsm_reply(" ");
}

static void cmd_tgkill(void)
{
	int rc[NTHREADS], i;

	for (i = 0; i < NTHREADS; i++)
		rc[i] = syscall(SYS_tgkill, getpid(), atomic_load(&tids[i]), SIGUSR1) ? errno : 0;
	ms_sleep(300);
	for (i = 0; i < NTHREADS; i++)
		printf("tgkill%d=%d usr1_%d=%d ", i, rc[i], i, atomic_load(&usr1[i]));
	nsm_reply(" ");
}

static void cmd_raise(void)
{
	int i;

	atomic_store(&want_raise, 1);
	ms_sleep(500);
	for (i = 0; i < NTHREADS; i++)
		printf("raised%d=%d raise_rc%d=%d ", i, atomic_load(&raised[i]), i,
		       atomic_load(&raise_rc[i]));
	nsm_reply(" ");
}

static void cmd_spawn(void)
{
	pthread_t t;
	int rc = pthread_create(&t, NULL, stay, NULL);

	while (!rc && !atomic_load(&spawned_tid))
		ms_sleep(10);
	nsm_reply("spawn=%d tid=%d", rc, atomic_load(&spawned_tid));
}

static void cmd_join(void)
{
	void *tid = NULL;
	pthread_t t;
	int rc = pthread_create(&t, NULL, report_tid, NULL);
	int jrc = rc ? -1 : pthread_join(t, &tid);

	nsm_reply("created=%d joined=%d tid=%ld", rc, jrc, (long)tid);
}

static void cmd_robust(pthread_t *threads)
{
	int i;

	atomic_store(&want_exit, 1);
	for (i = 0; i < NTHREADS; i++)
		pthread_join(threads[i], NULL);
	for (i = 0; i < NTHREADS; i++)
		printf("robust%d=%d ", i, pthread_mutex_lock(&robust[i]));
	nsm_reply(" ");
}

static void start_detached(void *(*fn)(void *))
{
	pthread_t t;

	if (!pthread_create(&t, NULL, fn, NULL))
		pthread_detach(t);
}

int main(void)
{
	struct sigaction sa = { .sa_flags = SA_RESTART };
	pthread_t threads[NTHREADS];
	pthread_mutexattr_t attr;
	const char *cmd;
	char buf[64];
	long i;

	signal(SIGCHLD, SIG_IGN);	/* the vfork child reaps itself */
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
	for (i = 0; i < NTHREADS; i++) {
		pthread_mutex_init(&robust[i], &attr);
		if (pthread_create(&threads[i], NULL, spin, (void *)i))
			return 1;
	}
	for (;;) {
		cmd = nsm_next_command(buf, sizeof(buf));
		if (!strcmp(cmd, "tgkill"))
			cmd_tgkill();
		else if (!strcmp(cmd, "raise"))
			cmd_raise();
		else if (!strcmp(cmd, "spawn"))
			cmd_spawn();
		else if (!strcmp(cmd, "join"))
			cmd_join();
		else if (!strcmp(cmd, "churn")) {
			start_detached(churn);
			nsm_reply("churn=0");
		} else if (!strcmp(cmd, "churned"))
			nsm_reply("churned=%ld failed=%ld", atomic_load(&churned),
				  atomic_load(&churn_failed));
		else if (!strcmp(cmd, "vfork")) {
			start_detached(vforker);
			nsm_reply("vfork=0");
		} else if (!strcmp(cmd, "robust"))
			cmd_robust(threads);
		else
			cmd_info();
	}
}
