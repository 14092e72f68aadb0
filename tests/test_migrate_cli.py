"""``nsexp migrate`` and ``nsexp request``: help, usage errors and refusals on this host, and the
real thing in the VM (one boot shared with the DKMS test: tests/user_vm.py).

The VM half: the guest script tests/vm/user_checks.py moves processes through the commands and
records what it saw; the assertions are made here.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nsexp import uapi
from nsexp.backends import Namespace, get_backend
from nsexp.manager import Manager

ROOT = Path(__file__).resolve().parent.parent
NO_DEVICE = pytest.mark.skipif(
    os.path.exists(uapi.DEVICE), reason=f"{uapi.DEVICE} exists here: the no-device case"
)


def nsexp(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsexp", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        **kwargs,
    )


def dead_pid() -> int:
    """A PID that no process has (one that just exited and was reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- nsexp migrate, natively ---------------------------------------------------------------


def test_migrate_help_reads_like_a_unix_tools_help():
    proc = nsexp("migrate", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(
        "usage: nsexp migrate [options] PID (--into NSFILE | --pid Q | --into-fd FD)"
    )
    for part in ("exit status:", "examples:", "  0  ", "  1  ", "  2  "):
        assert part in out, part
    for option in ("--into NSFILE", "--pid Q", "--into-fd FD", "--pidfd", "--parent P"):
        assert option in out, option
    assert "--timeout SECONDS" in out and "--json" in out
    assert "nsexp migrate 4242 --into /proc/77/ns/pid" in out
    # The commands appear in the top-level help too.
    top = nsexp("--help").stdout
    assert "migrate" in top and "request" in top


@pytest.mark.parametrize(
    "args, words",
    [
        (["1"], "one of the arguments --into -t/--pid --into-fd is required"),
        (["1", "--into", "/proc/self/ns/pid", "--pid", "1"], "not allowed with argument"),
        (["x", "--pid", "1"], "not a file descriptor number: 'x'"),
        (["1", "--pid", "0"], "must be a positive number"),
        (["1", "--pid", "1", "--timeout", "0"], "must be more than 0 and at most 60 s"),
        (["1", "--pid", "1", "--timeout", "61"], "must be more than 0 and at most 60 s"),
        (["1", "--pid", "1", "--parent", "-2"], "must be a positive number"),
        (["--pid", "1"], "the following arguments are required: PID"),
    ],
)
def test_migrate_usage_errors_exit_2(args, words):
    proc = nsexp("migrate", *args)
    assert proc.returncode == 2, proc
    assert words in proc.stderr
    assert proc.stdout == ""


@NO_DEVICE
def test_migrate_without_the_module_says_so():
    proc = nsexp("migrate", str(os.getpid()), "--into", "/proc/self/ns/pid")
    assert proc.returncode == 1
    assert f"{uapi.DEVICE} does not exist: the nsmigrate module is not loaded" in proc.stderr
    assert "[ENOENT, errno 2]" in proc.stderr
    assert proc.stdout == ""
    proc = nsexp("migrate", str(os.getpid()), "--pid", "1", "--json")
    assert proc.returncode == 1
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and reply["errno"] == errno.ENOENT and reply["error"] == "ENOENT"
    assert "module is not loaded" in reply["message"]


def test_migrate_target_that_cannot_be_opened():
    proc = nsexp("migrate", "1", "--into", "/nonexistent/ns/pid")
    assert proc.returncode == 1
    assert "cannot open /nonexistent/ns/pid: No such file or directory [ENOENT" in proc.stderr
    gone = dead_pid()
    proc = nsexp("migrate", "1", "--pid", str(gone), "--json")
    assert proc.returncode == 1
    reply = json.loads(proc.stdout)
    assert reply["errno"] == errno.ESRCH
    assert f"cannot open a pidfd for target process {gone}: No such process" == reply["message"]


# -- nsexp request, natively (a real manager; moves need the module: in the VM) ------------


@pytest.fixture
def manager(tmp_path):
    """A manager on a socket under tmp_path; one namespace registered: this test process's."""
    registry = {"HOST": Namespace.open("HOST", os.getpid())}
    m = Manager(str(tmp_path / "m.sock"), get_backend("kmod"), registry)
    m.start()
    try:
        yield m
    finally:
        m.stop()
        for ns in registry.values():
            ns.close()


def test_request_help():
    proc = nsexp("request", "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: nsexp request [options] --to NS [--] [COMMAND [ARG...]]")
    for part in ("exit status:", "examples:", "--socket PATH", "--ping", "--json", "127"):
        assert part in proc.stdout, part


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "one of the arguments --to --ping is required"),
        (["--to", "NS3", "--ping"], "not allowed with argument"),
        (["--to", "NS3", "--timeout", "soon"], "invalid float value: 'soon'"),
    ],
)
def test_request_usage_errors_exit_2(args, words):
    proc = nsexp("request", *args)
    assert proc.returncode == 2
    assert words in proc.stderr


def test_request_without_a_manager(tmp_path):
    sock = tmp_path / "nobody.sock"
    proc = nsexp("request", "--socket", str(sock), "--to", "NS3")
    assert proc.returncode == 1
    assert f"nsexp request: no answer from a manager at {sock}: cannot connect" in proc.stderr
    assert "is `nsexp manager` running?" in proc.stderr
    proc = nsexp("request", "--to", "NS3", "--json", env={**os.environ, "NSEXP_SOCKET": str(sock)})
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == "unavailable"


def test_request_ping_names_the_asking_process(manager):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nsexp", "request", "--socket", manager.socket_path, "--ping"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The manager names the sender from the kernel's credentials: the command's own process.
    assert f"the manager sees process {proc.pid} (PID {proc.pid} in HOST)" in out


