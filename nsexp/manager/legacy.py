"""The baseline: the manager's previous design, for the benchmark's comparison only.

One thread per connection, one request per connection, the caller taken from SO_PEERCRED (the
pid the kernel recorded at connect time, which is why a connection could not outlive a hop).
Selected by ``Manager(..., legacy_threads=True)``; clients use ``Client(reconnect=True)``.
Standard library only: it runs inside the VM guest.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

from nsexp import protocol
from nsexp.backends import Peer
from nsexp.manager.identity import Unidentified
from nsexp.manager.requests import SEND_TIMEOUT, log, try_send
from nsexp.protocol import ProtocolError

if TYPE_CHECKING:
    from nsexp.manager.service import Manager


def serve_legacy(manager: Manager) -> None:
    """Accept connections until stop(); each one gets a thread and serves one request."""
    assert manager._sock is not None
    manager._sock.settimeout(0.2)  # the accept loop wakes up to notice stop()
    slots = threading.BoundedSemaphore(manager.max_clients)
    threads: set[threading.Thread] = set()
    while not manager._stop.is_set():
        try:
            conn, _ = manager._sock.accept()
        except TimeoutError:
            continue
        except OSError as exc:
            if manager._stop.is_set():
                break
            log.warning("accept failed: %s", exc)
            time.sleep(0.05)
            continue
        if not slots.acquire(blocking=False):
            log.warning("too many clients: refusing a connection")
            try_send(conn, protocol.error_reply("busy", "too many clients, retry"))
            conn.close()
            continue
        manager.accepted += 1
        t = threading.Thread(target=_serve_connection, args=(manager, conn, slots, threads))
        t.daemon = True
        with manager._lock:
            threads.add(t)
        t.start()
    with manager._lock:
        left = list(threads)
    for t in left:
        t.join(SEND_TIMEOUT)


def _serve_connection(
    manager: Manager, conn: socket.socket, slots: threading.Semaphore, threads: set
) -> None:
    try:
        conn.settimeout(manager.read_timeout)
        pid, uid, gid = protocol.UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, protocol.UCRED.size)
        )
        try:
            req = protocol.recv_msg(conn)
        except TimeoutError:
            try_send(conn, protocol.error_reply("timeout", "no request received in time"))
            return
        except ProtocolError as exc:
            log.warning("pid %d: bad frame (%s): %s", pid, exc.code, exc.message)
            if not isinstance(exc, protocol.ConnectionClosed):
                try_send(conn, protocol.error_reply(exc.code, exc.message))
            return
        with manager._lock:
            manager.served += 1
        try:
            _, source, pid_in_ns, _ = manager._locate(pid)
        except Unidentified as exc:
            log.warning("cannot identify the peer: %s", exc)
            return
        manager.requests.handle(
            conn, Peer(pid, uid, gid, source, pid_in_ns), req, time.monotonic_ns()
        )
    except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
        log.exception("internal error while serving a client")
    finally:
        conn.close()
        slots.release()
        with manager._lock:
            threads.discard(threading.current_thread())
