"""The migration manager's service: one event loop over long-lived client connections.

Runs in the global PID namespace (on the host, or inside the VM guest); standard library only.
This module holds the loop and its connections; what a request does once its sender is known
is nsexp.manager.requests. Overview, protocol and error codes: the package docstring
(nsexp.manager) and docs/manager.md.
"""

from __future__ import annotations

import collections
import grp
import itertools
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from nsexp import protocol
from nsexp.backends import Backend, Namespace, Peer
from nsexp.manager import identity
from nsexp.manager.identity import KnownSender, Unidentified
from nsexp.manager.pool import Pool
from nsexp.manager.requests import (
    SEND_TIMEOUT,
    FailureHook,
    RecordHook,
    Requests,
    record_reply,
    try_send,
)
from nsexp.protocol import Credentials, ProtocolError

log = logging.getLogger("nsexp.manager")

_umask_lock = threading.Lock()
_staging_ids = itertools.count()
_RECV_SIZE = protocol.MAX_FRAME + protocol.HEADER.size
# Backends whose migrate() returns at once, so it runs on the loop (a hand-off to a pool thread
# costs as much as a whole round trip): kmod's ioctl only waits for the requester to reach its
# safe point, and the requester is blocked reading this very reply; restart and CRIU only check
# the request there. Their slow part (after_reply: wait for the exit, fork, dump, restore) runs
# in the pool.
_QUICK_BACKENDS = frozenset({"kmod", "restart", "criu"})
# A requester in these states cannot reach a safe point soon: its migration goes to the pool.
_NOT_RUNNABLE = frozenset("TtDZX")


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
        self.known: KnownSender | None = None  # its last sender (Manager._identify)


