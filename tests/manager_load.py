"""Many clients at once: a test harness for the manager under load, run inside the guest.

``python3 tests/manager_load.py --backend kmod --clients 64 --out DIR``: ``clients`` processes of
namespace A ask at the same moment to move to namespace B. Each writes what it became (pid,
namespace, start time) to ``DIR/landed/``; the summary goes to ``DIR/concurrency.json`` and is
printed. With kmod the same processes continue in B (same start time); with restart successors
are forked there. B's next free PIDs are 2..clients+1. Standard library only (plus nsexp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script in the guest

from nsexp import nsutil  # noqa: E402
from nsexp.backends import BACKENDS, MigrationError, get_backend, worker_side  # noqa: E402
from nsexp.client import Client, ManagerError  # noqa: E402
from nsexp.experiment.guest import new_run_id, socket_dir  # noqa: E402
from nsexp.hierarchy import Hierarchy, NamespacePlan  # noqa: E402

SUMMARY_FILE = "concurrency.json"


def _land(landed: Path, state: dict[str, Any], error: str | None = None) -> None:
    """Write what this process is now, after its hop (or why there was none)."""
    me = nsutil.self_info()
    rec = {**state, "pid": os.getpid(), "global_pid": me.global_pid, "inode": me.ns_inode}
    rec.update(start_time_after=me.start_time, error=error)
    tmp = landed / f"{state['i']}.tmp"
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, landed / f"{state['i']}.json")


def concurrency(backend_name: str, clients: int, out: Path, timeout: float = 120.0) -> dict:
    """Run the load once; returns (and writes to ``out/concurrency.json``) the summary."""
    backend = get_backend(backend_name)
    backend.check()
    out = Path(out).resolve()
    landed = out / "landed"
    landed.mkdir(parents=True, exist_ok=True)
    for old in landed.glob("*.json"):
        old.unlink()
    socket_path = os.path.join(socket_dir(), f"{new_run_id(backend_name)}-conc.sock")
    opts = {"entry": "land"} if backend_name == "restart" else {}
    side = worker_side(backend_name, **opts)

    def client(i: int) -> Callable[[], None]:
        def main() -> None:
            side.prepare()
            state = {"i": i, "pid_before": os.getpid()}
            state["start_time_before"] = nsutil.self_info().start_time
            try:
                reply = Client(socket_path).migrate(
                    "B", request_sent=time.monotonic_ns(), **side.request_fields(state)
                )
                if side.after_reply(reply) is None:
                    return  # restart: the successor reports
            except (ManagerError, MigrationError) as exc:
                _land(landed, state, str(exc))
                return
            _land(landed, state)

        return main

    tree = Hierarchy(
        [
            NamespacePlan("A", clients, {i: client(i) for i in range(clients)}),
            NamespacePlan("B", 0),
        ],
        entries={"land": lambda payload: _land(landed, payload["state"])},
    )
    started = time.monotonic()
    with tree.serving(backend, socket_path, {("A", "B")}):
        deadline = time.monotonic() + timeout
        while len(list(landed.glob("*.json"))) < clients and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        inode_b = tree.namespaces["B"].inode
    rows = [json.loads(p.read_text()) for p in sorted(landed.glob("*.json"))]
    ok_rows = [r for r in rows if not r.get("error")]
    summary = {
        "backend": backend_name,
        "clients": clients,
        "landed": len(ok_rows),
        "errors": [r["error"] for r in rows if r.get("error")],
        "pids": sorted(r["pid"] for r in ok_rows),
        "all_in_target": all(r["inode"] == inode_b for r in ok_rows),
        "same_process": all(r["start_time_before"] == r["start_time_after"] for r in ok_rows),
        "elapsed_s": round(elapsed, 3),
        "kernel": os.uname().release,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 tests/manager_load.py")
    parser.add_argument("--backend", choices=BACKENDS, default="kmod")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    summary = concurrency(args.backend, args.clients, args.out, timeout=args.timeout)
    print(json.dumps(summary))
    return 0 if summary["landed"] == args.clients and summary["all_in_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
