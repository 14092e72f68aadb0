"""The migration manager: a Unix-socket service in the global PID namespace.

One thread runs an event loop (selectors) over every client connection; a connection lives as
long as its process wants (a worker keeps one across all its hops). The caller of each request
is the sender the kernel names for that message: the listening socket has SO_PASSCRED, so every
message arrives with SCM_CREDENTIALS holding the sender's current pid, translated into the
manager's (global) namespace; a pid written in a request is never used. Pings are answered on
the loop; migrations and hop records go to a pool of threads that grows on demand (a slow
migration - a restart or CRIU hop, a kmod target that is slow to reach its safe point - never
stalls the loop or another client), and a connection with a request in flight is not read
until it is answered, so replies keep the order of requests. Targets are resolved by name
through a registry of open namespace fds, and a policy of allowed (source, target) pairs is
checked before the backend is called. Bad input gets an error reply and is logged; serving goes
on. The protocol (frames, credentials, ops, errors) is described in docs/manager.md.

``legacy_threads=True`` runs the previous design instead - a thread per connection, one request
per connection, the caller taken from SO_PEERCRED - as a baseline for the benchmark only.
Standard library only: it runs inside the VM guest.
"""

from __future__ import annotations

import argparse
import collections
import grp
import logging
import os
import queue
import selectors
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from nsexp import nsutil, protocol
from nsexp.backends import Backend, MigrationError, Namespace, Peer, get_backend
from nsexp.client import DEFAULT_SOCKET
from nsexp.protocol import Credentials, ProtocolError

log = logging.getLogger("nsexp.manager")

RecordHook = Callable[[Peer, dict[str, Any]], None]
FailureHook = Callable[[Peer, dict[str, Any], MigrationError], None]
_umask_lock = threading.Lock()
_RECV_SIZE = protocol.MAX_FRAME + protocol.HEADER.size
_SEND_TIMEOUT = 5.0


