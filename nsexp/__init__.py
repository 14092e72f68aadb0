"""nsexp: live migration of a running process between Linux PID namespaces.

A kernel module (``kmod/``, device ``/dev/nsmigrate``) moves a process into another PID namespace;
this package drives it, runs the paper's chained-execution experiment on a testbed (a QEMU VM via
virtme-ng, or this host), and turns the records into tables and figures.

The package core, and everything that runs inside the VM guest, is standard-library Python only.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("nsexp")
except PackageNotFoundError:  # running from a source tree that is not installed (e.g. the guest)
    __version__ = "0+unknown"

from nsexp.lib import Migration, migrate  # noqa: E402

__all__ = ["Migration", "migrate", "__version__"]
