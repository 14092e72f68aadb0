"""Kernel objects and user-space state that name the moving task (review findings F1-F20).

Each check builds the hazard before a move and walks it afterwards (a timer deleted, a lock
taken, a signal awaited), so that a dangling reference is used, not just created.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import signal
import termios
import threading
import time

from harness import (
    CLOCK_PROCESS_CPUTIME_ID,
    CLONE_NEWPID,
    SIGEV_SIGNAL,
    WORK,
    LineProgram,
    Namespace,
    Subject,
    check,
    fork_into,
    lib,
    libc,
    migrate_counted,
    migrate_errno,
    process_cpu_clock,
    sleeper,
    stats,
    stats_delta,
    status,
    timer_create,
    timer_delete,
    timer_settime,
    tty_nr,
    unshare,
)

# Run in the subject: CPU-clock timers (process and thread) and a periodic signal timer.
ARM_TIMERS = """
hits = [0]
signal.signal(signal.SIGUSR1, lambda *a: hits.__setitem__(0, hits[0] + 1))
signal.signal(signal.SIGUSR2, lambda *a: None)
cpu = timer_create(CLOCK_PROCESS_CPUTIME_ID, SIGEV_SIGNAL, signal.SIGUSR2)
quiet = timer_create(CLOCK_PROCESS_CPUTIME_ID, SIGEV_NONE)  # queued on 6.1 only
tcpu = timer_create(CLOCK_THREAD_CPUTIME_ID, SIGEV_SIGNAL, signal.SIGUSR2)
mono = timer_create(CLOCK_MONOTONIC, SIGEV_SIGNAL, signal.SIGUSR1)
result = [timer_settime(cpu, 100.0), timer_settime(quiet, 100.0), timer_settime(tcpu, 100.0),
          timer_settime(mono, 0.02, interval=0.02)]
"""
# After the move: the timers still work, signals still arrive, then every timer is deleted.
WALK_TIMERS = """
h0 = hits[0]
end = time.monotonic() + 0.6
while time.monotonic() < end:
    time.sleep(0.05)
result = {
    "signals_after_move": hits[0] - h0,
    "cpu_left": timer_gettime(cpu),
    "thread_cpu_left": timer_gettime(tcpu),
    "rearm_cpu": timer_settime(cpu, 50.0),
    "rearm_thread_cpu": timer_settime(tcpu, 50.0),
    "quiet_left": timer_gettime(quiet),
    "delete": [timer_delete(t) for t in (cpu, quiet, tcpu, mono)],
}
"""


def _timer_churn(seconds: float) -> None:
    """Create, arm and delete CPU timers, so that a freed k_itimer is soon reused."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ts = [
            timer_create(CLOCK_PROCESS_CPUTIME_ID, SIGEV_SIGNAL, signal.SIGUSR2) for _ in range(16)
        ]
        for t in ts:
            timer_settime(t, 100.0)
        for t in ts:
            timer_delete(t)


@check
def posix_timers() -> dict:
    """F1/F5: own POSIX timers (CPU clocks and a signal timer) follow the task."""
    a, b = Namespace("TMA", 1), Namespace("TMB", 1)
    try:
        s = Subject(a)
        armed = s.call("run", code=ARM_TIMERS)["result"]
        s.gpid = lib.migrate(s.gpid, b.path).global_pid
        out: dict = {"armed": armed}
        out["after"] = s.call("run", code=WALK_TIMERS)["result"]
        # Exit with the (deleted) timers' memory back in the cache, then reuse it.
        s.call("exit")
        s.kill()
        pid = os.fork()
        if pid == 0:
            _timer_churn(1.0)
            os._exit(0)
        os.waitpid(pid, 0)
        return out
    finally:
        a.kill()
        b.kill()


