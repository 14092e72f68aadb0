"""The process tree over real PID namespaces: PIDs, parents, threads, gate, spawner, teardown."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from nsexp import nsutil
from nsexp.backends.restart import ManagerSide as Restart
from nsexp.hierarchy import Hierarchy, NamespacePlan

PAPER = [("NS2", 2), ("NS3", 3), ("NS4", 4), ("NS5", 5)]


from proc_helpers import child_exit, no_children_left, wait_for, write_json  # noqa: F401, E402


def write_self(path: Path, extra: dict | None = None) -> None:
    me = nsutil.self_info()
    data = {"pid": os.getpid(), "ppid": os.getppid(), "global": me.global_pid, **(extra or {})}
    write_json(path, data)


def test_paper_tree_pids_parents_threads():
    h = Hierarchy([NamespacePlan(n, c) for n, c in PAPER])
    with h:
        inodes = set(h.inodes)
        assert len(inodes) == 4 and nsutil.ns_inode() not in inodes
        assert h.children == {
            "NS2": [2, 3],
            "NS3": [2, 3, 4],
            "NS4": [2, 3, 4, 5],
            "NS5": [2, 3, 4, 5, 6],
        }
        rows = h.snapshot(0)
        assert len(rows) == 4 + 2 + 3 + 4 + 5
        for name, n in PAPER:
            mine = [r for r in rows if r["ns"] == name]
            assert sorted(r["pid"] for r in mine) == list(range(1, n + 2))
            init = next(r for r in mine if r["role"] == "init")
            assert init["pid"] == 1 and init["ppid"] == 0
            assert init["global_pid"] == h.init_pids[name]
            assert all(r["ppid"] == 1 for r in mine if r["role"] == "child")
        for r in rows:
            # Single-threaded everywhere: PIDs are the result, a thread would take one.
            status = Path(f"/proc/{r['global_pid']}/status").read_text()
            assert "\nThreads:\t1\n" in status
        # The parent re-joined its own namespace after each fork, so it can still make threads.
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
    assert nsutil.pids_in_namespaces(inodes) == []


def test_gate_holds_programs_until_go(tmp_path):
    out = tmp_path / "prog.json"
    h = Hierarchy([NamespacePlan("A", 3, {1: lambda: write_self(out)})])
    with h:
        time.sleep(0.3)
        assert not out.exists()
        roles = {r["pid"]: r["role"] for r in h.snapshot(0)}
        assert roles == {1: "init", 2: "child", 3: "worker", 4: "child"}
        h.go()
        assert wait_for(out.exists)
        data = json.loads(out.read_text())
        assert (data["pid"], data["ppid"]) == (3, 1)
        # The program exited and its init reaped it: no zombie is left in the namespace.
        assert wait_for(lambda: len(h.live_pids()) == 3)


def test_spawner_forks_next_pid_and_reaps(tmp_path):
    h = Hierarchy(
        [NamespacePlan("A", 1), NamespacePlan("B", 2)],
        entries={"land": lambda p: write_self(tmp_path / f"{p['n']}.json", p)},
    )
    with h:
        spawner = Restart()
        pids = [spawner.spawn(h.namespaces["B"], "land", {"n": n}) for n in range(3)]
        assert pids == [4, 5, 6]  # after init (1) and its children (2, 3)
        assert wait_for(lambda: len(list(tmp_path.glob("*.json"))) == 3)
        seen = sorted(json.loads(p.read_text())["pid"] for p in tmp_path.glob("*.json"))
        assert seen == [4, 5, 6]
        assert wait_for(lambda: len(h.live_pids()) == 2 + 3)
        states = [nsutil.proc_info(p).state for p in h.live_pids()]
        assert "Z" not in states


def test_exception_inside_tears_down():
    h = Hierarchy([NamespacePlan(n, c) for n, c in PAPER])
    with pytest.raises(RuntimeError):
        with h:
            inodes = set(h.inodes)
            raise RuntimeError("boom")
    assert nsutil.pids_in_namespaces(inodes) == []


def test_parent_killed_takes_the_tree_down(tmp_path):
    info = tmp_path / "inodes.json"
    pid = os.fork()
    if pid == 0:
        try:
            h = Hierarchy([NamespacePlan(n, c) for n, c in PAPER]).start()
            write_json(info, list(h.inodes))
            time.sleep(60)
        finally:
            os._exit(1)
    try:
        assert wait_for(info.exists, 10)
        inodes = set(json.loads(info.read_text()))
        assert len(nsutil.pids_in_namespaces(inodes)) == 18
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # PR_SET_PDEATHSIG kills each init, and the kernel kills the rest of its namespace.
    assert wait_for(lambda: nsutil.pids_in_namespaces(inodes) == [])


def test_duplicate_names_refused():
    with pytest.raises(ValueError):
        Hierarchy([NamespacePlan("A", 1), NamespacePlan("A", 2)])


def test_own_proc_gives_each_namespace_its_proc(tmp_path):
    out = tmp_path / "proc.json"
    host_mounts = Path("/proc/self/mountinfo").read_text()

    def prog():
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        write_json(out, {"self": os.readlink("/proc/self"), "pids": pids})

    h = Hierarchy([NamespacePlan("A", 2, {1: prog})], own_proc=True)
    with h:
        h.go()
        assert wait_for(out.exists)
        # Seen from inside: its own PIDs only (what CRIU needs); the host's /proc is untouched.
        assert json.loads(out.read_text()) == {"self": "3", "pids": [1, 2, 3]}
        assert Path("/proc/self/mountinfo").read_text() == host_mounts
        assert wait_for(lambda: sorted(r["pid"] for r in h.snapshot(0)) == [1, 2])


def test_fork_pidns_init_from_an_init_nests_and_restores(tmp_path):
    """fork_pidns_init works from PID 1 of a namespace too, and leaves the caller's own
    namespace for children as it was (its next plain fork lands beside it)."""
    out = tmp_path / "nested.json"

    def outer_init() -> None:
        inner = nsutil.fork_pidns_init()
        if inner == 0:
            write_json(out, {"pid": os.getpid(), "depth": len(nsutil.self_info().nspids)})
            os._exit(0)
        os.waitpid(inner, 0)
        sibling = os.fork()
        if sibling == 0:
            os._exit(0)
        os.waitpid(sibling, 0)
        write_json(tmp_path / "outer.json", {"inner": inner, "sibling": sibling})

    depth = len(nsutil.self_info().nspids)
    pid = nsutil.fork_pidns_init()
    if pid == 0:
        child_exit(outer_init)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert nsutil.ns_inode() == nsutil.ns_inode(os.getpid())  # ours, unchanged
    nested = json.loads(out.read_text())
    assert nested == {"pid": 1, "depth": depth + 2}
    outer = json.loads((tmp_path / "outer.json").read_text())
    assert outer["inner"] == 2 and outer["sibling"] == 3  # both in the outer namespace


def test_serving_runs_the_stage_and_tears_it_down(tmp_path):
    """serving(): tree, manager, open gates, then both stopped however the block is left."""
    from nsexp.client import Client

    sock = str(tmp_path / "m.sock")
    seen = tmp_path / "seen.json"

    def program() -> None:
        write_json(seen, {"ping": Client(sock).ping().get("ok", True)})

    h = Hierarchy([NamespacePlan("A", 1, {0: program}), NamespacePlan("B", 0)])
    with pytest.raises(RuntimeError, match="inside"), h.serving(Restart(), sock, {("A", "B")}):
        assert wait_for(seen.exists, 10)
        inodes = set(h.inodes)
        assert nsutil.pids_in_namespaces(inodes)
        raise RuntimeError("inside")
    assert nsutil.pids_in_namespaces(inodes) == []
    assert not os.path.exists(sock)
