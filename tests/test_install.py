"""Reproducible installs: requirements/lock.txt covers pyproject.toml with hashes, environment.yml
pins the lock's versions, setup installs from the lock, and the project installs and runs its
core without any extra (the guest side and library-only use)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return norm(re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0])


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256, ...])} of the lock file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            current = norm(m.group(1))
            entries[current] = (m.group(2), [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(h.group(1))
    return entries


def test_lock_pins_every_dependency_with_hashes():
    entries = lock_entries()
    text = LOCK.read_text()
    assert "nsexp @" not in text and "file://" not in text, "the project itself is not locked"
    assert not re.search(r"^[A-Za-z0-9_.-]+\s*(>=|<=|~=|>|<)", text, re.M), "a loose pin"
    for name, (version, hashes) in entries.items():
        assert hashes, f"{name}=={version} has no hash"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    wanted = {requirement_name(r) for k, v in extras.items() if k != "all" for r in v}
    wanted |= {requirement_name(r) for r in project["build-system"]["requires"]}
    assert wanted <= set(entries), f"not in the lock (run `make lock`): {wanted - set(entries)}"
    assert "playwright" in entries  # the browser test's driver, pinned like the rest


def test_environment_yml_pins_the_locks_versions():
    entries = lock_entries()
    pins = re.findall(
        r"^\s+- ([A-Za-z0-9_.-]+)==(\S+)\s*$", (ROOT / "environment.yml").read_text(), re.M
    )
    assert len(pins) >= 10
    differ = {n: (v, entries.get(norm(n), ("missing",))[0]) for n, v in pins}
    differ = {n: v for n, v in differ.items() if v[0] != v[1]}
    assert not differ, f"environment.yml vs the lock (name: (yml, lock)): {differ}"


def test_setup_installs_from_the_lock_with_hashes():
    setup = (ROOT / "tools" / "setup.sh").read_text()
    assert "LOCK=requirements/lock.txt" in setup
    assert re.search(r"install .*--require-hashes \\\n\s+--no-deps -r \"\$LOCK\"", setup)
    assert re.search(r"--no-deps --no-build-isolation \\\n\s+-e \.", setup)
    assert '-e ".[all]"' not in setup  # nothing resolved at install time
    lock_sh = (ROOT / "tools" / "lock.sh").read_text()
    assert "--generate-hashes" in lock_sh and "pip-tools==" in lock_sh
    make = subprocess.run(["make", "-n", "lock"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0 and "tools/lock.sh" in make.stdout


def test_setup_installs_what_the_tests_need():
    setup = (ROOT / "tools" / "setup.sh").read_text()
    m = re.search(r"^TEST_PKGS=\(([^)]*)\)", setup, re.M)
    assert m, "TEST_PKGS in tools/setup.sh"
    assert {"git", "perl", "dkms", "chromium", "musl-tools"} <= set(m.group(1).split())
    assert '"${TEST_PKGS[@]}"' in setup  # and they are installed


@pytest.mark.slow
def test_core_installs_and_runs_without_extras(tmp_path):
    """`pip install --no-deps .` into a bare venv: the core imports and the CLI runs with the
    standard library only (what the VM guest and a library user have)."""
    # A copy of the sources, so that the build leaves nothing in the tree.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "nsexp", src / "nsexp", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Built with .venv's (locked) setuptools, installed with nothing else; nothing is downloaded.
    wheel = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", "./src"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert wheel.returncode == 0, wheel.stdout[-2000:] + wheel.stderr[-2000:]
    (built,) = (tmp_path / "dist").glob("nsexp-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    proc = subprocess.run(
        [*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(built)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    check = (
        "import importlib, sys, nsexp\n"
        "mods = ['nsexp.lib', 'nsexp.uapi', 'nsexp.client', 'nsexp.protocol', 'nsexp.manager',"
        " 'nsexp.hierarchy', 'nsexp.migrate', 'nsexp.request', 'nsexp.cli']\n"
        "for m in mods: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names"
        " and m.split('.')[0] not in ('nsexp', '__main__'))\n"
        "print(nsexp.__file__); print(bad)\n"
    )
    proc = subprocess.run(
        [str(py), "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    where, bad = proc.stdout.splitlines()
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree
    assert bad == "[]", bad
    for args in (["--help"], ["migrate", "--help"], ["request", "--help"]):
        run = subprocess.run(
            [str(venv / "bin" / "nsexp"), *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("usage: nsexp")
