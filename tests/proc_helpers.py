"""Helpers shared by the tests that fork process trees natively (hierarchy, manager)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_children_left():
    """Fail a test that leaves a child process behind (autouse where it is imported)."""
    yield
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    pytest.fail(f"the test left a child process behind (waitpid gave {pid})")


def write_json(path: Path, obj) -> None:
    """Write atomically: the test polls for the file and must never read half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def child_exit(fn) -> None:
    """In a forked child: run ``fn``, then leave with 0 (or 1 if it raised), never returning."""
    code = 0
    try:
        fn()
    except BaseException:  # noqa: BLE001 - the parent sees the exit code
        code = 1
    os._exit(code)