@check
def foreign_cpu_timer() -> dict:
    """F1: another process's CPU timer armed on the mover's process clock: refused, counted."""
    a, b = Namespace("TFA", 1), Namespace("TFB", 1)
    try:
        s = Subject(a)
        r, w = os.pipe()
        r2, w2 = os.pipe()
        holder = os.fork()
        if holder == 0:
            # SIGEV_SIGNAL: 6.12 never queues a SIGEV_NONE CPU timer. It never fires (100 s).
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            t = timer_create(process_cpu_clock(s.gpid), SIGEV_SIGNAL, signal.SIGUSR2)
            os.write(w, str(timer_settime(t, 100.0)).encode())
            os.read(r2, 1)  # until told to delete it
            os.write(w, str(timer_delete(t)).encode())
            os._exit(0)
        armed = int(os.read(r, 10))
        try:
            refused, counted = migrate_counted(s.gpid, b.path)
            state = s.outside()
        finally:
            os.write(w2, b"x")
        deleted = int(os.read(r, 10))
        os.waitpid(holder, 0)
        moved = migrate_errno(s.gpid, b.path)
        return {
            "armed": armed,
            "refused": refused,
            "counted": counted,
            "state_before": state,
            "deleted": deleted,
            "moved_after_delete": moved,
        }
    finally:
        a.kill()
        b.kill()


@check
def tid_cache() -> dict:
    """F3/F6: a glibc and a musl program hold a mutex across the move, then use their TID."""
    # B has more processes than A: old and new TIDs differ.
    a, b = Namespace("TCA", 1), Namespace("TCB", 4)
    out: dict = {}
    try:
        for flavour in ("glibc", "musl"):
            p = LineProgram(a, "tidcache", flavour)
            before = p.call("before")
            m = lib.migrate(p.gpid, b.path)
            after = p.call("after")
            p.wait()
            out[flavour] = {"before": before, "after": after, "new_pid": m.pid}
        return out
    finally:
        a.kill()
        b.kill()


def _waiting_parent(w: int) -> None:
    """In A: fork a child, then wait for it in waitpid() and in poll() on its pidfd."""
    c = os.fork()
    if c == 0:
        os.write(w, f"{int(os.readlink('/proc/self'))}\n".encode())
        sleeper()
    pidfd = os.pidfd_open(c)
    res: dict = {}

    def poller() -> None:
        t0 = time.monotonic()
        ready = select.select([pidfd], [], [], 10.0)[0]
        res["poll"] = "ready" if ready else "timeout"
        res["poll_after_s"] = time.monotonic() - t0

    th = threading.Thread(target=poller)
    th.start()
    t0 = time.monotonic()
    try:
        res["wait"] = os.waitpid(c, 0)[1]
    except ChildProcessError:
        res["wait"] = "ECHILD"
    res["wait_after_s"] = time.monotonic() - t0
    th.join(15)
    try:
        signal.pidfd_send_signal(pidfd, 0)
        res["pidfd_signal"] = 0
    except OSError as e:
        res["pidfd_signal"] = e.errno
    os.write(w, (json.dumps(res) + "\n").encode())


@check
def old_parent() -> dict:
    """F4: a parent blocked in waitpid() and poll(pidfd) on the mover, which is not the caller."""
    a, b = Namespace("OPA", 1), Namespace("OPB", 1)
    r, w = os.pipe()
    try:
        parent = fork_into(a.ns_fd, lambda: _waiting_parent(w))
        rf = os.fdopen(r)
        child = int(rf.readline())
        time.sleep(0.5)  # the parent is blocked in waitpid() and poll()
        refused, counted = migrate_counted(child, b.path)
        still_child_of = status(child)["PPid"]
        allowed = migrate_errno(child, b.path, leave_parent=True)
        seen = json.loads(rf.readline())
        os.waitpid(parent, 0)
        return {
            "parent": parent,
            "refused": refused,
            "counted": counted,
            "ppid_after_refusal": int(still_child_of),
            "allowed_with_flag": allowed,
            "parent_saw": seen,
        }
    finally:
        a.kill()
        b.kill()


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inh", ctypes.c_uint32),
    ]