class Manager:
    """Serve migration requests on ``socket_path`` with ``backend``.

    ``registry`` maps namespace names to open namespaces; ``policy`` is the set of allowed
    (source name, target name) pairs, or None to allow any pair of registered namespaces.
    ``on_record`` receives hop records sent by workers (the experiment snapshots the process
    tree there before the worker is answered); ``on_failure`` hears of failed migrations whose
    requester cannot be told any more (it died, or the restart successor could not be forked).
    ``read_timeout``: a frame must be complete this long after its first byte arrived.
    ``workers``: most requests served at once off the loop (migrations and records).
    ``inline_migrate``: call the backend's migrate() on the loop unless the requester is
    stopped (default: for the project's backends, whose migrate() is quick).
    ``legacy_threads``: the old thread-per-connection path, for the benchmark's comparison only.
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
        inline_migrate: bool | None = None,
        legacy_threads: bool = False,
        on_record: RecordHook | None = None,
        on_failure: FailureHook | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.backend = backend
        self.registry = registry
        self.group = group
        self.mode = mode if mode is not None else (0o660 if group is not None else 0o600)
        self.read_timeout = read_timeout
        self.max_clients = max_clients
        self.legacy_threads = legacy_threads
        quick = backend.name in _QUICK_BACKENDS
        self.inline_migrate = quick if inline_migrate is None else inline_migrate
        self.on_record = on_record
        self.requests = Requests(backend, registry, policy, on_record, on_failure)
        self._pool = Pool(workers)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: dict[int, _Conn] = {}  # by fd; the loop's own
        self._partial: set[_Conn] = set()  # connections in the middle of a frame
        self._done: collections.deque[tuple[_Conn, bool]] = collections.deque()
        self._wake_r, self._wake_w = -1, -1
        self._lock = threading.Lock()
        self.served = 0  # requests read
        self.accepted = 0  # connections accepted

    @property
    def connections(self) -> int:
        """Client connections open now (event loop only)."""
        return len(self._conns)

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the listening socket (removing a stale one left by a dead manager)."""
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Accepted connections inherit it: the kernel attaches the sender to every message.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # Bound under a temporary name and renamed once it listens: a client that finds the
        # socket can connect. The umask makes it private from the moment it exists.
        staging = os.path.join(directory, f".nsexp-{os.getpid()}-{next(_staging_ids)}.sock")
        try:
            with _umask_lock:
                old = os.umask(0o177)
                try:
                    sock.bind(staging)
                finally:
                    os.umask(old)
            if self.group is not None:
                group = self.group
                gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
                os.chown(staging, -1, gid)
            os.chmod(staging, self.mode)
            sock.listen(128)
            os.rename(staging, self.socket_path)
        except BaseException:
            sock.close()
            if os.path.lexists(staging):
                os.unlink(staging)
            raise
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
            from nsexp.manager.legacy import serve_legacy

            serve_legacy(self)
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
            if conn.known is not None:
                conn.known.close()
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
        # epoll itself rather than selectors: its bookkeeping costs a few microseconds per
        # wake-up natively, tens of times that under emulation. Events are looked up by fd.
        self._ep = select.epoll()
        listening, wake = self._sock.fileno(), self._wake_r
        self._ep.register(listening, select.EPOLLIN)
        self._ep.register(wake, select.EPOLLIN)
        conns = self._conns
        try:
            while not self._stop.is_set():
                for fd, _ in self._ep.poll(self._poll_timeout() if self._partial else -1):
                    if fd == listening:
                        self._accept()
                    elif fd == wake:
                        self._drain_wakeups()
                    elif (conn := conns.get(fd)) is not None and conn.events:
                        self._on_event(conn)
                if self._partial:
                    self._expire_partial_frames()
        finally:
            for conn in list(self._conns.values()):
                if not conn.busy:
                    self._close(conn)
            self._ep.close()

    def _poll_timeout(self) -> float:
        # A busy connection is not read (its pool thread owns it): its clock waits.
        started = [
            c.partial_since for c in self._partial if c.partial_since is not None and not c.busy
        ]
        if not started:
            return -1
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
                try_send(sock, protocol.error_reply("busy", "too many clients, retry"))
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
            want = select.EPOLLOUT if conn.out else select.EPOLLIN
        if want == conn.events:
            return
        if conn.events == 0:
            self._ep.register(conn.sock.fileno(), want)
        elif want == 0:
            self._ep.unregister(conn.sock.fileno())
        else:
            self._ep.modify(conn.sock.fileno(), want)
        conn.events = want

    def _close(self, conn: _Conn) -> None:
        if conn.events:
            self._ep.unregister(conn.sock.fileno())
            conn.events = 0
        self._conns.pop(conn.sock.fileno(), None)
        self._partial.discard(conn)
        conn.sock.close()
        if conn.known is not None:
            conn.known.close()
            conn.known = None

    def _on_event(self, conn: _Conn) -> None:
        # What the connection is watched for says what to do (a hang-up or an error is
        # reported either way, and the send or the recv then sees it).
        if conn.events == select.EPOLLOUT:
            self._flush(conn)
        else:
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
            if conn.partial_since is not None:
                conn.partial_since = None
                self._partial.discard(conn)
        elif conn.partial_since is None:
            conn.partial_since = time.monotonic()
            self._partial.add(conn)

    def _expire_partial_frames(self) -> None:
        now = time.monotonic()
        for conn in list(self._partial):
            if conn.busy or conn.partial_since is None:
                continue
            if now - conn.partial_since > self.read_timeout:
                log.warning("a frame was not completed within %.1fs: dropped", self.read_timeout)
                conn.partial_since = None
                self._partial.discard(conn)
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
            try:
                if self._serve_on_loop(conn, creds, item, received):
                    continue
                if conn.out and not self._flush(conn):
                    conn.pending.appendleft((creds, item, received))  # after earlier replies
                    break
                self._hand_to_pool(conn, self._serve_off_loop, conn, creds, item, received)
            except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
                log.exception("internal error while serving a client")
                conn.busy = False
                conn.sock.setblocking(False)
                self._queue(conn, protocol.error_reply("internal", "internal manager error"))
                conn.closing = True
        if conn.closing and not conn.out and not conn.busy:
            self._close(conn)
        elif conn.sock.fileno() >= 0:
            self._watch(conn)

    def _hand_to_pool(self, conn: _Conn, job: Callable[..., None], *args: Any) -> None:
        """Run ``job`` in the pool; ``conn`` is the job's (blocking, not watched) until done."""
        conn.busy = True
        self._watch(conn)
        conn.sock.setblocking(True)
        self._pool.submit(job, *args)

    def _serve_on_loop(
        self, conn: _Conn, creds: Credentials | None, req: dict[str, Any], received: int
    ) -> bool:
        """Serve ``req`` here if it is quick; False if it is the pool's."""
        op = req.get("op")
        if op == "ping":
            self._queue(conn, self._ping_on_loop(conn, creds))
            return True
        if op == "record" and self.on_record is None:
            self._queue(conn, record_reply(req))
            return True
        if op == "migrate" and self.inline_migrate:
            return self._migrate_on_loop(conn, creds, req, received)
        return False

    def _bad_frame(self, conn: _Conn, creds: Credentials | None, exc: ProtocolError) -> None:
        pid = creds.pid if creds else "?"
        log.warning("pid %s: bad frame (%s): %s", pid, exc.code, exc.message)
        reply = protocol.error_reply(exc.code, exc.message)
        if exc.code == "version" and isinstance(exc.peer_version, int):
            reply["v"] = exc.peer_version  # an older client reads the refusal in its own version
        conn.closing = exc.fatal or exc.code == "version"
        self._queue(conn, reply)

    def _queue(self, conn: _Conn, reply: dict[str, Any]) -> None:
        frame = protocol.encode(reply)
        if conn.out:
            conn.out += frame
            self._flush(conn)
            return
        try:  # nothing waits before it: straight to the kernel, the rest (if any) kept
            sent = conn.sock.send(frame, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.warning("could not send reply: %s", exc)
            conn.closing = True
            return
        if sent < len(frame):
            conn.out += frame[sent:]

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

    def _serve_off_loop(
        self, conn: _Conn, creds: Credentials | None, req: dict[str, Any], received: int
    ) -> None:
        keep = False  # whether the connection goes back to the loop
        try:
            peer, _ = self._identify(conn, creds)
            keep = self.requests.handle(conn.sock, peer, req, received)
        except Unidentified as exc:
            log.warning("cannot identify the sender: %s", exc)
            keep = try_send(conn.sock, protocol.error_reply("unknown_peer", str(exc)))
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
            log.exception("internal error while serving a client")
            try_send(conn.sock, protocol.error_reply("internal", "internal manager error"))
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

    def _migrate_on_loop(
        self, conn: _Conn, creds: Credentials | None, req: dict[str, Any], received: int
    ) -> bool:
        """Serve a migration on the loop; False if its requester cannot reach a safe point
        soon (stopped, traced, in uninterruptible sleep): then it is the pool's."""
        try:
            peer, state = self._identify(conn, creds)
        except Unidentified as exc:
            self._queue(conn, protocol.error_reply("unknown_peer", str(exc)))
            return True
        if state in _NOT_RUNNABLE:
            return False

        def send(reply: dict[str, Any]) -> bool:
            self._queue(conn, reply)
            return not conn.closing  # _flush marks a connection whose peer is gone

        def defer(after_reply: Callable[[], None]) -> None:
            self._hand_to_pool(conn, self._after_reply_off_loop, conn, after_reply)

        # No look-up of the mover's new pid here, ahead of its next message: the client was
        # just woken on this CPU (a sync wake-up) and would wait for it (seen in the VM).
        if not self.requests.migrate(send, conn.sock, peer, req, received, defer):
            conn.closing = True
        return True

    def _after_reply_off_loop(self, conn: _Conn, after_reply: Callable[[], None]) -> None:
        try:
            if conn.out:  # the reply must be out before the work that waits for the client
                conn.sock.settimeout(SEND_TIMEOUT)
                conn.sock.sendall(conn.out, socket.MSG_NOSIGNAL)
                conn.out.clear()
            after_reply()
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
            log.exception("internal error after a reply")
        finally:
            conn.out.clear()
            self._done.append((conn, False))
            self._wake(b"d")

    def _ping_on_loop(self, conn: _Conn, creds: Credentials | None) -> dict[str, Any]:
        try:
            return self.requests.ping(self._identify(conn, creds)[0])
        except Unidentified as exc:
            return protocol.error_reply("unknown_peer", str(exc))

    # -- who is asking -----------------------------------------------------------------------

    def _identify(self, conn: _Conn, creds: Credentials | None) -> tuple[Peer, str]:
        """The sender of one message, from its kernel credentials, and its state letter now.

        The connection's last sender is re-checked with one pread() (identity.KnownSender); a
        new pid, or a view that fails that check, is looked up afresh in /proc.
        """
        if creds is None or creds.pid <= 0:
            raise Unidentified("the message carried no sender credentials")
        known = conn.known
        state = known.state() if known is not None and known.pid == creds.pid else None
        if state is None:
            if known is not None:
                known.close()
                conn.known = None
            known, state = identity.open_known(creds.pid, self.registry)
            conn.known = known
        peer = known.peer
        if peer is None or peer.uid != creds.uid or peer.gid != creds.gid:
            peer = Peer(creds.pid, creds.uid, creds.gid, known.source, known.pid_in_ns)
            known.peer = peer
        return peer, state

    def _locate(self, pid: int) -> tuple[int, Namespace | None, int, str]:
        """The legacy path's look-up (nsexp.manager.identity.locate)."""
        return identity.locate(pid, self.registry)