class _Pool:
    """Daemon threads that run jobs; a new thread starts whenever none is idle (up to ``size``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job and not yet promised one
        self._threads: set[threading.Thread] = set()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self.size:
                t = threading.Thread(target=self._work, name="nsexp-manager-job", daemon=True)
                self._threads.add(t)
                t.start()
        self._jobs.put((fn, args))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, args = job
            fn(*args)
            with self._lock:
                self._idle += 1
        with self._lock:
            self._threads.discard(threading.current_thread())

    def shutdown(self, deadline: float) -> None:
        """Let the threads finish their jobs and exit; wait for them until ``deadline``."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class _Conn:
    """One client connection, as the loop sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = protocol.FrameReader()
        self.pending: collections.deque[tuple[Credentials | None, Any, int]] = collections.deque()
        self.out = bytearray()  # reply bytes not yet taken by the kernel
        self.events = 0  # what the selector watches for (0: not registered)
        self.busy = False  # a request of this connection is being served by a pool thread
        self.closing = False  # close once ``out`` is flushed
        self.partial_since: float | None = None  # a frame started, not finished
        self.known: tuple[int, Namespace | None, int] | None = None  # (pid, source, pid in ns)


class Manager:
    """Serve migration requests on ``socket_path`` with ``backend``.

    ``registry`` maps namespace names to open namespaces; ``policy`` is the set of allowed
    (source name, target name) pairs, or None to allow any pair of registered namespaces.
    ``on_record`` receives hop records sent by workers (the experiment snapshots the process
    tree there before the worker is answered); ``on_failure`` hears of failed migrations whose
    requester cannot be told any more (it died, or the restart successor could not be forked).
    ``read_timeout``: a frame must be complete this long after its first byte arrived.
    ``workers``: most requests served at once (migrations and records). ``legacy_threads``:
    the old thread-per-connection path, for the benchmark's comparison only.
    """

    def __init__(
        self,
        socket_path: str,
        backend: Backend,
        registry: dict[str, Namespace],
        policy: Iterable[tuple[str, str]] | None = None,
        *,
        mode: int | None = None,
        group: str | int | None = None,
        read_timeout: float = 10.0,
        max_clients: int = 256,
        workers: int = 64,
        legacy_threads: bool = False,
        on_record: RecordHook | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.backend = backend
        self.registry = registry
        self.policy = None if policy is None else {tuple(p) for p in policy}
        self.group = group
        self.mode = mode if mode is not None else (0o660 if group is not None else 0o600)
        self.read_timeout = read_timeout
        self.max_clients = max_clients
        self.legacy_threads = legacy_threads
        self.on_record = on_record
        self.on_failure = on_failure
        self._pool = _Pool(workers)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: dict[int, _Conn] = {}  # by fd; the loop's own
        self._done: collections.deque[tuple[_Conn, bool]] = collections.deque()
        self._wake_r, self._wake_w = -1, -1
        self._lock = threading.Lock()
        self.served = 0  # requests read
        self.accepted = 0  # connections accepted

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the listening socket (removing a stale one left by a dead manager)."""
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Accepted connections inherit it: the kernel attaches the sender to every message.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # The umask makes the socket private from the moment it exists; chmod then widens it.
        with _umask_lock:
            old = os.umask(0o177)
            try:
                sock.bind(self.socket_path)
            finally:
                os.umask(old)
        if self.group is not None:
            gid = self.group if isinstance(self.group, int) else grp.getgrnam(self.group).gr_gid
            os.chown(self.socket_path, -1, gid)
        os.chmod(self.socket_path, self.mode)
        sock.listen(128)
        self._sock = sock
        log.info(
            "listening on %s (backend %s%s)",
            self.socket_path,
            self.backend.name,
            ", legacy thread per connection" if self.legacy_threads else "",
        )

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
        except OSError:
            os.unlink(self.socket_path)  # nobody listens: left behind by a dead manager
            log.info("removed stale socket %s", self.socket_path)
            return
        finally:
            probe.close()
        raise FileExistsError(f"a manager already listens on {self.socket_path}")

    def start(self) -> Manager:
        """Bind and serve in a background thread."""
        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="nsexp-manager")
        self._thread.daemon = True
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until stop() (or request_stop())."""
        if self._sock is None:
            self.bind()
        if self.legacy_threads:
            self._serve_legacy()
        else:
            self._serve_loop()

    def request_stop(self) -> None:
        """Ask serve_forever() to return soon (safe from a signal handler)."""
        self._stop.set()
        self._wake(b"s")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, wait briefly for running requests, close everything, remove the socket."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(deadline)
        with self._lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r, self._wake_w = -1, -1
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Manager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the event loop --------------------------------------------------------------------

    def _serve_loop(self) -> None:
        assert self._sock is not None
        self._sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, mask in self._sel.select(self._select_timeout()):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wakeups()
                    else:
                        self._on_event(key.data, mask)
                self._expire_partial_frames()
        finally:
            for conn in list(self._conns.values()):
                if not conn.busy:
                    self._close(conn)
            self._sel.close()

    def _select_timeout(self) -> float | None:
        started = [c.partial_since for c in self._conns.values() if c.partial_since is not None]
        if not started:
            return None
        return max(0.0, min(started) + self.read_timeout - time.monotonic())

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if len(self._conns) >= self.max_clients:
                log.warning("too many clients: refusing a connection")
                self._try_send(sock, protocol.error_reply("busy", "too many clients, retry"))
                sock.close()
                continue
            self.accepted += 1
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns[sock.fileno()] = conn
            self._watch(conn)

    def _watch(self, conn: _Conn) -> None:
        """Point the selector at what ``conn`` waits for: a reply to flush, a request, nothing."""
        want = 0
        if not conn.busy:
            want = selectors.EVENT_WRITE if conn.out else selectors.EVENT_READ
        if want == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, want, conn)
        elif want == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, want, conn)
        conn.events = want

    def _close(self, conn: _Conn) -> None:
        if conn.events:
            self._sel.unregister(conn.sock)
            conn.events = 0
        self._conns.pop(conn.sock.fileno(), None)
        conn.sock.close()

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        elif mask & selectors.EVENT_READ:
            self._read(conn)
        if conn.sock.fileno() >= 0:
            self._advance(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data, anc, _, _ = conn.sock.recvmsg(_RECV_SIZE, protocol.CMSG_CREDS_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("read failed: %s", exc)
            self._close(conn)
            return
        if not data:
            if conn.reader.partial:
                log.warning("client closed the connection in the middle of a frame")
            self._close(conn)
            return
        received = time.monotonic_ns()
        for creds, item in conn.reader.feed(data, protocol.parse_credentials(anc)):
            conn.pending.append((creds, item, received))
        if not conn.reader.partial:
            conn.partial_since = None
        elif conn.partial_since is None:
            conn.partial_since = time.monotonic()

    def _expire_partial_frames(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.partial_since is not None and now - conn.partial_since > self.read_timeout:
                log.warning("a frame was not completed within %.1fs: dropped", self.read_timeout)
                conn.partial_since = None
                conn.pending.clear()
                conn.closing = True
                self._queue(conn, protocol.error_reply("timeout", "frame not completed in time"))
                self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        """Serve ``conn``'s complete requests in order, until one needs a pool thread."""
        while conn.pending and not conn.busy and not conn.closing:
            creds, item, received = conn.pending.popleft()
            if isinstance(item, ProtocolError):
                self._bad_frame(conn, creds, item)
                continue
            self.served += 1
            if item.get("op") == "ping":
                self._queue(conn, self._ping_on_loop(conn, creds))
                continue
            if conn.out and not self._flush(conn):
                conn.pending.appendleft((creds, item, received))  # after the earlier replies
                break
            conn.busy = True
            self._watch(conn)
            conn.sock.setblocking(True)
            self._pool.submit(self._serve_off_loop, conn, creds, item, received)
        if conn.closing and not conn.out and not conn.busy:
            self._close(conn)
        elif conn.sock.fileno() >= 0:
            self._watch(conn)

    def _bad_frame(self, conn: _Conn, creds: Credentials | None, exc: ProtocolError) -> None:
        pid = creds.pid if creds else "?"
        log.warning("pid %s: bad frame (%s): %s", pid, exc.code, exc.message)
        reply = protocol.error_reply(exc.code, exc.message)
        if exc.code == "version" and isinstance(exc.peer_version, int):
            reply["v"] = exc.peer_version  # an older client reads the refusal in its own version
        conn.closing = exc.fatal or exc.code == "version"
        self._queue(conn, reply)

    def _queue(self, conn: _Conn, reply: dict[str, Any]) -> None:
        conn.out += protocol.encode(reply)
        self._flush(conn)

    def _flush(self, conn: _Conn) -> bool:
        """Send what the kernel takes now; True once nothing is left."""
        try:
            sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("could not send reply: %s", exc)
            conn.out.clear()
            conn.closing = True
            return True
        del conn.out[:sent]
        return not conn.out

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._done:
            conn, keep = self._done.popleft()
            conn.busy = False
            if not keep or conn.sock.fileno() < 0:
                self._close(conn)
                continue
            conn.sock.setblocking(False)
            self._advance(conn)

    def _serve_off_loop(self, conn: _Conn, creds: Credentials | None, req: dict, received: int):
        keep = False
        try:
            peer = self._identify(conn, creds)
            keep = self._handle(conn.sock, peer, req, received)
        except _Unidentified as exc:
            log.warning("cannot identify the sender: %s", exc)
            self._try_send(conn.sock, protocol.error_reply("unknown_peer", str(exc)))
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
            log.exception("internal error while serving a client")
            self._try_send(conn.sock, protocol.error_reply("internal", "internal manager error"))
        finally:
            self._done.append((conn, keep))
            self._wake(b"d")

    def _wake(self, why: bytes) -> None:
        with self._lock:  # never write to a closed pipe's recycled fd number
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, why)
                except OSError:
                    pass  # the pipe is full: the loop wakes up anyway

    def _ping_on_loop(self, conn: _Conn, creds: Credentials | None) -> dict[str, Any]:
        try:
            return self._ping(self._identify(conn, creds))
        except _Unidentified as exc:
            return protocol.error_reply("unknown_peer", str(exc))

    # -- who is asking -----------------------------------------------------------------------

    def _identify(self, conn: _Conn, creds: Credentials | None) -> Peer:
        """The sender of one message, from its kernel credentials."""
        if creds is None or creds.pid <= 0:
            raise _Unidentified("the message carried no sender credentials")
        known = conn.known  # one connection, one pid: the same process (it is alive: it sent)
        if known is None or known[0] != creds.pid:
            known = self._locate(creds.pid)
            conn.known = known
        return Peer(creds.pid, creds.uid, creds.gid, known[1], known[2])

    def _locate(self, pid: int) -> tuple[int, Namespace | None, int]:
        try:
            info = nsutil.proc_info(pid)
        except OSError as exc:
            raise _Unidentified(f"pid {pid} is gone: {exc.strerror}") from None
        source = next((ns for ns in self.registry.values() if ns.inode == info.ns_inode), None)
        return pid, source, info.pid

    # -- one request (a pool thread, or a legacy connection thread) ---------------------------

    @staticmethod
    def _try_send(conn: socket.socket, msg: dict[str, Any]) -> bool:
        try:
            conn.settimeout(_SEND_TIMEOUT)
            conn.sendall(protocol.encode(msg), socket.MSG_NOSIGNAL)
            return True
        except OSError as exc:
            log.warning("could not send reply: %s", exc)
            return False

    def _handle(self, conn: socket.socket, peer: Peer, req: dict[str, Any], received: int) -> bool:
        """Serve one request on a blocking socket; True if the connection stays usable."""
        op = req.get("op")
        if op == "ping":
            return self._try_send(conn, self._ping(peer))
        if op == "migrate":
            return self._migrate(conn, peer, req, received)
        if op == "record":
            return self._record(conn, peer, req)
        log.warning("pid %d: unknown op %r", peer.pid, op)
        return self._try_send(conn, protocol.error_reply("unknown_op", f"unknown op {op!r}"))

    def _ping(self, peer: Peer) -> dict[str, Any]:
        return {
            "v": protocol.VERSION,
            "ok": True,
            "global_pid": peer.pid,
            "pid": peer.pid_in_ns,
            "ns": peer.source.name if peer.source else None,
            "backend": self.backend.name,
        }

    def _record(self, conn: socket.socket, peer: Peer, req: dict[str, Any]) -> bool:
        record = req.get("record")
        if not isinstance(record, dict):
            reply = protocol.error_reply("bad_request", "'record' must be an object")
            return self._try_send(conn, reply)
        if self.on_record is not None:
            self.on_record(peer, record)
        return self._try_send(conn, {"ok": True})

    def _check_route(self, peer: Peer, target_name: Any) -> Namespace | dict[str, Any]:
        if not isinstance(target_name, str) or target_name not in self.registry:
            return protocol.error_reply("unknown_namespace", f"no namespace named {target_name!r}")
        target = self.registry[target_name]
        if peer.source is None:
            return protocol.error_reply(
                "unknown_source", f"pid {peer.pid} is not in a registered namespace"
            )
        if peer.source is target:
            return protocol.error_reply("same_namespace", f"already in {target_name}")
        if self.policy is not None and (peer.source.name, target_name) not in self.policy:
            return protocol.error_reply(
                "forbidden_route", f"route {peer.source.name} -> {target_name} is not allowed"
            )
        return target

    def _migrate(self, conn: socket.socket, peer: Peer, req: dict[str, Any], received: int) -> bool:
        checked = self._check_route(peer, req.get("target"))
        if isinstance(checked, dict):
            log.warning("pid %d: refused: %s", peer.pid, checked["error"]["message"])
            return self._try_send(conn, checked)
        target = checked
        log.info(
            "pid %d (%s pid %d) -> %s",
            peer.pid,
            peer.source.name if peer.source else "?",
            peer.pid_in_ns,
            target.name,
        )
        try:
            result = self.backend.migrate(peer, target, req)
        except MigrationError as exc:
            log.warning("pid %d -> %s failed: %s", peer.pid, target.name, exc)
            reply = protocol.error_reply(exc.code, exc.message, errno=exc.errno)
            reply["error"]["timings"] = {"manager_received": received, **exc.timings}
            delivered = not exc.client_gone and self._try_send(conn, reply)
            if not delivered:
                self._failed(peer, req, exc)
            return delivered
        timings = {"manager_received": received, **result.pop("timings", {})}
        reply = {"ok": True, **result, "timings": timings}
        # The process is handed over (restart exits, CRIU dumps it): the client closes.
        handover = "action" in result
        if handover:
            reply["close"] = True
        timings["reply_sent"] = time.monotonic_ns()
        if not self._try_send(conn, reply):
            self._failed(
                peer, req, MigrationError("client_gone", "requester vanished before the reply")
            )
            return False
        try:
            self.backend.after_reply(conn, peer, target, req, reply)
        except MigrationError as exc:
            log.warning("pid %d -> %s failed after the reply: %s", peer.pid, target.name, exc)
            self._failed(peer, req, exc)
        return not handover

    def _failed(self, peer: Peer, req: dict[str, Any], exc: MigrationError) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(peer, req, exc)
            except Exception:  # noqa: BLE001
                log.exception("on_failure hook failed")

    # -- the baseline: a thread per connection, one request per connection ----------------

    def _serve_legacy(self) -> None:
        assert self._sock is not None
        self._sock.settimeout(0.2)  # the accept loop wakes up to notice stop()
        slots = threading.BoundedSemaphore(self.max_clients)
        threads: set[threading.Thread] = set()
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    break
                log.warning("accept failed: %s", exc)
                time.sleep(0.05)
                continue
            if not slots.acquire(blocking=False):
                log.warning("too many clients: refusing a connection")
                self._try_send(conn, protocol.error_reply("busy", "too many clients, retry"))
                conn.close()
                continue
            self.accepted += 1
            t = threading.Thread(target=self._legacy_conn, args=(conn, slots, threads))
            t.daemon = True
            with self._lock:
                threads.add(t)
            t.start()
        with self._lock:
            left = list(threads)
        for t in left:
            t.join(_SEND_TIMEOUT)

    def _legacy_conn(self, conn: socket.socket, slots: threading.Semaphore, threads: set) -> None:
        try:
            conn.settimeout(self.read_timeout)
            pid, uid, gid = protocol.UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, protocol.UCRED.size)
            )
            try:
                req = protocol.recv_msg(conn)
            except TimeoutError:
                self._try_send(conn, protocol.error_reply("timeout", "no request received in time"))
                return
            except ProtocolError as exc:
                log.warning("pid %d: bad frame (%s): %s", pid, exc.code, exc.message)
                if not isinstance(exc, protocol.ConnectionClosed):
                    self._try_send(conn, protocol.error_reply(exc.code, exc.message))
                return
            with self._lock:
                self.served += 1
            try:
                _, source, pid_in_ns = self._locate(pid)
            except _Unidentified as exc:
                log.warning("cannot identify the peer: %s", exc)
                return
            self._handle(conn, Peer(pid, uid, gid, source, pid_in_ns), req, time.monotonic_ns())
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
            log.exception("internal error while serving a client")
        finally:
            conn.close()
            slots.release()
            with self._lock:
                threads.discard(threading.current_thread())


