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
#define NSMIGRATE_ABI_VERSION	2

/* @pid is a pidfd rather than a PID in the caller's namespace. */
#define NSMIGRATE_F_PIDFD	_BITUL(0)
/* @parent is the PID (in the caller's namespace) of the new parent. */
#define NSMIGRATE_F_PARENT	_BITUL(1)
/*
 * ABI 2: the old parent may be any process. Without this flag the move is
 * refused (EBUSY) unless the old parent is a PID namespace init or the
 * caller: any other parent would see its child vanish without an exit
 * status (wait() returns ECHILD, no SIGCHLD).
 */
#define NSMIGRATE_F_LEAVE_PARENT	_BITUL(2)
/*
 * ABI 2: also join the mount namespace of @mntns_fd (an fd of a
 * /proc/PID/ns/mnt file), as setns(2) would, so that /proc, ps and
 * getpid() agree in the target. Root and cwd become that namespace's root.
 */
#define NSMIGRATE_F_MNTNS	_BITUL(3)
#define NSMIGRATE_F_ALL		(NSMIGRATE_F_PIDFD | NSMIGRATE_F_PARENT | \
				 NSMIGRATE_F_LEAVE_PARENT | NSMIGRATE_F_MNTNS)

/* Waiting longer than this is refused with EINVAL. */
#define NSMIGRATE_MAX_TIMEOUT_NS	(60ULL * 1000 * 1000 * 1000)
/* Used when @timeout_ns is 0. */
#define NSMIGRATE_DEFAULT_TIMEOUT_NS	(5ULL * 1000 * 1000 * 1000)

/**
 * struct nsmigrate_req - one migration request, in and out.
 * @size:	sizeof(struct nsmigrate_req) as the caller knows it.
 * @version:	the ABI version the caller speaks: 1 or 2 (2 may use the
 *		flags and fields marked ABI 2).
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
 * @mntns_fd:	ABI 2, with NSMIGRATE_F_MNTNS: the mount namespace to join.
 * @reserved:	must be 0.
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
	__s32 mntns_fd;
	__u32 reserved;
};

#define NSMIGRATE_REQ_SIZE_VER1	64
#define NSMIGRATE_REQ_SIZE_VER2	72

#define NSMIGRATE_IOC_MAGIC	0xB7
/* Returns NSMIGRATE_ABI_VERSION. */
#define NSMIGRATE_IOC_VERSION	_IO(NSMIGRATE_IOC_MAGIC, 0)
/*
 * The size in the command number is frozen at the first version's: a
 * larger struct is announced by @size, never by a new command number.
 */
#define NSMIGRATE_IOC_MIGRATE	_IOC(_IOC_READ | _IOC_WRITE, \
				     NSMIGRATE_IOC_MAGIC, 1, \
				     NSMIGRATE_REQ_SIZE_VER1)

#endif /* _UAPI_NSMIGRATE_H */
