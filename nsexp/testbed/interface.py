"""What every testbed shares: the :class:`Testbed` interface, its results and its error.

Runs on the host, and is imported inside the guest too: standard library only.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nsexp.errors import NsexpError
from nsexp.testbed.kernel_log import kernel_log_problems

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
KMOD_DIR = REPO_ROOT / "kmod"
BUILD_DIR = REPO_ROOT / "build"
VM_RUNS_DIR = BUILD_DIR / "vm-runs"
MODULE_NAME = "nsmigrate"
DEVICE_PATH = "/dev/nsmigrate"

#: Subfolder of the output folder where the testbed keeps its own files (script, per-command
#: output, exit statuses, kernel logs). Commands write their results to ``$NSEXP_OUT`` itself.
META_DIR = "testbed"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TestbedError(NsexpError, RuntimeError):
    """A testbed could not do what was asked; the message names the fix.

    ``result`` carries what was collected before the failure, when there is any (for example the
    output of the commands that finished before the guest crashed).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, message: str, *, result: BatchResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class CommandResult:
    """One command of a batch. ``returncode`` is None if the command never finished."""

    command: str
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass
class BatchResult:
    """What one batch (one boot, for the VM) produced."""

    testbed: str
    kernel_release: str
    out_dir: Path
    results: list[CommandResult]
    #: kernel log of the whole boot, read after the commands and after ``rmmod``
    dmesg: str
    module_loaded: bool
    #: ``rmmod`` succeeded; None if no module was loaded (or, natively, never unloaded)
    module_unloaded: bool | None
    boot_log: str
    duration_s: float = field(default=0.0)
    #: how the VM ran: "kvm" or "tcg" (QEMU's emulation); "" on the native testbed
    accel: str = ""
    #: extra kernel command line arguments of the boot (VM only)
    kernel_args: list[str] = field(default_factory=list)

    def kernel_log_problems(self) -> list[str]:
        return kernel_log_problems(self.dmesg)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i: int) -> CommandResult:
        return self.results[i]


class Testbed(ABC):
    """Runs a batch of shell commands next to the kernel module and returns their results.

    Commands run with ``bash -c`` in the repository root with ``PYTHONPATH`` set to it,
    ``NSEXP_OUT`` set to the output folder (write result files there) and ``NSEXP_TESTBED`` set
    to the testbed's name.
    """

    __test__ = False
    name: str = ""

    @abstractmethod
    def kernel_release(self) -> str: ...

    @abstractmethod
    def run_batch(
        self,
        commands: Sequence[str],
        *,
        out_dir: Path | None = None,
        timeout: float = 900,
        command_timeout: float | None = None,
        load_module: bool = True,
        env: Mapping[str, str] | None = None,
        kernel_args: Sequence[str] = (),
    ) -> BatchResult:
        """Run ``commands`` in one batch; ``kernel_args`` are extra kernel command line
        arguments for this boot (VM only; the native testbed refuses them)."""

    def run(self, command: str, **kwargs) -> CommandResult:
        """Run one command (one boot for the VM)."""
        return self.run_batch([command], **kwargs).results[0]

    @staticmethod
    def new_out_dir(out_dir: Path | None = None) -> Path:
        """An output folder for one batch: ``out_dir`` (created) or a new one under
        build/vm-runs/; its testbed/ subfolder is emptied so an earlier batch is never read."""
        if out_dir is None:
            VM_RUNS_DIR.mkdir(parents=True, exist_ok=True)
            out_dir = Path(
                tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=VM_RUNS_DIR)
            )
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = out_dir / META_DIR
        if meta.exists():
            shutil.rmtree(meta)
        meta.mkdir()
        return out_dir

    #: old name of :meth:`new_out_dir`, kept until nsexp.bench uses the new one
    _prepare_out_dir = new_out_dir

    @staticmethod
    def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
        env = dict(env or {})
        for k in env:
            if not _ENV_NAME.match(k):
                raise TestbedError(f"invalid environment variable name {k!r}")
        return env
