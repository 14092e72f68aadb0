"""Small Linux helpers: PID-namespace syscalls through ctypes and /proc readers.

Python 3.11 has no os.unshare/os.setns, hence ctypes. /proc here is the global namespace's
(no mount namespace is created), so every pid read from /proc is a global pid.
Standard library only: used inside the VM guest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def fork_pidns_init() -> int:
    """Fork the init (PID 1) of a new PID namespace: 0 in the new init, its pid in the caller.

    unshare(CLONE_NEWPID) changes only the namespace of the caller's next children; the
    caller's own one is set back right after the fork, because a process whose children's
    namespace differs from its own cannot create threads (and the manager runs in threads).
    Works from any caller, an init of another namespace included.
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    pid = -1
    try:
        unshare(CLONE_NEWPID)
        pid = os.fork()
    finally:
        if pid != 0:  # the caller (fork failed, or succeeded and this is the parent)
            setns(own, CLONE_NEWPID)
        os.close(own)
    return pid


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    """mount(2) without data."""
    enc = lambda v: None if v is None else v.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), None), "mount")


def private_proc() -> None:
    """Give the caller its own mount namespace with a /proc of its PID namespace.

    CRIU must run in the dumped process's PID namespace, in that process's mount namespace, and
    read a /proc that matches: namespaces that use the criu backend get this from their init.
    """
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl")


def set_comm(name: str) -> None:
    """Set this process's comm (visible in /proc/PID/comm, ps); at most 15 bytes are kept."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def monotonic_offset_ns(clock: str = "monotonic") -> int:
    """Clock offset of this process's time namespace (0 in the initial one).

    ``clock`` is "monotonic" or "boottime" (start times in /proc follow the latter).

    CRIU restores a process into a time namespace whose clocks continue from the checkpoint;
    subtracting the offset puts its timestamps back on the host's clock.
    """
    try:
        with open("/proc/self/timens_offsets") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] == clock:
                    return int(parts[1]) * 1_000_000_000 + int(parts[2])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def ns_inode(pid: int | str = "self") -> int:
    """Inode of the PID namespace of ``pid`` (identifies the namespace)."""
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


@dataclass(frozen=True)
class ProcInfo:
    """What /proc says about one process (all pids global unless noted)."""

    global_pid: int
    nspids: tuple[int, ...]  # NSpid: global first, innermost (its own namespace) last
    ppid: int  # global parent pid
    state: str  # one letter: R, S, Z, ...
    start_time: int  # field 22 of stat: clock ticks after boot
    comm: str
    ns_inode: int

    @property
    def pid(self) -> int:
        """The pid in the process's own namespace."""
        return self.nspids[-1]


def proc_info(pid: int | str) -> ProcInfo:
    """Read /proc/PID/status and stat; raises OSError if the process is gone."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    nspids = tuple(int(x) for x in status["NSpid"].split())
    return ProcInfo(
        global_pid=int(stat.split(None, 1)[0]),
        nspids=nspids,
        ppid=int(status["PPid"]),
        state=status["State"].split()[0],
        start_time=int(fields[19]),  # field 22 overall; fields[0] is field 3
        comm=status["Name"].strip(),
        ns_inode=ns_inode(pid),
    )


def self_info() -> ProcInfo:
    """proc_info of the calling process (/proc/self resolves to its global pid)."""
    return proc_info("self")


def all_pids() -> list[int]:
    """Global pids of all processes currently in /proc."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_in_namespaces(inodes: set[int]) -> list[int]:
    """Global pids of live processes whose PID namespace is one of ``inodes``."""
    found = []
    for pid in all_pids():
        try:
            if ns_inode(pid) in inodes:
                found.append(pid)
        except OSError:
            continue  # exited meanwhile
    return found


def processes_named(prefix: str = "nsexp-") -> list[int]:
    """Global pids of live, non-zombie processes whose comm starts with ``prefix``.

    The hierarchy names its processes nsexp-init-NS, nsexp-child-NS and nsexp-worker, so this
    finds anything a run left behind.
    """
    found = []
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2 :].split(None, 1)[0]
        if comm.startswith(prefix) and state != "Z":
            found.append(pid)
    return found
