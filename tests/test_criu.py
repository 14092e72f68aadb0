"""The criu baseline records each hop as CRIU made it, or why CRIU could not: never a hop that
did not happen. CRIU fails on the host (vdso), so the runs that can succeed are VM-only."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import pytest

from nsexp import nsutil, records
from nsexp.backends.criu import _criu_error
from nsexp.experiment import LayoutSpec, run
from nsexp.experiment.guest import read_records
from nsexp.experiment.host import guest_command


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
    """One boot, two layouts. Where the worker's PID is free in the target (NS3 without
    children) CRIU makes the hop: same PID, same value carried, a new task. In the paper's
    layout PID 3 is taken in NS3: the restore fails ("File exists") and the row says so."""
    free = LayoutSpec.make(children=[2, 0], route=["NS2", "NS3"])
    outs = {"free": tmp_path / "free", "paper": tmp_path / "paper"}
    provenance = {"code_version": records.code_version(), "command": "pytest test_criu"}
    commands = [
        guest_command(free, "criu", outs["free"], timeout=300, echo=False, **provenance),
        guest_command(LayoutSpec(), "criu", outs["paper"], timeout=300, echo=False, **provenance),
    ]
    batch = vm_testbed.run_batch(commands, out_dir=tmp_path, load_module=False, timeout=1500)
    logs = "\n".join(f"{r.command}\n{r.stdout}\n{r.stderr}" for r in batch.results)
    free_hops = read_records(outs["free"])
    paper_hops = read_records(outs["paper"])
    assert_honest(free_hops)
    assert_honest(paper_hops)
    assert [(h["ns"], h["value"], h["pid"], h["status"]) for h in free_hops] == [
        ("NS2", 100, 3, "ok"),
        ("NS3", 200, 3, "ok"),
    ], logs
    assert free_hops[0]["start_time"] != free_hops[1]["start_time"]  # a restored task
    # Its start time as recorded (read inside CRIU's time namespace, corrected) is the one the
    # host's /proc shows in the snapshot after the hop.
    with (outs["free"] / "processes.csv").open() as f:
        workers = [r for r in csv.DictReader(f) if r["role"] == "worker"]
    # The correction converts a nanosecond clock offset into clock ticks: +-1 tick of rounding.
    assert [int(w["snapshot"]) for w in workers] == [h["hop"] for h in free_hops]
    for w, h in zip(workers, free_hops, strict=True):
        assert abs(int(w["start_time"]) - h["start_time"]) <= 1, (w, h)
    assert free_hops[1]["dump_done"] < free_hops[1]["restore_done"] < free_hops[1]["resumed"]
    assert [h["status"] for h in paper_hops] == ["ok", "failed"], logs
    assert "File exists" in paper_hops[1]["error"], logs
    assert all(h["testbed"] == "vm" and h["backend"] == "criu" for h in free_hops + paper_hops)
    assert [r.returncode for r in batch.results] == [0, 1], logs
    for out in outs.values():
        meta = json.loads((out / "run.json").read_text())
        assert meta["backend"] == "criu" and any((out / "criu-logs").glob("*dump.log"))


def test_monotonic_offset_undoes_a_time_namespace():
    """CRIU restores into a time namespace whose CLOCK_MONOTONIC is shifted; the worker's
    stamps subtract the shift so that they stay comparable with the manager's."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            nsutil.unshare(0x80)  # CLONE_NEWTIME: applies to the children forked next
            with open("/proc/self/timens_offsets", "w") as f:
                f.write("monotonic -3 500000000\n")
            child = os.fork()
            if child == 0:
                shifted = time.monotonic_ns()
                host = shifted - nsutil.monotonic_offset_ns()
                os.write(w, f"{shifted} {host}".encode())
                os._exit(0)
            os.waitpid(child, 0)
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 200).decode()
    os.close(r)
    os.waitpid(pid, 0)
    now = time.monotonic_ns()
    shifted, host = map(int, data.split())
    assert 2_000_000_000 < now - shifted < 4_000_000_000  # the namespace's clock is behind
    assert 0 <= now - host < 1_000_000_000  # corrected: back on the host's clock
