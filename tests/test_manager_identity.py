"""How the manager's loop knows who sent a message, cheaply and without trusting anything but
the kernel: the view kept per connection, its proof per message, and the client's timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from proc_helpers import write_json
from test_manager import in_ns

from nsexp.backends import Backend, Namespace, Peer
from nsexp.client import Client, ManagerUnavailable
from nsexp.hierarchy import Hierarchy, NamespacePlan
from nsexp.manager import Manager
from nsexp.manager.identity import Unidentified, open_known


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "m.sock")


@pytest.fixture
def two_ns():
    with Hierarchy([NamespacePlan("A", 0), NamespacePlan("B", 0)]) as h:
        yield h


def test_kept_view_fails_once_its_process_is_gone(sock, two_ns):
    """The kept /proc/PID/stat says the state while the process lives, nothing once it is gone
    (exited here; a kmod move frees the old pid the same way): the pid is then looked up anew."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        known, state = open_known(child.pid, two_ns.namespaces)
        assert state in "SR" and known.state() in ("S", "R")
        assert known.source is None and known.pid_in_ns == child.pid  # not a registered ns
    finally:
        child.kill()
        child.wait()
    assert known.state() is None
    known.close()
    with pytest.raises(Unidentified):
        open_known(child.pid, two_ns.namespaces)


class ClaimsAnotherPid(Backend):
    """A quick backend whose reply names some other process as the requester's new pid."""

    name = "claims"

    def __init__(self, other: int) -> None:
        self.other = other

    def migrate(self, peer: Peer, target: Namespace, request):
        return {"pid": 1, "global_pid": self.other, "timings": {}}


def test_pid_in_a_reply_never_names_the_sender(sock, two_ns, tmp_path):
    """A backend's reply naming another process as the requester's new pid changes nothing:
    the next message is identified by its own credentials."""
    ns = two_ns.namespaces
    decoy = subprocess.Popen(["sleep", "30"])
    out = tmp_path / "seen.json"

    def client():
        c = Client(sock, timeout=10)
        moved = c.migrate("B")
        write_json(out, {"moved": moved["global_pid"], "ping": c.ping(), "me": os.getpid()})

    try:
        with Manager(sock, ClaimsAnotherPid(decoy.pid), ns, inline_migrate=True):
            os.waitpid(in_ns(ns["A"], client), 0)
    finally:
        decoy.kill()
        decoy.wait()
    got = json.loads(out.read_text())
    assert got["moved"] == decoy.pid
    assert got["ping"]["ns"] == "A" and got["ping"]["pid"] == got["me"]
    assert got["ping"]["global_pid"] not in (decoy.pid, os.getpid())


def test_client_timeout_without_a_poll_per_call(tmp_path):
    """The client's timeout is the kernel's (SO_RCVTIMEO): a silent manager still times out."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        c = Client(path, timeout=0.3)
        c.connect()
        assert c._sock is not None and c._sock.gettimeout() is None  # blocking: no poll()
        t0 = time.monotonic()
        with pytest.raises(ManagerUnavailable) as ei:
            c.ping()
        assert ei.value.code == "timeout" and 0.25 < time.monotonic() - t0 < 5
        assert not c.connected
