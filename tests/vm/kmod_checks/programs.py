"""Real programs moved while they work, as a new user would try them.

Each is started by this runner (the caller of every move, so its parent may lose it) in
namespace A and moved between A and B while it works; what it did is recorded.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import select
import signal
import socket
import threading
import time
import urllib.request

from harness import (
    Namespace,
    check,
    fork_into,
    lib,
    nspid,
    tty_nr,
)


def _serve(port_w: int) -> None:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    os.write(port_w, str(srv.server_address[1]).encode())
    srv.serve_forever()


def _hammer(url: str, stop_r: int, report_w: int) -> None:
    """Client process: GET ``url`` back to back until ``stop_r`` is readable; report counts."""
    ok, failed = 0, []
    while not select.select([stop_r], [], [], 0)[0]:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                resp.read()
            ok += 1
        except OSError as e:
            failed.append(repr(e))
    os.write(report_w, json.dumps({"ok": ok, "failed": failed[:20]}).encode())


@check
def http_server() -> dict:
    """A ThreadingHTTPServer hammered by a client process while it hops 20 times. An idle
    connection stays open meanwhile, so its handler thread lives: every hop moves a
    multi-threaded process, and no hop may fail or wait."""
    hops = int(os.environ.get("NSM_HTTP_HOPS", "20"))
    a, b = Namespace("HSA", 1), Namespace("HSB", 1)
    r, w = os.pipe()
    stop_r, stop_w = os.pipe()
    rep_r, rep_w = os.pipe()
    client = idle = None
    try:
        gpid = fork_into(a.ns_fd, lambda: _serve(w))
        port = int(os.read(r, 16))
        url = f"http://127.0.0.1:{port}/"
        idle = socket.create_connection(("127.0.0.1", port))
        client = os.fork()
        if client == 0:
            _hammer(url, stop_r, rep_w)
            os._exit(0)
        time.sleep(0.5)
        threads = []
        errors = []
        for i in range(hops):
            time.sleep(0.1)
            threads.append(len(os.listdir(f"/proc/{gpid}/task")))
            try:
                gpid = lib.migrate(gpid, (b.path, a.path)[i % 2]).global_pid
            except OSError as e:
                errors.append(e.errno)
        time.sleep(0.5)
        os.write(stop_w, b"x")
        os.waitpid(client, 0)
        client = None
        served = json.loads(os.read(rep_r, 65536))
        # The idle connection's handler is still there and answers.
        idle.sendall(b"GET / HTTP/1.0\r\n\r\n")
        idle_answer = idle.recv(64).decode(errors="replace")
        os.kill(gpid, signal.SIGKILL)
        return {
            "hops": hops - len(errors),
            "wanted_hops": hops,
            "errors": errors,
            "threads_at_hops": threads,
            "client": served,
            "idle_answer": idle_answer,
            "final_nspid": nspid(gpid) if os.path.exists(f"/proc/{gpid}") else None,
        }
    finally:
        if idle:
            idle.close()
        if client:
            os.kill(client, signal.SIGKILL)
            os.waitpid(client, 0)
        a.kill()
        b.kill()


def _exec(argv: list[str], stdin: int | None = None, stdout: int | None = None):
    def child() -> None:
        if stdin is not None:
            os.dup2(stdin, 0)
        if stdout is not None:
            os.dup2(stdout, 1)
        os.execvp(argv[0], argv)

    return child


@check
def coreutils_sleep() -> dict:
    """`sleep 3` moved twice mid-sleep keeps its deadline and exits 0."""
    a, b = Namespace("CSA", 1), Namespace("CSB", 1)
    try:
        t0 = time.monotonic()
        gpid = fork_into(a.ns_fd, _exec(["sleep", "3"]))
        time.sleep(0.7)
        m1 = lib.migrate(gpid, b.path)
        time.sleep(0.7)
        m2 = lib.migrate(m1.global_pid, a.path)
        # Its parent is now A's init, which reaps it: wait for it to disappear.
        while os.path.exists(f"/proc/{m2.global_pid}"):
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        reaped = [st for pid, st in a.reaped() if pid == m2.pid]
        return {"elapsed_s": elapsed, "reaped_status": reaped, "pids": [m1.pid, m2.pid]}
    finally:
        a.kill()
        b.kill()


@check
def cat_pipe() -> dict:
    """`cat` in a pipe moves back and forth while 8 MiB go through it: nothing lost."""
    size = int(os.environ.get("NSM_CAT_BYTES", str(8 << 20)))
    a, b = Namespace("CPA", 1), Namespace("CPB", 1)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        gpid = fork_into(a.ns_fd, _exec(["cat"], stdin=in_r, stdout=out_w))
        os.close(in_r)
        os.close(out_w)
        data = os.urandom(size)
        got = hashlib.sha256()
        received = [0]

        def feed() -> None:
            view = memoryview(data)
            for i in range(0, size, 65536):
                os.write(in_w, view[i : i + 65536])
                time.sleep(0.001)
            os.close(in_w)

        def drain() -> None:
            while chunk := os.read(out_r, 65536):
                got.update(chunk)
                received[0] += len(chunk)

        threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
        for t in threads:
            t.start()
        hops = 0
        while threads[0].is_alive() and hops < 40:
            try:
                gpid = lib.migrate(gpid, (b.path, a.path)[hops % 2]).global_pid
                hops += 1
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
                break
            time.sleep(0.02)
        for t in threads:
            t.join(120)
        return {
            "hops": hops,
            "sent": size,
            "received": received[0],
            "same_sha256": got.hexdigest() == hashlib.sha256(data).hexdigest(),
        }
    finally:
        os.close(out_r)
        a.kill()
        b.kill()


@check
def tail_follow() -> dict:
    """`tail -f` keeps following its file after a move."""
    a, b = Namespace("TFA", 1), Namespace("TFB", 1)
    path = "/tmp/nsm-checks/tail-f.log"
    out_r, out_w = os.pipe()
    try:
        with open(path, "w") as f:
            f.write("line-0\n")
        gpid = fork_into(a.ns_fd, _exec(["tail", "-n", "+1", "-f", path], stdout=out_w))
        os.close(out_w)
        rf = os.fdopen(out_r)
        lines = [rf.readline().strip()]
        m = lib.migrate(gpid, b.path)
        for i in (1, 2, 3):
            with open(path, "a") as f:
                f.write(f"line-{i}\n")
            lines.append(rf.readline().strip())
        os.kill(m.global_pid, signal.SIGKILL)
        return {"lines": lines, "pid": m.pid}
    finally:
        a.kill()
        b.kill()


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """What ``fd`` gives until ``marker`` shows, EOF, or ``timeout`` seconds pass."""
    buf = b""
    end = time.monotonic() + timeout
    while marker not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: no slave side open (yet)
            time.sleep(0.1)
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def _shell_on(slave: str) -> None:
    """Session leader with ``slave`` as its controlling tty, running an interactive bash."""
    os.setsid()
    fd = os.open(slave, os.O_RDWR)  # a session leader's first tty becomes its ctty
    for n in (0, 1, 2):
        os.dup2(fd, n)
    os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])


@check
def shell_on_pty() -> dict:
    """An interactive bash, session leader on a pty, moved: it keeps answering on its
    terminal, which it no longer controls."""
    a, b = Namespace("SPA", 1), Namespace("SPB", 3)  # old and new PIDs differ
    master, slave_fd = os.openpty()  # the slave stays open here: no EIO on the master
    slave = os.ttyname(slave_fd)
    try:
        shell = fork_into(a.ns_fd, lambda: _shell_on(slave))
        # The terminal echoes what is typed: wait for what only the shell computes.
        os.write(master, b"PS1='$ '; echo ready-$((40+2))\n")
        first = _read_until(master, b"ready-42", 180)  # bash starts slowly under TCG
        if b"ready-42" not in first:
            raise TimeoutError(f"bash did not answer on its terminal: {first[-200:]!r}")
        before = {"tty_nr": tty_nr(shell), "nspid": nspid(shell)}
        m = lib.migrate(shell, b.path)
        os.write(master, b"echo pid=$$ bashpid=$BASHPID done-$((40+2))\n")
        answer = _read_until(master, b"done-42", 180).decode(errors="replace")
        after = {"tty_nr": tty_nr(m.global_pid), "nspid": nspid(m.global_pid)}
        os.kill(m.global_pid, signal.SIGKILL)
        return {
            "ready": b"ready-42" in first,
            "before": before,
            "after": after,
            "answer": answer[-300:],
        }
    finally:
        os.close(master)
        os.close(slave_fd)
        a.kill()
        b.kill()
