// SPDX-License-Identifier: GPL-2.0
/*
 * populate: park COUNT idle processes in the PID namespace of INIT_PID.
 * Used by `nsexp bench scaling` (population sweep): processes already in the target namespace.
 *
 * Usage: populate INIT_PID COUNT
 * Joins the namespace for its children (setns), forks COUNT children that pause() forever,
 * prints "ready N" on stdout, then reaps its children as they die (when the namespace's init
 * dies, the kernel kills them all, and the namespace can only go away once they are reaped),
 * and exits when none is left. Python would cost ~30 ms and megabytes per process under TCG;
 * a small C process costs far less of both.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char path[64];
	int fd, i, count;

	if (argc != 3) {
		fprintf(stderr, "usage: populate INIT_PID COUNT\n");
		return 2;
	}
	count = atoi(argv[2]);
	snprintf(path, sizeof(path), "/proc/%s/ns/pid", argv[1]);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || setns(fd, CLONE_NEWPID)) {
		perror(path);
		return 1;
	}
	close(fd);
	for (i = 0; i < count; i++) {
		pid_t c = fork();

		if (c < 0) {
			/* Say so and stay: the children made so far die with the namespace. */
			perror("fork");
			printf("failed after %d\n", i);
			fflush(stdout);
			break;
		}
		if (c == 0) {
			close(0);
			close(1);
			for (;;)
				pause();
		}
	}
	if (i == count) {
		printf("ready %d\n", count);
		fflush(stdout);
	}
	for (;;) {
		if (wait(NULL) < 0 && errno == ECHILD)
			return 0;
	}
}