def test_request_refusals_are_the_managers_words(manager):
    proc = nsexp("request", "--socket", manager.socket_path, "--to", "NOPE")
    assert proc.returncode == 1
    assert "nsexp request: the manager refused: unknown_namespace: no namespace named 'NOPE'" in (
        proc.stderr
    )
    proc = nsexp("request", "--socket", manager.socket_path, "--to", "HOST", "--json")
    assert proc.returncode == 1
    reply = json.loads(proc.stdout)
    assert reply["code"] == "same_namespace" and reply["message"] == "already in HOST"


def test_request_command_not_found_moves_nothing(manager):
    proc = nsexp("request", "--socket", manager.socket_path, "--to", "NOPE", "--", "no-such-cmd")
    assert proc.returncode == 127
    assert "no-such-cmd: command not found; nothing was moved" in proc.stderr
    assert manager.served == 0  # the manager was not even asked


# -- in the VM: real moves through the commands (one boot with the DKMS test) --------------


@pytest.fixture(scope="module")
def guest() -> dict:
    from user_vm import user_guest

    return user_guest()


@pytest.mark.vm
@pytest.mark.timeout(3600)
def test_migrate_moves_a_process_through_the_command(guest):
    from user_vm import observed

    d = observed(guest, "migrate")
    assert d["moved"]["rc"] == 0, d["moved"]["err"]
    r, before, after = d["result"], d["before"], d["after"]
    # Target B held init + 3 sleepers: the next PID there is 5; the command says so, and so
    # does /proc from the outside, for the very same process (same start time).
    assert r["pid_in_target"] == 5 and after["nspid"] == [r["pid_from_caller"], 5]
    assert after["start"] == before["start"] and after["ppid"] == d["b_init"]
    assert after["ns"] != before["ns"] and d["old_gone"]
    assert r["namespace"].startswith("pid:[") and r["switch_ns"] > 0
    # Back, the target named by a process in it (a pidfd), with --parent: the text output.
    back, pids = d["back"], d["back_pids"]
    assert back["rc"] == 0, back["err"]
    assert back["out"].startswith(f"moved process {r['pid_from_caller']} into pid:[")
    assert d["after_back"]["nspid"] == [pids[1], pids[0]]
    assert d["after_back"]["ppid"] == d["sleeper"] and d["after_back"]["ns"] == before["ns"]
    assert d["after_back"]["start"] == before["start"]
    # By pidfd into an inherited namespace fd.
    assert d["by_fd"]["rc"] == 0, d["by_fd"]["err"]
    by_fd = json.loads(d["by_fd"]["out"])
    assert list(by_fd["process"]) == ["pidfd"]
    assert d["by_fd_state"]["nspid"] == [by_fd["pid_from_caller"], by_fd["pid_in_target"]]
    assert d["by_fd_state"]["ns"] == after["ns"]
    assert d["by_fd_state"]["start"] == d["before2"]["start"]


@pytest.mark.vm
@pytest.mark.timeout(3600)
def test_migrate_refusals_give_the_errno_in_words(guest):
    from user_vm import observed

    d = observed(guest, "migrate")
    refusals = d["refusals"]
    expected = {
        "no_such_process": ("ESRCH", errno.ESRCH, "No such process"),
        "namespace_init": ("EINVAL", errno.EINVAL, "Invalid argument"),
        "not_a_pid_namespace": ("EINVAL", errno.EINVAL, "Invalid argument"),
        "stopped_timeout": ("ETIMEDOUT", errno.ETIMEDOUT, "did not reach a safe point in time"),
    }
    for case, (name, number, words) in expected.items():
        r = refusals[case]
        assert r["rc"] == 1, (case, r)
        assert f"[{name}, errno {number}]" in r["err"], (case, r["err"])
        assert words in r["err"] and r["out"] == "", (case, r)
    same = json.loads(refusals["same_namespace"]["out"])
    assert refusals["same_namespace"]["rc"] == 1
    assert same["ok"] is False and same["errno"] == errno.EINVAL and same["error"] == "EINVAL"
    assert "already in the target namespace" in same["message"]
    # The command waited (--timeout 1) before giving up; the rest is Python's start-up under TCG.
    assert refusals["stopped_timeout"]["elapsed"] >= 1.0
    # Every refusal left the process as it was.
    assert d["probe_after"] == d["probe_before"]


@pytest.mark.vm
@pytest.mark.timeout(3600)
def test_request_from_a_shell_inside_a_namespace(guest):
    from user_vm import observed

    d = observed(guest, "request")
    # The manager names the asking process: PID 3 of NS2 (init 1, a sleeper 2, then the
    # init's child that sh exec'd).
    assert re.search(r"the manager sees process \d+ \(PID 3 in NS2\), backend kmod", d["ping"])
    assert "no namespace named 'NOPE'" in d["unknown"] and "rc=1" in d["unknown"]
    assert "forbidden_route: route NS2 -> NS4 is not allowed" in d["forbidden"]
    assert "rc=1" in d["forbidden"]
    # A kernel refusal reaches the shell with its errno: a process with a child cannot move.
    refused = json.loads(d["has_child"].strip().splitlines()[0])
    assert refused["ok"] is False and refused["errno"] == errno.EBUSY
    # The move: the command then runs in NS3 as the moved process, with NS3's next PID.
    ns3_next = max(d["ns3_children_before"]) + 1
    m = re.search(r"pid=(\d+) ppid=(\d+)\nNSpid:\s+(\d+)\s+(\d+)\n", d["move"])
    assert m, d["move"]
    assert int(m.group(1)) == ns3_next == int(m.group(4)) and int(m.group(2)) == 1
