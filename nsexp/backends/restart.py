"""restart backend: the user-space baseline (state forwarding through a new process).

The worker sends its state and, once the manager confirms, exits. The manager then waits until
the old process has gone and asks the target namespace's init (over its control channel) to fork
a successor that resumes from the state. Same values and, with the same layout, the same PIDs,
but a different process: new start time, new memory.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from nsexp import protocol
from nsexp.backends import Backend, MigrationError, Namespace, Peer, wait_client_gone
from nsexp.backends import WorkerSide as _WorkerSide

_ids = itertools.count(1)


class ManagerSide(Backend):
    name = "restart"

    def __init__(self, exit_timeout: float = 10.0, spawn_timeout: float = 10.0) -> None:
        self.exit_timeout = exit_timeout
        self.spawn_timeout = spawn_timeout

    def migrate(self, peer: Peer, target: Namespace, request: dict[str, Any]) -> dict[str, Any]:
        if target.control is None:
            raise MigrationError("no_spawner", f"namespace {target.name} has no spawner channel")
        if not isinstance(request.get("state"), dict) or not isinstance(request.get("entry"), str):
            raise MigrationError("bad_request", "restart needs 'entry' (str) and 'state' (object)")
        return {"action": "exit", "timings": {}}

    def after_reply(self, conn, peer, target, request, reply) -> None:  # type: ignore[override]
        # The successor starts only after the old process has left: never two live copies.
        if not wait_client_gone(conn, self.exit_timeout):
            raise MigrationError(
                "client_stayed", f"pid {peer.pid} did not exit after the handover", client_gone=True
            )
        timings = dict(reply.get("timings") or {})
        timings["request_sent"] = request.get("request_sent")
        timings["migrate_started"] = time.monotonic_ns()
        pid = self.spawn(target, request["entry"], {"state": request["state"], "timings": timings})
        reply["successor_pid"] = pid

    def spawn(self, target: Namespace, entry: str, payload: dict[str, Any]) -> int:
        """Ask ``target``'s init to fork ``entry`` with ``payload``; returns the new pid there."""
        assert target.control is not None
        msg_id = next(_ids)
        with target.lock:
            try:
                target.control.settimeout(self.spawn_timeout)
                protocol.send_msg(
                    target.control,
                    {"op": "spawn", "id": msg_id, "entry": entry, "payload": payload},
                )
                while True:
                    answer = protocol.recv_msg(target.control)
                    # A reply left over from a manager killed mid-exchange has another id.
                    if answer.get("id") == msg_id:
                        break
            except (OSError, protocol.ProtocolError) as exc:
                raise MigrationError(
                    "spawner_failed", f"spawner of {target.name}: {exc}", client_gone=True
                ) from None
        if not answer.get("ok"):
            raise MigrationError(
                "spawner_failed",
                f"spawner of {target.name}: {answer.get('error')}",
                client_gone=True,
            )
        return int(answer["pid"])


class WorkerSide(_WorkerSide):
    """Send the state along; exit once the manager confirms."""

    name = "restart"

    def __init__(self, entry: str = "worker") -> None:
        self.entry = entry

    def request_fields(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"entry": self.entry, "state": state}

    def after_reply(self, reply: dict[str, Any]) -> dict[str, Any] | None:
        return None
