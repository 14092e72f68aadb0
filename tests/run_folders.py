"""A small run folder written by hand, shaped like the experiment's output (no run needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from nsexp import records

PAPER = [("NS2", 100, 3), ("NS3", 200, 5), ("NS4", 300, 6), ("NS5", 400, 7)]


def make_run(folder: Path, run_id: str = "r1", backend: str = "kmod", phases: bool = True) -> Path:
    """Write a small run folder shaped like the experiment's output."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    t = 1_000_000_000_000
    for hop, (ns, value, pid) in enumerate(PAPER):
        row = {
            "run_id": run_id,
            "backend": backend,
            "testbed": "vm",
            "kernel": "6.1.0-test-amd64",
            "hop": hop,
            "ns": ns,
            "value": value,
            "pid": pid,
            "global_pid": 500 + hop,
            "ppid": 1,
            "start_time": 4242,
            "status": "ok",
            "error": "",
        }
        for k, phase in enumerate(records.STAMPS):
            # The last hop has no migration after it: empty phases, as a backend would leave.
            row[phase] = t + 1000 * k * (hop + 1) if phases and hop < 3 else ""
        t += 10_000_000
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / records.HOPS_FILE, index=False)
    procs = []
    for snap, (wns, _, wpid) in enumerate(PAPER):
        for i, ns in enumerate(["NS2", "NS3", "NS4", "NS5"]):
            procs.append(
                {
                    "snapshot": snap,
                    "ns": ns,
                    "role": "init",
                    "pid": 1,
                    "global_pid": 100 + i,
                    "ppid": 0,
                }
            )
            for c in range(i + 2 - (1 if i == 0 else 0)):
                procs.append(
                    {
                        "snapshot": snap,
                        "ns": ns,
                        "role": "child",
                        "pid": 2 + c,
                        "global_pid": 200 + 10 * i + c,
                        "ppid": 1,
                    }
                )
        procs.append(
            {
                "snapshot": snap,
                "ns": wns,
                "role": "worker",
                "pid": wpid,
                "global_pid": 500 + snap,
                "ppid": 1,
            }
        )
    pd.DataFrame(procs).to_csv(folder / records.PROCESSES_FILE, index=False)
    meta = {
        "run_id": run_id,
        "backend": backend,
        "testbed": "vm",
        "kernel": "6.1.0-test-amd64",
        "code_version": "abc1234",
        "command": "nsexp run --backend kmod --testbed vm --out x",
        "expected": {"pids": [3, 5, 6, 7], "values": [100, 200, 300, 400]},
        "spec": {
            "route": ["NS2", "NS3", "NS4", "NS5"],
            "namespaces": ["NS2", "NS3", "NS4", "NS5"],
            "children": [2, 3, 4, 5],
            "increments": 100,
        },
    }
    (folder / records.RUN_FILE).write_text(json.dumps(meta))
    return folder


def make_failed_run(folder: Path) -> Path:
    """A criu run folder whose hop 1 failed as CRIU reports it (no PID, CRIU's words)."""
    make_run(folder, backend="criu")
    df = pd.read_csv(folder / records.HOPS_FILE, dtype={"error": object, "pid": object})
    df.loc[1, ["status", "error", "pid"]] = ["failed", "Can't fork for 3: File exists", None]
    df.to_csv(folder / records.HOPS_FILE, index=False)
    return folder
