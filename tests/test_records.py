"""nsexp.records: the one schema, JSON lines, sidecars, code version and command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsexp import records

ROOT = Path(records.__file__).resolve().parent.parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.org")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    return tmp_path


def test_hop_columns_carry_every_stamp_in_order() -> None:
    """The drift this module ends: criu's phases sit between kernel_done and reply_sent."""
    cols = records.HOP_COLUMNS
    stamps = cols[cols.index("request_sent") : cols.index("resumed") + 1]
    assert stamps == records.STAMPS
    assert cols.index("dump_done") < cols.index("restore_done") < cols.index("status")


def test_code_version_clean_dirty_unknown(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    head = _git(repo, "rev-parse", "HEAD")
    assert records.code_version(repo) == head and records.is_clean(head)
    (repo / "a.txt").write_text("two\n")
    dirty = records.code_version(repo)
    assert dirty.startswith(head + "-dirty-") and not records.is_clean(dirty)
    assert records.code_version(repo) == dirty  # the same edit, the same version
    (repo / "a.txt").write_text("three\n")
    assert records.code_version(repo) != dirty
    assert records.code_version(tmp_path_factory.mktemp("nogit")) == "unknown"


def test_code_version_of_this_tree_is_a_commit() -> None:
    version = records.code_version()
    commit = version.split("-")[0]
    assert len(commit) == 40
    assert _git(Path(records.__file__).parent.parent, "cat-file", "-t", commit) == "commit"


def test_jsonl_roundtrip_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records.append_jsonl(path, {"hop": 0})
    records.append_jsonl(path, {"hop": 1, "x": None})
    with path.open("a") as f:
        f.write('{"hop": 2, "x"')
    assert records.read_jsonl(path) == [{"hop": 0}, {"hop": 1, "x": None}]
    assert records.read_jsonl(tmp_path / "none.jsonl") == []


def test_write_csv_exact_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    records.write_csv(path, ("a", "b"), [{"a": 1, "b": None, "c": 3}])
    assert path.read_text().splitlines() == ["a,b", "1,"]


def test_sidecar_and_clear_run_dir(tmp_path: Path) -> None:
    assert records.sidecar_path(tmp_path / "x_hops.csv").name == "x_hops.provenance.json"
    side = records.write_sidecar(tmp_path / "fig.pdf", {"code_version": "c"})
    assert side.name == "fig.provenance.json" and '"code_version": "c"' in side.read_text()
    run = tmp_path / "run"
    run.mkdir()
    (run / records.HOPS_FILE).write_text("old")
    (run / "keep.txt").write_text("mine")
    records.clear_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_command_line_of_a_module_run_with_m(tmp_path: Path) -> None:
    pkg = tmp_path / "tool"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("from nsexp import records\nprint(records.command_line())\n")
    env = {k: v for k, v in os.environ.items() if k != records.COMMAND_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    cmd = [sys.executable, "-m", "tool", "run", "--out", "a b"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "python3 -m tool run --out 'a b'"


def test_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(records.COMMAND_ENV, raising=False)
    assert records.command_line(["/x/.venv/bin/nsexp", "run", "--out", "a b"]) == (
        "nsexp run --out 'a b'"
    )
    cmd = records.command_line(notebook="01.ipynb", parameters={"backend": "restart", "n": 2})
    assert cmd == "papermill 01.ipynb OUTPUT.ipynb -p backend restart -p n 2"
    monkeypatch.setenv(records.COMMAND_ENV, "nsexp figures -n 01")
    assert records.command_line(notebook="01.ipynb") == "nsexp figures -n 01"


PUBLISHED = sorted(
    _git(ROOT, "ls-files", "--", "data/*.provenance.json", "figures/*.provenance.json").split()
)


@pytest.mark.parametrize("sidecar", PUBLISHED)
def test_published_provenance_names_a_commit(sidecar: str) -> None:
    """Every result in data/ and figures/ names the full hash of a commit in this history, for
    the code that made it and for the runs it read; never a package version."""
    import json

    prov = json.loads((ROOT / sidecar).read_text())
    versions = [prov.get("code_version"), *(prov.get("run_code_versions") or [])]
    for version in versions:
        commit = str(version).split("-")[0]
        assert len(commit) == 40, f"{sidecar}: code version {version!r} is not a commit hash"
        kind = subprocess.run(
            ["git", "-C", str(ROOT), "cat-file", "-t", commit], capture_output=True, text=True
        ).stdout.strip()
        assert kind == "commit", f"{sidecar}: {commit} is not a commit of this repository"
