"""The tree's packaging: pyproject.toml and environment.yml agree, the core stays standard-library
(the VM guest runs it with the distribution's python3), the CLI registry, Makefile and CI."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import pytest

from nsexp import cli
from nsexp.backends import BACKENDS

ROOT = Path(__file__).resolve().parent.parent


def _norm(requirement: str) -> str:
    """'pytest-timeout>=2' -> 'pytest-timeout'; names compared the way pip does."""
    name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def environment_yml() -> dict:
    """environment.yml, with PyYAML when it is installed, else a parser for the flat shape
    that file has (name, channels, dependencies with one nested pip list)."""
    text = (ROOT / "environment.yml").read_text()
    try:
        import yaml
    except ImportError:
        return _tiny_yaml(text)
    return yaml.safe_load(text)


def _tiny_yaml(text: str) -> dict:
    data: dict = {}
    key = None
    nested: list | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        s = line.strip()
        if indent == 0:
            k, _, v = s.partition(":")
            key, nested = k, None
            data[k] = v.strip() if v.strip() else []
        elif s.startswith("- ") and s.endswith(":"):  # "- pip:" opens a nested list
            nested = []
            data[key].append({s[2:-1].strip(): nested})
        elif s.startswith("- "):
            item = s[2:].strip()
            if nested is not None and indent > 2:
                nested.append(item)
            else:
                nested = None
                data[key].append(item)
    return data


def test_tiny_yaml_parser_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")  # pulled in by jupyter; the fallback must match it
    text = (ROOT / "environment.yml").read_text()
    assert _tiny_yaml(text) == yaml.safe_load(text)


def test_pyproject_core():
    p = pyproject()["project"]
    assert p["name"] == "nsexp"
    assert p["requires-python"] == ">=3.11"
    assert p.get("dependencies", []) == []  # the core (and the guest side) is stdlib only
    assert p["scripts"] == {"nsexp": "nsexp.cli:main"}
    extras = p["optional-dependencies"]
    assert {"notebooks", "test", "vm", "all"} <= set(extras)
    names = {k: {_norm(r) for r in v} for k, v in extras.items()}
    assert {"jupyterlab", "pandas", "matplotlib", "papermill", "ipywidgets", "pyarrow"} <= names[
        "notebooks"
    ]
    assert {"pytest", "pytest-timeout", "ruff"} <= names["test"]
    assert names["vm"] == {"virtme-ng"}
    assert extras["all"] == ["nsexp[notebooks,test,vm]"]


def test_environment_yml_agrees_with_pyproject():
    extras = pyproject()["project"]["optional-dependencies"]
    wanted = {_norm(r) for k, v in extras.items() if k != "all" for r in v}
    env = environment_yml()
    assert env["name"] == "nsexp"
    assert "conda-forge" in env["channels"]
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for item in dep["pip"]:
                if not item.startswith("-e"):
                    pip.add(_norm(item))
        else:
            conda.add(_norm(dep))
    assert any(
        re.fullmatch(r"python\s*>=\s*3\.11", d) for d in env["dependencies"] if isinstance(d, str)
    )
    assert {"python", "pip"} <= conda
    declared = (conda - {"python", "pip"}) | pip
    assert declared == wanted, (
        f"only in environment.yml: {sorted(declared - wanted)}; "
        f"only in pyproject.toml: {sorted(wanted - declared)}"
    )
    assert not (conda & pip), "a package listed twice"
    assert any(
        item.startswith("-e")
        for d in env["dependencies"]
        if isinstance(d, dict)
        for item in d["pip"]
    )


# The guest side: everything a guest entry point imports is standard-library Python (the guest
# runs the distribution's python3). The entry points are found, not listed: every
# nsexp/**/guest.py, the CLI, the backends the guest loads by name (nsexp.backends.BACKENDS),
# and the scripts the VM tests run in the guest (tests/vm/*.py, tests/vm/*/, tests/manager_load.py).
GUEST_ENTRY_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "nsexp").rglob("guest.py")
) + ["nsexp.cli", *(f"nsexp.backends.{name}" for name in BACKENDS)]
GUEST_SCRIPTS = sorted(
    [
        ROOT / "tests" / "manager_load.py",
        *(ROOT / "tests" / "vm").glob("*.py"),
        *(p.parent for p in (ROOT / "tests" / "vm").glob("*/__main__.py")),
    ]
)

_CHECK = r"""
import importlib, json, sys
before = set(sys.modules)
for mod in sys.argv[1:]:
    importlib.import_module(mod)
