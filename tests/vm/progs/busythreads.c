// SPDX-License-Identifier: GPL-2.0
/*
 * A process with 8 busy threads (a pthread program as most real ones are):
 * "info" reports the PID and every thread's TID and loop count as the
 * threads themselves see them.
 */
#include <pthread.h>
#include <stdatomic.h>

#include "nsm_prog.h"

#define NTHREADS 8

static atomic_long loops[NTHREADS];
static atomic_int tids[NTHREADS];

static void *spin(void *arg)
{
	long i = (long)arg;

	for (;;) {
		atomic_store(&tids[i], nsm_gettid());
		atomic_fetch_add(&loops[i], 1);
		usleep(200);	/* busy, but the 2-CPU guest stays usable */
	}
	return NULL;
}

int main(void)
{
	pthread_t threads[NTHREADS];
	char buf[64];
	long i;

	for (i = 0; i < NTHREADS; i++)
		if (pthread_create(&threads[i], NULL, spin, (void *)i))
			return 1;
	for (;;) {
		nsm_next_command(buf, sizeof(buf));
		printf("pid=%d", getpid());
		for (i = 0; i < NTHREADS; i++)
			printf(" tid%ld=%d loops%ld=%ld", i, atomic_load(&tids[i]), i,
			       atomic_load(&loops[i]));
		nsm_reply(" ");
	}
}
