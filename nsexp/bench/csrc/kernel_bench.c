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
#include "nsbench.h"

#include <string.h>
#include <sys/syscall.h>

/* A namespace init that reaps its children (the subject, once migrated in) forever. */
static void ns_init(int unused)
{
	reap_forever();
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
	a = spawn_ns(ns_init, 0);
	b = spawn_ns(ns_init, 0);
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
		struct nsmigrate_req req;
		unsigned long long rtt = migrate(dev, subject, fds[(i + warmup) % 2 ? 0 : 1], &req);

		subject = req.new_pid;
		if (i < 0)
			continue;
		printf("ioctl_round_trip,%d,%llu\n", i, rtt);
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
