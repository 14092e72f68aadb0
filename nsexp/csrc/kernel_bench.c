// SPDX-License-Identifier: GPL-2.0
/*
 * kernel_bench: the cost of one migration beside fork()+waitpid() and getpid(),
 * measured in one process, in one boot. Built and run by `nsexp bench kernel`.
 *
 * Usage: kernel_bench N WARMUP
 * Prints CSV rows "metric,i,ns" on stdout:
 *   ioctl_round_trip   NSMIGRATE_IOC_MIGRATE as the caller sees it (CLOCK_MONOTONIC)
 *   kernel_switch      t_switch_done_ns - t_switch_start_ns, reported by the module
 *   kernel_queue_to_done  t_switch_done_ns - t_queued_ns
 *   fork_wait          fork() of a child that _exit()s at once, and waitpid()
 *   getpid             syscall(SYS_getpid)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../kmod/nsmigrate.h"

static unsigned long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* A new PID namespace whose init reaps children forever; returns its global PID. */
static pid_t new_namespace(void)
{
	int self = open("/proc/self/ns/pid", O_RDONLY);
	pid_t init;

	if (self < 0 || unshare(CLONE_NEWPID))
		die("unshare");
	init = fork();
	if (init < 0)
		die("fork");
	if (init == 0) {
		for (;;)
			if (wait(NULL) < 0)
				pause();
	}
	if (setns(self, CLONE_NEWPID))
		die("setns");
	close(self);
	return init;
}

static int ns_fd(pid_t init)
{
	char path[64];
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/ns/pid", init);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		die(path);
	return fd;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 1000;
	int warmup = argc > 2 ? atoi(argv[2]) : 100;
	pid_t a, b, subject;
	int dev, fds[2], i, pipefd[2];

	dev = open(NSMIGRATE_DEVICE, O_RDWR);
	if (dev < 0)
		die(NSMIGRATE_DEVICE);
	a = new_namespace();
	b = new_namespace();
	fds[0] = ns_fd(a);
	fds[1] = ns_fd(b);

	/* The subject blocks in read(), as a manager client blocks waiting for its reply. */
	if (pipe(pipefd))
		die("pipe");
	subject = fork();
	if (subject == 0) {
		char c;

		close(pipefd[1]);
		while (read(pipefd[0], &c, 1) != 0)
			;
		_exit(0);
	}

	for (i = -warmup; i < n; i++) {
		struct nsmigrate_req req = {
			.size = sizeof(req),
			.version = NSMIGRATE_ABI_VERSION,
			.pid = subject,
			.target_fd = fds[(i + warmup) % 2 ? 0 : 1],
		};
		unsigned long long t0 = now_ns(), t1;

		if (ioctl(dev, NSMIGRATE_IOC_MIGRATE, &req))
			die("NSMIGRATE_IOC_MIGRATE");
		t1 = now_ns();
		subject = req.new_pid;
		if (i < 0)
			continue;
		printf("ioctl_round_trip,%d,%llu\n", i, t1 - t0);
		printf("kernel_switch,%d,%llu\n", i,
		       (unsigned long long)(req.t_switch_done_ns - req.t_switch_start_ns));
		printf("kernel_queue_to_done,%d,%llu\n", i,
		       (unsigned long long)(req.t_switch_done_ns - req.t_queued_ns));
	}

	for (i = -warmup; i < n; i++) {
		unsigned long long t0 = now_ns(), t1;
		pid_t c = fork();

		if (c == 0)
			_exit(0);
		if (c < 0 || waitpid(c, NULL, 0) != c)
			die("fork/waitpid");
		t1 = now_ns();
		if (i >= 0)
			printf("fork_wait,%d,%llu\n", i, t1 - t0);
	}

	for (i = -warmup; i < n; i++) {
		unsigned long long t0 = now_ns(), t1;

		syscall(SYS_getpid);
		t1 = now_ns();
		if (i >= 0)
			printf("getpid,%d,%llu\n", i, t1 - t0);
	}

	kill(subject, SIGKILL);
	kill(a, SIGKILL);
	kill(b, SIGKILL);
	while (wait(NULL) > 0)
		;
	return 0;
}
