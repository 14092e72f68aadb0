"""Round trips of nsexp.experiment.tables and nsexp.publish on small hand-made run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from run_folders import PAPER, make_failed_run, make_run  # noqa: E402

from nsexp import publish, records
from nsexp.experiment import tables as nio


def test_read_run_columns_and_meta(tmp_path: Path) -> None:
    run = nio.read_run(make_run(tmp_path / "r1"))
    assert run.run_id == "r1"
    assert list(run.hops.columns[: len(records.HOP_COLUMNS)]) == list(records.HOP_COLUMNS)
    assert set(records.PROCESS_COLUMNS) <= set(run.processes.columns)
    assert run.hops.attrs["run"]["code_version"] == "abc1234"
    assert run.hops["value"].tolist() == [100, 200, 300, 400]
    # Nanosecond timestamps stay exact integers; missing phases are NA, not NaN floats.
    assert str(run.hops["request_sent"].dtype) == "Int64"
    assert run.hops["request_sent"].iloc[3] is pd.NA
    assert run.hops["error"].isna().all()


def test_read_run_fills_identity_from_meta(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "r2", run_id="r2")
    df = pd.read_csv(folder / records.HOPS_FILE).drop(columns=["backend", "kernel"])
    df.to_csv(folder / records.HOPS_FILE, index=False)
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
    folder = make_failed_run(tmp_path / "c")
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
    assert len(d) == 3 * (len(records.STAMPS) - 1)
    assert (d["ms"] > 0).all()
    empty = nio.phase_durations(nio.read_run(make_run(tmp_path / "n", phases=False)).hops)
    assert empty.empty


@pytest.mark.parametrize("fmt", ["csv", "parquet", None])
def test_write_read_table_round_trip(tmp_path: Path, fmt: str | None) -> None:
    runs = nio.read_runs([make_run(tmp_path / "r0", "r0"), make_run(tmp_path / "r1", "r1")])
    before = records.code_version()
    prov = publish.provenance(runs, command="nsexp figures")
    after = records.code_version()  # (a tree shared with other writers may move in between)
    path = publish.write_table(runs.hops, tmp_path / "data", "hops", prov, fmt=fmt)
    assert path.suffix == ("." + (fmt or "csv")) and path.stat().st_size > 0
    side = records.sidecar_path(path)
    assert side.name == "hops.provenance.json"
    back, p = publish.read_table(path)
    assert p["command"] == "nsexp figures"
    assert p["backend"] == "kmod" and p["testbed"] == "vm" and p["kernel"] == "6.1.0-test-amd64"
    # The analysis code's own version; the runs' versions and ids beside it.
    assert p["code_version"] in (before, after) and p["code_version"] != "abc1234"
    assert p["run_code_versions"] == ["abc1234"] and p["run_ids"] == ["r0", "r1"]
    assert p["rows"] == 8 and p["format"] == path.suffix[1:] and len(p["sha256"]) == 64
    assert "date" in p
    pd.testing.assert_frame_equal(
        back[list(records.HOP_COLUMNS)].reset_index(drop=True),
        runs.hops[list(records.HOP_COLUMNS)].reset_index(drop=True),
        check_dtype=False,
    )


def test_write_table_large_goes_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "CSV_MAX_ROWS", 2)
    path = publish.write_table(pd.DataFrame({"a": range(5)}), tmp_path, "big")
    assert path.suffix == ".parquet"


def test_write_runs(tmp_path: Path) -> None:
    runs = nio.read_runs([make_run(tmp_path / "r0", "r0")])
    paths = nio.write_runs(runs, tmp_path / "data", "chained", command="test")
    assert publish.read_table(paths["hops"])[1]["command"] == "test"
    assert set(paths) == {"hops", "hop_table", "processes", "runs", "expected"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
        assert records.sidecar_path(p).exists()
    assert list(pd.read_csv(paths["hop_table"]).columns) == list(nio.HOP_TABLE_COLUMNS)


def test_published_results_of_another_kind_are_kept(tmp_path: Path) -> None:
    """A restart run does not replace the tables of the kmod runs unless told to; nothing of
    the refused batch is written; the same backend and testbed may replace its own."""
    kmod = nio.read_runs([make_run(tmp_path / "k", "k", "kmod")])
    restart = nio.read_runs([make_run(tmp_path / "r", "r", "restart")])
    data = tmp_path / "data"
    paths = nio.write_runs(kmod, data, "chained", command="first")
    before = {k: p.read_bytes() for k, p in paths.items()}
    with pytest.raises(publish.PublishError, match="backend=kmod.*replace=True"):
        nio.write_runs(restart, data, "chained")
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    nio.write_runs(kmod, data, "chained", command="again")  # same kind: allowed
    assert publish.read_table(paths["hops"])[1]["command"] == "again"
    nio.write_runs(restart, data, "chained", replace=True)  # the explicit choice
    assert publish.read_table(paths["hops"])[1]["backend"] == "restart"


def test_provenance_mixed_backends(tmp_path: Path) -> None:
    runs = nio.read_runs(
        [make_run(tmp_path / "a", "a", "kmod"), make_run(tmp_path / "b", "b", "restart")]
    )
    assert publish.provenance(runs)["backend"] == ["kmod", "restart"]


def test_compare_expected(tmp_path: Path) -> None:
    runs = nio.read_runs([make_run(tmp_path / "r0", "r0")])
    cmp = nio.compare_expected(runs)
    assert cmp["match"].tolist() == [True] * 4
    assert cmp["expected_pid"].tolist() == [3, 5, 6, 7]
    folder = make_run(tmp_path / "bad", "bad")
    df = pd.read_csv(folder / records.HOPS_FILE)
    df.loc[2, "pid"] = 9
    df.to_csv(folder / records.HOPS_FILE, index=False)
    assert nio.compare_expected(nio.read_runs([folder]))["match"].tolist() == [
        True,
        True,
        False,
        True,
    ]
