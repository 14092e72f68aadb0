/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared by the guest test programs of the kernel-module suite
 * (tests/vm/progs/, one .c each): built on the host with gcc (glibc) and musl-gcc
 * (static), run inside the VM by tests/vm/kmod_checks.
 *
 * Every program talks line by line: it reads a command on stdin and
 * answers with one line of "key=value" pairs on stdout.
 */
#ifndef NSM_PROG_H
#define NSM_PROG_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline pid_t nsm_gettid(void)
{
	return (pid_t)syscall(SYS_gettid);
}

/* Wait for the next command; exit quietly when stdin closes. */
static inline const char *nsm_next_command(char *buf, size_t len)
{
	if (!fgets(buf, (int)len, stdin))
		exit(0);
	buf[strcspn(buf, "\n")] = '\0';
	return buf;
}

#define nsm_reply(...)                  \
	do {                            \
		printf(__VA_ARGS__);    \
		putchar('\n');          \
		fflush(stdout);         \
	} while (0)

#endif /* NSM_PROG_H */
