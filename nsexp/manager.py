"""The migration manager: a Unix-socket service in the global PID namespace.

Each connection gets its own thread, so one client's migration never blocks another. The caller
is identified by SO_PEERCRED (a global pid, since the manager lives in the global namespace);
a pid written in a request is never used. Targets are resolved by name through a registry of
open namespace fds, and a policy of allowed (source, target) pairs is checked before the backend
is called. Bad input gets an error reply or is dropped, and is logged; serving goes on.
Standard library only: it runs inside the VM guest.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from nsexp import nsutil, protocol
from nsexp.backends import Backend, MigrationError, Namespace, Peer, get_backend
from nsexp.client import DEFAULT_SOCKET

log = logging.getLogger("nsexp.manager")

RecordHook = Callable[[Peer, dict[str, Any]], None]
FailureHook = Callable[[Peer, dict[str, Any], MigrationError], None]
_UCRED = struct.Struct("3i")
_umask_lock = threading.Lock()


class Manager:
    """Serve migration requests on ``socket_path`` with ``backend``.

    ``registry`` maps namespace names to open namespaces; ``policy`` is the set of allowed
    (source name, target name) pairs, or None to allow any pair of registered namespaces.
    ``on_record`` receives hop records sent by workers (the experiment snapshots the process
    tree there before the worker is answered); ``on_failure`` hears of failed migrations whose
    requester cannot be told any more (it died, or the restart successor could not be forked).
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
        self.on_record = on_record
        self.on_failure = on_failure
        self._slots = threading.BoundedSemaphore(max_clients)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: set[threading.Thread] = set()
        self._conns_lock = threading.Lock()
        self.served = 0  # requests read (under _conns_lock: threads increment it)

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the listening socket (removing a stale one left by a dead manager)."""
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
        sock.settimeout(0.2)  # the accept loop wakes up to notice stop()
        self._sock = sock
        log.info("listening on %s (backend %s)", self.socket_path, self.backend.name)

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
        """Accept connections until stop(); each one is handled in its own thread."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
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
            if not self._slots.acquire(blocking=False):
                log.warning("too many clients: refusing a connection")
                self._try_send(conn, protocol.error_reply("busy", "too many clients, retry"))
                conn.close()
                continue
            t = threading.Thread(target=self._run_conn, args=(conn,), name="nsexp-conn")
            t.daemon = True
            with self._conns_lock:
                self._conns.add(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wait briefly for running requests, remove the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._conns_lock:
            conns = list(self._conns)
        deadline = time.monotonic() + timeout
        for t in conns:
            t.join(max(0.0, deadline - time.monotonic()))
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

    # -- one connection --------------------------------------------------------------------

    def _run_conn(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except Exception:  # noqa: BLE001 - a bug in one request must not stop the service
            log.exception("internal error while serving a client")
            self._try_send(conn, protocol.error_reply("internal", "internal manager error"))
        finally:
            conn.close()
            self._slots.release()
            with self._conns_lock:
                self._conns.discard(threading.current_thread())

    @staticmethod
    def _try_send(conn: socket.socket, msg: dict[str, Any]) -> bool:
        try:
            conn.settimeout(5.0)
            protocol.send_msg(conn, msg)
            return True
        except OSError as exc:
            log.warning("could not send reply: %s", exc)
            return False

    def _peer(self, conn: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        info = nsutil.proc_info(pid)
        source = next((ns for ns in self.registry.values() if ns.inode == info.ns_inode), None)
        return Peer(pid=pid, uid=uid, gid=gid, source=source, pid_in_ns=info.pid)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.read_timeout)
        try:
            peer = self._peer(conn)
        except OSError as exc:
            log.warning("cannot identify the peer: %s", exc)
            return
        try:
            req = protocol.recv_msg(conn)
        except protocol.ConnectionClosed as exc:
            log.warning("pid %d: %s", peer.pid, exc)
            return
        except TimeoutError:
            log.warning("pid %d sent no request within %.1fs: dropped", peer.pid, self.read_timeout)
            self._try_send(conn, protocol.error_reply("timeout", "no request received in time"))
            return
        except protocol.ProtocolError as exc:
            log.warning("pid %d: bad frame (%s): %s", peer.pid, exc.code, exc.message)
            self._try_send(conn, protocol.error_reply(exc.code, exc.message))
            return
        except OSError as exc:
            log.warning("pid %d: read failed: %s", peer.pid, exc)
            return
        received = time.monotonic_ns()
        with self._conns_lock:
            self.served += 1
        op = req.get("op")
        if op == "ping":
            self._try_send(conn, self._ping(peer))
        elif op == "migrate":
            self._migrate(conn, peer, req, received)
        elif op == "record":
            self._record(conn, peer, req)
        else:
            log.warning("pid %d: unknown op %r", peer.pid, op)
            self._try_send(conn, protocol.error_reply("unknown_op", f"unknown op {op!r}"))

    def _ping(self, peer: Peer) -> dict[str, Any]:
        return {
            "ok": True,
            "global_pid": peer.pid,
            "pid": peer.pid_in_ns,
            "ns": peer.source.name if peer.source else None,
            "backend": self.backend.name,
        }

    def _record(self, conn: socket.socket, peer: Peer, req: dict[str, Any]) -> None:
        record = req.get("record")
        if not isinstance(record, dict):
            self._try_send(conn, protocol.error_reply("bad_request", "'record' must be an object"))
            return
        if self.on_record is not None:
            self.on_record(peer, record)
        self._try_send(conn, {"ok": True})

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

    def _migrate(self, conn: socket.socket, peer: Peer, req: dict[str, Any], received: int) -> None:
        checked = self._check_route(peer, req.get("target"))
        if isinstance(checked, dict):
            log.warning("pid %d: refused: %s", peer.pid, checked["error"]["message"])
            self._try_send(conn, checked)
            return
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
            return
        timings = {"manager_received": received, **result.pop("timings", {})}
        reply = {"ok": True, **result, "timings": timings}
        timings["reply_sent"] = time.monotonic_ns()
        if not self._try_send(conn, reply):
            self._failed(
                peer, req, MigrationError("client_gone", "requester vanished before the reply")
            )
            return
        try:
            self.backend.after_reply(conn, peer, target, req, reply)
        except MigrationError as exc:
            log.warning("pid %d -> %s failed after the reply: %s", peer.pid, target.name, exc)
            self._failed(peer, req, exc)

    def _failed(self, peer: Peer, req: dict[str, Any], exc: MigrationError) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(peer, req, exc)
            except Exception:  # noqa: BLE001
                log.exception("on_failure hook failed")


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
    p.add_argument("--read-timeout", type=float, default=10.0)
    p.add_argument("-v", "--verbose", action="store_true")


def command(args: argparse.Namespace) -> int:
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
    signal.signal(signal.SIGTERM, lambda *_: manager._stop.set())
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
    p.set_defaults(func=command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsexp-manager", description=__doc__)
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
