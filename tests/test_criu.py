"""The criu baseline records each hop as CRIU made it, or why CRIU could not: never a hop that
did not happen. CRIU fails on the host (vdso), so the runs that can succeed are VM-only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from nsexp import nsutil
from nsexp.backends.criu import _criu_error
from nsexp.experiment import LayoutSpec, run


def assert_honest(hops: list[dict]) -> None:
    """Rows are real hops up to the first failure, which carries CRIU's words; nothing after."""
    assert hops and hops[0]["hop"] == 0 and hops[0]["status"] == "ok"
    failed = [i for i, h in enumerate(hops) if h["status"] != "ok"]
    if failed:
        first = failed[0]
        assert first == len(hops) - 1, "rows after a failed hop"
        bad = hops[first]
        assert bad["pid"] is None and bad["global_pid"] is None and bad["start_time"] is None
        assert "criu" in bad["error"]
    for h in hops:
        if h["status"] == "ok":
            assert h["value"] == 100 * (h["hop"] + 1) and h["pid"] is not None


def test_criu_error_picks_criu_own_lines(tmp_path):
    log = tmp_path / "restore.log"
    log.write_text(
        "(00.1) restore: Forking task with 3 pid (flags 0x0)\n"
        "(00.9) Error (criu/cr-restore.c:1491): Can't fork for 3: File exists\n"
        "(00.9) Error (criu/cr-restore.c:2611): Restoring FAILED.\n"
    )
    msg = _criu_error(log, "fallback")
    assert "Can't fork for 3: File exists" in msg and "Restoring FAILED" in msg
    assert _criu_error(tmp_path / "missing.log", "fallback") == "fallback"


@pytest.mark.skipif(shutil.which("criu") is None, reason="criu is not installed (make setup)")
def test_criu_native_never_reports_a_hop_it_did_not_make(tmp_path):
    result = run(LayoutSpec(), "criu", "native", tmp_path, echo=False)
    hops = result.hops
    assert_honest(hops)
    # On this kind of host CRIU cannot dump (vdso); and even where it can, PID 3 is taken in
    # NS3, so the paper's first hop cannot be restored: the chain stops at hop 1 either way.
    assert len(hops) == 2 and hops[1]["status"] == "failed" and hops[1]["ns"] == "NS3"
    assert not result.ok and "hop 1 failed" in (result.error or "")
    meta = json.loads((tmp_path / "run.json").read_text())
    inodes = {ns["inode"] for ns in meta["namespaces"].values()}
    assert nsutil.pids_in_namespaces(inodes) == []


@pytest.mark.vm
def test_criu_in_vm(vm_testbed, tmp_path):
    """Inside the VM CRIU runs, but cannot make the paper's first hop: the row says why.

    PID 3 is taken in NS3, so a restore must fail ("File exists"); with namespaces that share
    the global mount namespace, CRIU (which must run in the process's PID namespace with a
    /proc of that namespace, hence in a mount namespace of its own) already refuses to dump the
    global mount tree (9p, overlays). Either way: CRIU's own words, and no hop invented.
    """
    result = run(LayoutSpec(), "criu", vm_testbed, tmp_path / "criu", echo=False)
    hops = result.hops
    assert_honest(hops)
    assert [h["status"] for h in hops] == ["ok", "failed"], result.table()
    assert re.search(r"Error \(criu/|File exists", hops[1]["error"]), hops[1]["error"]
    assert all(h["testbed"] == "vm" and h["backend"] == "criu" for h in hops)
    assert not result.ok and result.meta["vm"]["returncode"] == 1
    assert any(Path(tmp_path, "criu", "criu-logs").glob("*dump.log"))
