"""The manager: bad input, identity, policy, concurrency, dying clients, a dying manager,
long-lived connections with the sender named by the kernel per message, the legacy baseline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from proc_helpers import no_children_left, wait_for, write_json  # noqa: F401, E402

from nsexp import nsutil, protocol
from nsexp.backends import Backend, Namespace, Peer
from nsexp.backends.restart import ManagerSide as Restart
from nsexp.client import Client, ManagerError, ManagerUnavailable
from nsexp.hierarchy import Hierarchy, NamespacePlan
from nsexp.manager import Manager


class Echo(Backend):
    """Migrates nothing: answers with what it saw; sleeps for targets listed in ``slow``."""

    name = "echo"

    def __init__(self, slow: dict[str, float] | None = None, entered: Path | None = None):
        self.slow = slow or {}
        self.entered = entered
        self.calls = 0

    def migrate(self, peer: Peer, target: Namespace, request):
        self.calls += 1
        if self.entered is not None:
            with open(self.entered, "a") as f:
                f.write(f"{peer.pid}\n")
        time.sleep(self.slow.get(target.name, 0.0))
        return {"pid": peer.pid_in_ns, "global_pid": peer.pid, "timings": {}}


def in_ns(ns: Namespace, fn) -> int:
    """Fork a process into ``ns`` (setns + fork) running ``fn``; returns its global pid."""
    own = os.open("/proc/self/ns/pid", os.O_RDONLY)
    nsutil.setns(ns.fd, nsutil.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    nsutil.setns(own, nsutil.CLONE_NEWPID)
    os.close(own)
    return pid


def request_to_file(path: str, out: Path, target: str, **fields):
    """Body of a client process: one migrate request, outcome written to ``out``."""

    def run():
        try:
            reply = Client(path).migrate(target, **fields)
            result = {"ok": True, "reply": reply}
        except ManagerError as exc:
            result = {"ok": False, "code": exc.code, "kind": type(exc).__name__}
        result["pid"] = os.getpid()
        write_json(out, result)

    return run


def read_any_version(s: socket.socket) -> dict | None:
    """One reply frame, whatever its version (None if the connection closed first)."""
    header = s.recv(4, socket.MSG_WAITALL)
    if not header:
        return None
    (length,) = struct.unpack(">I", header)
    return json.loads(s.recv(length, socket.MSG_WAITALL))


def raw_exchange(path: str, data: bytes, shutdown: bool = False) -> dict | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        return read_any_version(s)


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "m.sock")


@pytest.fixture
def three_ns():
    h = Hierarchy([NamespacePlan("A", 0), NamespacePlan("B", 0), NamespacePlan("C", 0)])
    with h:
        yield h


def test_bad_input_gets_error_replies_and_service_goes_on(sock, three_ns, caplog):
    caplog.set_level(logging.INFO, "nsexp.manager")
    with Manager(sock, Echo(), three_ns.namespaces, [("A", "B")]):
        frame = protocol.encode
        cases = [
            (struct.pack(">I", 9) + b"not json!", "malformed"),
            (struct.pack(">I", protocol.MAX_FRAME + 1), "too_large"),
            (frame({"v": 1, "op": "ping"}), "version"),
            (frame({"v": 3, "op": "ping"}), "version"),
            (frame({"op": "dance"}), "unknown_op"),
            (frame({"op": "record", "record": [1]}), "bad_request"),
            (frame({"op": "migrate", "target": "Nowhere"}), "unknown_namespace"),
            (frame({"op": "migrate", "target": 7}), "unknown_namespace"),
            # This test process lives in the global namespace, which is not registered.
            (frame({"op": "migrate", "target": "B"}), "unknown_source"),
        ]
        for data, code in cases:
            reply = raw_exchange(sock, data)
            assert reply is not None and reply["ok"] is False, code
            assert reply["error"]["code"] == code
        # The same errors on one long-lived connection: it stays usable after each of them.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(sock)
            for data, code in cases[:1] + cases[4:]:
                s.sendall(data)
                assert protocol.recv_msg(s)["error"]["code"] == code
            s.sendall(frame({"op": "ping"}))
            assert protocol.recv_msg(s)["ok"]
        # Still serving, and the identity comes from the kernel, not from the request.
        pong = Client(sock).request({"op": "ping", "pid": 1, "global_pid": 1})
        assert pong["global_pid"] == os.getpid() and pong["ns"] is None
    text = caplog.text
    assert "bad frame (malformed)" in text and "bad frame (too_large)" in text
    assert "unknown op" in text and "refused" in text


def test_v1_client_refused_in_its_own_version_with_the_fix(sock, three_ns):
    with Manager(sock, Echo(), three_ns.namespaces):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(sock)
            s.sendall(protocol.encode({"v": 1, "op": "ping"}))
            reply = read_any_version(s)
            assert s.recv(1) == b""  # and the connection is closed
        # A v1 client checks "v" == 1 before it reads the error: it can read this one.
        assert reply["v"] == 1 and reply["ok"] is False
        assert reply["error"]["code"] == "version"
        assert "speaks v2" in reply["error"]["message"]
        assert "nsexp.client.Client" in reply["error"]["message"]
        assert Client(sock).ping()["ok"]


def test_disconnect_mid_frame_stalled_frame_and_idle_connection(sock, three_ns, caplog):
    caplog.set_level(logging.INFO, "nsexp.manager")
    with Manager(sock, Echo(), three_ns.namespaces, read_timeout=2.0):
        body = protocol.encode({"op": "ping"})
        assert raw_exchange(sock, body[:7], shutdown=True) is None  # half a frame, then EOF
        assert raw_exchange(sock, b"", shutdown=True) is None  # nothing at all, then EOF
        idle = Client(sock, timeout=5)
        assert idle.ping()["ok"]
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.settimeout(5)
        stalled.connect(sock)
        stalled.sendall(body[:6])
        t0 = time.monotonic()
        # While the stalled client holds its half frame, others are served at once.
        assert Client(sock, timeout=5).ping()["ok"]
        assert time.monotonic() - t0 < 1.5
        reply = protocol.recv_msg(stalled)
        assert stalled.recv(1) == b""
        stalled.close()
        assert reply["error"]["code"] == "timeout"
        assert 1.9 < time.monotonic() - t0 < 6
        # An idle connection (no frame started) is not timed out: a worker holds one for life.
        assert idle.connected and idle.ping()["ok"]
        idle.close()
    assert "in the middle of a frame" in caplog.text
    assert "not completed within" in caplog.text


def test_identity_and_route_policy(sock, three_ns, tmp_path):
    ns = three_ns.namespaces
    with Manager(sock, Echo(), ns, [("A", "B")]):
        outs = {k: tmp_path / f"{k}.json" for k in ("ping", "ok", "forbidden", "same")}

        def ping():
            write_json(outs["ping"], {**Client(sock).ping(), "me": os.getpid()})

        pids = [
            in_ns(ns["A"], ping),
            in_ns(ns["A"], request_to_file(sock, outs["ok"], "B", pid=99999)),
            in_ns(ns["A"], request_to_file(sock, outs["forbidden"], "C")),
            in_ns(ns["A"], request_to_file(sock, outs["same"], "A")),
        ]
        for pid in pids:
            os.waitpid(pid, 0)
        p = json.loads(outs["ping"].read_text())
        assert p["ns"] == "A" and p["pid"] == p["me"] and p["global_pid"] in pids
        ok = json.loads(outs["ok"].read_text())
        assert ok["ok"] and ok["reply"]["pid"] == ok["pid"]  # not the 99999 it claimed
        assert json.loads(outs["forbidden"].read_text())["code"] == "forbidden_route"
        assert json.loads(outs["same"].read_text())["code"] == "same_namespace"


def test_socket_mode_group_and_stale_socket(tmp_path, three_ns):
    path = str(tmp_path / "sub" / "m.sock")
    with Manager(path, Echo(), three_ns.namespaces):
        st = os.stat(path)
        assert oct(st.st_mode & 0o777) == oct(0o600)
        assert os.listdir(os.path.dirname(path)) == ["m.sock"]  # staged, listening, renamed
        with pytest.raises(FileExistsError, match="already listens"):
            Manager(path, Echo(), three_ns.namespaces).bind()
    assert not os.path.exists(path)
    # A socket left by a dead manager is replaced; a regular file is not touched.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with Manager(path, Echo(), three_ns.namespaces, group=0):
        st = os.stat(path)
        assert oct(st.st_mode & 0o777) == oct(0o660) and st.st_gid == 0
        assert Client(path).ping()["ok"]
    Path(path).write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        Manager(path, Echo(), three_ns.namespaces).bind()


def test_slow_migration_does_not_block_others(sock, three_ns, tmp_path):
    ns = three_ns.namespaces
    with Manager(sock, Echo(slow={"B": 3.0}), ns):
        slow = in_ns(ns["A"], request_to_file(sock, tmp_path / "slow.json", "B"))
        time.sleep(0.2)
        t0 = time.monotonic()
        fast = in_ns(ns["A"], request_to_file(sock, tmp_path / "fast.json", "C"))
        os.waitpid(fast, 0)
        assert time.monotonic() - t0 < 2.0
        assert json.loads((tmp_path / "fast.json").read_text())["ok"]
        assert not (tmp_path / "slow.json").exists()
        os.waitpid(slow, 0)
        assert json.loads((tmp_path / "slow.json").read_text())["ok"]


def test_client_killed_mid_migration(sock, three_ns, tmp_path):
    ns = three_ns.namespaces
    entered = tmp_path / "entered"
    failures = []
    manager = Manager(
        sock,
        Echo(slow={"B": 1.0}, entered=entered),
        ns,
        on_failure=lambda peer, req, exc: failures.append((peer.pid, exc.code)),
    )
    with manager:
        victim = in_ns(ns["A"], request_to_file(sock, tmp_path / "victim.json", "B"))
        assert wait_for(entered.exists)
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        assert wait_for(lambda: failures, 5)
        assert failures == [(victim, "client_gone")]
        assert wait_for(lambda: manager.connections == 0)
        ok = in_ns(ns["A"], request_to_file(sock, tmp_path / "after.json", "C"))
        os.waitpid(ok, 0)
        assert json.loads((tmp_path / "after.json").read_text())["ok"]
    assert not (tmp_path / "victim.json").exists()


def test_connections_beyond_max_clients_are_told_busy(sock, three_ns):
    with Manager(sock, Echo(), three_ns.namespaces, max_clients=2) as manager:
        held = [Client(sock, timeout=5) for _ in range(2)]
        for c in held:
            c.ping()
        with pytest.raises(ManagerError) as ei:
            Client(sock, timeout=5).ping()
        assert ei.value.code == "busy"
        late = Client(sock, timeout=5)
        late.connect()
        time.sleep(0.3)  # the manager has answered "busy" and hung up before the request
        with pytest.raises(ManagerError) as ei:
            late.ping()
        assert ei.value.code == "busy" and not late.connected
        held.pop().close()
        assert wait_for(lambda: manager.connections == 1)
        assert Client(sock, timeout=5).ping()["ok"]
        held.pop().close()


def test_killed_idle_client_leaves_no_connection(sock, three_ns):
    ns = three_ns.namespaces

    def hold_a_connection():
        client = Client(sock)
        client.ping()
        time.sleep(60)

    with Manager(sock, Echo(), ns) as manager:
        idle = in_ns(ns["A"], hold_a_connection)
        try:
            assert wait_for(lambda: manager.connections == 1, 10)
        finally:  # the child must be gone before its namespace's init is torn down
            os.kill(idle, signal.SIGKILL)
            os.waitpid(idle, 0)
        assert wait_for(lambda: manager.connections == 0)


N_CLIENTS = 64


@pytest.mark.parametrize("legacy", [False, True], ids=["loop", "legacy_threads"])
def test_64_concurrent_clients_restart(sock, tmp_path, legacy):
    def client(i: int):
        def run():
            Client(sock).migrate(
                "B", entry="land", state={"i": i}, request_sent=time.monotonic_ns()
            )

        return run

    def land(payload):
        me = nsutil.self_info()
        out = {"i": payload["state"]["i"], "pid": os.getpid(), "inode": me.ns_inode}
        write_json(tmp_path / f"land-{out['i']}.json", out)

    h = Hierarchy(
        [
            NamespacePlan("A", N_CLIENTS, {i: client(i) for i in range(N_CLIENTS)}),
            NamespacePlan("B", 0),
        ],
        entries={"land": land},
    )
    manager = Manager(sock, Restart(), h.namespaces, [("A", "B")], legacy_threads=legacy)
    with h, manager:
        t0 = time.monotonic()
        h.go()
        done = lambda: len(list(tmp_path.glob("land-*.json"))) == N_CLIENTS  # noqa: E731
        assert wait_for(done, 30), f"{len(list(tmp_path.glob('land-*')))} landed"
        elapsed = time.monotonic() - t0
        landed = [json.loads(p.read_text()) for p in tmp_path.glob("land-*.json")]
        assert sorted(x["i"] for x in landed) == list(range(N_CLIENTS))
        # Every successor was forked by B's init: B's next free PIDs, in B.
        assert sorted(x["pid"] for x in landed) == list(range(2, N_CLIENTS + 2))
        assert {x["inode"] for x in landed} == {h.namespaces["B"].inode}
        assert manager.served == N_CLIENTS
        # The old processes exited and were reaped by A's init; successors by B's.
        assert wait_for(lambda: len(h.live_pids()) == 2)
        inodes = set(h.inodes)
    assert elapsed < 20
    assert nsutil.pids_in_namespaces(inodes) == []


def _serve_in_child(sock: str, backend: Backend, registry) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            Manager(sock, backend, registry).serve_forever()
        finally:
            os._exit(0)
    return pid


def test_manager_killed_then_restarted(sock, tmp_path):
    waiting = 4
    entered = tmp_path / "entered"

    def land(payload):
        write_json(tmp_path / "landed.json", {"pid": os.getpid()})

    h = Hierarchy(
        [
            NamespacePlan(
                "A",
                waiting,
                {i: request_to_file(sock, tmp_path / f"w{i}.json", "B") for i in range(waiting)},
            ),
            NamespacePlan("B", 0),
        ],
        entries={"land": land},
    )
    with h:
        manager_pid = _serve_in_child(sock, Echo(slow={"B": 60}, entered=entered), h.namespaces)
        held = Client(sock, timeout=5)  # a long-lived connection that outlives its manager
        try:
            assert wait_for(lambda: os.path.exists(sock))
            assert held.ping()["ok"]
            h.go()
            assert wait_for(lambda: entered.exists() and len(entered.read_text().split()) == 4)
        finally:
            os.kill(manager_pid, signal.SIGKILL)
            os.waitpid(manager_pid, 0)
        outs = [tmp_path / f"w{i}.json" for i in range(waiting)]
        assert wait_for(lambda: all(p.exists() for p in outs))
        for p in outs:
            r = json.loads(p.read_text())
            assert r["ok"] is False and r["code"] == "manager_gone"
            assert r["kind"] == ManagerUnavailable.__name__
        assert os.path.exists(sock)  # the killed manager could not clean up
        with pytest.raises(ManagerUnavailable):
            Client(sock).ping()
        # A new manager takes over the stale socket; migrations work again.
        with Manager(sock, Restart(), h.namespaces, [("A", "B")]):
            c = in_ns(
                h.namespaces["A"],
                request_to_file(sock, tmp_path / "again.json", "B", entry="land", state={}),
            )
            os.waitpid(c, 0)
            assert json.loads((tmp_path / "again.json").read_text())["ok"]
            assert wait_for((tmp_path / "landed.json").exists)
            assert json.loads((tmp_path / "landed.json").read_text())["pid"] == 2
            # The held connection died with the old manager; the next request reconnects.
            assert held.ping()["global_pid"] == os.getpid()
            held.close()
        # The clients that got the error exited; nothing of theirs is left in A.
        assert wait_for(lambda: len(h.live_pids()) == 2)


def test_half_frame_behind_a_busy_request_waits_without_spinning(sock, three_ns):
    """A stalled frame is timed from when its connection is read again, and the loop sleeps."""
    slow_hook = lambda peer, record: time.sleep(1.5)  # noqa: E731 - served in the pool
    with Manager(sock, Echo(), three_ns.namespaces, read_timeout=0.5, on_record=slow_hook):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(sock)
            cpu0, t0 = time.process_time(), time.monotonic()
            record = protocol.encode({"op": "record", "record": {}})
            s.sendall(record + protocol.encode({"op": "ping"})[:5])  # one read: both
            assert protocol.recv_msg(s)["ok"]
            assert protocol.recv_msg(s)["error"]["code"] == "timeout"
            assert time.monotonic() - t0 > 1.5
            assert time.process_time() - cpu0 < 0.5


def test_sender_named_per_message_on_one_connection(sock, three_ns, tmp_path):
    """A connection opened here (global namespace) and inherited by a process forked into A (the
    host's analogue of a process that moved): each request is answered for its own sender."""
    ns = three_ns.namespaces
    out = tmp_path / "child.json"
    with Manager(sock, Echo(), ns) as manager, socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        protocol.send_msg(s, {"op": "ping", "pid": 1})
        first = protocol.recv_msg(s)

        def on_the_same_connection():
            protocol.send_msg(s, {"op": "ping", "pid": os.getppid(), "global_pid": 1})
            write_json(out, {**protocol.recv_msg(s), "me": os.getpid()})

        child = in_ns(ns["A"], on_the_same_connection)
        os.waitpid(child, 0)
        protocol.send_msg(s, {"op": "ping"})
        last = protocol.recv_msg(s)
        peercred = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        assert manager.accepted == 1
    got = json.loads(out.read_text())
    assert first["ns"] is None and first["global_pid"] == os.getpid() == peercred[0]
    assert got["ns"] == "A" and got["pid"] == got["me"] and got["global_pid"] == child
    assert last["ns"] is None and last["global_pid"] == os.getpid()


def test_one_connection_for_a_process_lifetime_replies_in_order(sock, three_ns, tmp_path):
    ns = three_ns.namespaces
    out = tmp_path / "seq.json"

    def worker():
        c = Client(sock, timeout=10)
        seen = [c.ping()["ns"], c.migrate("B")["pid"], c.record({"x": 1})["ok"]]
        seen.append(c.migrate("C")["pid"])
        # Pipelined: a slow migration between two pings; the replies keep the order.
        s = c._sock
        s.sendall(b"".join(protocol.encode(m) for m in PIPELINE))
        seen.append([protocol.recv_msg(s).get("tag") for _ in PIPELINE])
        write_json(out, {"seen": seen, "me": os.getpid(), "connected": c.connected})

    PIPELINE = [
        {"op": "ping", "tag": 1},
        {"op": "migrate", "target": "B", "tag": 2},
        {"op": "ping", "tag": 3},
    ]
    with Manager(sock, Echo(slow={"B": 0.3}), ns) as manager:
        os.waitpid(in_ns(ns["A"], worker), 0)
        got = json.loads(out.read_text())
        assert manager.accepted == 1 and manager.served == 7
    assert got["seen"][:4] == ["A", got["me"], True, got["me"]]
    assert got["connected"]


def test_quick_backend_runs_on_the_loop_unless_the_requester_is_stopped(sock, three_ns, tmp_path):
    ns = three_ns.namespaces
    where = []

    class Where(Echo):
        def migrate(self, peer, target, request):
            where.append(threading.current_thread().name)
            return super().migrate(peer, target, request)

    gate = threading.Event()
    sent_r, sent_w = os.pipe()

    def stopped_requester():
        c = Client(sock, timeout=20)
        c.connect()
        frames = [{"op": "record", "record": {}}, {"op": "migrate", "target": "B"}]
        c._sock.sendall(b"".join(protocol.encode(m) for m in frames))
        os.write(sent_w, b"x")
        write_json(tmp_path / "stopped.json", [protocol.recv_msg(c._sock) for _ in frames])

    hold = lambda peer, record: gate.wait(20)  # noqa: E731 - keeps the connection busy
    with Manager(sock, Where(), ns, inline_migrate=True, on_record=hold):
        os.waitpid(in_ns(ns["A"], request_to_file(sock, tmp_path / "running.json", "B")), 0)
        assert json.loads((tmp_path / "running.json").read_text())["ok"]
        child = in_ns(ns["A"], stopped_requester)
        os.read(sent_r, 1)
        os.kill(child, signal.SIGSTOP)
        assert wait_for(lambda: nsutil.proc_info(child).state == "T")
        gate.set()  # the record is answered; the migration behind it finds its sender stopped
        assert wait_for(lambda: len(where) == 2)
        os.kill(child, signal.SIGCONT)
        os.waitpid(child, 0)
    os.close(sent_r)
    os.close(sent_w)
    assert where == ["nsexp-manager", "nsexp-manager-job"]
    assert [r["ok"] for r in json.loads((tmp_path / "stopped.json").read_text())] == [True] * 2


@pytest.mark.parametrize("inline", [True, False], ids=["on_loop", "in_pool"])
def test_a_bug_in_the_backend_is_an_internal_error_not_an_outage(sock, three_ns, tmp_path, inline):
    class Boom(Echo):
        def migrate(self, peer, target, request):
            raise RuntimeError("bug")

    ns = three_ns.namespaces
    with Manager(sock, Boom(), ns, inline_migrate=inline):
        out = tmp_path / "boom.json"
        os.waitpid(in_ns(ns["A"], request_to_file(sock, out, "B")), 0)
        assert json.loads(out.read_text())["code"] == "internal"
        assert Client(sock, timeout=5).ping()["ok"]


def test_forked_child_opens_its_own_connection(sock, three_ns, tmp_path):
    with Manager(sock, Echo(), three_ns.namespaces) as manager:
        c = Client(sock, timeout=5)
        assert c.ping()["global_pid"] == os.getpid()
        child = os.fork()
        if child == 0:
            code = 0 if not c.connected and c.ping()["global_pid"] == os.getpid() else 1
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert c.connected and c.ping()["global_pid"] == os.getpid()
        c.close()
        assert manager.accepted == 2


def test_nothing_left_behind_after_stop(sock, three_ns):
    def fds():
        return sorted(os.listdir("/proc/self/fd"))

    before_fds, before_threads = fds(), set(threading.enumerate())
    manager = Manager(sock, Echo(slow={"B": 0.2}), three_ns.namespaces).start()
    clients = [Client(sock, timeout=5) for _ in range(5)]
    for c in clients:
        c.ping()
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(sock)
    half.sendall(b"\0\0")
    manager.stop()
    for c in clients:
        with pytest.raises(ManagerUnavailable):
            c.ping()
    half.close()
    assert not os.path.exists(sock)
    assert wait_for(lambda: set(threading.enumerate()) <= before_threads)
    assert fds() == before_fds


def test_legacy_switch_thread_per_connection(sock, three_ns, tmp_path):
    """The old path, kept for the benchmark's comparison: a connection per request."""
    ns = three_ns.namespaces
    with Manager(sock, Echo(), ns, [("A", "B")], legacy_threads=True) as manager:
        c = Client(sock, timeout=5, reconnect=True)
        assert [c.ping()["global_pid"] for _ in range(3)] == [os.getpid()] * 3
        assert not c.connected and manager.accepted == 3
        out = tmp_path / "ok.json"
        pid = in_ns(ns["A"], request_to_file(sock, out, "B", pid=99999))
        os.waitpid(pid, 0)
        ok = json.loads(out.read_text())
        assert ok["ok"] and ok["reply"]["pid"] == ok["pid"]
        assert raw_exchange(sock, protocol.encode({"op": "dance"}))["error"]["code"] == "unknown_op"


def test_concurrent_pings_from_threads(sock, three_ns):
    with Manager(sock, Echo(), three_ns.namespaces):
        results = []

        def hit():
            results.append(Client(sock, timeout=5).ping()["global_pid"])

        threads = [threading.Thread(target=hit) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [os.getpid()] * 32


@pytest.mark.skipif(shutil.which("criu") is None, reason="criu is not installed (make setup)")
def test_manager_cli_runs_in_the_foreground(tmp_path, three_ns):
    sock = tmp_path / "cli.sock"
    cmd = [sys.executable, "-m", "nsexp", "manager", "--socket", str(sock), "--backend", "criu"]
    cmd += ["--ns", f"A={three_ns.init_pids['A']}", "--ns", f"B={three_ns.init_pids['B']}"]
    cmd += ["--allow", "A:B"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(sock.exists, 20)
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        out = tmp_path / "ping.json"
        pid = in_ns(three_ns.namespaces["A"], lambda: write_json(out, Client(str(sock)).ping()))
        os.waitpid(pid, 0)
        assert json.loads(out.read_text())["ns"] == "A"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()
    assert "listening on" in proc.stderr.read()


@pytest.mark.vm
def test_64_concurrent_clients_kmod_in_vm(vm_testbed, tmp_path):
    """The same 64 processes move at once: B's PIDs 2..65, same start times, clean kernel log."""
    cmd = 'python3 tests/manager_load.py --backend kmod --clients 64 --out "$NSEXP_OUT/conc"'
    batch = vm_testbed.run_batch([cmd], out_dir=tmp_path, timeout=900)
    res = batch.results[0]
    summary_path = tmp_path / "conc" / "concurrency.json"
    assert summary_path.exists(), f"{res.returncode}\n{res.stdout}\n{res.stderr}"
    summary = json.loads(summary_path.read_text())
    assert summary["errors"] == [] and summary["landed"] == 64, summary
    assert summary["pids"] == list(range(2, 66))
    assert summary["all_in_target"] and summary["same_process"]
    assert batch.module_loaded and batch.kernel_log_problems() == []
