"""The worker's hooks, as the benchmarks use them: before_hop, sink and the done file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from proc_helpers import no_children_left  # noqa: F401

from nsexp.backends import get_backend
from nsexp.experiment.worker import Worker, WorkerConfig
from nsexp.hierarchy import Hierarchy, NamespacePlan
from nsexp.records import append_jsonl, read_jsonl

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")


class Probe(Worker):
    """Logs each before_hop call with the pid making it; keeps records in its own file."""

    def before_hop(self, hop: int, target: str) -> None:
        append_jsonl(self.cfg.extra["log"], {"hop": hop, "target": target, "pid": os.getpid()})

    def sink(self, record: dict[str, Any]) -> None:
        append_jsonl(self.cfg.extra["sink"], {**record, "tag": self.cfg.extra["tag"]})


def config(tmp_path: Path, route: list[str], **kw: Any) -> WorkerConfig:
    return WorkerConfig(
        run_id="t",
        backend="restart",
        testbed="native",
        kernel=os.uname().release,
        socket_path=str(tmp_path / "m.sock"),
        out_dir=str(tmp_path),
        route=route,
        increments=1,
        echo=False,
        report=False,
        done_path=str(tmp_path / "done.json"),
        extra={"log": str(tmp_path / "log.jsonl"), "sink": str(tmp_path / "sink.jsonl"), "tag": 7},
        **kw,
    )


def wait_done(path: Path, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the worker wrote no done file"
        time.sleep(0.02)
    return json.loads(path.read_text())


@needs_root
def test_hooks_across_restart_successors(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["A", "B", "A", "B"])
    worker = Probe(cfg)
    plans = [NamespacePlan("A", 2, {1: worker.start}), NamespacePlan("B", 1)]
    tree = Hierarchy(plans, entries={"worker": worker.resume})
    with tree.serving(get_backend("restart"), cfg.socket_path):
        done = wait_done(Path(cfg.done_path))
    assert done == {"ok": True, "error": None}
    recs = read_jsonl(cfg.extra["sink"])
    assert [(r["hop"], r["ns"], r["value"], r["tag"]) for r in recs] == [
        (0, "A", 1, 7),
        (1, "B", 2, 7),
        (2, "A", 3, 7),
        (3, "B", 4, 7),
    ]
    assert [r["final"] for r in recs] == [False, False, False, True]
    befores = read_jsonl(cfg.extra["log"])
    # before_hop(k) runs in the process that stood at hop k - 1, right before its request.
    assert [(b["hop"], b["target"]) for b in befores] == [(1, "B"), (2, "A"), (3, "B")]
    assert [b["pid"] for b in befores] == [r["pid"] for r in recs[:-1]]
    assert not (tmp_path / "records.jsonl").exists()  # the sink replaced the default


@needs_root
def test_done_file_names_a_failed_hop(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["A", "B"])
    worker = Probe(cfg)
    plans = [NamespacePlan("A", 2, {1: worker.start}), NamespacePlan("B", 1)]
    tree = Hierarchy(plans, entries={"worker": worker.resume})
    with tree.serving(get_backend("restart"), cfg.socket_path, policy={("B", "A")}):
        done = wait_done(Path(cfg.done_path))
    assert done["ok"] is False and "hop 1 failed" in done["error"]
    recs = read_jsonl(cfg.extra["sink"])
    assert [r["status"] for r in recs] == ["ok", "failed"] and recs[-1]["final"]
