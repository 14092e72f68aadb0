/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * nsmigrate: move a running process into another PID namespace.
 *
 * This header is the single definition of the user/kernel ABI of
 * /dev/nsmigrate. nsexp/uapi.py mirrors it; tests compile it and compare.
 */
#ifndef _UAPI_NSMIGRATE_H
#define _UAPI_NSMIGRATE_H

#include <linux/const.h>
#include <linux/ioctl.h>
#include <linux/types.h>

#define NSMIGRATE_DEVICE	"/dev/nsmigrate"
#define NSMIGRATE_ABI_VERSION	1

/* @pid is a pidfd rather than a PID in the caller's namespace. */
#define NSMIGRATE_F_PIDFD	_BITUL(0)
/* @parent is the PID (in the caller's namespace) of the new parent. */
#define NSMIGRATE_F_PARENT	_BITUL(1)
#define NSMIGRATE_F_ALL		(NSMIGRATE_F_PIDFD | NSMIGRATE_F_PARENT)

/* Waiting longer than this is refused with EINVAL. */
#define NSMIGRATE_MAX_TIMEOUT_NS	(60ULL * 1000 * 1000 * 1000)
/* Used when @timeout_ns is 0. */
#define NSMIGRATE_DEFAULT_TIMEOUT_NS	(5ULL * 1000 * 1000 * 1000)

/**
 * struct nsmigrate_req - one migration request, in and out.
 * @size:	sizeof(struct nsmigrate_req) as the caller knows it.
 * @version:	NSMIGRATE_ABI_VERSION.
 * @flags:	NSMIGRATE_F_*.
 * @pid:	the process: a PID in the caller's namespace, or a pidfd.
 * @target_fd:	the target namespace: an fd of a /proc/PID/ns/pid file, or
 *		a pidfd of any process whose active namespace is the target.
 * @parent:	with NSMIGRATE_F_PARENT, the new parent; else the target's
 *		init.
 * @timeout_ns:	how long the caller waits for the switch; 0 for the default.
 * @new_pid:	out: the process's new PID as the caller sees it.
 * @new_pid_in_target: out: the new PID in the target namespace.
 * @t_queued_ns: out: CLOCK_MONOTONIC when the switch was queued.
 * @t_switch_start_ns: out: when the process started switching.
 * @t_switch_done_ns: out: when the switch was complete.
 */
struct nsmigrate_req {
	__u32 size;
	__u32 version;
	__u32 flags;
	__s32 pid;
	__s32 target_fd;
	__s32 parent;
	__u64 timeout_ns;
	__s32 new_pid;
	__s32 new_pid_in_target;
	__u64 t_queued_ns;
	__u64 t_switch_start_ns;
	__u64 t_switch_done_ns;
};

#define NSMIGRATE_REQ_SIZE_VER1	64

#define NSMIGRATE_IOC_MAGIC	0xB7
/* Returns NSMIGRATE_ABI_VERSION. */
#define NSMIGRATE_IOC_VERSION	_IO(NSMIGRATE_IOC_MAGIC, 0)
#define NSMIGRATE_IOC_MIGRATE	_IOWR(NSMIGRATE_IOC_MAGIC, 1, struct nsmigrate_req)

#endif /* _UAPI_NSMIGRATE_H */
