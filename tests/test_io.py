"""Round trips of nsexp.io on small hand-made run folders (no experiment needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from nsexp import io as nio

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
        for k, phase in enumerate(nio.PHASE_COLUMNS):
            # The last hop has no migration after it: empty phases, as a backend would leave.
            row[phase] = t + 1000 * k * (hop + 1) if phases and hop < 3 else ""
        t += 10_000_000
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / nio.HOPS_FILE, index=False)
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
    pd.DataFrame(procs).to_csv(folder / nio.PROCESSES_FILE, index=False)
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
    (folder / nio.RUN_FILE).write_text(json.dumps(meta))
    return folder


def test_read_run_columns_and_meta(tmp_path: Path) -> None:
    run = nio.read_run(make_run(tmp_path / "r1"))
    assert run.run_id == "r1"
    assert list(run.hops.columns[: len(nio.HOP_COLUMNS)]) == list(nio.HOP_COLUMNS)
    assert set(nio.PROCESS_COLUMNS) <= set(run.processes.columns)
    assert run.hops.attrs["run"]["code_version"] == "abc1234"
    assert run.hops["value"].tolist() == [100, 200, 300, 400]
    # Nanosecond timestamps stay exact integers; missing phases are NA, not NaN floats.
    assert str(run.hops["request_sent"].dtype) == "Int64"
    assert run.hops["request_sent"].iloc[3] is pd.NA
    assert run.hops["error"].isna().all()


def test_read_run_fills_identity_from_meta(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "r2", run_id="r2")
    df = pd.read_csv(folder / nio.HOPS_FILE).drop(columns=["backend", "kernel"])
    df.to_csv(folder / nio.HOPS_FILE, index=False)
    run = nio.read_run(folder)
    assert set(run.hops["backend"]) == {"kmod"}
    assert set(run.hops["kernel"]) == {"6.1.0-test-amd64"}


def test_read_run_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        nio.read_run(tmp_path)


def test_concat_and_hop_table(tmp_path: Path) -> None:
    dirs = [make_run(tmp_path / f"r{i}", run_id=f"r{i}") for i in range(3)]
    assert nio.find_run_dirs(tmp_path) == dirs
    runs = nio.read_runs(dirs)
    assert runs.run_ids == ["r0", "r1", "r2"]
    assert len(runs.hops) == 12 and set(runs.hops["repeat"]) == {0, 1, 2}
    assert len(runs.runs) == 3
    assert {"repeat", "run_id", "backend", "kernel", "code_version"} <= set(runs.runs.columns)
    # Nested spec values become flat columns holding JSON text.
    assert json.loads(runs.runs["spec.children"].iloc[0]) == [2, 3, 4, 5]
    table = nio.hop_table(runs.hops)
    assert list(table.columns) == list(nio.HOP_TABLE_COLUMNS)
    assert [tuple(r) for r in table[["ns", "value", "pid"]].itertuples(index=False)] == PAPER
    assert table["runs"].tolist() == [3] * 4 and table["agree"].tolist() == [3] * 4


def test_hop_table_skips_failed_hops(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "c", backend="criu")
    df = pd.read_csv(folder / nio.HOPS_FILE, dtype={"error": object, "pid": object})
    df.loc[1, ["status", "error", "pid"]] = ["failed", "Can't fork for 3: File exists", None]
    df.to_csv(folder / nio.HOPS_FILE, index=False)
    table = nio.hop_table(nio.read_run(folder).hops)
    assert table["hop"].tolist() == [0, 1, 2, 3]
    failed = table.iloc[1]
    assert failed["ns"] == "NS3" and failed["runs"] == 0 and failed["failed"] == 1
    assert pd.isna(failed["value"]) and pd.isna(failed["pid"])
    assert failed["error"] == "Can't fork for 3: File exists"
    assert table["failed"].tolist() == [0, 1, 0, 0]


def test_phase_durations(tmp_path: Path) -> None:
    run = nio.read_run(make_run(tmp_path / "r"))
    d = nio.phase_durations(run.hops)
    assert set(d["hop"]) == {0, 1, 2}  # hop 3 has no phases
    assert len(d) == 3 * (len(nio.PHASE_COLUMNS) - 1)
    assert (d["ms"] > 0).all()
    empty = nio.phase_durations(nio.read_run(make_run(tmp_path / "n", phases=False)).hops)
    assert empty.empty


@pytest.mark.parametrize("fmt", ["csv", "parquet", None])
def test_write_read_table_round_trip(tmp_path: Path, fmt: str | None) -> None:
    runs = nio.read_runs([make_run(tmp_path / "r0", "r0"), make_run(tmp_path / "r1", "r1")])
    prov = nio.provenance(runs, command="nsexp figures")
    path = nio.write_table(runs.hops, tmp_path / "data", "hops", prov, fmt=fmt)
    assert path.suffix == ("." + (fmt or "csv")) and path.stat().st_size > 0
    side = nio.provenance_path(path)
    assert side.name == "hops.provenance.json"
    back, p = nio.read_table(path)
    assert p["command"] == "nsexp figures"
    assert p["backend"] == "kmod" and p["testbed"] == "vm" and p["kernel"] == "6.1.0-test-amd64"
    assert p["code_version"] == "abc1234" and p["run_ids"] == ["r0", "r1"]
    assert p["rows"] == 8 and p["format"] == path.suffix[1:] and len(p["sha256"]) == 64
    assert "date" in p
    pd.testing.assert_frame_equal(
        back[list(nio.HOP_COLUMNS)].reset_index(drop=True),
        runs.hops[list(nio.HOP_COLUMNS)].reset_index(drop=True),
        check_dtype=False,
    )


def test_write_table_large_goes_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nio, "CSV_MAX_ROWS", 2)
    path = nio.write_table(pd.DataFrame({"a": range(5)}), tmp_path, "big")
    assert path.suffix == ".parquet"


def test_write_runs(tmp_path: Path) -> None:
    runs = nio.read_runs([make_run(tmp_path / "r0", "r0")])
    paths = nio.write_runs(runs, tmp_path / "data", "chained", command="test")
    assert set(paths) == {"hops", "hop_table", "processes", "runs", "expected"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
        assert nio.provenance_path(p).exists()
    assert list(pd.read_csv(paths["hop_table"]).columns) == list(nio.HOP_TABLE_COLUMNS)


def test_provenance_mixed_backends(tmp_path: Path) -> None:
    runs = nio.read_runs(
        [make_run(tmp_path / "a", "a", "kmod"), make_run(tmp_path / "b", "b", "restart")]
    )
    assert nio.provenance(runs)["backend"] == ["kmod", "restart"]


def test_compare_expected(tmp_path: Path) -> None:
    runs = nio.read_runs([make_run(tmp_path / "r0", "r0")])
    cmp = nio.compare_expected(runs)
    assert cmp["match"].tolist() == [True] * 4
    assert cmp["expected_pid"].tolist() == [3, 5, 6, 7]
    folder = make_run(tmp_path / "bad", "bad")
    df = pd.read_csv(folder / nio.HOPS_FILE)
    df.loc[2, "pid"] = 9
    df.to_csv(folder / nio.HOPS_FILE, index=False)
    assert nio.compare_expected(nio.read_runs([folder]))["match"].tolist() == [
        True,
        True,
        False,
        True,
    ]
