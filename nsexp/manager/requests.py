"""What one request does, wherever it is served: the route check, the backend call, the reply
and the hooks. The event loop (nsexp.manager.service), its pool threads and the legacy
connection threads (nsexp.manager.legacy) all end here.

Runs in the global PID namespace (on the host, or inside the VM guest); standard library only.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from nsexp import protocol
from nsexp.backends import Backend, MigrationError, Namespace, Peer

log = logging.getLogger("nsexp.manager")

RecordHook = Callable[[Peer, dict[str, Any]], None]
FailureHook = Callable[[Peer, dict[str, Any], MigrationError], None]
SEND_TIMEOUT = 5.0


def try_send(conn: socket.socket, msg: dict[str, Any]) -> bool:
    """Send ``msg`` on a blocking socket; False (logged) if the peer is gone or stuck."""
    try:
        conn.settimeout(SEND_TIMEOUT)
        conn.sendall(protocol.encode(msg), socket.MSG_NOSIGNAL)
        return True
    except OSError as exc:
        log.warning("could not send reply: %s", exc)
        return False


def record_reply(req: dict[str, Any]) -> dict[str, Any]:
    """The reply to a hop record: ok, or why the record is malformed."""
    if not isinstance(req.get("record"), dict):
        return protocol.error_reply("bad_request", "'record' must be an object")
    return {"ok": True}


class Requests:
    """Serve requests with ``backend`` over the namespaces of ``registry``, within ``policy``
    (allowed (source, target) pairs; None: any); the hooks as nsexp.manager.Manager documents."""

    def __init__(
        self,
        backend: Backend,
        registry: dict[str, Namespace],
        policy: Iterable[tuple[str, str]] | None,
        on_record: RecordHook | None,
        on_failure: FailureHook | None,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.policy = None if policy is None else {tuple(p) for p in policy}
        self.on_record = on_record
        self.on_failure = on_failure

    def handle(self, conn: socket.socket, peer: Peer, req: dict[str, Any], received: int) -> bool:
        """Serve one request on a blocking socket; True if the connection stays usable."""
        op = req.get("op")
        if op == "ping":
            return try_send(conn, self.ping(peer))
        if op == "migrate":
            return self.migrate(partial(try_send, conn), conn, peer, req, received)
        if op == "record":
            return self.record(conn, peer, req)
        log.warning("pid %d: unknown op %r", peer.pid, op)
        return try_send(conn, protocol.error_reply("unknown_op", f"unknown op {op!r}"))

    def ping(self, peer: Peer) -> dict[str, Any]:
        return {
            "v": protocol.VERSION,
            "ok": True,
            "global_pid": peer.pid,
            "pid": peer.pid_in_ns,
            "ns": peer.source.name if peer.source else None,
            "backend": self.backend.name,
        }

    def record(self, conn: socket.socket, peer: Peer, req: dict[str, Any]) -> bool:
        reply = record_reply(req)
        if reply["ok"] and self.on_record is not None:
            self.on_record(peer, req["record"])
        return try_send(conn, reply)

    def check_route(self, peer: Peer, target_name: Any) -> Namespace | dict[str, Any]:
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

    def migrate(
        self,
        send: Callable[[dict[str, Any]], bool],
        conn: socket.socket,
        peer: Peer,
        req: dict[str, Any],
        received: int,
        defer: Callable[[Callable[[], None]], None] | None = None,
    ) -> bool:
        """Check, migrate, answer through ``send``; True if the connection stays usable.

        ``defer``: where a handed-over process's after_reply work goes (else it runs here).
        """
        checked = self.check_route(peer, req.get("target"))
        if isinstance(checked, dict):
            log.warning("pid %d: refused: %s", peer.pid, checked["error"]["message"])
            return send(checked)
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
            delivered = not exc.client_gone and send(reply)
            if not delivered:
                self.failed(peer, req, exc)
            return delivered
        timings = {"manager_received": received, **result.pop("timings", {})}
        reply = {"ok": True, **result, "timings": timings}
        # The process is handed over (restart exits, CRIU dumps it): the client closes.
        handover = "action" in result
        if handover:
            reply["close"] = True
        timings["reply_sent"] = time.monotonic_ns()
        if not send(reply):
            self.failed(
                peer, req, MigrationError("client_gone", "requester vanished before the reply")
            )
            return False

        def after_reply() -> None:
            try:
                self.backend.after_reply(conn, peer, target, req, reply)
            except MigrationError as exc:
                log.warning("pid %d -> %s failed after the reply: %s", peer.pid, target.name, exc)
                self.failed(peer, req, exc)

        if handover and defer is not None:
            defer(after_reply)
            return True  # the pool thread ends the connection when it is done
        after_reply()
        return not handover

    def failed(self, peer: Peer, req: dict[str, Any], exc: MigrationError) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(peer, req, exc)
            except Exception:  # noqa: BLE001
                log.exception("on_failure hook failed")
