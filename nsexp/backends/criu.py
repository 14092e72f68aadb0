"""criu backend: the checkpoint/restore baseline (CRIU), inside the VM only.

The worker makes itself dumpable once (own session, nothing open but /dev/null), asks for a hop
and closes its connection; the manager replies "checkpoint" with the path of a result file, waits
for the connection to close, dumps the worker from inside the source namespace (``nsenter -p -m
criu dump``; CRIU cannot dump a non-init process of a child namespace from outside) and restores
it inside the target (``nsenter -p -m criu restore -d``). The worker polls for the result file:
the restored copy finds it after a successful hop, the original finds it if the dump failed.
CRIU restores the original PID, so a restore into a namespace where that PID is taken fails
("File exists"): that failure is recorded with CRIU's own message and the chain stops there.
On the host CRIU fails (vdso), hence VM-only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nsexp.backends import (
    Backend,
    BackendUnavailable,
    MigrationError,
    Namespace,
    Peer,
    wait_client_gone,
)
from nsexp.backends import WorkerSide as _WorkerSide

WORK_DIR = "/run/nsexp/criu"  # the guest's own tmpfs, not the 9p share


def _criu_error(log_path: Path, fallback: str) -> str:
    """CRIU's own words: the last error lines of its log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return fallback
    errors = [ln.strip() for ln in lines if re.search(r"Error|error|Can't|can't", ln)]
    picked = errors[-3:] if errors else lines[-3:]
    return " | ".join(picked) or fallback


def run_criu(
    init_pid: int,
    args: Sequence[str],
    images: str | os.PathLike[str],
    log: str,
    timeout: float,
    verbosity: str = "-v4",
) -> str | None:
    """Run ``criu ARGS -D images -o log`` inside ``init_pid``'s PID and mount namespaces.

    Returns None on success, else CRIU's own words (the last error lines of its log). Inside
    the namespaces because CRIU cannot dump a non-init process of a child namespace from
    outside, and in the process's mount namespace (the hierarchy gives each namespace one with
    its own /proc for this backend) CRIU reads the right /proc and leaves the mount tree alone.
    """
    cmd = ["nsenter", "-t", str(init_pid), "-p", "-m", "criu", *args]
    cmd += ["-D", str(images), "-o", log, verbosity]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"criu {args[0]} timed out after {timeout:g} s"
    if proc.returncode == 0:
        return None
    fallback = (proc.stderr or proc.stdout).strip()[-500:] or f"exit {proc.returncode}"
    return f"criu {args[0]}: " + _criu_error(Path(images) / log, fallback)


def make_dumpable() -> None:
    """Make the calling process one CRIU can dump: its own session, nothing open but /dev/null.

    A session leader outside the namespace, an inherited console or pipe, or any other open
    file would make the dump fail.
    """
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader (a restored process)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.closerange(3, 65536)


class ManagerSide(Backend):
    name = "criu"

    def __init__(
        self, work_dir: str = WORK_DIR, timeout: float = 300.0, log_dir: str | None = None
    ) -> None:
        self.work_dir = work_dir
        self.timeout = timeout
        self.log_dir = log_dir  # CRIU's logs are copied there (the work dir may be tmpfs)

    def check(self) -> None:
        for tool in ("criu", "nsenter"):
            if shutil.which(tool) is None:
                raise BackendUnavailable(f"{tool} is not installed")

    def migrate(self, peer: Peer, target: Namespace, request: dict[str, Any]) -> dict[str, Any]:
        if peer.source is None:
            raise MigrationError("unknown_source", "the requester is not in a known namespace")
        token = f"{peer.pid}-{secrets.token_hex(4)}"
        images = Path(self.work_dir) / token
        images.mkdir(parents=True, mode=0o700)
        return {
            "action": "checkpoint",
            "result_path": str(images / "result.json"),
            "timings": {},
        }

    def _criu(self, init_pid: int, args: list[str], images: Path, log: str) -> tuple[bool, str]:
        try:
            error = run_criu(init_pid, args, images, log, self.timeout)
        finally:
            self._keep_log(images, log)
        return error is None, error or ""

    def after_reply(self, conn, peer, target, request, reply) -> None:  # type: ignore[override]
        assert peer.source is not None
        result_path = Path(reply["result_path"])
        images = result_path.parent
        timings = dict(reply.get("timings") or {})
        if not wait_client_gone(conn, 30.0):
            self._finish(result_path, timings, "client_stayed", "worker kept its connection open")
            raise MigrationError("client_stayed", "worker kept its connection open")
        timings["migrate_started"] = time.monotonic_ns()
        ok, err = self._criu(
            peer.source.init_pid,
            ["dump", "-t", str(peer.pid_in_ns)],
            images,
            "dump.log",
        )
        timings["dump_done"] = time.monotonic_ns()
        if not ok:
            # A failed dump leaves the worker running: it reads this file and records the row.
            self._finish(result_path, timings, "criu_dump_failed", err)
            if not os.path.exists(f"/proc/{peer.pid}"):
                raise MigrationError("criu_dump_failed", err, client_gone=True, timings=timings)
            return
        ok, err = self._criu(target.init_pid, ["restore", "-d"], images, "restore.log")
        timings["restore_done"] = time.monotonic_ns()
        if not ok:
            # The dump killed the worker and nothing was restored: the chain ends here.
            self._finish(result_path, timings, "criu_restore_failed", err)
            raise MigrationError("criu_restore_failed", err, client_gone=True, timings=timings)
        self._finish(result_path, timings, None, None)

    def _keep_log(self, images: Path, log: str) -> None:
        if self.log_dir is None or not (images / log).exists():
            return
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            shutil.copyfile(images / log, Path(self.log_dir) / f"{images.name}-{log}")
        except OSError:
            pass  # the log is a convenience; the error row has CRIU's message already

    @staticmethod
    def _finish(path: Path, timings: dict[str, Any], code: str | None, error: str | None) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ok": code is None, "code": code, "error": error, **timings}))
        os.replace(tmp, path)  # the worker polls for the final name: never a torn file


class WorkerSide(_WorkerSide):
    """Make the process dumpable; after the reply, wait for the hop's outcome."""

    name = "criu"

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout

    def prepare(self) -> None:
        make_dumpable()

    def request_fields(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"state": state}  # informational: lets the manager record a lost hop's value

    def after_reply(self, reply: dict[str, Any]) -> dict[str, Any] | None:
        path = Path(reply["result_path"])
        deadline = time.monotonic() + self.timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise MigrationError("timeout", f"no CRIU outcome after {self.timeout:g} s")
            time.sleep(0.02)  # the dump may freeze us here; the restored copy wakes up here
        result = json.loads(path.read_text())
        shutil.rmtree(path.parent, ignore_errors=True)
        timings = {k: v for k, v in result.items() if k not in ("ok", "code", "error")}
        timings.update(reply.get("timings") or {})
        if not result.get("ok"):
            raise MigrationError(str(result.get("code")), str(result.get("error")), timings=timings)
        return timings