class _Unidentified(Exception):
    """The sender of a message cannot be told (no credentials, or it is gone)."""


# -- command line ----------------------------------------------------------------------------


def _parse_ns(value: str) -> tuple[str, int]:
    name, sep, pid = value.partition("=")
    if not sep or not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=INIT_PID, got {value!r}")
    return name, int(pid)


def _parse_pair(value: str) -> tuple[str, str]:
    src, sep, dst = value.partition(":")
    if not sep or not src or not dst:
        raise argparse.ArgumentTypeError(f"expected SRC:DST, got {value!r}")
    return src, dst


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="socket path (default %(default)s)")
    p.add_argument("--backend", default="kmod", choices=["kmod", "criu"])
    p.add_argument(
        "--ns",
        action="append",
        type=_parse_ns,
        default=[],
        metavar="NAME=INIT_PID",
        help="register a namespace by the global pid of its init (repeatable)",
    )
    p.add_argument(
        "--allow",
        action="append",
        type=_parse_pair,
        metavar="SRC:DST",
        help="allowed route (repeatable); default: any pair of registered namespaces",
    )
    p.add_argument("--group", help="group allowed to connect (socket mode 0660)")
    p.add_argument(
        "--read-timeout", type=float, default=10.0, help="seconds to finish a started frame"
    )
    p.add_argument("-v", "--verbose", action="store_true")


def cmd_manager(args: argparse.Namespace) -> int:
    """``nsexp manager``: serve in the foreground until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    backend = get_backend(args.backend)
    backend.check()
    registry = {name: Namespace.open(name, pid) for name, pid in args.ns}
    manager = Manager(
        args.socket,
        backend,
        registry,
        args.allow,
        group=args.group,
        read_timeout=args.read_timeout,
    )
    signal.signal(signal.SIGTERM, lambda *_: manager.request_stop())
    try:
        manager.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop()
        for ns in registry.values():
            ns.close()
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``nsexp manager`` to the CLI."""
    p = subparsers.add_parser("manager", help="run the migration manager in the foreground")
    add_arguments(p)
    p.set_defaults(func=cmd_manager)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsexp-manager", description=__doc__)
    add_arguments(parser)
    return cmd_manager(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
