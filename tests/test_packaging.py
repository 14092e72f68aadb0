"""The tree's packaging: pyproject.toml and environment.yml agree, the core stays standard-library
(the VM guest runs it with the distribution's python3), the CLI registry, Makefile and CI."""

from __future__ import annotations

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


# Modules that run inside the VM guest (or are imported there): standard library only at import.
GUEST_MODULES = [
    "nsexp",
    "nsexp.cli",
    "nsexp.testbed",
    "nsexp.lib",
    "nsexp.uapi",
    "nsexp.protocol",
    "nsexp.client",
    "nsexp.manager",
    "nsexp.hierarchy",
    "nsexp.backends",
    "nsexp.backends.kmod",
    "nsexp.backends.restart",
    "nsexp.backends.criu",
    "nsexp.nsutil",
    "nsexp.experiment.worker",
    "nsexp.experiment",
    "nsexp.benchguest",
]

_CHECK = r"""
import importlib, sys
mod = sys.argv[1]
before = set(sys.modules)
importlib.import_module(mod)
bad = sorted(
    m for m in set(sys.modules) - before
    if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "nsexp"
)
print(" ".join(bad))
"""


def guest_python() -> str:
    """The interpreter the guest runs: the distribution's python3."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.mark.parametrize("module", GUEST_MODULES)
def test_guest_modules_import_only_the_standard_library(module):
    if (
        not (ROOT / (module.replace(".", "/") + ".py")).exists()
        and not (ROOT / module.replace(".", "/") / "__init__.py").exists()
    ):
        pytest.skip(f"{module} is not in the tree yet")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [guest_python(), "-s", "-c", _CHECK, module],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{module} imports non-stdlib modules: {proc.stdout}"


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


def test_cli_missing_module_is_skipped_and_named(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["nsexp.testbed", "nsexp._not_written_yet"])
    monkeypatch.setattr(cli, "EXPECTED_COMMANDS", {"frobnicate": "nsexp._not_written_yet"})
    assert cli.main(["frobnicate", "--x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing that looks like a result
    assert "`frobnicate` is not available yet" in err
    assert "nsexp._not_written_yet is not in this tree yet" in err
    assert "Nothing was run" in err


def test_cli_module_with_broken_dependency_is_reported(monkeypatch, tmp_path, capsys):
    pkg = tmp_path / "fakepkg_nsexp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["fakepkg_nsexp.broken"])
    monkeypatch.setattr(cli, "EXPECTED_COMMANDS", {"zap": "fakepkg_nsexp.broken"})
    assert cli.main(["zap"]) == 2
    err = capsys.readouterr().err
    assert "could not be imported" in err and "a_dependency_that_is_not_installed" in err


def test_cli_unknown_command_and_help():
    py = [sys.executable, "-m", "nsexp"]
    proc = subprocess.run([*py, "no-such-command"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = subprocess.run([*py, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    assert "vm-shell" in proc.stdout and "testbed-check" in proc.stdout


def test_cli_registers_testbed_commands():
    parser, skipped, commands = cli.build_parser()
    assert {"vm-shell", "testbed-check"} <= commands
    assert "nsexp.testbed" not in skipped


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
