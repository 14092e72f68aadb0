"""ctypes mirror of kmod/nsmigrate.h, the ABI of /dev/nsmigrate.

tests/test_uapi.py compiles the C header and checks every number here against it.
"""

from __future__ import annotations

import ctypes

DEVICE = "/dev/nsmigrate"
ABI_VERSION = 2

F_PIDFD = 1 << 0
F_PARENT = 1 << 1
F_LEAVE_PARENT = 1 << 2  # ABI 2: the old parent may be any process (it sees no exit status)
F_MNTNS = 1 << 3  # ABI 2: also join the mount namespace of mntns_fd (/proc/PID/ns/mnt)
F_ALL = F_PIDFD | F_PARENT | F_LEAVE_PARENT | F_MNTNS

MAX_TIMEOUT_NS = 60 * 1000 * 1000 * 1000
DEFAULT_TIMEOUT_NS = 5 * 1000 * 1000 * 1000


class NsmigrateReq(ctypes.Structure):
    """struct nsmigrate_req: one migration request, in and out."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pid", ctypes.c_int32),
        ("target_fd", ctypes.c_int32),
        ("parent", ctypes.c_int32),
        ("timeout_ns", ctypes.c_uint64),
        ("new_pid", ctypes.c_int32),
        ("new_pid_in_target", ctypes.c_int32),
        ("t_queued_ns", ctypes.c_uint64),
        ("t_switch_start_ns", ctypes.c_uint64),
        ("t_switch_done_ns", ctypes.c_uint64),
        ("mntns_fd", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
    ]


REQ_SIZE_VER1 = 64
REQ_SIZE_VER2 = 72

# <asm-generic/ioctl.h>
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


IOC_MAGIC = 0xB7
IOC_VERSION = _ioc(_IOC_NONE, IOC_MAGIC, 0, 0)
# The size in the command number is frozen at version 1's; a larger struct says so in .size.
IOC_MIGRATE = _ioc(_IOC_READ | _IOC_WRITE, IOC_MAGIC, 1, REQ_SIZE_VER1)
