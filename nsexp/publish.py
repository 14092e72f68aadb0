"""Write results with their provenance: tables (CSV or Parquet) and figures (PDF and PNG).

Every published file gets a sidecar ``<stem>.provenance.json`` (see :mod:`nsexp.records`) that
says which code made it (the analysis code's version, taken here), from which runs (their ids and
their own code versions), with which command, backend, testbed and kernel. A file whose sidecar
names another backend or testbed is not replaced unless the caller says so (``replace=True``):
the committed results of the module in the VM cannot be overwritten by a baseline run by accident.

Host-side only (pandas; matplotlib for figures, imported where a figure is saved).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from nsexp import records
from nsexp.errors import NsexpError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Above this many rows a table is written as Parquet rather than CSV.
CSV_MAX_ROWS = 10_000

#: Sidecar keys that must agree before a published file may be replaced without ``replace``.
GUARDED_KEYS = ("backend", "testbed")


class PublishError(NsexpError):
    """A result would replace one of another kind (backend or testbed) without being asked to."""


def meta_value(meta: Mapping[str, Any], key: str) -> Any:
    """A run's metadata value by name, tolerating the few spellings a run.json may use."""
    aliases = {
        "kernel": ("kernel", "kernel_release", "release"),
        "code_version": ("code_version", "version", "git"),
    }
    for k in aliases.get(key, (key,)):
        if meta.get(k) not in (None, ""):
            return meta[k]
    return None


def provenance(
    source: Any = None,
    command: str | Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Provenance of a derived result: the analysis code, the command, and the runs it read.

    ``source`` is a list of run metadata (run.json contents) or an object with a ``meta`` list
    (``nsexp.experiment.tables.Runs``). ``code_version`` is this code's version now (the
    analysis), ``run_code_versions`` those the runs recorded; values that differ between runs
    are given as lists. ``extra`` (e.g. the notebook and its parameters) is added as is.
    """
    metas = list(getattr(source, "meta", source) or [])

    def collect(key: str) -> Any:
        vals = []
        for m in metas:
            v = meta_value(m, key)
            if v is not None and v not in vals:
                vals.append(v)
        return vals[0] if len(vals) == 1 else (vals or None)

    if command is None:
        command = records.command_line()
    if not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    versions = list(dict.fromkeys(str(meta_value(m, "code_version")) for m in metas))
    prov: dict[str, Any] = {
        "command": command,
        "backend": collect("backend"),
        "testbed": collect("testbed"),
        "kernel": collect("kernel"),
        "accel": collect("accel"),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "code_version": records.code_version(),
        "run_ids": [str(m.get("run_id")) for m in metas if m.get("run_id") is not None],
        "run_code_versions": versions,
    }
    prov.update(extra)
    return prov


def check_replace(path: str | os.PathLike[str], prov: Mapping[str, Any], replace: bool) -> None:
    """Refuse to replace ``path`` if its sidecar records another backend or testbed."""
    side = records.sidecar_path(path)
    if replace or not side.exists():
        return
    try:
        old = json.loads(side.read_text())
    except ValueError:
        return  # an unreadable sidecar protects nothing
    differ = [k for k in GUARDED_KEYS if old.get(k) is not None and old.get(k) != prov.get(k)]
    if differ:
        was = ", ".join(f"{k}={old.get(k)}" for k in differ)
        new = ", ".join(f"{k}={prov.get(k)}" for k in differ)
        raise PublishError(
            f"{path} holds the results of {was}; this run ({new}) would replace them. "
            "Write elsewhere (a notebook's default, publish=False, writes under build/) "
            "or say so explicitly (replace=True; for a notebook -p replace true)."
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_table(
    df: pd.DataFrame,
    directory: str | os.PathLike[str],
    name: str,
    prov: Mapping[str, Any] | None = None,
    fmt: str | None = None,
    replace: bool = False,
) -> Path:
    """Write ``df`` as ``directory/name.csv`` (or ``.parquet``) with its provenance sidecar.

    ``fmt`` is ``"csv"``, ``"parquet"`` or None to choose by size (CSV up to
    :data:`CSV_MAX_ROWS` rows). See :func:`check_replace` for ``replace``. Returns the path.
    """
    if fmt is None:
        fmt = "csv" if len(df) <= CSV_MAX_ROWS else "parquet"
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"unknown table format {fmt!r}")
    out_dir = Path(directory)
    path = out_dir / f"{name}.{fmt}"
    side = dict(prov or provenance())
    check_replace(path, side, replace)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Write then rename, so that a reader never sees half a table.
    if fmt == "csv":
        df.to_csv(tmp, index=False)
    else:
        df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    side.update(
        file=path.name,
        format=fmt,
        rows=int(len(df)),
        columns=[str(c) for c in df.columns],
        sha256=_sha256(path),
    )
    records.write_sidecar(path, side)
    return path


def read_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV as written here: empty cells are missing, any other text (even "NA") is kept."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def read_table(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`write_table` with its provenance (empty if none).

    Columns whose values are all integers (or all empty) become nullable integers (ns stamps
    stay exact), text columns strings.
    """
    p = Path(path)
    df = pd.read_parquet(p) if p.suffix == ".parquet" else read_csv(p)
    side = records.sidecar_path(p)
    prov = json.loads(side.read_text()) if side.exists() else {}
    for col in df.columns:
        num = pd.to_numeric(df[col], errors="coerce")
        nonnull = num.dropna()
        if num.notna().sum() == df[col].notna().sum() and (nonnull == nonnull.round()).all():
            df[col] = num.astype("Int64")  # all integers, or all empty
        elif df[col].dtype == object:
            df[col] = df[col].astype("string")
    df.attrs["provenance"] = prov
    return df, prov


def save_figure(
    fig: Figure, path_stem: str | os.PathLike[str], formats: Sequence[str] = ("pdf", "png")
) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.pdf`` and ``.png`` (creating folders); return the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        # Fixed metadata keeps PDFs byte-stable between regenerations of the same data.
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        fig.savefig(path, dpi=200 if fmt == "png" else None, metadata=metadata, bbox_inches="tight")
        paths.append(path)
    return paths


def save_figures(
    figures: Mapping[str, Figure | None],
    directory: str | os.PathLike[str],
    prefix: str,
    close: bool = True,
    provenance: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> list[Path]:
    """Save each figure as ``directory/<prefix>_<key>.{pdf,png}``; None entries are skipped.

    With ``provenance`` each figure also gets ``<prefix>_<key>.provenance.json`` naming its
    files, as the tables do (and the same guard, see :func:`check_replace`).
    """
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    for key, fig in figures.items():
        if fig is None:
            continue
        stem = Path(directory) / f"{prefix}_{key}"
        if provenance is not None:
            check_replace(stem, provenance, replace)
        saved = save_figure(fig, stem)
        paths += saved
        if provenance is not None:
            records.write_sidecar(stem, dict(provenance, files=[p.name for p in saved]))
        if close:
            plt.close(fig)
    return paths
