// SPDX-License-Identifier: GPL-2.0
/*
 * libc state that holds the thread's TID, across a move (review F3, F6).
 *
 * "before": lock an error-checking mutex (its owner field is libc's TID).
 * (the process is moved while it waits for the next command)
 * "after": unlock it, create and join a thread, setuid(getuid()) (musl
 * runs it on every thread through its thread-list lock), raise() a signal
 * (libc sends it with its cached TID), report what each returned.
 * An alarm turns a deadlock into a visible "timeout" exit.
 */
#include <pthread.h>
#include <signal.h>

#include "nsm_prog.h"

static pthread_mutex_t held;
static volatile sig_atomic_t raised;

static void on_usr1(int sig)
{
	(void)sig;
	raised++;
}

static void *thread_main(void *arg)
{
	return arg;
}

static void on_alarm(int sig)
{
	static const char msg[] = "timeout=1\n";

	(void)sig;
	if (write(1, msg, sizeof(msg) - 1) < 0)
		_exit(3);
	_exit(2);
}

int main(void)
{
	pthread_mutexattr_t attr;
	pthread_t thread;
	char buf[64];
	int unlock, create, join, setuid_rc;

	signal(SIGUSR1, on_usr1);
	signal(SIGALRM, on_alarm);
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
	pthread_mutex_init(&held, &attr);

	nsm_next_command(buf, sizeof(buf));
	nsm_reply("pid=%d tid=%d lock=%d", getpid(), nsm_gettid(),
		  pthread_mutex_lock(&held));

	nsm_next_command(buf, sizeof(buf));
	alarm(10);
	unlock = pthread_mutex_unlock(&held);
	create = pthread_create(&thread, NULL, thread_main, NULL);
	join = create ? -1 : pthread_join(thread, NULL);
	setuid_rc = setuid(getuid()) ? errno : 0;
	raise(SIGUSR1);
	alarm(0);
	nsm_reply("pid=%d tid=%d unlock=%d create=%d join=%d setuid=%d raised=%d timeout=0",
		  getpid(), nsm_gettid(), unlock, create, join, setuid_rc,
		  (int)raised);
	nsm_next_command(buf, sizeof(buf));
	return 0;
}
