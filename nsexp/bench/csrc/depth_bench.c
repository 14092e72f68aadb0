// SPDX-License-Identifier: GPL-2.0
/*
 * depth_bench: the kernel's cost of a migration against the nesting depth of the namespaces.
 * Built and run by `nsexp bench scaling` (sweep "depth", kernel side), in the same boot.
 *
 * Usage: depth_bench N WARMUP DEPTH...
 * For each DEPTH: namespaces A and B, siblings at level DEPTH (1 = children of the global
 * namespace), under a chain of DEPTH - 1 namespaces, each created by unsharing from inside the
 * previous one; a subject in A blocks in read(), as a manager client waits for its reply, and is
 * migrated A -> B -> A ... N times after WARMUP (a PID has DEPTH + 1 numbers: the kernel
 * allocates that many in the target). Prints CSV rows "depth,i,metric,ns" on stdout:
 *   ioctl_round_trip   NSMIGRATE_IOC_MIGRATE as the caller sees it (CLOCK_MONOTONIC)
 *   kernel_switch      t_switch_done_ns - t_switch_start_ns, reported by the module
 * Python under TCG is too noisy to see a few microseconds per level; this is not.
 */
#include "nsbench.h"

#include <string.h>

static int info_w, gate_r;
static int depth;

/* The caller's pid in the global namespace (this /proc is the global one). */
static long global_pid(void)
{
	char buf[32];
	ssize_t n = readlink("/proc/self", buf, sizeof(buf) - 1);

	if (n <= 0)
		die("readlink /proc/self");
	buf[n] = 0;
	return atol(buf);
}

static void report(const char *tag)
{
	char line[64];
	int n = snprintf(line, sizeof(line), "%s %ld\n", tag, global_pid());

	if (write(info_w, line, n) != n)
		die("write info");
}

static void ns_a(int level)
{
	char c;

	if (fork() == 0) {
		report("S");
		while (read(gate_r, &c, 1) != 0)
			;
		_exit(0);
	}
	report("A");
	reap_forever();
}

static void ns_b(int level)
{
	report("B");
	reap_forever();
}

static void chain(int level)
{
	if (level == depth - 1) {
		spawn_ns(ns_a, level + 1);
		spawn_ns(ns_b, level + 1);
	} else {
		spawn_ns(chain, level + 1);
	}
	reap_forever();
}

static void one_depth(int dev, int n, int warmup)
{
	int info[2], gate[2], fds[2], i, got = 0;
	long a = 0, b = 0, s = 0;
	pid_t tops[2] = { 0, 0 };
	char line[64];
	FILE *in;

	if (pipe(info) || pipe(gate))
		die("pipe");
	info_w = info[1];
	gate_r = gate[0];
	if (depth == 1) {
		tops[0] = spawn_ns(ns_a, 1);
		tops[1] = spawn_ns(ns_b, 1);
	} else {
		tops[0] = spawn_ns(chain, 1);
	}
	close(info[1]);
	close(gate[0]);
	in = fdopen(info[0], "r");
	while (got < 3 && fgets(line, sizeof(line), in)) {
		long v = atol(line + 2);

		if (line[0] == 'A')
			a = v;
		else if (line[0] == 'B')
			b = v;
		else if (line[0] == 'S')
			s = v;
		got++;
	}
	if (!a || !b || !s) {
		fprintf(stderr, "depth %d: the chain did not report\n", depth);
		exit(1);
	}
	fds[0] = ns_fd(a);
	fds[1] = ns_fd(b);
	for (i = -warmup; i < n; i++) {
		struct nsmigrate_req req;
		unsigned long long rtt = migrate(dev, s, fds[(i + warmup) % 2 ? 0 : 1], &req);

		s = req.new_pid;
		if (i < 0)
			continue;
		printf("%d,%d,ioctl_round_trip,%llu\n", depth, i, rtt);
		printf("%d,%d,kernel_switch,%llu\n", depth, i,
		       (unsigned long long)(req.t_switch_done_ns - req.t_switch_start_ns));
	}
	fflush(stdout);
	for (i = 0; i < 2; i++)
		if (tops[i]) {
			kill(tops[i], SIGKILL);
			waitpid(tops[i], NULL, 0);
		}
	close(fds[0]);
	close(fds[1]);
	close(gate[1]);
	fclose(in);
}

int main(int argc, char **argv)
{
	int n, warmup, dev, k;

	if (argc < 4) {
		fprintf(stderr, "usage: depth_bench N WARMUP DEPTH...\n");
		return 2;
	}
	n = atoi(argv[1]);
	warmup = atoi(argv[2]);
	dev = open(NSMIGRATE_DEVICE, O_RDWR);
	if (dev < 0)
		die(NSMIGRATE_DEVICE);
	for (k = 3; k < argc; k++) {
		depth = atoi(argv[k]);
		if (depth < 1 || depth > 31) {
			fprintf(stderr, "depth %d out of 1..31\n", depth);
			return 2;
		}
		one_depth(dev, n, warmup);
	}
	return 0;
}
