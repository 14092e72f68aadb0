"""Multi-threaded processes: every thread moves in one step, or none does.

The subject is tests/vm/progs/busythreads (8 busy threads, glibc and musl builds), started by
this runner in namespace A (so the runner, its parent, is the caller of every move).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time

from harness import (
    WORK,
    LineProgram,
    Namespace,
    Subject,
    check,
    lib,
    libc,
    migrate_counted,
    migrate_errno,
    proc_info,
    seize,
    stats,
    stats_delta,
    thread_views,
)
from holding_fuse import FUSE_INTERRUPT, FUSE_LOOKUP, HoldingFuse

SYS_TGKILL = 234


def _started(ns: Namespace, flavour: str = "glibc") -> LineProgram:
    """busythreads in ``ns``, once every thread has reported its TID."""
    p = LineProgram(ns, "busythreads", flavour)
    for _ in range(100):
        info = p.call("info")
        if all(info[f"tid{i}"] for i in range(8)):
            return p
        time.sleep(0.05)
    raise TimeoutError("busythreads: its threads did not start")


def _tgkill_from_outside(gpid: int) -> dict[int, int]:
    """SIGUSR1 to every thread of ``gpid`` by its global TID: the errno per TID."""
    out = {}
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{gpid}/task")):
        rc = libc.syscall(ctypes.c_long(SYS_TGKILL), gpid, tid, signal.SIGUSR1)
        out[tid] = ctypes.get_errno() if rc == -1 else 0
    return out


def _move_every_thread(flavour: str) -> dict:
    # A has more processes than B: the threads' old numbers name no task in B.
    a, b = Namespace(f"TA{flavour}", 20), Namespace(f"TB{flavour}", 1)
    try:
        p = _started(a, flavour)
        time.sleep(0.2)
        before = {"info": p.call("info"), "views": thread_views(p.gpid)}
        st0 = stats()
        m = lib.migrate(p.gpid, b.path)
        counted = stats_delta(st0)
        time.sleep(0.3)
        out = {
            "new_pid": m.pid,
            "counted": counted,
            "b_ns": os.readlink(f"/proc/{b.init}/ns/pid"),
            "before": before,
            "after": {"info": p.call("info"), "views": thread_views(m.global_pid)},
            "ps_lwp": b.ps_threads(m.pid),
            "tgkill_inside": p.call("tgkill"),
            "tgkill_outside": _tgkill_from_outside(m.global_pid),
        }
        time.sleep(0.3)
        out["after_outside_tgkill"] = p.call("info")
        out["raise"] = p.call("raise")
        out["spawn"] = p.call("spawn")
        out["join"] = p.call("join")
        out["views_with_spawned"] = thread_views(m.global_pid)
        out["robust"] = p.call("robust")
        time.sleep(0.2)
        out["views_after_exits"] = thread_views(m.global_pid)
        os.kill(m.global_pid, signal.SIGKILL)
        return out
    finally:
        a.kill()
        b.kill()


@check
def threads_move() -> dict:
    """An 8-thread program moves in one step: TIDs in B, threads running, signals, libc."""
    return {flavour: _move_every_thread(flavour) for flavour in ("glibc", "musl")}


def _one_namespace(gpid: int) -> list[str]:
    """The distinct (pid, pid_for_children) namespaces of ``gpid``'s live threads."""
    return sorted({f"{v['ns']} {v['ns_for_children']}" for v in thread_views(gpid).values()})


@check
def threads_clone_race() -> dict:
    """A thread creates and joins threads in a loop while the process hops: after every
    ioctl, moved or refused, all threads are in one namespace (nothing half-moved)."""
    hops = int(os.environ.get("NSM_THREAD_HOPS", "100"))
    a, b = Namespace("TCA", 1), Namespace("TCB", 1)
    try:
        p = _started(a)
        p.call("churn")
        time.sleep(0.2)
        st0 = stats()
        churned0 = p.call("churned")
        ns_path = {0: a.path, 1: b.path}
        ns_link = {i: os.readlink(f"/proc/{ns.init}/ns/pid") for i, ns in enumerate((a, b))}
        gpid, where, codes, split = p.gpid, 0, [], []
        for i in range(hops):
            to = 1 - where
            try:
                gpid = lib.migrate(gpid, ns_path[to]).global_pid
                codes.append(0)
                where = to
            except OSError as e:
                codes.append(e.errno)
            seen = _one_namespace(gpid)
            if seen != [f"{ns_link[where]} {ns_link[where]}"]:
                split.append({"hop": i, "seen": seen, "expected": ns_link[where]})
        churned1 = p.call("churned")
        info = p.call("info")
        threads_after = len(thread_views(gpid))
        os.kill(gpid, signal.SIGKILL)
        return {
            "hops": hops,
            "codes": codes,
            "split": split[:10],
            "churned_before": churned0,
            "churned_after": churned1,
            "threads_after": threads_after,
            "retried": stats_delta(st0).get("attempts_retried", 0),
            "loops": [info[f"loops{i}"] for i in range(8)],
        }
    finally:
        a.kill()
        b.kill()


