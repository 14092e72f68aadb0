"""The chained-execution experiment: layouts, the PID rule, native restart runs, files, CLI,
teardown; and (marked vm) the kmod run inside the VM."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nsexp import nsutil, records
from nsexp.experiment import LayoutSpec, predict_pids, predict_values, run
from nsexp.experiment.guest import guest_parser, read_records
from nsexp.experiment.host import guest_command
from nsexp.experiment.layout import spec_from_args

REPO = Path(__file__).resolve().parent.parent
PAPER_TABLE = [("NS2", 100, 3), ("NS3", 200, 5), ("NS4", 300, 6), ("NS5", 400, 7)]


@pytest.fixture(autouse=True)
def no_children_left():
    yield
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    pytest.fail(f"the test left a child process behind (waitpid gave {pid})")


def assert_nothing_left(out: Path) -> None:
    """No live process remains in any namespace the run created."""
    meta = json.loads((out / "run.json").read_text())
    inodes = {ns["inode"] for ns in meta["namespaces"].values()}
    assert len(inodes) == len(meta["spec"]["namespaces"])
    assert nsutil.pids_in_namespaces(inodes) == []


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# -- layout and prediction -------------------------------------------------------------------


def test_paper_layout_is_the_default():
    spec = LayoutSpec()
    assert spec == LayoutSpec.make()
    assert predict_pids(spec) == [3, 5, 6, 7]
    assert predict_values(spec) == [100, 200, 300, 400]
    assert spec.hops == 3


def test_predict_pids_cycles_and_other_layouts():
    spec = LayoutSpec.make(namespaces=8, hops=10)
    assert spec.route == tuple(f"NS{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4))
    assert spec.children == (2, 3, 4, 5, 6, 7, 8, 9)
    # Back in NS2 the cursor has moved past 3 (the worker's old PID is not reused): 4.
    assert predict_pids(spec) == [3, 5, 6, 7, 8, 9, 10, 11, 4, 6, 7]
    two = LayoutSpec.make(children=[1, 1], hops=4, worker_index=0)
    assert predict_pids(two) == [2, 3, 3, 4, 4]


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"children": [2, 3], "namespaces": 3}, "child counts"),
        ({"route": ["NS2", "NS2", "NS3"]}, "stays in"),
        ({"route": ["NS2", "NS9"]}, "unknown namespace"),
        ({"worker_index": 5}, "worker index"),
        ({"route": ["NS2", "NS3"], "hops": 3}, "disagrees"),
    ],
)
def test_bad_layouts(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        LayoutSpec.make(**kwargs)


# -- native runs with the restart backend ----------------------------------------------------


def test_paper_run_restart_native(tmp_path, capfd):
    t0 = time.monotonic()
    result = run(LayoutSpec(), "restart", "native", tmp_path)
    elapsed = time.monotonic() - t0
    assert result.ok, result.error
    assert elapsed < 10
    assert [(h["ns"], h["value"], h["pid"]) for h in result.hops] == PAPER_TABLE
    # restart: a new process at every hop (new start time, new global pid), parent = the init.
    assert len({(h["global_pid"], h["start_time"]) for h in result.hops}) == 4
    assert all(h["ppid"] == 1 and h["status"] == "ok" for h in result.hops)
    assert all(h["backend"] == "restart" and h["testbed"] == "native" for h in result.hops)
    # Phases in order; restart has no kernel phase, and its successor forks after the reply.
    for h in result.hops[1:]:
        assert h["request_sent"] < h["manager_received"] < h["reply_sent"]
        assert h["reply_sent"] < h["migrate_started"] < h["resumed"]
        assert h["kernel_done"] is None
    assert result.hops[0]["request_sent"] is None and result.hops[0]["resumed"] is None

    # What the worker printed is what it recorded.
    printed = capfd.readouterr().out
    for h in result.hops:
        assert f"value {h['value']} pid {h['pid']} (global {h['global_pid']}" in printed

    rows = read_csv(tmp_path / "hops.csv")
    assert [(r["ns"], int(r["value"]), int(r["pid"])) for r in rows] == PAPER_TABLE
    assert {r["run_id"] for r in rows} == {result.run_id}
    for col in ("kernel", "global_pid", "ppid", "start_time", "status", "error", "kernel_done"):
        assert col in rows[0]

    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["run_id"] == result.run_id and meta["backend"] == "restart"
    assert meta["kernel"] == os.uname().release and meta["ok"] is True
    assert meta["spec"]["children"] == [2, 3, 4, 5]
    # Taken by the host before the run: this tree's commit (and its edits' hash if any).
    assert meta["code_version"] == records.code_version() != "unknown"
    assert meta["command"] == records.command_line()
    assert meta["started"] < meta["ended"]

    procs = read_csv(tmp_path / "processes.csv")
    assert sorted({int(p["snapshot"]) for p in procs}) == [0, 1, 2, 3]
    for h in result.hops:
        snap = [p for p in procs if int(p["snapshot"]) == h["hop"]]
        workers = [p for p in snap if p["role"] == "worker"]
        assert [(w["ns"], int(w["pid"]), int(w["global_pid"])) for w in workers] == [
            (h["ns"], h["pid"], h["global_pid"])
        ]
        # Every namespace keeps its init and its children; the worker is extra where it is.
        assert len(snap) == 4 + 14 - 1 + 1
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    "layout",
    [
        {"namespaces": 8, "hops": 10},
        {"children": [1, 0, 6], "worker_index": 0, "route": ["NS2", "NS4", "NS3", "NS2", "NS4"]},
        {"children": [3, 2, 7, 1, 4], "increments": 7, "worker_index": 2},
    ],
    ids=["8ns-cycle-10", "children-1-0-6", "children-3-2-7-1-4"],
)
def test_other_layouts_follow_the_pid_rule(tmp_path, layout):
    spec = LayoutSpec.make(**layout)
    result = run(spec, "restart", "native", tmp_path, echo=False)
    assert result.ok, result.error
    assert [h["ns"] for h in result.hops] == list(spec.route)
    assert [h["pid"] for h in result.hops] == predict_pids(spec)
    assert [h["value"] for h in result.hops] == predict_values(spec)
    assert_nothing_left(tmp_path)


def test_timeout_tears_everything_down(tmp_path):
    spec = LayoutSpec.make(increments=10**10)  # the worker would compute for hours
    t0 = time.monotonic()
    result = run(spec, "restart", "native", tmp_path, timeout=1.0, echo=False)
    assert time.monotonic() - t0 < 8
    assert not result.ok and "timed out" in (result.error or "")
    assert result.hops == []
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_tears_everything_down(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nsexp.experiment.guest", "--backend", "restart"]
    cmd += ["--out", str(out), "--increments", str(10**10)]
    # PYTHONFAULTHANDLER: if the guest hangs, SIGABRT makes it print every thread's stack.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Wait until the tree exists (the worker is computing), then interrupt.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(_tree_of(proc.pid)) < 4:
            time.sleep(0.05)
        tree = _tree_of(proc.pid)
        assert len(tree) == 4
        time.sleep(0.3)
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=10)
            pytest.fail(
                f"the guest did not exit within 20 s of {sig.name}; its stacks:\n"
                + err.decode(errors="replace")[-6000:]
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["error"] == "interrupted"
    assert_nothing_left(out)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in tree)


def test_a_broken_stage_still_writes_the_run_folder(tmp_path, monkeypatch):
    """If the stage fails (here: the manager cannot start), run.json says so, nothing is left
    running, and the error is raised."""
    from nsexp import hierarchy

    class Broken(hierarchy.Manager):
        def start(self):
            raise OSError(98, "Address already in use")

    monkeypatch.setattr(hierarchy, "Manager", Broken)
    with pytest.raises(OSError, match="in use"):
        run(LayoutSpec(), "restart", "native", tmp_path, echo=False)
    meta = json.loads((tmp_path / "run.json").read_text())
    assert not meta["ok"] and meta["error"] == "OSError: [Errno 98] Address already in use"
    assert_nothing_left(tmp_path)


def _tree_of(parent: int) -> list[int]:
    """Inits (children of ``parent``) of a run."""
    found = []
    for pid in nsutil.all_pids():
        try:
            info = nsutil.proc_info(pid)
        except (OSError, KeyError):
            continue
        if info.ppid == parent and info.comm.startswith("nsexp-init"):
            found.append(pid)
    return found


def test_cli_run_restart_native(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "nsexp", "run", "--backend", "restart", "--testbed", "native"]
    cmd += ["--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = read_csv(out / "hops.csv")
    for r in rows:
        line = f"{r['hop']}    {r['ns']}  {r['value']}    {r['pid']}    {r['global_pid']}"
        assert line in res.stdout
    assert [(r["ns"], int(r["value"]), int(r["pid"])) for r in rows] == PAPER_TABLE
    assert_nothing_left(out)


def test_cli_kmod_native_needs_the_module(tmp_path):
    if os.path.exists("/dev/nsmigrate"):
        pytest.skip("the module is loaded on this host")
    cmd = [sys.executable, "-m", "nsexp", "run", "--backend", "kmod", "--testbed", "native"]
    cmd += ["--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "/dev/nsmigrate does not exist" in res.stderr


def test_cli_bad_layout(tmp_path):
    cmd = [sys.executable, "-m", "nsexp", "run", "--backend", "restart"]
    cmd += ["--testbed", "native", "--out", str(tmp_path), "--children", "2,3"]
    cmd += ["--namespaces", "3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "nsexp run: 2 child counts for 3 namespaces" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run.json").exists()


def test_guest_records_the_hosts_version_and_command(tmp_path):
    """The guest records what the host hands it (the host took it before the run)."""
    cmd = [sys.executable, "-m", "nsexp.experiment.guest", "--backend", "restart"]
    cmd += ["--out", str(tmp_path), "--namespaces", "2", "--children", "2,2", "--quiet"]
    cmd += ["--code-version", "f" * 40, "--command", "nsexp run --testbed vm"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["code_version"] == "f" * 40 and meta["command"] == "nsexp run --testbed vm"
    assert meta["testbed"] == "native" and meta["ok"]


# -- the real mechanism, inside the VM -------------------------------------------------------


@pytest.mark.vm
def test_paper_run_kmod_in_vm(tmp_path):
    result = run(LayoutSpec(), "kmod", "vm", tmp_path / "kmod")
    assert result.ok, f"{result.error}\n{result.table()}"
    assert [(h["ns"], h["value"], h["pid"]) for h in result.hops] == PAPER_TABLE
    # One process throughout: the same start time at every hop, parent = the target's init.
    assert len({h["start_time"] for h in result.hops}) == 1
    assert all(h["ppid"] == 1 and h["backend"] == "kmod" for h in result.hops)
    assert all(h["testbed"] == "vm" for h in result.hops)
    for h in result.hops[1:]:
        assert h["request_sent"] < h["manager_received"] <= h["migrate_started"]
        assert h["migrate_started"] < h["kernel_done"] <= h["reply_sent"] < h["resumed"]
    assert result.meta["vm"]["kernel_log_problems"] == []
    assert result.meta["vm"]["module_unloaded"] is True


@pytest.mark.vm
def test_other_layouts_kmod_in_vm(vm_testbed, tmp_path):
    """One boot, two layouts (8 namespaces with a cycling route of 10 hops; other child counts):
    the same process all along, at the PIDs the rule predicts."""
    specs = {
        "cycle": LayoutSpec.make(namespaces=8, hops=10),
        "mixed": LayoutSpec.make(
            children=[1, 0, 6], worker_index=0, route=["NS2", "NS4", "NS3", "NS2", "NS4"]
        ),
    }
    version = records.code_version()
    commands = [
        guest_command(
            spec,
            "kmod",
            tmp_path / name,
            timeout=300,
            code_version=version,
            command="t",
            echo=False,
        )
        for name, spec in specs.items()
    ]
    batch = vm_testbed.run_batch(commands, out_dir=tmp_path, timeout=1500)
    logs = "\n".join(f"{r.command}\n{r.stdout}\n{r.stderr}" for r in batch.results)
    for name, spec in specs.items():
        hops = read_records(tmp_path / name)
        assert [h["status"] for h in hops] == ["ok"] * len(spec.route), logs
        assert [h["ns"] for h in hops] == list(spec.route)
        assert [h["pid"] for h in hops] == predict_pids(spec), logs
        assert [h["value"] for h in hops] == predict_values(spec)
        assert len({h["start_time"] for h in hops}) == 1
        meta = json.loads((tmp_path / name / "run.json").read_text())
        assert meta["code_version"] == version and meta["testbed"] == "vm"
    assert batch.module_loaded and batch.kernel_log_problems() == []


@pytest.mark.parametrize(
    "spec",
    [
        LayoutSpec(),
        LayoutSpec.make(namespaces=8, hops=10),
        LayoutSpec.make(children=[1, 0, 6], worker_index=0),
    ],
)
def test_guest_command_reproduces_the_layout(spec, tmp_path):
    """What the VM guest runs is the same layout, recorded as "vm", into the shared folder,
    with the code version and the command the host took."""
    import shlex

    cmd = guest_command(spec, "kmod", tmp_path / "x y", timeout=90, code_version="v", command="c")
    argv = shlex.split(cmd)
    assert argv[:3] == ["python3", "-m", "nsexp.experiment.guest"]
    args = guest_parser().parse_args(argv[3:])
    assert spec_from_args(args) == spec
    assert (args.backend, args.record_testbed) == ("kmod", "vm")
    assert (args.code_version, args.command) == ("v", "c")
    assert args.out == tmp_path / "x y" and args.timeout == 90
