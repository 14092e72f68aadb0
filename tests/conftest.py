"""Shared fixtures.

VM prerequisites are never skipped silently: if one is missing, the VM tests fail with the
testbed's message, which names the fix (CI installs everything through `make setup`).
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def vm_testbed() -> Any:
    """The VM testbed on the default kernel (or $NSEXP_KERNEL), with its prerequisites checked
    (module loading not required). Imported here: the native tests do not load the testbed."""
    from nsexp.testbed import TestbedError, VMTestbed

    try:
        tb = VMTestbed()
        tb.check(load_module=False)
    except TestbedError as e:
        pytest.fail(f"VM testbed unavailable: {e}", pytrace=False)
    return tb