def _refused(gpid: int, target: str, **kw) -> dict:
    """A refused move, with the counters it moved and every thread's view before and after."""
    views = thread_views(gpid)
    code, counted = migrate_counted(gpid, target, **kw)
    return {"errno": code, "counted": counted, "same": thread_views(gpid) == views}


IO_URING_SQPOLL = """
import ctypes
params = ctypes.create_string_buffer(120)
ctypes.c_uint32.from_buffer(params, 8).value = 2  # IORING_SETUP_SQPOLL
ctypes.c_uint32.from_buffer(params, 16).value = 60000  # sq_thread_idle, ms
fd = libc.syscall(ctypes.c_long(425), 8, params)  # io_uring_setup
result = {"fd": fd, "errno": ctypes.get_errno() if fd < 0 else 0}
"""


def _children_of_threads(pid: int) -> list[int]:
    """The children of every thread of ``pid``; a thread that exits meanwhile (the one that
    ran the vfork command, on a slow kernel) has none."""
    kids = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return kids


def _wait_for(probe, wait_s: float = 10.0):
    """``probe()`` once it is truthy, or its last value after wait_s."""
    deadline = time.monotonic() + wait_s
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def _thread_names(pid: int) -> list[str]:
    return sorted(proc_info(int(t)).comm for t in os.listdir(f"/proc/{pid}/task"))


def _thread_names_once(pid: int, prefix: str, wait_s: float = 10.0) -> list[str]:
    """The comm of every thread of ``pid``, once one starts with ``prefix`` (or wait_s passed).

    io_uring's SQPOLL thread names itself (io_sq_thread: set_task_comm) only when it first
    runs, which on a loaded host can be well after io_uring_setup has returned."""
    _wait_for(lambda: any(n.startswith(prefix) for n in _thread_names(pid)), wait_s)
    return _thread_names(pid)


def _threads_in_state(pid: int, state: str) -> list[int]:
    """Global TIDs of the threads of ``pid`` in ``state`` (a /proc stat letter)."""
    found = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            if proc_info(int(t)).state == state:
                found.append(int(t))
        except FileNotFoundError:
            pass
    return found


def _all_threads_in_state(pid: int, state: str, wait_s: float = 10.0) -> bool:
    """Whether every thread of ``pid`` reaches ``state`` (a /proc stat letter) within wait_s."""

    def every() -> bool:
        return len(_threads_in_state(pid, state)) == len(os.listdir(f"/proc/{pid}/task"))

    return _wait_for(every, wait_s)


@check
def threads_refused() -> dict:
    """What cannot move is refused with its reason, and every thread is left as it was: a
    traced thread, a thread's vfork child (and that child itself), an io_uring worker, and
    threads that do not reach a safe point in time."""
    a, b = Namespace("TRA", 1), Namespace("TRB", 1)
    try:
        p = _started(a)
        tids = sorted(int(t) for t in os.listdir(f"/proc/{p.gpid}/task"))
        tracer = seize(tids[3])  # one thread, not the leader
        out = {"traced": _refused(p.gpid, b.path)}
        os.kill(tracer, signal.SIGKILL)
        os.waitpid(tracer, 0)
        out["vfork"] = p.call("vfork")
        time.sleep(0.3)
        out["vfork_parent"] = _refused(p.gpid, b.path)
        kids = _children_of_threads(p.gpid)
        vchild = _refused(kids[0], b.path, leave_parent=True) if kids else {"errno": None}
        out["vfork_child"] = vchild
        time.sleep(5.5)  # the vfork child exits (and reaps itself)
        before = p.call("info")
        out["moved_after"] = migrate_errno(p.gpid, b.path)
        time.sleep(0.3)
        after = p.call("info")
        out["progress_after"] = [after[f"loops{i}"] > before[f"loops{i}"] for i in range(8)]

        s = Subject(a)
        out["io_uring"] = s.call("run", code=IO_URING_SQPOLL)["result"]
        out["io_uring_threads"] = _thread_names_once(s.gpid, "iou-sqp")
        out["io_uring_refused"] = _refused(s.gpid, b.path)
        s.kill()

        # threads that cannot reach a safe point in time (group-stopped): ETIMEDOUT, untouched
        q = _started(a)
        os.kill(q.gpid, signal.SIGSTOP)
        out["all_stopped"] = _all_threads_in_state(q.gpid, "T")
        out["stopped"] = _refused(q.gpid, b.path, timeout=1.0)
        os.kill(q.gpid, signal.SIGCONT)
        time.sleep(0.3)
        out["stopped_moved_after"] = migrate_errno(q.gpid, b.path)
        return out
    finally:
        a.kill()
        b.kill()


