"""What a run writes and every reader reads: the one schema, shared by the guest and the host.

The columns of the hop and process tables, the files of a run folder, JSON lines, CSV, the
provenance sidecar of a published file, the code version and the command line a run records.
Standard library only: the guest imports it, and so do the host's tables and the benchmarks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: CLOCK_MONOTONIC stamps (ns) of one migration, in the order the pieces take them.
#: ``dump_done`` and ``restore_done`` are CRIU's phases; a backend leaves out what it lacks.
STAMPS: tuple[str, ...] = (
    "request_sent",
    "manager_received",
    "migrate_started",
    "kernel_queued",
    "kernel_switch_started",
    "kernel_done",
    "dump_done",
    "restore_done",
    "reply_sent",
    "resumed",
)

#: One row per stop of the worker (``hops.csv``); the stamps are those of the hop that led there.
HOP_COLUMNS: tuple[str, ...] = (
    "run_id",
    "backend",
    "testbed",
    "kernel",
    "hop",
    "ns",
    "value",
    "pid",
    "global_pid",
    "ppid",
    "start_time",
    *STAMPS,
    "status",
    "error",
)

#: One row per live process of the tree, before the first hop and after each (``processes.csv``).
PROCESS_COLUMNS: tuple[str, ...] = (
    "snapshot",
    "ns",
    "role",
    "pid",
    "global_pid",
    "ppid",
    "state",
    "start_time",
)

RECORDS_FILE = "records.jsonl"  # the worker's hop records as it writes them
HOPS_FILE = "hops.csv"
PROCESSES_FILE = "processes.csv"
RUN_FILE = "run.json"  # the run's metadata, provenance included
DMESG_FILE = "dmesg.txt"  # the guest's kernel log of a VM run
RUN_FILES = (RECORDS_FILE, HOPS_FILE, PROCESSES_FILE, RUN_FILE, DMESG_FILE)

SIDECAR_SUFFIX = ".provenance.json"

#: Set by ``nsexp figures`` (and by the host for the guest): the command a person ran.
COMMAND_ENV = "NSEXP_COMMAND"

UNKNOWN = "unknown"


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line: one write on an O_APPEND fd, opened and closed each time.

    Nothing stays open between records, so a process that records can be dumped by CRIU, and
    concurrent writers never interleave inside a line.
    """
    line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every JSON line of ``path`` (none if it does not exist; a torn last line is skipped)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a writer killed mid-line
    return rows


def write_csv(
    path: str | os.PathLike[str], columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Write ``rows`` with exactly ``columns`` (None becomes an empty cell, extra keys dropped)."""
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})


def clear_run_dir(out: str | os.PathLike[str]) -> Path:
    """Create the run folder ``out`` and remove what an earlier run left in it."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    return folder


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The provenance sidecar of a published file: ``<stem>.provenance.json`` beside it."""
    p = Path(path)
    return p.with_name(p.name.split(".")[0] + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike[str], info: Mapping[str, Any]) -> Path:
    """Write the provenance sidecar of ``path``; returns the sidecar's path."""
    side = sidecar_path(path)
    side.write_text(json.dumps(dict(info), indent=2, sort_keys=True, default=str) + "\n")
    return side


def _git(root: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, timeout=30, check=True
    ).stdout


def code_version(root: str | os.PathLike[str] | None = None) -> str:
    """The code of the source tree: its full commit hash, or ``"unknown"``.

    A tree with uncommitted changes to tracked files gives ``<hash>-dirty-<diff>``, where
    ``<diff>`` is the first 16 hex digits of the SHA-256 of ``git diff HEAD`` (the same edits give
    the same version). Never the package's version: that does not identify the code. Take it on
    the host before a run starts and hand it to the guest, where git may not be available.
    """
    tree = Path(root) if root else Path(__file__).resolve().parent.parent
    try:
        commit = _git(tree, "rev-parse", "--verify", "HEAD").decode().strip()
        diff = _git(tree, "diff", "HEAD", "--no-ext-diff", "--binary")
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    if len(commit) != 40:
        return UNKNOWN
    if diff:
        return f"{commit}-dirty-{hashlib.sha256(diff).hexdigest()[:16]}"
    return commit


def is_clean(version: str) -> bool:
    """True if ``version`` (from :func:`code_version`) names a commit with no local edits."""
    return len(version) == 40 and all(c in "0123456789abcdef" for c in version)


def command_line(
    argv: Sequence[str] | None = None,
    notebook: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> str:
    """The command a person ran, for provenance.

    ``NSEXP_COMMAND`` wins when set (``nsexp figures`` sets it for the notebooks it executes).
    In a notebook ``sys.argv`` is only the Jupyter kernel's launcher, so a notebook passes its
    own name and parameters, recorded as the papermill command that reproduces the run.
    Otherwise ``argv`` (default ``sys.argv``, ``python3 -m X ...`` for a module run with -m)
    with the program's base name.
    """
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    if notebook is not None:
        words = ["papermill", str(notebook), "OUTPUT.ipynb"]
        for key, value in (parameters or {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            words += ["-p", str(key), text]
        return shlex.join(words)
    args = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if argv is None and spec is not None and spec.name:  # python -m X: say so
        args[:1] = ["python3", "-m", spec.name.removesuffix(".__main__")]
    elif args and args[0]:
        args[0] = Path(args[0]).name
    return shlex.join(args) if args else UNKNOWN
