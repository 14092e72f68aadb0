/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the benchmark programs (kernel_bench, depth_bench, populate).
 * Header-only, like tools/testing/selftests/pidfd/pidfd.h; built with -I kmod for the uapi.
 */
#ifndef NSBENCH_H
#define NSBENCH_H

#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "nsmigrate.h"

static inline unsigned long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static inline void die(const char *what)
{
	perror(what);
	exit(1);
}

/* What a namespace init does here: reap its children (and those migrated in), forever. */
static inline void reap_forever(void)
{
	for (;;)
		if (wait(NULL) < 0)
			usleep(50000);
}

/*
 * A new PID namespace whose init (forked here) runs fn(arg) and exits; returns the init's pid
 * as seen from here. The caller's own namespace for children is restored right after the fork.
 */
static inline pid_t spawn_ns(void (*fn)(int), int arg)
{
	int self = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
	pid_t pid;

	if (self < 0 || unshare(CLONE_NEWPID))
		die("unshare");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		close(self);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		fn(arg);
		_exit(0);
	}
	if (setns(self, CLONE_NEWPID))
		die("setns");
	close(self);
	return pid;
}

/* An fd of the PID namespace of process pid (an argument of the migrate ioctl). */
static inline int ns_fd(long pid)
{
	char path[64];
	int fd;

	snprintf(path, sizeof(path), "/proc/%ld/ns/pid", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die(path);
	return fd;
}

/*
 * Move process pid into the namespace of target_fd; req gets the module's answer (new_pid and
 * its timestamps). Returns the ioctl's round trip as the caller sees it, in ns.
 */
static inline unsigned long long migrate(int dev, long pid, int target_fd,
					 struct nsmigrate_req *req)
{
	unsigned long long t0;

	*req = (struct nsmigrate_req){
		.size = sizeof(*req),
		.version = NSMIGRATE_ABI_VERSION,
		.pid = pid,
		.target_fd = target_fd,
	};
	t0 = now_ns();
	if (ioctl(dev, NSMIGRATE_IOC_MIGRATE, req))
		die("NSMIGRATE_IOC_MIGRATE");
	return now_ns() - t0;
}

#endif /* NSBENCH_H */
