"""Many moves: back and forth, concurrent movers with fork churn, a target dying mid-burst.

Counts: NSM_BACK_AND_FORTH (10,000), NSM_STRESS_THREADED (10,000 moves of an 8-thread
process), NSM_STRESS_CONCURRENT_EACH (or NSM_CONCURRENT_EACH; 200 per mover, 8 movers),
NSM_STRESS_BURST (at most 5,000 per mover while B's init is killed).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from harness import (
    SLAB_CACHES,
    LineProgram,
    Namespace,
    Subject,
    check,
    churn,
    fork_into,
    hop_errors,
    lib,
    nspid,
    settle,
    slab_objects,
    thread_views,
)
from hazards import ARM_SIGIO, ARM_TIMERS, WALK_SIGIO, WALK_TIMERS


@check
def stress_back_and_forth() -> dict:
    """One process moved n times while it holds POSIX timers and an F_SETOWN owner, which
    follow it every time: a reference leaked per move would show in the pid slab."""
    n = int(os.environ.get("NSM_BACK_AND_FORTH", "10000"))
    a, b = Namespace("SA", 2), Namespace("SB", 2)
    try:
        s = Subject(a)
        s.call("incr", n=5)
        s.call("run", code=ARM_TIMERS)
        s.call("run", code=ARM_SIGIO)
        start = s.outside()["starttime"]
        settle()
        slab0 = slab_objects(SLAB_CACHES)
        fd = {0: a.ns_fd, 1: b.ns_fd}
        gpid = s.gpid
        errors = 0
        t0 = time.monotonic()
        for i in range(n):
            try:
                gpid = lib.__migrate(gpid, fd[(i + 1) % 2]).global_pid
            except OSError:
                errors += 1
            if i % 1000 == 0:
                print(f"back-and-forth {i}/{n}", flush=True)
        elapsed = time.monotonic() - t0
        s.gpid = gpid
        state = s.call("state")
        held = {
            "timers": s.call("run", code=WALK_TIMERS)["result"],
            "sigio": s.call("run", code=WALK_SIGIO)["result"],
        }
        settle()
        slab1 = slab_objects(SLAB_CACHES)
        return {
            "n": n,
            "errors": errors,
            "elapsed_s": elapsed,
            "state": state,
            "start": start,
            "held": held,
            "slab_before": slab0,
            "slab_after": slab1,
            "final_nspid": nspid(gpid),
            "a_children": a.children(),
            "b_children": b.children(),
            "gpid": gpid,
        }
    finally:
        a.kill()
        b.kill()


@check
def stress_threaded() -> dict:
    """An 8-thread process (tests/vm/progs/busythreads) moved n times back and forth: every
    move allocates 9 pids and nsproxies; a reference leaked per thread would show in the slabs.
    """
    n = int(os.environ.get("NSM_STRESS_THREADED", "10000"))
    a, b = Namespace("STA", 2), Namespace("STB", 2)
    try:
        p = LineProgram(a, "busythreads")
        time.sleep(0.3)
        before = p.call("info")
        settle()
        slab0 = slab_objects(SLAB_CACHES)
        t0 = time.monotonic()
        gpid, errors = hop_errors(p.gpid, (a.ns_fd, b.ns_fd), n)
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
        after = p.call("info")
        views = thread_views(gpid)
        os.kill(gpid, signal.SIGKILL)
        try:
            os.waitpid(gpid, 0)  # never moved: still this runner's child
        except ChildProcessError:  # moved: reaped by the namespace's init
            for _ in range(600):
                if not os.path.exists(f"/proc/{gpid}"):
                    break
                time.sleep(0.05)
        settle()
        slab1 = slab_objects(SLAB_CACHES)
        return {
            "n": n,
            "errors": sorted(set(errors)),
            "error_count": len(errors),
            "elapsed_s": elapsed,
            "progress": [after[f"loops{i}"] > before[f"loops{i}"] for i in range(8)],
            "threads": len(views),
            "namespaces": sorted({v["ns"] for v in views.values()}),
            "a_ns": os.readlink(f"/proc/{a.init}/ns/pid"),
            "slab_before": slab0,
            "slab_after": slab1,
        }
    finally:
        a.kill()
        b.kill()


@check
def stress_concurrent() -> dict:
    per = int(
        os.environ.get("NSM_STRESS_CONCURRENT_EACH", os.environ.get("NSM_CONCURRENT_EACH", "200"))
    )
    a, b = Namespace("CA", 1), Namespace("CB", 1)
    churners = [fork_into(ns.ns_fd, lambda: churn(60)) for ns in (a, b)]
    try:
        subjects = [Subject(a) for _ in range(8)]
        for i, s in enumerate(subjects):
            s.call("incr", n=i)
        results: dict[int, dict] = {}
        targets = (b.ns_fd, a.ns_fd)

        def run(idx: int, s: Subject) -> None:
            gpid, errs = s.gpid, []
            for i in range(per):
                try:
                    gpid = lib.__migrate(gpid, targets[i % 2]).global_pid
                except OSError as e:
                    errs.append(e.errno)
            results[idx] = {"gpid": gpid, "errors": errs}

        threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(subjects)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        states = []
        for i, s in enumerate(subjects):
            s.gpid = results.get(i, {}).get("gpid", s.gpid)
            states.append({"counter": s.call("state")["counter"], "nspid": nspid(s.gpid)})
        return {
            "per": per,
            "results": results,
            "states": states,
            "elapsed_s": elapsed,
            "alive_threads": sum(t.is_alive() for t in threads),
        }
    finally:
        for c in churners:
            os.kill(c, signal.SIGKILL)
            os.waitpid(c, 0)
        a.kill()
        b.kill()


@check
def target_init_killed_in_burst() -> dict:
    a = Namespace("KA", 1)
    b = Namespace("KB", 2)
    subjects = [Subject(a) for _ in range(6)]
    errs: dict[int, list] = {}

    stop_burst = threading.Event()

    def run(idx: int, s: Subject) -> None:
        # Keep migrating until well after B's init is dead, so that some moves race its death.
        gpid, out = s.gpid, []
        for i in range(int(os.environ.get("NSM_STRESS_BURST", "5000"))):
            if stop_burst.is_set() and i % 2 == 0:
                break
            try:
                target = b.ns_fd if i % 2 == 0 else a.ns_fd
                gpid = lib.__migrate(gpid, target).global_pid
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        errs[idx] = out

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(subjects)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(b.init, signal.SIGKILL)
    t0 = time.monotonic()
    os.waitpid(b.init, 0)
    init_reaped_after = time.monotonic() - t0
    time.sleep(0.5)
    stop_burst.set()
    for t in threads:
        t.join(120)
    codes = sorted({e for v in errs.values() for e in v})
    for s in subjects:
        s.kill()
    os.close(b.ns_fd)
    a.kill()
    return {
        "codes": codes,
        "init_reaped_after_s": init_reaped_after,
        "hung_threads": sum(t.is_alive() for t in threads),
    }