# In the subject (after it joined A's mount namespace): four threads read /proc/thread-self.
THREADS_READING_PROC = """
import threading
SEEN = {}
def _reader(k):
    while True:
        try:
            SEEN[k] = os.readlink("/proc/thread-self")
        except OSError as e:
            SEEN[k] = -e.errno
        time.sleep(0.02)
for k in range(4):
    threading.Thread(target=_reader, args=(k,), daemon=True).start()
time.sleep(0.2)
result = {"pid": os.getpid(), "seen": dict(SEEN)}
"""
THREADS_SEEN = """
SEEN.clear()
time.sleep(0.3)
result = {"pid": os.getpid(), "seen": dict(SEEN)}
"""


@check
def threads_mount_ns_refused() -> dict:
    """NSMIGRATE_F_MNTNS needs a root and cwd that are the process's alone, as setns(CLONE_NEWNS)
    does: a 5-thread process is refused (EINVAL) with every thread as it was, still reading
    A's /proc; without the flag it moves."""
    a, b = Namespace("TMA", 1, own_proc=True), Namespace("TMB", 2, own_proc=True)
    try:
        s = Subject(a)
        mnt_a, mnt_b = f"/proc/{a.init}/ns/mnt", f"/proc/{b.init}/ns/mnt"
        s.join_mount_ns(mnt_a, cwd="/tmp")
        before = s.call("run", code=THREADS_READING_PROC)["result"]
        tasks = os.listdir(f"/proc/{s.gpid}/task")
        out = {
            "before": before,
            "threads": len(tasks),
            "refused": _refused(s.gpid, b.path, mntns=mnt_b),
            "after_refusal": s.call("run", code=THREADS_SEEN)["result"],
            "mnt_a": os.readlink(mnt_a),
            "threads_mnt": sorted(os.readlink(f"/proc/{s.gpid}/task/{t}/ns/mnt") for t in tasks),
        }
        out["moved_without_flag"] = migrate_errno(s.gpid, b.path)
        return out
    finally:
        a.kill()
        b.kill()


# In the subject: one thread looks up a name on the unanswered FUSE mount and blocks.
LOOKUP_IN_A_THREAD = """
import threading
LOOKUP = []
def _lookup():
    try:
        os.stat({path!r})
        LOOKUP.append(0)
    except OSError as exc:
        LOOKUP.append(exc.errno)
threading.Thread(target=_lookup, daemon=True).start()
"""


@check
def thread_in_d_state() -> dict:
    """A thread in uninterruptible sleep (a FUSE lookup that nobody answers) never reaches a
    safe point: the move times out (ETIMEDOUT) and leaves every thread as it was; once the
    wait ends (the connection is aborted) the same process moves."""
    a, b = Namespace("TDA", 1), Namespace("TDB", 1)
    s = Subject(a)  # forked before /dev/fuse is opened: it must not hold the daemon's fd
    fuse = None
    try:
        fuse = HoldingFuse(f"{WORK}/fuse-unanswered", answer_init=False)
        s.call("run", code=LOOKUP_IN_A_THREAD.format(path=f"{fuse.mnt}/name"))
        out = {"in_d": _wait_for(lambda: _threads_in_state(s.gpid, "D"))}
        out["refused"] = _refused(s.gpid, b.path, timeout=1.0)
        out["in_d_after"] = _threads_in_state(s.gpid, "D")
        fuse.close()
        fuse = None
        out["lookup"] = _wait_for(lambda: s.call("run", code="result = LOOKUP")["result"])
        out["moved_after"] = migrate_errno(s.gpid, b.path)
        return out
    finally:
        if fuse is not None:
            fuse.close()
        s.kill()
        a.kill()
        b.kill()


