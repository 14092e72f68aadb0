"""The module builds without warnings for both supported kernels and is checkpatch-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from nsexp import testbed

REPO = Path(__file__).resolve().parent.parent
KMOD = REPO / "kmod"
CHECKPATCH_FILES = (
    "scripts/checkpatch.pl",
    "scripts/spelling.txt",
    "scripts/const_structs.checkpatch",
)


@pytest.mark.parametrize("series", testbed.SUPPORTED_SERIES)
def test_builds_without_warnings(series: str, tmp_path: Path) -> None:
    release = next(r for r in testbed.supported_releases() if r.startswith(series))
    kdir = testbed.kernel_headers_dir(release)
    for name in ("Kbuild", "nsmigrate.c", "nsmigrate.h"):
        shutil.copy(KMOD / name, tmp_path)
    proc = subprocess.run(
        ["make", "-C", str(kdir), f"M={tmp_path}", "modules"], capture_output=True, text=True
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "CC [M]" in log, log  # it really compiled
    assert not re.search(r"warning:|error:", log, re.I), log
    # modpost lists any symbol the module would need but the kernel does not export.
    assert "undefined!" not in log, log
    assert (tmp_path / "nsmigrate.ko").stat().st_size > 0
    assert module_put_is_a_tail_call(tmp_path / "nsmigrate.ko")


def module_put_is_a_tail_call(ko: Path) -> bool:
    """The task work drops the module's last reference as its very last act: module_put()
    must be reached by a jump, so that no instruction of the module runs after it (the module
    may be freed by then)."""
    dis = subprocess.run(
        ["objdump", "-dr", "--no-show-raw-insn", str(ko)], capture_output=True, text=True
    ).stdout
    body = dis.split("<nsm_task_work>:", 1)[1].split("\n\n", 1)[0].splitlines()
    for prev, line in zip(body, body[1:], strict=False):
        if "R_X86_64_PLT32\tmodule_put" in line:
            return prev.split(":", 1)[1].split()[0] == "jmp"
    raise AssertionError("no call of module_put in nsm_task_work:\n" + "\n".join(body))


@pytest.fixture(scope="session")
def checkpatch() -> Path:
    """checkpatch.pl from Debian's linux-source tarball, extracted once under build/."""
    dest = REPO / "build" / "checkpatch"
    script = dest / "scripts" / "checkpatch.pl"
    if script.exists():
        return script
    tarballs = sorted(Path("/usr/src").glob("linux-source-*.tar.*"))
    assert tarballs, "no /usr/src/linux-source-*.tar.xz: apt-get install linux-source (make setup)"
    with tarfile.open(tarballs[-1]) as tar:
        top = tar.next().name.split("/")[0]
        for name in CHECKPATCH_FILES:
            member = tar.getmember(f"{top}/{name}")
            member.name = name
            tar.extract(member, dest)
    return script


def test_checkpatch_strict_clean(checkpatch: Path) -> None:
    # The sources, not kbuild products such as nsmigrate.mod.c left by `make -C kmod`.
    files = sorted(str(p) for p in KMOD.glob("*.[ch]") if not p.name.endswith(".mod.c"))
    proc = subprocess.run(
        ["perl", str(checkpatch), "--strict", "--no-tree", "-f", *files],
        capture_output=True,
        text=True,
    )
    totals = re.findall(r"total: (\d+) errors, (\d+) warnings, (\d+) checks", proc.stdout)
    assert len(totals) == len(files), proc.stdout + proc.stderr
    assert all(t == ("0", "0", "0") for t in totals), proc.stdout


def test_dkms_conf_matches_module_version() -> None:
    conf = dict(re.findall(r'^(\w+)="([^"]*)"', (KMOD / "dkms.conf").read_text(), re.M))
    version = re.search(r'#define NSM_VERSION "([^"]+)"', (KMOD / "nsmigrate.c").read_text())
    assert conf["PACKAGE_NAME"] == "nsmigrate"
    assert conf["PACKAGE_VERSION"] == version.group(1)