new = set(sys.modules) - before
bad = sorted(m for m in new if m.split(".")[0] not in sys.stdlib_module_names | {"nsexp"})
print(json.dumps({"bad": bad, "nsexp": sorted(m for m in new if m.split(".")[0] == "nsexp")}))
"""


def guest_python() -> str:
    """The interpreter the guest runs: the distribution's python3."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def import_in_guest_python(*modules: str) -> dict[str, list[str]]:
    """Import ``modules`` under the guest's interpreter: the non-stdlib and nsexp modules loaded."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [guest_python(), "-s", "-c", _CHECK, *modules],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def script_imports(entry: Path) -> tuple[set[str], set[str]]:
    """(nsexp modules, other top-level modules) a guest script imports anywhere in its files;
    a folder entry's own modules (its files) and a script's sibling files are part of it."""
    files = sorted(entry.glob("*.py")) if entry.is_dir() else [entry]
    own = {f.stem for f in (files if entry.is_dir() else entry.parent.glob("*.py"))}
    if not entry.is_dir():  # a script beside a folder entry may import that folder's helpers
        own |= {f.stem for f in entry.parent.glob("*/*.py")}
    nsexp_mods, others = set(), set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "nsexp":
                    nsexp_mods.add(name)
                elif top not in own and top != "__future__":
                    others.add(top)
    return nsexp_mods, others


def test_guest_entry_points_are_found():
    assert {"nsexp.experiment.guest", "nsexp.bench.guest"} <= set(GUEST_ENTRY_MODULES)
    assert ROOT / "tests" / "vm" / "kmod_checks" in GUEST_SCRIPTS
    loaded = set(import_in_guest_python("nsexp.experiment.guest")["nsexp"])
    core = {"nsexp.experiment.worker", "nsexp.hierarchy", "nsexp.manager", "nsexp.records"}
    assert core <= loaded  # what the guest imports is computed, not listed


@pytest.mark.parametrize("module", GUEST_ENTRY_MODULES)
def test_guest_modules_import_only_the_standard_library(module):
    bad = import_in_guest_python(module)["bad"]
    assert bad == [], f"the guest's {module} imports non-stdlib modules: {bad}"


@pytest.mark.parametrize("entry", GUEST_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_guest_scripts_import_only_the_standard_library(entry):
    nsexp_mods, others = script_imports(entry)
    assert others <= sys.stdlib_module_names, sorted(others - sys.stdlib_module_names)
    if nsexp_mods:
        bad = import_in_guest_python(*sorted(nsexp_mods))["bad"]
        assert bad == [], f"{entry.name} imports non-stdlib modules through nsexp: {bad}"


# --------------------------------------------------------------------------------------------
# CLI registry
# --------------------------------------------------------------------------------------------


def _fake_module(name: str, register) -> types.ModuleType:
    m = types.ModuleType(name)
    if register is not None:
        m.register_cli = register
    return m


def test_cli_registered_module_runs(monkeypatch):
    calls = []

    def register(sub):
        p = sub.add_parser("hello")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(func=lambda args: calls.append(args.n) or 5)

    monkeypatch.setitem(sys.modules, "nsexp._fake_cmd", _fake_module("nsexp._fake_cmd", register))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["nsexp._fake_cmd"])
    assert cli.main(["hello", "--n", "3"]) == 5
    assert calls == [3]


def test_cli_reports_the_packages_errors_in_one_line(monkeypatch, capsys):
    """Any error of nsexp (one base class) is one line naming the fix, exit 1; others raise."""
    from nsexp.errors import NsexpError

    def register(sub):
        p = sub.add_parser("fail")
        p.add_argument("what")

        def cmd_fail(args):
            if args.what == "ours":
                raise NsexpError("do X to fix it")
            raise ZeroDivisionError("a bug")

        p.set_defaults(func=cmd_fail)

    monkeypatch.setitem(sys.modules, "nsexp._fake_cmd", _fake_module("nsexp._fake_cmd", register))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["nsexp._fake_cmd"])
    assert cli.main(["fail", "ours"]) == 1
    assert capsys.readouterr().err == "nsexp fail: do X to fix it\n"
    with pytest.raises(ZeroDivisionError):
        cli.main(["fail", "bug"])


def test_package_errors_share_the_base():
    from nsexp.backends import BackendUnavailable, MigrationError
    from nsexp.client import ManagerError
    from nsexp.errors import NsexpError
    from nsexp.experiment.layout import LayoutError
    from nsexp.hierarchy import HierarchyError
    from nsexp.protocol import ProtocolError
    from nsexp.publish import PublishError
    from nsexp.testbed import TestbedError

    for cls in (BackendUnavailable, MigrationError, ManagerError, LayoutError, HierarchyError):
        assert issubclass(cls, NsexpError), cls
    for cls in (ProtocolError, PublishError, TestbedError):
        assert issubclass(cls, NsexpError), cls


def test_cli_unknown_command_and_help():
    py = [sys.executable, "-m", "nsexp"]
    proc = subprocess.run([*py, "no-such-command"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = subprocess.run([*py, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    assert "vm-shell" in proc.stdout and "testbed-check" in proc.stdout


def test_cli_registers_every_command():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"vm-shell", "testbed-check", "manager", "run", "figures", "bench"} <= commands


def test_version():
    import nsexp

    assert re.match(r"\d", nsexp.__version__)


# --------------------------------------------------------------------------------------------
# Makefile, setup, CI
# --------------------------------------------------------------------------------------------


def make_n(target: str) -> str:
    proc = subprocess.run(
        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is installed by `make setup`")
def test_make_targets():
    assert "tools/setup.sh" in make_n("setup")
    test = make_n("test")
    assert test.index("tools/setup.sh") < test.index("-m pytest")
    assert "nsexp run --backend kmod --testbed vm --out data/runs/latest" in make_n("run")
    assert "nsexp figures" in make_n("figures")
    assert "$(MAKE) -C kmod" in (ROOT / "Makefile").read_text()
    assert "jupyter lab --ip 127.0.0.1 --no-browser" in make_n("lab")
    assert "nsexp vm-shell" in make_n("vm-shell")


def test_setup_stops_naming_a_missing_python(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "python3.99"), NSEXP_SKIP_APT="1")
    env["NSEXP_VENV"] = str(tmp_path / "venv")
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "python3.99" in proc.stderr and "Python >= 3.11" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_setup_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "tools/setup.sh")]).returncode == 0


def test_ci_runs_make_test_without_stdin():
    ci = (ROOT / ".ci/run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") or ci.startswith("#!/bin/bash")
    assert "set -euo pipefail" in ci
    assert "CI=true" in ci
    assert re.search(r"make test\s*</dev/null", ci)


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="runs only under the tree's own .venv (made by `make setup`)",
)
def test_second_setup_is_fast():
    """`make setup` already ran (make test depends on it): running it again takes seconds."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "tools/setup.sh")],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "venv: up to date" in proc.stderr
    assert elapsed < 10, f"second setup took {elapsed:.1f} s"
