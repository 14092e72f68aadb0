"""DKMS, tested and not only described: inside the VM (one boot with the migrate/request checks,
tests/user_vm.py), `dkms add`, `dkms build` and `dkms install` kmod/ for the guest's running
kernel, `modprobe nsmigrate`, then the paper's experiment on the native testbed, in the guest,
with that module. The guest's /usr, /var and /lib are copy-on-write overlays: the host is left
untouched.
"""

from __future__ import annotations

import csv
import re

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

PAPER = [("NS2", 100, 3), ("NS3", 200, 5), ("NS4", 300, 6), ("NS5", 400, 7)]


@pytest.fixture(scope="module")
def guest() -> dict:
    from user_vm import user_guest

    return user_guest()


def steps(guest: dict) -> dict[str, int]:
    path = guest["dkms"] / "steps"
    assert path.exists(), f"the DKMS script did not run: {guest['batch'].results[1].stderr[-3000:]}"
    return {name: int(rc) for name, rc in (line.split() for line in path.read_text().splitlines())}


def step_output(guest: dict, name: str) -> str:
    return (guest["dkms"] / f"{name}.out").read_text()


def test_dkms_builds_installs_and_loads_the_module(guest):
    done = steps(guest)
    order = ["rmmod", "add", "build", "install", "status", "modprobe", "modinfo", "device"]
    for name in order:
        assert done.get(name) == 0, f"{name}: {step_output(guest, name)[-3000:]}"
    facts = (guest["dkms"] / "facts").read_text().splitlines()
    release, version = (line.split()[1] for line in facts[:2])
    fstype = {line.split()[1]: line.split()[2] for line in facts if line.startswith("mount ")}
    assert release == guest["batch"].kernel_release
    assert re.search(
        rf"^nsmigrate/{re.escape(version)}, {re.escape(release)}, x86_64: installed",
        step_output(guest, "status"),
        re.M,
    ), step_output(guest, "status")
    # modprobe found DKMS's copy, not the testbed's build/kmod one.
    path = step_output(guest, "modinfo").strip()
    assert re.fullmatch(
        rf"/lib/modules/{re.escape(release)}/updates/dkms/nsmigrate\.ko(\.xz)?", path
    )
    assert step_output(guest, "device").startswith("crw-------")
    # dkms wrote into the guest's overlays; the host has none of it.
    assert {fstype[d] for d in ("/usr/src", "/var/lib/dkms", f"/lib/modules/{release}")} == {
        "overlay"
    }, fstype
    assert guest["host_after"] == guest["host_before"]


def test_paper_experiment_runs_with_the_dkms_module(guest):
    done = steps(guest)
    assert done.get("run") == 0, step_output(guest, "run")[-3000:]
    with open(guest["dkms"] / "run" / "hops.csv") as f:
        hops = list(csv.DictReader(f))
    got = [(h["ns"], int(h["value"]), int(h["pid"])) for h in hops]
    assert got == PAPER
    assert {h["backend"] for h in hops} == {"kmod"}
    assert len({h["start_time"] for h in hops}) == 1  # one process travelled
    assert "NS5" in step_output(guest, "run")  # the table was printed


def test_the_boot_was_clean(guest):
    batch = guest["batch"]
    assert batch.module_unloaded, batch.boot_log[-3000:]  # the DKMS module unloads
    assert batch.kernel_log_problems() == []
    assert [r.returncode for r in batch.results] == [0, 0], [r.stderr[-2000:] for r in batch]