@check
def thread_execs_during_a_move() -> dict:
    """An execve() that waits for another thread to die (de_thread; the thread sleeps in a FUSE
    request the daemon has read and not answered) refuses a move (EBUSY busy_exec) and leaves
    every thread as it was; the exec then completes, and the new program moves."""
    a, b = Namespace("TEA", 1), Namespace("TEB", 1)
    s = Subject(a)  # forked before the FUSE mount: it must not hold the daemon's fd
    fuse = None
    try:
        fuse = HoldingFuse(f"{WORK}/fuse-holding", answer_init=True)
        s.call("run", code=LOOKUP_IN_A_THREAD.format(path=f"{fuse.mnt}/name"))
        out = {"lookup_read": fuse.wait_for(FUSE_LOOKUP)}
        # The leader execs; no reply comes back: the subject's command loop is being replaced.
        code = "os.execv('/bin/sleep', ['sleep', '600'])"
        s.sock.sendall((json.dumps({"cmd": "run", "code": code}) + "\n").encode())
        out["interrupt_read"] = fuse.wait_for(FUSE_INTERRUPT)  # de_thread's SIGKILL
        out["in_d"] = _wait_for(lambda: len(_threads_in_state(s.gpid, "D")) == 2)
        out["refused"] = _refused(s.gpid, b.path)
        fuse.answer_held()
        out["comm_after"] = (
            _wait_for(lambda: proc_info(s.gpid).comm == "sleep") and proc_info(s.gpid).comm
        )
        out["threads_after"] = len(os.listdir(f"/proc/{s.gpid}/task"))
        m = lib.migrate(s.gpid, b.path)
        out["moved_after"] = {"pid": m.pid, "comm": proc_info(m.global_pid).comm}
        os.kill(m.global_pid, signal.SIGKILL)
        return out
    finally:
        if fuse is not None:
            fuse.close()
        s.kill()
        a.kill()
        b.kill()


# In the subject: a worker thread waits for a timer signal and SIGIO directed at it alone
# (SIGEV_THREAD_ID, F_OWNER_TID); a CPU-clock timer runs on the worker's own clock.
ARM_THREAD_OBJECTS = """
import fcntl, struct
SIG = signal.SIGRTMIN + 2
signal.pthread_sigmask(signal.SIG_BLOCK, [SIG, signal.SIGIO])
box = {"timer": 0, "sigio": 0, "ready": threading.Event()}
def worker():
    box["tid"] = box["tid_now"] = threading.get_native_id()
    box["ready"].set()
    while True:
        info = signal.sigtimedwait([SIG, signal.SIGIO], 0.1)
        box["tid_now"] = threading.get_native_id()
        if info is not None:
            box["timer" if info.si_signo == SIG else "sigio"] += 1
threading.Thread(target=worker, daemon=True).start()
box["ready"].wait()
tid = box["tid"]
ttimer = timer_create(CLOCK_MONOTONIC, SIGEV_THREAD_ID, SIG, tid)
tcpu = timer_create(((~tid) << 3) | 6, SIGEV_THREAD_ID, SIG, tid)  # the worker's CPU clock
own_r, own_w = os.pipe()
fcntl.fcntl(own_r, 15, struct.pack("ii", 0, tid))  # F_SETOWN_EX, F_OWNER_TID
fcntl.fcntl(own_r, fcntl.F_SETFL, fcntl.fcntl(own_r, fcntl.F_GETFL) | os.O_ASYNC)
arm = [timer_settime(ttimer, 0.02, interval=0.02), timer_settime(tcpu, 100.0)]
result = {"tid": tid, "arm": arm,
          "getown_ex": list(struct.unpack("ii", fcntl.fcntl(own_r, 16, bytes(8))))}
"""
WALK_THREAD_OBJECTS = """
t0, s0 = box["timer"], box["sigio"]
time.sleep(0.6)
os.write(own_w, b"x")
time.sleep(0.3)
os.read(own_r, 1)
result = {"tid_now": box["tid_now"], "timer_signals": box["timer"] - t0, "sigio": box["sigio"] - s0,
          "getown_ex": list(struct.unpack("ii", fcntl.fcntl(own_r, 16, bytes(8)))),
          "cpu_left": timer_gettime(tcpu), "rearm": timer_settime(tcpu, 50.0),
          "delete": [timer_delete(ttimer), timer_delete(tcpu)]}
"""


@check
def thread_owned_objects() -> dict:
    """Objects naming a non-leader thread follow that thread: a SIGEV_THREAD_ID timer, a
    CPU-clock timer on the thread's clock (deleted after the move, then the process exits:
    the timer list is walked), an F_SETOWN_EX F_OWNER_TID owner."""
    a, b = Namespace("TOA", 5), Namespace("TOB", 1)  # old and new TIDs differ
    try:
        s = Subject(a)
        before = s.call("run", code=ARM_THREAD_OBJECTS)
        s.gpid = lib.migrate(s.gpid, b.path).global_pid
        after = s.call("run", code=WALK_THREAD_OBJECTS)
        views = thread_views(s.gpid)
        s.kill()
        return {"before": before, "after": after, "views": views}
    finally:
        a.kill()
        b.kill()
