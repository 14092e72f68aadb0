"""Drive the nsmigrate kernel module: move a live process into another PID namespace.

``__migrate`` is the low-level call the manager makes; ``migrate`` is the public one.
Standard library only: this runs inside the VM testbed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

from nsexp import uapi

# Why the kernel refused (kmod/README.md lists every case; /proc/nsmigrate counts them).
_HINTS = {
    errno.ESRCH: "no such process, it exited before the switch, or the chosen parent is gone",
    errno.EINVAL: "a kernel thread, a namespace init, already in the target namespace, the "
    "target is not a PID namespace, an unfit parent, more than one thread or a root/cwd shared "
    "with another process (with mntns), or a bad request",
    errno.EPERM: "needs CAP_SYS_ADMIN over both namespaces, ptrace access to the process "
    "(PTRACE_MODE_ATTACH_REALCREDS), and the target namespace visible from the caller's",
    errno.EBUSY: "a thread with children, a traced or tracing thread, a vfork child, an "
    "io_uring or other kernel worker thread, an exec in progress, threads created or exiting "
    "faster than the move could park them all, a parent that is neither a namespace init nor "
    "the caller (pass leave_parent=True to allow it), another process's CPU-clock timer on "
    "its clocks, or an open POSIX message queue (close it first); the busy_* lines of "
    "/proc/nsmigrate say which",
    errno.ENXIO: "the target namespace has no init (not yet, or it died)",
    errno.ETIMEDOUT: "a thread of the process did not reach a safe point in time "
    "(stopped, or in uninterruptible sleep); every thread was left as it was",
    errno.EINTR: "interrupted while waiting; every thread was left as it was",
    errno.EBADF: "not an open file descriptor",
    errno.EFAULT: "the request is not readable or the reply not writable",
    errno.E2BIG: "a newer request with fields this module does not know",
    errno.ENOTTY: "not an nsmigrate device, or an unknown command",
    errno.ENOMEM: "the kernel is out of memory (or the target namespace cannot take more PIDs)",
}


@dataclass(frozen=True)
class Migration:
    """The result of one migration, as the kernel reported it."""

    pid: int  # the new PID in the target namespace
    global_pid: int  # the new PID as the caller sees it
    t_queued_ns: int  # CLOCK_MONOTONIC: the switch was queued on the process
    t_switch_start_ns: int  # the process started switching, in its own context
    t_switch_done_ns: int  # the switch was complete

    @property
    def switch_ns(self) -> int:
        """Time the process spent switching, in its own context."""
        return self.t_switch_done_ns - self.t_switch_start_ns


_device_fd: int | None = None


def _device() -> int:
    global _device_fd
    if _device_fd is None:
        try:
            _device_fd = os.open(uapi.DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                f"{uapi.DEVICE} does not exist: the nsmigrate module is not loaded "
                "(use the vm testbed, or install kmod/ with DKMS)",
            ) from None
    return _device_fd


def abi_version() -> int:
    """The ABI version of the loaded module."""
    return fcntl.ioctl(_device(), uapi.IOC_VERSION)


def __migrate(
    pid: int,
    target_fd: int,
    *,
    flags: int = 0,
    parent: int = 0,
    timeout_ns: int = 0,
    mntns_fd: int = -1,
) -> Migration:
    """One NSMIGRATE_IOC_MIGRATE call: move process ``pid`` into the namespace of ``target_fd``.

    ``target_fd`` is an open /proc/PID/ns/pid file or a pidfd of a process in the target;
    ``mntns_fd`` (with ``uapi.F_MNTNS`` in ``flags``) an open /proc/PID/ns/mnt file.
    Raises OSError (ProcessLookupError, PermissionError, ...) with the kernel's errno.
    """
    req = uapi.NsmigrateReq(
        size=uapi.REQ_SIZE_VER2,
        version=uapi.ABI_VERSION,
        flags=flags,
        pid=pid,
        target_fd=target_fd,
        parent=parent,
        timeout_ns=timeout_ns,
        mntns_fd=mntns_fd,
    )
    buf = bytearray(req)
    device = _device()  # its own error names the fix (module not loaded)
    try:
        fcntl.ioctl(device, uapi.IOC_MIGRATE, buf, True)
    except OSError as e:
        what = f"pidfd {pid}" if flags & uapi.F_PIDFD else f"process {pid}"
        hint = _HINTS.get(e.errno, "")
        raise OSError(
            e.errno,
            f"cannot migrate {what} into namespace fd {target_fd} ({_describe_fd(target_fd)}): "
            f"{os.strerror(e.errno)}" + (f": {hint}" if hint else ""),
        ) from None
    out = uapi.NsmigrateReq.from_buffer(buf)
    return Migration(
        pid=out.new_pid_in_target,
        global_pid=out.new_pid,
        t_queued_ns=out.t_queued_ns,
        t_switch_start_ns=out.t_switch_start_ns,
        t_switch_done_ns=out.t_switch_done_ns,
    )


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "not open"


def migrate(
    pid: int,
    target: str | os.PathLike[str] | int,
    *,
    pidfd: bool = False,
    parent: int | None = None,
    timeout: float | None = None,
    leave_parent: bool = False,
    mntns: str | os.PathLike[str] | None = None,
) -> Migration:
    """Move the running process ``pid`` (all its threads) into another PID namespace.

    ``target`` is a path to a PID-namespace file (``/proc/PID/ns/pid``), or an open fd of
    one, or a pidfd of any process in the target namespace. With ``pidfd=True``, ``pid`` is
    itself a pidfd. ``parent`` (a PID as the caller sees it, in the target namespace) becomes
    the new parent instead of the target's init. ``timeout`` bounds the wait, in seconds.
    ``leave_parent=True`` allows the move when the old parent is neither a namespace init nor
    the caller: that parent then sees its child vanish with no exit status. ``mntns`` (a
    ``/proc/PID/ns/mnt`` path) is a mount namespace to join in the same step, as setns(2)
    would: /proc then matches the target; root and cwd become that namespace's root.
    """
    flags = (
        (uapi.F_PIDFD if pidfd else 0)
        | (uapi.F_PARENT if parent is not None else 0)
        | (uapi.F_LEAVE_PARENT if leave_parent else 0)
        | (uapi.F_MNTNS if mntns is not None else 0)
    )
    timeout_ns = 0 if timeout is None else int(timeout * 1e9)
    opened: list[int] = []
    try:
        if not isinstance(target, int):
            target = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(target)
        mntns_fd = -1
        if mntns is not None:
            mntns_fd = os.open(mntns, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(mntns_fd)
        return __migrate(
            pid, target, flags=flags, parent=parent or 0, timeout_ns=timeout_ns, mntns_fd=mntns_fd
        )
    finally:
        for fd in opened:
            os.close(fd)
