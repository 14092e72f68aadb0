"""JupyterLab's save hook for ``make lab``: the tracked notebooks are saved without outputs.

JupyterLab marks a notebook modified as soon as its kernel starts (it fills in the kernel's
``language_info``), and autosave then writes whatever the session produced, tables and images
included, into the file. ``make lab`` starts the server with
``--ContentsManager.pre_save_hook=nsexp.lab.strip_outputs``, so every save, autosave included,
writes the notebook as it is committed: sources, tags and kernelspec, no outputs, no execution
counts, no widget state, no kernel details. The session keeps its outputs on screen; results live
in data/ and figures/ (written by the runs), not in the notebooks. Host-side only: it runs inside
the Jupyter server.
"""

from __future__ import annotations

from typing import Any

#: Cell metadata that a session adds and a committed notebook does not carry.
SESSION_CELL_METADATA = ("execution", "scrolled", "collapsed", "papermill", "widgets")


def strip_notebook(nb: dict[str, Any]) -> dict[str, Any]:
    """Remove, in place, what running a notebook adds to it; return it."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        meta = cell.get("metadata", {})
        for key in SESSION_CELL_METADATA:
            meta.pop(key, None)
    meta = nb.setdefault("metadata", {})
    for key in ("widgets", "papermill"):
        meta.pop(key, None)
    if "language_info" in meta:  # the kernel's version, mimetype, ...: only the name is ours
        meta["language_info"] = {"name": meta["language_info"].get("name", "python")}
    return nb


def strip_outputs(model: dict[str, Any], **_kwargs: Any) -> None:
    """Jupyter's ``pre_save_hook(model, path, contents_manager)``: strip a notebook being saved."""
    if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
        strip_notebook(model["content"])
