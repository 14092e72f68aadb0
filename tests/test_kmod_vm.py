"""The kernel module in the VM, on both supported kernels: one boot per kernel.

tests/vm/kmod_checks.py runs inside the guest and records what it observed; the assertions
(DESIGN.md, "Migration semantics" 1-8) are made here on the host.
"""

from __future__ import annotations

import errno
import json

import pytest
from test_kmod_build import SUPPORTED, supported_releases

from nsexp import testbed

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

BACK_AND_FORTH = 10_000
FUZZ = 100_000


@pytest.fixture(scope="module", params=SUPPORTED, ids=lambda s: f"linux-{s.rstrip('.')}")
def guest(request) -> dict:
    """Boot the kernel once, run every check, return the observations and the batch."""
    release = next(r for r in supported_releases() if r.startswith(request.param))
    tb = testbed.VMTestbed(kernel=release)
    batch = tb.run_batch(
        ['python3 tests/vm/kmod_checks.py "$NSEXP_OUT"'],
        env={"NSM_BACK_AND_FORTH": str(BACK_AND_FORTH), "NSM_FUZZ": str(FUZZ)},
        timeout=1800,
        command_timeout=1500,
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
    "multi_threaded": errno.EBUSY,
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
    assert d["threaded_state"]["outside"] == d["base"]["outside"]
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
        "version_2": errno.EINVAL,
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
        "size_72_nonzero_tail": errno.E2BIG,
        "size_72_zero_tail": 0,
    }
    assert {k: d[k] for k in expect} == expect
    assert d["version_ioctl"] == 1
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


def test_struct_pid_and_nsproxy_do_not_leak(guest: dict) -> None:
    d = data(guest, "stress_back_and_forth")
    # Every migration allocates one struct pid and one nsproxy and frees the old ones; the
    # counts are read after shrinking the caches (precise). Between the two readings the same
    # processes are alive: a leak of one object per migration would add 10,000.
    for cache, before in d["slab_before"].items():
        assert abs(d["slab_after"][cache] - before) <= 4, (cache, d["slab_before"], d["slab_after"])
    # Over the whole boot (every check, every namespace created and killed) nothing may grow
    # beyond what the runner itself holds at the end (for example its own nsproxy after
    # unshare). Counts may drop: the guest's own boot-time processes exit meanwhile.
    obs = guest["obs"]
    for cache, start in obs["slab_start"].items():
        assert obs["slab_end"][cache] - start <= 8, (cache, obs["slab_start"], obs["slab_end"])


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


def test_kernel_log_clean_and_module_unloads(guest: dict) -> None:
    batch = guest["batch"]
    assert batch.kernel_log_problems() == []
    assert "nsmigrate: version" in batch.dmesg
    assert batch.module_unloaded is True
    assert "nsmigrate: unloaded" in batch.dmesg
