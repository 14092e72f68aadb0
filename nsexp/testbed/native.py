"""The native testbed: this host, with the module already loaded (``/dev/nsmigrate`` exists,
for example installed through DKMS). Also what the guest side uses inside the VM.

Runs on the host or in the guest: standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nsexp.testbed.interface import (
    DEVICE_PATH,
    REPO_ROOT,
    BatchResult,
    CommandResult,
    Testbed,
    TestbedError,
)


class NativeTestbed(Testbed):
    """This host, with the module loaded here (``/dev/nsmigrate`` exists)."""

    name = "native"

    def __init__(self, *, device: str = DEVICE_PATH):
        self.device = device

    def __repr__(self) -> str:
        return f"NativeTestbed(device={self.device!r})"

    def kernel_release(self) -> str:
        return os.uname().release

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
        commands = list(commands)
        extra = self._check_env(env)
        if kernel_args:
            raise TestbedError(
                f"the native testbed cannot change its kernel's command line ({kernel_args}); "
                "use --testbed vm"
            )
        if load_module and not os.path.exists(self.device):
            raise TestbedError(
                f"the module is not loaded on this host ({self.device} does not exist); "
                "use --testbed vm, or install it with DKMS (kmod/dkms.conf)"
            )
        out_dir = self.new_out_dir(out_dir)
        run_env = dict(os.environ)
        pythonpath = run_env.get("PYTHONPATH")
        run_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
        run_env.update(NSEXP_OUT=str(out_dir), NSEXP_TESTBED=self.name, **extra)
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        results: list[CommandResult] = []

        def partial() -> BatchResult:
            return BatchResult(
                self.name, self.kernel_release(), out_dir, list(results), "", load_module, None, ""
            )

        for command in commands:
            remaining = deadline - time.monotonic()
            at_deadline = command_timeout is None or remaining <= command_timeout
            if remaining <= 0:
                raise TestbedError(
                    f"the native batch timed out after {timeout:g} s", result=partial()
                )
            limit = remaining if at_deadline else command_timeout
            results.append(_run_native(command, run_env, limit))
            if results[-1].timed_out and at_deadline:
                raise TestbedError(
                    f"the native batch timed out after {timeout:g} s (in {command!r})",
                    result=partial(),
                )
        dmesg = ""
        try:
            proc = subprocess.run(
                ["dmesg"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30
            )
            if proc.returncode == 0:
                dmesg = proc.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
        return BatchResult(
            testbed=self.name,
            kernel_release=self.kernel_release(),
            out_dir=out_dir,
            results=results,
            dmesg=dmesg,
            module_loaded=load_module,
            module_unloaded=None,
            boot_log="",
            duration_s=time.monotonic() - t0,
        )


def _run_native(command: str, env: Mapping[str, str], limit: float) -> CommandResult:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=REPO_ROOT,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return CommandResult(
        command=command,
        returncode=None if timed_out else proc.returncode,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        duration_s=time.monotonic() - t0,
    )