def drop_capability(cap: int) -> None:
    """Remove ``cap`` from this process's effective and permitted sets (capset(2), v3)."""
    hdr = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[cap // 32].effective &= ~(1 << (cap % 32))
    data[cap // 32].permitted &= ~(1 << (cap % 32))
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _errno_from_child(fn) -> int:
    """Run ``fn()`` (returning an errno) in a forked child; its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, str(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return int(f.read() or -1)


@check
def ptrace_access() -> dict:
    """F8: CAP_SYS_ADMIN over the namespaces is not enough without ptrace access to the task."""
    cap_sys_ptrace = 19
    a, b = Namespace("PTA", 1), Namespace("PTB", 1)
    try:
        s = Subject(a)
        s.call("run", code="os.setresgid(1000, 1000, 1000); os.setresuid(1000, 1000, 1000)")

        def without_ptrace_cap() -> int:
            target = os.open(b.path, os.O_RDONLY)  # opening it needs ptrace access to B's init
            drop_capability(cap_sys_ptrace)
            return migrate_errno(s.gpid, target, leave_parent=True)

        st0 = stats()
        denied = _errno_from_child(without_ptrace_cap)
        counted = stats_delta(st0)
        unchanged = s.outside()
        allowed = _errno_from_child(lambda: migrate_errno(s.gpid, b.path, leave_parent=True))
        return {"denied": denied, "counted": counted, "unchanged": unchanged, "allowed": allowed}
    finally:
        a.kill()
        b.kill()


ARM_SIGIO = """
import fcntl
sig_r, sig_w = os.pipe()
sigio = [0]
signal.signal(signal.SIGIO, lambda *a: sigio.__setitem__(0, sigio[0] + 1))
fcntl.fcntl(sig_r, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(sig_r, fcntl.F_SETFL, fcntl.fcntl(sig_r, fcntl.F_GETFL) | os.O_ASYNC)
result = {"getown": fcntl.fcntl(sig_r, fcntl.F_GETOWN), "pid": os.getpid()}
"""
WALK_SIGIO = """
s0 = sigio[0]
os.write(sig_w, b"x")
time.sleep(0.3)
os.read(sig_r, 1)
result = {"getown": fcntl.fcntl(sig_r, fcntl.F_GETOWN), "pid": os.getpid(), "sigio": sigio[0] - s0}
"""


@check
def sigio_owner() -> dict:
    """F5: an F_SETOWN owner naming the mover follows it: SIGIO still arrives."""
    a, b = Namespace("SOA", 1), Namespace("SOB", 3)  # old and new PIDs differ
    try:
        s = Subject(a)
        before = s.call("run", code=ARM_SIGIO)["result"]
        s.gpid = lib.migrate(s.gpid, b.path).global_pid
        return {"before": before, "after": s.call("run", code=WALK_SIGIO)["result"]}
    finally:
        a.kill()
        b.kill()


MQ_NOTIFY = """
mq_hits = [0]
signal.signal(signal.SIGUSR2, lambda *a: mq_hits.__setitem__(0, mq_hits[0] + 1))
mq_name = f"/nsm-check-{os.getpid()}-{time.monotonic_ns()}".encode()
mqd = libc.mq_open(mq_name, os.O_CREAT | os.O_RDWR, ctypes.c_uint(0o600), None)
sev = (ctypes.c_int * 16)()  # struct sigevent: sigev_signo at 8, sigev_notify 0 (SIGEV_SIGNAL)
sev[2] = signal.SIGUSR2
result = {"mqd": mqd, "notify": libc.mq_notify(mqd, sev), "pid": os.getpid()}
"""
MQ_SEND = """
libc.mq_send(mqd, b"x", 1, 0)
time.sleep(0.3)
result = {"notified": mq_hits[0]}
"""
MQ_CLOSE = """
result = {"close": libc.mq_close(mqd), "unlink": libc.mq_unlink(mq_name)}
"""


@check
def mq_notify_owner() -> dict:
    """F1: an mq_notify() registration names the mover's pid where the module cannot reach it:
    a process holding a message queue is refused untouched, and its registration still works."""
    a, b = Namespace("MQA", 1), Namespace("MQB", 3)
    try:
        s = Subject(a)
        armed = s.call("run", code=MQ_NOTIFY)["result"]
        before = s.outside()
        refused, counted = migrate_counted(s.gpid, b.path)
        after = s.outside()
        sent = s.call("run", code=MQ_SEND)["result"]
        closed = s.call("run", code=MQ_CLOSE)["result"]
        moved = migrate_errno(s.gpid, b.path)
        return {
            "armed": armed,
            "refused": refused,
            "counted": counted,
            "state_before": before,
            "state_after": after,
            "notified_after_refusal": sent["notified"],
            "closed": closed,
            "moved_after_close": moved,
        }
    finally:
        a.kill()
        b.kill()


# Each blocks about 2 s in one libc call (no Python retry loop); the move comes after 0.5 s.
BLOCKING_CALLS = {
    "nanosleep": "ts = Itimerspec().value; ts.tv_sec = 2; "
    "rc = libc.nanosleep(ctypes.byref(ts), None)",
    "poll": "rc = libc.poll(None, 0, 2000)",
    "select": "tv = (ctypes.c_long * 2)(2, 0); rc = libc.select(0, None, None, None, tv)",
    "epoll_wait": "ep = libc.epoll_create1(0); ev = ctypes.create_string_buffer(12); "
    "rc = libc.epoll_wait(ep, ev, 1, 2000)",
    "sigtimedwait": "ss = ctypes.create_string_buffer(128); libc.sigemptyset(ss); "
    "libc.sigaddset(ss, signal.SIGUSR2); ts = Itimerspec().value; ts.tv_sec = 2; "
    "rc = libc.sigtimedwait(ss, None, ctypes.byref(ts))",
    "recv_timeout": "import socket; x, y = socket.socketpair(); "
    "x.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bytes(Itimerspec().value) and "
    "(ctypes.c_long * 2)(2, 0)); buf = ctypes.create_string_buffer(8); "
    "rc = libc.recv(x.fileno(), buf, 8, 0)",
}


@check
def blocking_calls() -> dict:
    """F11: which blocking calls return EINTR to a program without signal handlers."""
    a, b = Namespace("ECA", 1), Namespace("ECB", 1)
    out: dict = {}
    try:
        s = Subject(a)
        targets = [b.path, a.path]
        for i, (name, call) in enumerate(BLOCKING_CALLS.items()):
            code = (
                "ctypes.set_errno(0); t0 = time.monotonic(); " + call + "; "
                "result = [rc, ctypes.get_errno() if rc == -1 else 0, time.monotonic() - t0]"
            )
            s.sock.sendall((json.dumps({"cmd": "run", "code": code}) + "\n").encode())
            time.sleep(0.5)
            moved = migrate_errno(s.gpid, targets[i % 2])
            rep = json.loads(s.rfile.readline())["result"]
            s.gpid = s.call("state")["gpid"]
            out[name] = {"moved": moved, "rc": rep[0], "errno": rep[1], "seconds": rep[2]}
        return out
    finally:
        a.kill()
        b.kill()


@check
def empty_target() -> dict:
    """F2: a PID namespace with no init yet cannot be named, and its first fork still works."""
    a = Namespace("ETA", 1)
    r, w = os.pipe()
    r2, w2 = os.pipe()
    helper = os.fork()
    if helper == 0:
        unshare(CLONE_NEWPID)
        os.write(w, b"u")
        os.read(r2, 1)
        c = os.fork()
        if c == 0:
            os._exit(0)
        os.waitpid(c, 0)
        os.write(w, b"f")
        os._exit(0)
    try:
        os.read(r, 1)
        s = Subject(a)
        out: dict = {}
        try:
            fd = os.open(f"/proc/{helper}/ns/pid_for_children", os.O_RDONLY)
            out["open"] = 0
            out["migrate"] = migrate_errno(s.gpid, fd)
            os.close(fd)
        except OSError as e:
            out["open"] = e.errno
        # The helper's active namespace is not the empty one: a pidfd of it names its own.
        os.write(w2, b"x")
        out["first_fork"] = os.read(r, 1).decode()
        os.waitpid(helper, 0)
        return out
    finally:
        a.kill()


def _session_on_pty(slave: str, w: int, hup_log: str) -> None:
    """Session leader with ``slave`` as controlling tty; a member (not its child) in the
    terminal's foreground group logs the SIGHUP it gets."""
    os.setsid()
    fd = os.open(slave, os.O_RDWR)  # a session leader's first tty becomes its ctty
    x = os.fork()
    if x == 0:
        if os.fork() == 0:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.setpgid(0, 0)
            os.tcsetpgrp(fd, os.getpgrp())
            signal.signal(signal.SIGHUP, lambda *a: open(hup_log, "a").write("hup\n"))
            os.write(w, f"{int(os.readlink('/proc/self'))}\n".encode())
            sleeper()
        os._exit(0)
    os.waitpid(x, 0)  # the member is now the namespace init's child
    sleeper()


def _take_ctty(slave: str) -> int:
    """In a new session, try to make ``slave`` the controlling tty; its tty_nr or the errno."""
    os.setsid()
    fd = os.open(slave, os.O_RDWR | os.O_NOCTTY)
    try:
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
    except OSError as e:
        return -e.errno
    return tty_nr(int(os.readlink("/proc/self")))


@check
def controlling_tty() -> dict:
    """F9: a session leader with a controlling tty leaves its session as its exit would."""
    a, b = Namespace("CTA", 1), Namespace("CTB", 1)
    master, slave_fd = os.openpty()
    slave = os.ttyname(slave_fd)
    os.close(slave_fd)
    hup_log = f"{WORK}/ctty-hup"
    open(hup_log, "w").close()
    r, w = os.pipe()
    try:
        leader = fork_into(a.ns_fd, lambda: _session_on_pty(slave, w, hup_log))
        member = int(os.fdopen(r).readline())
        # The member reported before its parent exited: wait until the leader reaped it (a
        # process with a child is refused, busy_children).
        for _ in range(500):
            if not open(f"/proc/{leader}/task/{leader}/children").read().split():
                break
            time.sleep(0.01)
        before = {"leader_tty": tty_nr(leader), "member_tty": tty_nr(member)}
        taken_before = _errno_from_child(lambda: _take_ctty(slave))
        m = lib.migrate(leader, b.path)
        time.sleep(0.3)
        after = {
            "leader_tty": tty_nr(m.global_pid),
            "member_tty": tty_nr(member),
            "member_alive": os.path.exists(f"/proc/{member}"),
            "member_hup": open(hup_log).read().count("hup"),
            "leader_sid_pgid": [
                int(x) for x in (status(m.global_pid)["NSsid"].split()[-1:] or [0])
            ],
        }
        taken_after = _errno_from_child(lambda: _take_ctty(slave))
        return {
            "before": before,
            "taken_before": taken_before,
            "after": after,
            "taken_after": taken_after,
        }
    finally:
        os.close(master)
        a.kill()
        b.kill()


PROC_VIEW = """
try:
    link = int(os.readlink("/proc/self"))
except OSError as e:
    link = -e.errno
result = {"getpid": os.getpid(), "proc_self": link, "cwd": os.getcwd(),
          "listed": str(os.getpid()) in os.listdir("/proc")}
"""


@check
def proc_view() -> dict:
    """F7: with its own /proc, a process moved to a sibling namespace loses /proc/self unless
    it joins the target's mount namespace too (NSMIGRATE_F_MNTNS)."""
    a, b = Namespace("PVA", 1, own_proc=True), Namespace("PVB", 2, own_proc=True)
    try:
        s = Subject(a)
        mnt_a, mnt_b = f"/proc/{a.init}/ns/mnt", f"/proc/{b.init}/ns/mnt"
        s.join_mount_ns(mnt_a, cwd="/tmp")
        before = s.call("run", code=PROC_VIEW)["result"]
        m = lib.migrate(s.gpid, b.path)
        plain = s.call("run", code=PROC_VIEW)["result"]
        m = lib.migrate(m.global_pid, a.path, mntns=mnt_a)
        back = s.call("run", code=PROC_VIEW)["result"]
        m = lib.migrate(m.global_pid, b.path, mntns=mnt_b)
        joined = s.call("run", code=PROC_VIEW)["result"]
        ps = s.call(
            "run",
            code="import subprocess; result = subprocess.run(['ps', '-o', 'pid=', '-p', "
            "str(os.getpid())], capture_output=True, text=True).stdout.strip()",
        )["result"]
        bad_fd = migrate_errno(m.global_pid, a.path, mntns=f"/proc/{a.init}/ns/net")
        return {
            "before": before,
            "plain": plain,
            "back_with_mntns": back,
            "joined": joined,
            "ps_pid": ps,
            "new_pid": m.pid,
            "not_a_mount_ns": bad_fd,
        }
    finally:
        a.kill()
        b.kill()
