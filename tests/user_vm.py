"""One VM boot for the user-facing checks: `nsexp migrate`/`nsexp request` from a shell
(tests/vm/user_checks.py), then DKMS (tests/vm/dkms_check.sh). tests/test_migrate_cli.py and
tests/test_dkms_vm.py both read it; the boot happens once per pytest session, for whichever asks
first, and a failed boot fails both with its message.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

from nsexp.testbed import TestbedError, VMTestbed

ROOT = Path(__file__).resolve().parent.parent
_VERSION = re.search(r'^PACKAGE_VERSION="([^"]+)"', (ROOT / "kmod/dkms.conf").read_text(), re.M)
#: What the guest's DKMS writes: on the host these must not appear (the guest's view is a
#: copy-on-write overlay). Checked before and after the boot.
HOST_PATHS = ("/var/lib/dkms/nsmigrate", f"/usr/src/nsmigrate-{_VERSION.group(1)}")


@functools.cache
def _boot() -> dict:
    try:
        tb = VMTestbed()
        host_before = {p: Path(p).exists() for p in HOST_PATHS}
        batch = tb.run_batch(
            [
                'python3 tests/vm/user_checks.py "$NSEXP_OUT"',
                'bash tests/vm/dkms_check.sh "$NSEXP_OUT"',
            ],
            # Under TCG on a busy 2-core host, dkms build alone took minutes (gcc is emulated).
            timeout=3300,
            command_timeout=1500,
        )
    except TestbedError as e:
        return {"error": str(e)}
    path = batch.out_dir / "user_checks.json"
    return {
        "batch": batch,
        "obs": json.loads(path.read_text()) if path.exists() else {},
        "dkms": batch.out_dir / "dkms",
        "host_before": host_before,
        "host_after": {p: Path(p).exists() for p in HOST_PATHS},
    }


def user_guest() -> dict:
    """The boot's results (booting on first use); fails the calling test if the VM could not."""
    guest = _boot()
    if "error" in guest:
        pytest.fail(f"VM boot for the user-facing checks failed: {guest['error']}", False)
    return guest


def observed(guest: dict, name: str) -> dict:
    """The guest's observations of check ``name`` (asserting that it ran to the end)."""
    rec = guest["obs"].get(name)
    batch = guest["batch"]
    assert rec is not None, f"check {name} did not run: {batch.results[0].stderr[-3000:]}"
    assert rec["ok"], rec.get("traceback")
    return rec["data"]
