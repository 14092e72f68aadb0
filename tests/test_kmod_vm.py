"""The kernel module in the VM, on both supported kernels: one boot per kernel.

tests/vm/kmod_checks/ runs inside the guest and records what it observed; the assertions
(kmod/README.md, "What a migration does", "Refusals", "Known limits") are made here on the
host. Each boot has slab poisoning and KFENCE on, so a use-after-free shows in the kernel log.
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

from nsexp import testbed

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parent.parent
BACK_AND_FORTH = 10_000
FUZZ = 100_000
THREADED_MOVES = 10_000
# Freed objects are poisoned and checked, KFENCE samples every allocation it can.
POISON_ARGS = ("slub_debug=FZPU", "page_poison=1", "init_on_free=1", "kfence.sample_interval=1")


def build_guest_programs() -> None:
    """tests/vm/progs/*.c for glibc and musl, into build/kmod-progs (the guest reads it)."""
    proc = subprocess.run(
        ["make", "-C", str(REPO / "tests" / "vm" / "progs")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(
    scope="module", params=testbed.SUPPORTED_SERIES, ids=lambda s: f"linux-{s.rstrip('.')}"
)
def guest(request) -> dict:
    """Boot the kernel once, run every check, return the observations and the batch."""
    release = next(r for r in testbed.supported_releases() if r.startswith(request.param))
    build_guest_programs()
    tb = testbed.VMTestbed(kernel=release)
    batch = tb.run_batch(
        ['python3 tests/vm/kmod_checks "$NSEXP_OUT"'],
        env={
            "NSM_BACK_AND_FORTH": str(BACK_AND_FORTH),
            "NSM_FUZZ": str(FUZZ),
            "NSM_STRESS_THREADED": str(THREADED_MOVES),
        },
        timeout=1800,
        command_timeout=1500,
        kernel_args=POISON_ARGS,
    )
    path = batch.out_dir / "kmod_checks.json"
    assert path.exists(), f"the guest wrote no results: {batch.results[0].stderr[-3000:]}"
    return {"batch": batch, "obs": json.loads(path.read_text())}


def data(guest: dict, name: str) -> dict:
    rec = guest["obs"].get(name)
    assert rec is not None, f"check {name} did not run"
    assert rec["ok"], rec.get("traceback") or rec.get("error")
    return rec["data"]


def test_runs_the_kernel_it_was_asked_for(guest: dict) -> None:
    assert guest["obs"]["uname"] == guest["batch"].kernel_release
    assert guest["batch"].module_loaded
    assert guest["batch"].results[0].returncode == 0, guest["batch"].results[0].stderr[-3000:]


def test_booted_with_slab_poisoning_and_kfence(guest: dict) -> None:
    # A freed object touched after the move then shows as a poison or KFENCE report.
    lines = guest["batch"].dmesg.splitlines()
    command_line = next(line for line in lines if "Kernel command line" in line)
    assert all(arg in command_line for arg in POISON_ARGS), command_line


def test_migrated_process_keeps_state_and_gets_next_pid(guest: dict) -> None:
    d = data(guest, "basic")
    before, after, m = d["before"], d["after"], d["migration"]
    # Target B: init + 3 children -> the next free PID is 5.
    assert m["pid"] == 5
    assert after["outside"]["nspid"][-1] == 5 == after["inside"]["pid"]
    assert after["outside"]["nspid"][0] == m["global_pid"] == after["inside"]["gpid"]
    assert len(after["outside"]["nspid"]) == 2
    # Same process: start time, counter, open file, anonymous mapping.
    assert after["outside"]["starttime"] == before["outside"]["starttime"]
    for key in ("counter", "file", "anon", "starttime"):
        assert after["inside"][key] == before["inside"][key], key
    assert before["inside"]["counter"] == 42
    # Parent: B's init, seen from outside and from inside.
    assert after["outside"]["ppid"] == d["b_init"]
    assert after["inside"]["ppid"] == 1
    assert m["global_pid"] in after["b_init_children"]
    # Its old number is gone from A, its new one is listed by ps inside B.
    assert not after["old_gpid_exists"]
    assert before["inside"]["pid"] in before["ps_a"]
    assert before["inside"]["pid"] not in after["ps_a"]
    assert 5 in after["ps_b"]
    # A new session and process group, led by itself.
    assert after["inside"]["sid"] == after["inside"]["pgid"] == 5
    # Kernel timestamps are ordered.
    assert m["t_queued_ns"] <= m["t_switch_start_ns"] <= m["t_switch_done_ns"]


def test_children_are_born_in_target_and_target_init_reaps(guest: dict) -> None:
    d = data(guest, "basic")
    forked = d["forked"]
    # Born in B: two levels, its parent is the migrated process (5), and its number is the
    # next free one in B (after the `ps` that listed B, which was the last process born there).
    assert forked["ppid"] == 5
    assert len(forked["nspid"]) == 2 and forked["nspid"][-1] == forked["pid"]
    assert forked["pid"] == max(d["after"]["ps_b"]) + 1
    # It exited: B's init reaped it (status 0), the old parent has no such child.
    assert [5, 0] in d["b_reaped"]
    assert d["a_reaped"] == []
    assert d["old_parent_wait"] == "ECHILD"
    assert not d["new_gpid_exists_after_exit"]


def test_libc_tid_cache_is_rewritten(guest: dict) -> None:
    # A robust mutex locked after migration stores libc's cached TID; the kernel marks it
    # EOWNERDEAD at exit only if that equals the task's new TID.
    d = data(guest, "basic")
    assert d["robust_lock"]["lock"] == 0
    assert d["robust_next_lock"] == errno.EOWNERDEAD


def test_paper_chain(guest: dict) -> None:
    d = data(guest, "chain")
    got = [(h["ns"], h["value"], h["pid"]) for h in d["hops"]]
    assert got == [("NS2", 100, 3), ("NS3", 200, 5), ("NS4", 300, 6), ("NS5", 400, 7)]
    assert {h["starttime"] for h in d["hops"]} == {d["start"]}
    assert [h["ppid"] for h in d["hops"][1:]] == [1, 1, 1]


def test_parent_flag_chooses_parent_in_target(guest: dict) -> None:
    d = data(guest, "parent_flag")
    assert d["ppid_outside"] == d["expected"]
    assert d["ppid_inside"] == d["parent_nspid"][-1]


EXPECTED_REFUSALS = {
    "nonexistent_pid": errno.ESRCH,
    "zero_pid": errno.EINVAL,
    "kernel_thread": errno.EINVAL,
    "namespace_init": errno.EINVAL,
    "global_init": errno.EINVAL,
    "same_namespace": errno.EINVAL,
    "target_net_ns": errno.EINVAL,
    "target_regular_file": errno.EINVAL,
    "target_bad_fd": errno.EBADF,
    "target_negative_fd": errno.EBADF,
    "parent_outside_target": errno.EINVAL,
    "no_cap_sys_admin": errno.EPERM,
    "has_children": errno.EBUSY,
    "traced": errno.EBUSY,
    "stopped_timeout": errno.ETIMEDOUT,
    "target_init_dead": errno.ENXIO,
    "killed_while_queued": errno.ESRCH,
}


def test_refusals_have_precise_errnos(guest: dict) -> None:
    cases = data(guest, "refusals")["cases"]
    assert cases == EXPECTED_REFUSALS


def test_refused_process_is_unchanged(guest: dict) -> None:
    d = data(guest, "refusals")
    assert d["unchanged_after_simple"] == d["base"]
    assert d["traced_state"]["after"] == d["traced_state"]["before"]
    # Stopped, timed out, then continued: still in A, same PID, nothing half-done.
    t = d["after_timeout"]
    assert t["inside"]["pid"] == t["outside"]["nspid"][-1]
    assert t["inside"]["ppid"] == 0  # parent still the runner, outside the namespace
    assert d["after_dead_target"] == t
    assert 1.0 <= d["timeout_elapsed"] < 5.0


def test_interrupted_waiter_leaves_process_alone(guest: dict) -> None:
    d = data(guest, "refusals")
    assert d["interrupted_waiter"] == "interrupted"
    assert d["eintr_counted"] == 1
    after = d["after_interrupt"]
    # Continued after the waiter gave up: the abandoned switch did not run.
    assert after["inside"]["pid"] == after["outside"]["nspid"][-1]
    assert after["inside"]["ppid"] == 0


def test_bad_ioctl_input_returns_errors(guest: dict) -> None:
    d = data(guest, "bad_ioctl")
    expect = {
        "size_0": errno.EINVAL,
        "size_8": errno.EINVAL,
        "size_63": errno.EINVAL,
        "size_huge": errno.EINVAL,
        "version_0": errno.EINVAL,
        "version_3": errno.EINVAL,
        "v1_with_v2_flag": errno.EINVAL,
        "unknown_flag": errno.EINVAL,
        "timeout_too_long": errno.EINVAL,
        "negative_pid": errno.EINVAL,
        "huge_pid": errno.ESRCH,
        "negative_fd": errno.EBADF,
        "bad_pidfd": errno.EBADF,
        "null_pointer": errno.EFAULT,
        "unmapped_pointer": errno.EFAULT,
        "kernel_pointer": errno.EFAULT,
        "unknown_cmd": errno.ENOTTY,
        "size_80_nonzero_tail": errno.E2BIG,
        "reserved_nonzero": errno.EINVAL,
        "size_80_zero_tail": 0,
    }
    assert {k: d[k] for k in expect} == expect
    assert d["version_ioctl"] == 2
    assert d["v1_request"] == 0  # a version-1 caller still works
    # A pidfd for the process and a pidfd naming the target both work.
    p = d["pidfd_migration"]
    assert p["nspid"] == [p["global_pid"], p["pid"]]


def test_ten_thousand_migrations_back_and_forth(guest: dict) -> None:
    d = data(guest, "stress_back_and_forth")
    assert d["n"] == BACK_AND_FORTH and d["errors"] == 0
    assert d["state"]["counter"] == 5 and d["state"]["starttime"] == d["start"]
    assert d["state"]["gpid"] == d["gpid"] and d["final_nspid"][-1] == d["state"]["pid"]
    # An even number of hops ends in A, as a child of A's init.
    assert d["gpid"] in d["a_children"] and d["gpid"] not in d["b_children"]
    # Its timers and SIGIO owner followed it every time.
    timers, sigio = d["held"]["timers"], d["held"]["sigio"]
    assert timers["signals_after_move"] >= 5 and timers["delete"] == [0, 0, 0, 0]
    assert sigio["getown"] == sigio["pid"] and sigio["sigio"] >= 1


def slack(cache: str) -> int:
    """Objects a cache may gain for reasons of its own: kernel workers come and go."""
    return 4 if cache.startswith(("pid", "nsproxy")) else 16


def test_slab_objects_do_not_leak(guest: dict) -> None:
    d = data(guest, "stress_back_and_forth")
    # Every migration allocates one struct pid and one nsproxy and frees the old ones, and
    # moves timer and file-owner references; the counts are read after shrinking the caches
    # (precise). Between the two readings the same processes are alive: a leak of one object
    # per migration would add 10,000. Counts may drop: what earlier checks left behind is
    # still being freed (RCU) when the first reading is taken.
    for cache, before in d["slab_before"].items():
        assert d["slab_after"][cache] - before <= slack(cache), (cache, d)
    # Over the whole boot (every check, every namespace created and killed) nothing may grow
    # beyond what the runner itself holds at the end (for example its own nsproxy after
    # unshare). Counts may drop: the guest's own boot-time processes exit meanwhile.
    obs = guest["obs"]
    for cache, start in obs["slab_start"].items():
        assert obs["slab_end"][cache] - start <= 2 * slack(cache), (cache, obs["slab_start"], obs)


def test_concurrent_migrations_with_fork_churn(guest: dict) -> None:
    d = data(guest, "stress_concurrent")
    assert d["alive_threads"] == 0
    assert all(r["errors"] == [] for r in d["results"].values()), d["results"]
    assert len(d["results"]) == 8
    assert [s["counter"] for s in d["states"]] == list(range(8))


def test_target_init_killed_during_burst(guest: dict) -> None:
    d = data(guest, "target_init_killed_in_burst")
    assert d["hung_threads"] == 0
    # Each subject alternates B, A, B, ...: a move into the dying B is refused (ENXIO) or the
    # process dies with B (then ESRCH); one refused stays in A, so its next "back to A" is
    # EINVAL (already there). Nothing else may come back.
    assert set(d["codes"]) <= {0, errno.ESRCH, errno.ENXIO, errno.EINVAL}
    assert errno.ENXIO in d["codes"] or errno.ESRCH in d["codes"]
    assert d["init_reaped_after_s"] < 30


def test_fuzz(guest: dict) -> None:
    d = data(guest, "fuzz")
    assert d["n"] == FUZZ
    assert sum(d["counts"].values()) == FUZZ


def test_counters(guest: dict) -> None:
    before, after = guest["obs"]["stats_before"], guest["obs"]["stats_after"]
    assert after["in_flight"] == 0
    assert after["migrations"] - before["migrations"] >= BACK_AND_FORTH
    for reason in ("esrch", "einval", "eperm", "ebusy", "enxio", "eintr", "etimedout"):
        assert after[f"refused_{reason}"] > before[f"refused_{reason}"], reason
    for reason in ("children", "ptrace", "vfork", "parent", "foreign_cpu_timer", "io_worker"):
        assert after[f"busy_{reason}"] > before[f"busy_{reason}"], reason


def test_kernel_log_clean_and_module_unloads(guest: dict) -> None:
    batch = guest["batch"]
    assert batch.kernel_log_problems() == []
    assert "nsmigrate: version" in batch.dmesg
    assert batch.module_unloaded is True
    assert "nsmigrate: unloaded" in batch.dmesg


# --- hazards: kernel objects and user-space state naming the mover (review F1-F11) ---


def test_posix_timers_follow_the_task(guest: dict) -> None:
    # F1/F5: CPU-clock timers (process and thread clock) and a periodic signal timer armed
    # before the move still work after it: signals keep arriving, the CPU timers can be read,
    # re-armed and deleted (today's module left them dangling: a use-after-free at exit).
    d = data(guest, "posix_timers")
    assert d["armed"] == [0, 0, 0, 0]
    after = d["after"]
    assert after["signals_after_move"] >= 5  # a 20 ms timer over 0.6 s
    assert 90 < after["cpu_left"] <= 100 and 90 < after["thread_cpu_left"] <= 100
    assert after["rearm_cpu"] == after["rearm_thread_cpu"] == 0
    assert after["delete"] == [0, 0, 0, 0]


def test_foreign_cpu_timer_is_refused_and_counted(guest: dict) -> None:
    d = data(guest, "foreign_cpu_timer")
    assert d["armed"] == 0
    assert d["refused"] == errno.EBUSY
    assert d["counted"] == {"refused_ebusy": 1, "busy_foreign_cpu_timer": 1}
    # Once its owner deleted it, the same process moves.
    assert d["deleted"] == 0 and d["moved_after_delete"] == 0


def test_tid_cache_glibc_and_musl(guest: dict) -> None:
    d = data(guest, "tid_cache")
    for flavour in ("glibc", "musl"):
        before, after = d[flavour]["before"], d[flavour]["after"]
        assert before["pid"] != after["pid"] == d[flavour]["new_pid"] == after["tid"], flavour
        # No deadlock (musl's thread-list lock is left alone): threads and setuid work.
        assert after["timeout"] == 0, flavour
        assert (after["create"], after["join"], after["setuid"]) == (0, 0, 0), flavour
    # glibc: its TID cache holds the new TID (raise() reaches the thread); a mutex held
    # across the move belongs to the old TID (README, "Mutexes held across the move").
    assert d["glibc"]["after"]["raised"] == 1
    assert d["glibc"]["after"]["unlock"] == errno.EPERM
    # musl: its descriptor keeps the old TID, which the module cannot reach (README).
    assert d["musl"]["after"]["raised"] == 0
    assert d["musl"]["after"]["unlock"] == 0


def test_old_parent_is_never_fooled(guest: dict) -> None:
    d = data(guest, "old_parent")
    # Refused by default: the parent is neither a namespace init nor the caller.
    assert d["refused"] == errno.EBUSY
    assert d["counted"] == {"refused_ebusy": 1, "busy_parent": 1}
    assert d["ppid_after_refusal"] == d["parent"]
    # With the flag: the parent's waitpid() gets ECHILD, its pidfd poll wakes (6.1 too).
    assert d["allowed_with_flag"] == 0
    saw = d["parent_saw"]
    assert saw["wait"] == "ECHILD"
    assert saw["poll"] == "ready" and saw["poll_after_s"] < 5
    assert saw["pidfd_signal"] == errno.ESRCH


def test_ptrace_access_is_required(guest: dict) -> None:
    d = data(guest, "ptrace_access")
    assert d["denied"] == errno.EPERM
    assert d["counted"] == {"refused_eperm": 1}
    assert d["allowed"] == 0


def test_sigio_owner_follows(guest: dict) -> None:
    d = data(guest, "sigio_owner")
    assert d["before"]["getown"] == d["before"]["pid"]
    assert d["after"]["pid"] != d["before"]["pid"]
    assert d["after"]["getown"] == d["after"]["pid"]
    assert d["after"]["sigio"] >= 1


def test_process_holding_a_message_queue_is_refused_untouched(guest: dict) -> None:
    d = data(guest, "mq_notify_owner")
    assert d["armed"]["mqd"] >= 0 and d["armed"]["notify"] == 0
    assert d["refused"] == errno.EBUSY
    assert d["counted"] == {"refused_ebusy": 1, "busy_mqueue": 1}
    assert d["state_after"] == d["state_before"]
    # The registration still names the process: the message's notification arrives.
    assert d["notified_after_refusal"] == 1
    # Without a queue, the same process moves.
    assert d["closed"] == {"close": 0, "unlink": 0} and d["moved_after_close"] == 0


# README, "Blocking calls that return EINTR": exactly these.
RESTARTED = {"nanosleep", "poll", "select"}
EINTR_RETURNED = {"epoll_wait", "sigtimedwait", "recv_timeout"}


def test_blocking_calls_restart_or_return_eintr_as_documented(guest: dict) -> None:
    d = data(guest, "blocking_calls")
    assert set(d) == RESTARTED | EINTR_RETURNED
    for name, r in d.items():
        assert r["moved"] == 0, name
        if name in RESTARTED:
            # Restarted, and the deadline kept: the full 2 s.
            assert r["rc"] == 0 and r["errno"] == 0 and r["seconds"] >= 1.9, (name, r)
        else:
            assert r["rc"] == -1 and r["errno"] == errno.EINTR and r["seconds"] < 1.9, (name, r)


def test_empty_target_unreachable_and_intact(guest: dict) -> None:
    d = data(guest, "empty_target")
    # /proc/PID/ns/pid_for_children of a namespace without init cannot be opened; had it
    # been, the module refuses it (ENXIO) before allocating a PID.
    assert d["open"] == errno.ENOENT or d.get("migrate") == errno.ENXIO
    assert d["first_fork"] == "f"


def test_controlling_tty_left_as_at_exit(guest: dict) -> None:
    d = data(guest, "controlling_tty")
    assert d["before"]["leader_tty"] == d["before"]["member_tty"] != 0
    assert d["taken_before"] == -errno.EPERM  # the session still owns it
    after = d["after"]
    assert after["leader_tty"] == after["member_tty"] == 0
    assert after["member_alive"] and after["member_hup"] >= 1
    assert d["taken_after"] == d["before"]["leader_tty"]  # another session can take it


def test_proc_view_with_mount_namespace_join(guest: dict) -> None:
    d = data(guest, "proc_view")
    assert d["before"]["proc_self"] == d["before"]["getpid"]
    # A sibling namespace: its own /proc has no number for the mover.
    assert d["plain"]["proc_self"] == -errno.ENOENT
    assert d["before"]["cwd"] == d["plain"]["cwd"] == "/tmp"
    for key in ("back_with_mntns", "joined"):
        v = d[key]
        assert v["proc_self"] == v["getpid"] and v["listed"], key
        assert v["cwd"] == "/"  # setns(CLONE_NEWNS) semantics: root and cwd reset
    assert d["joined"]["getpid"] == d["new_pid"] == int(d["ps_pid"])
    assert d["not_a_mount_ns"] == errno.EINVAL


# --- multi-threaded processes: every thread in one step ---


def moved(guest: dict, flavour: str) -> dict:
    d = data(guest, "threads_move")[flavour]
    assert d["counted"].get("migrations") == 1, d["counted"]
    return d


def lasts(views: dict) -> list[int]:
    return sorted(v["nspid"][-1] for v in views.values())


@pytest.mark.parametrize("flavour", ["glibc", "musl"])
def test_every_thread_gets_a_tid_in_the_target(guest: dict, flavour: str) -> None:
    d = moved(guest, flavour)
    before, after = d["before"]["views"], d["after"]["views"]
    # Same 9 tasks (global TIDs change with the pids), each now numbered in B only.
    assert len(before) == len(after) == 9
    assert all(len(v["nspid"]) == 2 for v in after.values())
    assert all(v["ns"] == v["ns_for_children"] == d["b_ns"] for v in after.values())
    assert not set(lasts(before)) & set(lasts(after))
    # The TGID is the leader's new PID; the threads see their own new TIDs.
    info = d["after"]["info"]
    assert info["pid"] == d["new_pid"] == min(lasts(after))
    assert sorted([info["pid"]] + [info[f"tid{i}"] for i in range(8)]) == lasts(after)
    # ps -L inside B lists them all.
    assert d["ps_lwp"] == lasts(after)


@pytest.mark.parametrize("flavour", ["glibc", "musl"])
def test_every_thread_keeps_running_and_gets_signals(guest: dict, flavour: str) -> None:
    d = moved(guest, flavour)
    b, a = d["before"]["info"], d["after"]["info"]
    assert all(a[f"loops{i}"] > b[f"loops{i}"] for i in range(8))
    # tgkill to each thread, from inside (new TIDs) and from outside (global TIDs).
    k = d["tgkill_inside"]
    assert [(k[f"tgkill{i}"], k[f"usr1_{i}"]) for i in range(8)] == [(0, 1)] * 8
    assert set(d["tgkill_outside"].values()) == {0}
    assert [d["after_outside_tgkill"][f"usr1_{i}"] for i in range(8)] == [2] * 8


@pytest.mark.parametrize("flavour", ["glibc", "musl"])
def test_threads_created_and_exiting_after_the_move(guest: dict, flavour: str) -> None:
    d = moved(guest, flavour)
    # New threads are born in B (copy_process accepts CLONE_THREAD: every thread's nsproxy
    # has B for its children), join, and exit; the process stays one namespace.
    assert d["join"]["created"] == d["join"]["joined"] == 0
    assert d["spawn"]["spawn"] == 0
    views = d["views_with_spawned"]
    assert len(views) == 10 and d["spawn"]["tid"] in lasts(views)
    assert all(v["ns"] == v["ns_for_children"] == d["b_ns"] for v in views.values())
    # The 8 busy threads exited (holding a robust mutex each): main and the spawned remain.
    assert lasts(d["views_after_exits"]) == sorted([d["new_pid"], d["spawn"]["tid"]])


def test_glibc_tid_cache_true_in_every_thread(guest: dict) -> None:
    d = moved(guest, "glibc")
    r = d["raise"]
    # raise() uses glibc's cached TID: it reaches the raising thread itself.
    assert [(r[f"raise_rc{i}"], r[f"raised{i}"]) for i in range(8)] == [(0, 1)] * 8
    # Robust mutexes locked after the move were released at each owner's death.
    assert [d["robust"][f"robust{i}"] for i in range(8)] == [errno.EOWNERDEAD] * 8


def test_musl_threads_keep_the_old_tid_in_their_descriptor(guest: dict) -> None:
    # README, "musl": musl's raise() uses its descriptor's TID, which the module cannot
    # reach; B's numbers never coincide with A's here, so the old TID names no thread.
    r = moved(guest, "musl")["raise"]
    assert [(r[f"raise_rc{i}"], r[f"raised{i}"]) for i in range(8)] == [(-1, 0)] * 8


def test_clone_racing_the_move_never_half_moves(guest: dict) -> None:
    d = data(guest, "threads_clone_race")
    # After every ioctl, moved or not, all threads share one namespace (pid and children).
    assert d["split"] == []
    assert len(d["codes"]) == d["hops"]
    # A racing clone makes the move retry; it may run out of retries (EBUSY), rarely.
    assert set(d["codes"]) <= {0, errno.EBUSY}
    assert d["codes"].count(0) >= 0.9 * d["hops"]
    assert d["churned_after"]["churned"] > d["churned_before"]["churned"]
    assert d["churned_after"]["failed"] == 0


def test_refused_threads_are_left_as_they_were(guest: dict) -> None:
    d = data(guest, "threads_refused")
    expect = {
        "traced": (errno.EBUSY, "busy_ptrace"),
        "vfork_parent": (errno.EBUSY, "busy_children"),
        "vfork_child": (errno.EBUSY, "busy_vfork"),
    }
    for case, (code, reason) in expect.items():
        r = d[case]
        assert r["errno"] == code, (case, r)
        assert r["counted"] == {"refused_ebusy": 1, reason: 1}, (case, r)
        assert r["same"], case  # every thread: same TIDs, NSpid and namespaces
    # Once the tracer and the vfork child are gone, the same process moves, all threads run.
    assert d["moved_after"] == 0 and all(d["progress_after"])


def test_io_uring_worker_is_refused(guest: dict) -> None:
    d = data(guest, "threads_refused")
    if d["io_uring"]["fd"] < 0:
        pytest.skip(f"io_uring_setup failed in the guest: errno {d['io_uring']['errno']}")
    assert any(name.startswith("iou-sqp") for name in d["io_uring_threads"])
    r = d["io_uring_refused"]
    assert r["errno"] == errno.EBUSY
    assert r["counted"] == {"refused_ebusy": 1, "busy_io_worker": 1}
    assert r["same"]


def test_threads_not_reaching_a_safe_point_time_out_untouched(guest: dict) -> None:
    """Every thread group-stopped: none arrives, the move gives up (ETIMEDOUT) and leaves each
    thread as it was; after SIGCONT the same process moves."""
    d = data(guest, "threads_refused")
    assert d["all_stopped"]
    r = d["stopped"]
    assert r["errno"] == errno.ETIMEDOUT, r
    assert r["counted"] == {"refused_etimedout": 1}, r
    assert r["same"]
    assert d["stopped_moved_after"] == 0


def test_mount_namespace_join_of_threads_is_refused_untouched(guest: dict) -> None:
    """NSMIGRATE_F_MNTNS on a 5-thread process: EINVAL on every kernel (as setns(CLONE_NEWNS)
    with a shared fs_struct), every thread as it was and still reading A's /proc; without the
    flag the same process moves."""
    d = data(guest, "threads_mount_ns_refused")
    assert d["threads"] == 5
    r = d["refused"]
    assert r["errno"] == errno.EINVAL, r
    assert r["counted"] == {"refused_einval": 1}, r
    assert r["same"]
    assert d["threads_mnt"] == [d["mnt_a"]] * 5
    before, after = d["before"], d["after_refusal"]
    assert after["pid"] == before["pid"]
    assert sorted(after["seen"]) == ["0", "1", "2", "3"], after
    assert all(str(v).startswith(f"{before['pid']}/task/") for v in after["seen"].values()), after
    assert d["moved_without_flag"] == 0


def test_thread_in_uninterruptible_sleep_times_out_untouched(guest: dict) -> None:
    """One thread in D (a FUSE lookup nobody answers): the move gives up (ETIMEDOUT), every
    thread as it was and the sleeper still asleep; once the wait ends, the process moves."""
    d = data(guest, "thread_in_d_state")
    assert len(d["in_d"]) == 1, d
    r = d["refused"]
    assert r["errno"] == errno.ETIMEDOUT, r
    assert r["counted"] == {"refused_etimedout": 1}, r
    assert r["same"]
    assert d["in_d_after"] == d["in_d"]
    assert d["lookup"] == [errno.ENOTCONN]  # the aborted connection ended the wait
    assert d["moved_after"] == 0


def test_exec_in_progress_refuses_the_move_untouched(guest: dict) -> None:
    """The leader in execve(), waiting for a thread asleep in a held FUSE request: EBUSY
    busy_exec, every thread as it was; once the request is answered the exec completes and
    the new program moves."""
    d = data(guest, "thread_execs_during_a_move")
    assert d["lookup_read"] and d["interrupt_read"] and d["in_d"], d
    r = d["refused"]
    assert r["errno"] == errno.EBUSY, r
    assert r["counted"] == {"refused_ebusy": 1, "busy_exec": 1}, r
    assert r["same"]
    assert d["comm_after"] == "sleep" and d["threads_after"] == 1
    assert d["moved_after"]["comm"] == "sleep" and d["moved_after"]["pid"] > 1


def test_thread_directed_objects_follow_their_thread(guest: dict) -> None:
    d = data(guest, "thread_owned_objects")
    before, after = d["before"]["result"], d["after"]["result"]
    assert d["before"].get("error") is None and d["after"].get("error") is None, d
    assert before["arm"] == [0, 0] and before["getown_ex"] == [0, before["tid"]]
    # The worker has a new TID in B, and every object naming it names the new one.
    assert after["tid_now"] != before["tid"]
    assert after["tid_now"] in [v["nspid"][-1] for v in d["views"].values()]
    assert after["getown_ex"] == [0, after["tid_now"]] and after["sigio"] >= 1
    assert after["timer_signals"] >= 5  # a 20 ms SIGEV_THREAD_ID timer over 0.6 s
    # The CPU timer on the worker's clock: readable, re-armable, deletable after the move.
    assert 40 < after["cpu_left"] <= 100 and after["rearm"] == 0
    assert after["delete"] == [0, 0]


def test_ten_thousand_moves_of_an_eight_thread_process(guest: dict) -> None:
    d = data(guest, "stress_threaded")
    assert d["n"] == THREADED_MOVES and d["error_count"] == 0
    assert all(d["progress"]) and d["threads"] == 9
    # An even number of hops ends in A, every thread.
    assert d["namespaces"] == [d["a_ns"]]
    # 9 pids and nsproxies per move, 90,000 of each: all freed once the process is gone.
    for cache, before in d["slab_before"].items():
        assert d["slab_after"][cache] - before <= slack(cache), (cache, d)


# --- real programs ---


def test_http_server_hammered_while_hopping(guest: dict) -> None:
    d = data(guest, "http_server")
    # Every hop moved a multi-threaded server (an idle connection's handler thread lives
    # throughout), none failed or waited, no request failed, and the idle connection's
    # handler, moved with the rest, still answers.
    assert d["errors"] == [] and d["hops"] == d["wanted_hops"] >= 5
    assert min(d["threads_at_hops"]) >= 2
    assert d["client"]["failed"] == [] and d["client"]["ok"] >= 5
    assert d["idle_answer"].startswith("HTTP/1.0 200")


def test_coreutils_sleep_keeps_its_deadline(guest: dict) -> None:
    d = data(guest, "coreutils_sleep")
    assert 2.9 <= d["elapsed_s"] < 8
    assert d["reaped_status"] == [0]


def test_cat_in_a_pipe_loses_nothing(guest: dict) -> None:
    d = data(guest, "cat_pipe")
    assert d["hops"] >= 3
    assert d["received"] == d["sent"] >= 1 << 20 and d["same_sha256"]


def test_tail_follow_keeps_following(guest: dict) -> None:
    d = data(guest, "tail_follow")
    assert d["lines"] == ["line-0", "line-1", "line-2", "line-3"]


def test_interactive_shell_on_a_pty(guest: dict) -> None:
    d = data(guest, "shell_on_pty")
    assert d["ready"] and d["before"]["tty_nr"] != 0
    assert d["after"]["tty_nr"] == 0  # no controlling terminal any more
    # It still answers on the terminal; $$ is bash's cached number, $BASHPID the real one.
    old, new = d["before"]["nspid"][-1], d["after"]["nspid"][-1]
    assert old != new
    assert f"pid={old} bashpid={new} done-42" in d["answer"]


def test_abandoned_requests_leave_nothing_queued(guest: dict) -> None:
    d = data(guest, "abandoned_work")
    assert d["codes"] == [errno.ETIMEDOUT]
    assert d["module_refs_added"] == 0  # each still-queued work would hold one
    assert d["still_answers"] == d["after"]["nspid"][-1]  # continued, in A, unchanged
