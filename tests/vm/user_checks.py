"""Inside the VM guest: `nsexp migrate` and `nsexp request` used as a person would, from a shell.

Run by tests/user_vm.py (one boot with the DKMS check); writes what it observed to
$OUT/user_checks.json, and the host-side tests (tests/test_migrate_cli.py) assert on it.
Two namespaces per part, each with an init of ours that forks, on request, commands as its own
children (as a shell inside the namespace would be). Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from nsexp import nsutil

PY = [sys.executable, "-m", "nsexp"]


class Namespace:
    """A PID namespace whose init (ours) forks `children` sleepers, then runs commands it is
    sent as its own children, with stdout and stderr into a file."""

    def __init__(self, name: str, children: int) -> None:
        self.name = name
        ctl_r, self._ctl = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = nsutil.fork_pidns_init()
        if pid == 0:
            os.close(self._ctl)
            os.close(rep_r)
            self._init(ctl_r, rep_w, children)
        os.close(ctl_r)
        os.close(rep_w)
        self.init = pid
        with os.fdopen(rep_r) as f:
            self.children = json.loads(f.readline())  # PIDs in the namespace
        self.inode = nsutil.ns_inode(pid)

    @staticmethod
    def _init(ctl: int, report: int, children: int) -> None:
        try:
            nsutil.set_pdeathsig(signal.SIGKILL)
            kids = []
            for _ in range(children):
                kid = os.fork()
                if kid == 0:
                    os.execvp("sleep", ["sleep", "600"])
                kids.append(kid)
            os.write(report, (json.dumps(kids) + "\n").encode())
            os.close(report)
            buf = b""
            while True:
                ready, _, _ = select.select([ctl], [], [], 0.05)
                if ready:
                    data = os.read(ctl, 65536)
                    if not data:
                        os._exit(0)
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        req = json.loads(line)
                        if os.fork() == 0:
                            fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                            os.dup2(fd, 1)
                            os.dup2(fd, 2)
                            os.closerange(3, 256)
                            os.execvpe(req["argv"][0], req["argv"], {**os.environ, **req["env"]})
                try:
                    while os.waitpid(-1, os.WNOHANG)[0]:
                        pass
                except ChildProcessError:
                    pass
        finally:
            os._exit(1)

    def spawn(self, argv: list[str], out: Path, env: dict[str, str] | None = None) -> None:
        """Have the init fork ``argv`` as its child; output goes to ``out``."""
        req = {"argv": argv, "out": str(out), "env": env or {}}
        os.write(self._ctl, (json.dumps(req) + "\n").encode())

    def spawn_sleeper(self, out: Path, timeout: float = 30.0) -> int:
        """Have the init fork ``sleep 600``; return its global PID."""
        known = set(nsutil.pids_in_namespaces({self.inode}))
        self.spawn(["sleep", "600"], out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for g in set(nsutil.pids_in_namespaces({self.inode})) - known:
                try:
                    if os.readlink(f"/proc/{g}/exe").endswith("/sleep"):
                        return g
                except OSError:
                    continue
            time.sleep(0.05)
        raise TimeoutError(f"the sleeper did not start in {self.name}")

    def gpid(self, pid: int, timeout: float = 30.0) -> int:
        """The global PID of process ``pid`` of this namespace."""
        deadline = time.monotonic() + timeout
        while True:
            for g in nsutil.pids_in_namespaces({self.inode}):
                if nspid(g)[-1] == pid:
                    return g
            if time.monotonic() > deadline:
                raise TimeoutError(f"no PID {pid} in {self.name}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            os.kill(self.init, signal.SIGKILL)
            os.waitpid(self.init, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self._ctl)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def nspid(pid: int) -> list[int]:
    return [int(x) for x in status(pid)["NSpid"].split()]


def starttime(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def state(pid: int) -> dict:
    """What a move must change (or keep): numbers, parent, namespace, start time."""
    return {
        "nspid": nspid(pid),
        "ppid": int(status(pid)["PPid"]),
        "ns": nsutil.ns_inode(pid),
        "start": starttime(pid),
    }


def cli(*args: str, **kwargs) -> dict:
    proc = subprocess.run([*PY, *args], capture_output=True, text=True, timeout=120, **kwargs)
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}


def wait_for(path: Path, marker: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and marker in (text := path.read_text()):
            return text
        time.sleep(0.1)
    raise TimeoutError(f"{path} has no {marker!r}: {path.read_text() if path.exists() else ''}")


# -- nsexp migrate ---------------------------------------------------------------------------


def check_migrate(out: Path) -> dict:
    a, b = Namespace("A", 1), Namespace("B", 3)  # B: init + 3 -> the next PID there is 5
    try:
        subject = a.spawn_sleeper(out / "subject.out")
        before = state(subject)
        moved = cli("migrate", str(subject), "--into", f"/proc/{b.init}/ns/pid", "--json")
        result = json.loads(moved["out"]) if moved["rc"] == 0 else None
        if result is None:
            return {"moved": moved}  # nothing else can be checked; the test shows why
        after = state(result["pid_from_caller"])
        gone = not os.path.exists(f"/proc/{subject}")

        # Back into A, named through a process of A (a pidfd), with A's sleeper as parent.
        sleeper = a.gpid(a.children[0])
        back = cli(
            "migrate",
            str(result["pid_from_caller"]),
            "--pid",
            str(a.init),
            "--parent",
            str(sleeper),
        )
        m = re.search(r"PID (\d+) there, (\d+) from here", back["out"])
        back_pids = [int(m.group(1)), int(m.group(2))] if m else None
        after_back = state(back_pids[1]) if back_pids else None

        # By pidfd, into an inherited namespace fd.
        subject2 = a.spawn_sleeper(out / "subject2.out")
        before2 = state(subject2)
        pidfd = os.pidfd_open(subject2)
        nsfd = os.open(f"/proc/{b.init}/ns/pid", os.O_RDONLY)
        by_fd = cli(
            "migrate", "--pidfd", str(pidfd), "--into-fd", str(nsfd), "--json",
            pass_fds=(pidfd, nsfd),
        )  # fmt: skip
        os.close(pidfd)
        os.close(nsfd)
        by_fd_state = (
            state(json.loads(by_fd["out"])["pid_from_caller"]) if by_fd["rc"] == 0 else None
        )

        # Refusals: errno in words, exit status 1, the process as it was.
        probe = a.spawn_sleeper(out / "probe.out")
        probe_before = state(probe)
        dead = subprocess.Popen(["true"])
        dead.wait()
        into_b, into_a = f"/proc/{b.init}/ns/pid", f"/proc/{a.init}/ns/pid"
        refusals = {
            "no_such_process": cli("migrate", str(dead.pid), "--into", into_b),
            "namespace_init": cli("migrate", str(b.init), "--into", into_a),
            "same_namespace": cli("migrate", str(probe), "--into", into_a, "--json"),
            "not_a_pid_namespace": cli("migrate", str(probe), "--into", f"/proc/{b.init}/ns/net"),
        }
        os.kill(probe, signal.SIGSTOP)
        t0 = time.monotonic()
        refusals["stopped_timeout"] = cli("migrate", str(probe), "--into", into_b, "--timeout", "1")
        refusals["stopped_timeout"]["elapsed"] = time.monotonic() - t0
        os.kill(probe, signal.SIGCONT)
        return {
            "before": before,
            "moved": moved,
            "result": result,
            "after": after,
            "old_gone": gone,
            "a_init": a.init,
            "b_init": b.init,
            "sleeper": sleeper,
            "back": back,
            "back_pids": back_pids,
            "after_back": after_back,
            "before2": before2,
            "by_fd": by_fd,
            "by_fd_state": by_fd_state,
            "refusals": refusals,
            "probe_before": probe_before,
            "probe_after": state(probe),
        }
    finally:
        a.close()
        b.close()


# -- nsexp request ---------------------------------------------------------------------------


def check_request(out: Path) -> dict:
    ns2, ns3, ns4 = Namespace("NS2", 1), Namespace("NS3", 2), Namespace("NS4", 1)
    sock = "/run/nsexp-user-checks/manager.sock"  # not on 9p: a socket needs the guest's /run
    log = open(out / "manager.log", "w")
    manager = subprocess.Popen(
        [*PY, "manager", "--socket", sock, "--backend", "kmod",
         "--ns", f"NS2={ns2.init}", "--ns", f"NS3={ns3.init}", "--ns", f"NS4={ns4.init}",
         "--allow", "NS2:NS3"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert manager.poll() is None, "the manager exited"
            assert time.monotonic() < deadline, "the manager did not bind its socket"
            time.sleep(0.1)
        env = {"NSEXP_SOCKET": sock, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        req = [*PY, "request"]
        runs = {
            # A shell in NS2 asks; `exec` so that the asking process is the init's own child.
            "ping": ["sh", "-c", f"exec {' '.join(req)} --ping"],
            "unknown": ["sh", "-c", f"{' '.join(req)} --to NOPE; echo rc=$? END"],
            "forbidden": ["sh", "-c", f"{' '.join(req)} --to NS4; echo rc=$? END"],
            "has_child": ["sh", "-c", f"sleep 30 & exec {' '.join(req)} --to NS3 --json"],
        }
        results = {}
        for name, argv in runs.items():
            path = out / f"request-{name}.out"
            ns2.spawn(argv, path, env)
            marker = {"ping": "backend", "has_child": "}"}.get(name, "END")
            results[name] = wait_for(path, marker)
        # The move itself: then the command runs in NS3 as the same process.
        path = out / "request-move.out"
        # What runs after the move: sh prints its PID and parent, then becomes awk, which prints
        # its own NSpid line (the same process all along).
        awk = '"/^NSpid/ {print; print \\"END\\"}"'
        then = f"echo pid=$$ ppid=$PPID; exec awk {awk} /proc/self/status"
        ns2.spawn(["sh", "-c", f"exec {' '.join(req)} --to NS3 -- sh -c '{then}'"], path, env)
        results["move"] = wait_for(path, "END")
        results["ns3_children_before"] = ns3.children
        return results
    finally:
        manager.send_signal(signal.SIGTERM)
        try:
            manager.wait(20)
        except subprocess.TimeoutExpired:
            manager.kill()
        log.close()
        for ns in (ns2, ns3, ns4):
            ns.close()


def main(out_dir: str) -> int:
    out = Path(out_dir)
    obs: dict = {}
    for name, check in (("migrate", check_migrate), ("request", check_request)):
        try:
            obs[name] = {"ok": True, "data": check(out)}
        except Exception:  # recorded for the host-side test to show
            obs[name] = {"ok": False, "traceback": traceback.format_exc()}
    (out / "user_checks.json").write_text(json.dumps(obs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
