"""The testbeds: kernel discovery, the kernel-log scan, error messages, the native testbed, and
two VM boots (one batch of commands; one boot killed by its timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nsexp import testbed as tb
from nsexp.testbed import (
    BatchResult,
    NativeTestbed,
    TestbedError,
    VMTestbed,
    accel,
    available_kernels,
    debug_kernel,
    default_kernel,
    get_testbed,
    kernel_log_problems,
    kernels,
    vm_processes,
)

# --------------------------------------------------------------------------------------------
# kernel log scan
# --------------------------------------------------------------------------------------------

BAD_LINES = [
    "[   12.345678] BUG: unable to handle page fault for address: ffffffffc0a01000",
    "[   12.3] BUG kmalloc-64 (Tainted: G           O      ): Object already free",
    "[    3.1] WARNING: CPU: 1 PID: 245 at kernel/pid.c:123 free_pid+0x20/0x80",
    "[    3.2] Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "[    3.3] refcount_t: underflow; use-after-free.",
    "[    3.4] kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
    "[    3.5] WARNING: possible circular locking dependency detected",
    "[    3.6] INFO: task python3:123 blocked for more than 120 seconds.",
    "[    3.7] list_add corruption. prev->next should be next (ffff8880), but was 0000.",
    "[    3.8] list_del corruption, ffff888003a1c0c8->next is LIST_POISON1 (dead000000000100)",
    "[    3.9] general protection fault, probably for non-canonical address 0xdead: 0000 [#1]",
    "[    4.0] Call Trace:",
    "[    4.1] Kernel panic - not syncing: Fatal exception",
    # the debug kernel's checkers
    "[    5.0] BUG: KASAN: slab-use-after-free in posix_timer_fn+0x2c/0x80",
    "[    5.1] BUG: KFENCE: use-after-free read in nsm_move_locked+0x10/0x200",
    "[    5.2] UBSAN: array-index-out-of-bounds in kmod/nsmigrate.c:120:5",
    "[    5.3] WARNING: suspicious RCU usage",
    "[    5.4] BUG: sleeping function called from invalid context at mm/slab.h:1",
    "[    5.5] unreferenced object 0xffff888004a1c000 (size 64):",
    "[    5.6] ODEBUG: free active (active state 0) object: ffff8880 object type: hrtimer",
    "[    5.7] INFO: lockdep is turned off.",
    "[    5.8] BUG kmalloc-64 (Not tainted): Poison overwritten",
    "[    5.9] DEBUG_LOCKS_WARN_ON(1)",
]

GOOD_LINES = [
    "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org)",
    "[    0.512] nsmigrate: loaded, /dev/nsmigrate ready",
    "[    0.600] virtio_net virtio0 enp0s3: renamed from eth0",
    "[    0.700] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed "
    "attacks, data leaks possible!",
    "[    0.800] kmemleak: Kernel memory leak detector disabled",
    "[    0.900] Spectre V1 : Mitigation: usercopy/swapgs barriers and __user pointer sanitization",
]


@pytest.mark.parametrize("line", BAD_LINES)
def test_kernel_log_problems_finds_each_kind(line):
    assert kernel_log_problems(line) == [line.strip()]


def test_kernel_log_problems_ignores_healthy_lines():
    assert kernel_log_problems("\n".join(GOOD_LINES)) == []


def test_kernel_log_problems_in_a_mixed_log_keeps_order():
    log = "\n".join([GOOD_LINES[0], BAD_LINES[2], GOOD_LINES[1], BAD_LINES[11], GOOD_LINES[2]])
    assert kernel_log_problems(log) == [BAD_LINES[2], BAD_LINES[11]]
    res = BatchResult("vm", "r", Path("."), [], log, False, None, "")
    assert res.kernel_log_problems() == [BAD_LINES[2], BAD_LINES[11]]


# --------------------------------------------------------------------------------------------
# kernels, errors that name the fix
# --------------------------------------------------------------------------------------------


def test_version_order_puts_612_after_61():
    rels = ["6.12.117+deb12-amd64", "6.1.0-56-amd64", "6.12.9+deb12-amd64", "6.1.0-9-amd64"]
    assert sorted(rels, key=kernels._version_key) == [
        "6.1.0-9-amd64",
        "6.1.0-56-amd64",
        "6.12.9+deb12-amd64",
        "6.12.117+deb12-amd64",
    ]


def test_available_kernels_have_image_and_headers():
    kernels = available_kernels()
    assert kernels, "no kernel with headers: `make setup` installs linux-image/headers-amd64"
    for rel in kernels:
        assert Path(f"/boot/vmlinuz-{rel}").exists()
        assert tb.kernel_headers_dir(rel) is not None
    assert default_kernel() == kernels[-1]


def test_nonexistent_kernel_release_is_named():
    with pytest.raises(TestbedError) as e:
        VMTestbed("0.0.0-nsexp-nonexistent")
    msg = str(e.value)
    assert "0.0.0-nsexp-nonexistent" in msg
    assert "apt-get install linux-image-0.0.0-nsexp-nonexistent" in msg


def test_build_module_without_headers_names_the_package():
    with pytest.raises(TestbedError, match=r"apt-get install linux-headers-0\.0\.0-nope"):
        tb.build_module("0.0.0-nope")


def test_missing_qemu_names_the_fix(monkeypatch):
    t = VMTestbed()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TestbedError, match=r"qemu-system-x86"):
        t.check(load_module=False)


def test_missing_vng_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TestbedError, match=r"make setup"):
        tb.find_vng()


def test_kernel_args_become_vng_appends():
    t = VMTestbed(kernel_args=["slub_debug=FZPU", "kfence.sample_interval=1"])
    cmd = t.vng_command("vng", kernel_args=["page_poison=1"])
    appended = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--append"]
    assert appended == ["slub_debug=FZPU", "kfence.sample_interval=1", "page_poison=1"]
    assert "slub_debug" in repr(t)


def test_native_refuses_kernel_args(tmp_path):
    with pytest.raises(TestbedError, match="--testbed vm"):
        NativeTestbed().run_batch(
            ["true"], load_module=False, out_dir=tmp_path, kernel_args=["quiet"]
        )


def test_debug_kernel_not_built_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("NSEXP_KERNEL_CACHE", str(tmp_path))
    assert debug_kernel.built() is None
    with pytest.raises(TestbedError, match=r"make debug-kernel"):
        VMTestbed("debug")


def test_debug_kernel_boots_with_its_own_arguments_first(monkeypatch, tmp_path):
    fake = debug_kernel.DebugKernel(tmp_path, "6.12.0-nsmdbg", 1.0)
    monkeypatch.setattr(debug_kernel, "built", lambda: fake)
    cmd = VMTestbed("debug", kernel_args=["slab_nomerge"]).vng_command("vng")
    appended = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--append"]
    assert appended == [*debug_kernel.BOOT_ARGS, "slab_nomerge"]
    assert "no5lvl" in appended and "kasan_multi_shot" in appended
    # a Debian kernel gets only the caller's
    assert "--append" not in VMTestbed().vng_command("vng")


def test_debug_kernel_cache_key_follows_the_fragment(monkeypatch, tmp_path):
    before = debug_kernel.config_hash()
    frag = tmp_path / "frag.config"
    frag.write_text(debug_kernel.FRAGMENT.read_text() + "CONFIG_KCSAN=y\n")
    monkeypatch.setattr(debug_kernel, "FRAGMENT", frag)
    debug_kernel.config_hash.cache_clear()
    try:
        after = debug_kernel.config_hash()
    finally:
        debug_kernel.config_hash.cache_clear()
    assert len(after) == 12 and after != before
    monkeypatch.setenv("NSEXP_KERNEL_CACHE", str(tmp_path))
    assert debug_kernel.cache_dir().parent == tmp_path


def test_debug_kernel_cache_key_ignores_comments_but_not_unset_options(monkeypatch, tmp_path):
    def key(text: str) -> str:
        frag = tmp_path / "frag.config"
        frag.write_text(text)
        monkeypatch.setattr(debug_kernel, "FRAGMENT", frag)
        debug_kernel.config_hash.cache_clear()
        try:
            return debug_kernel.config_hash()
        finally:
            debug_kernel.config_hash.cache_clear()

    base = key("CONFIG_KASAN=y\n# CONFIG_DRM is not set\n")
    assert key("# why KASAN\n\nCONFIG_KASAN=y\n# CONFIG_DRM is not set\n") == base
    assert key("CONFIG_KASAN=y\n") != base
    assert key("CONFIG_KASAN=y\n# CONFIG_SOUND is not set\n") != base


def test_debug_kernel_config_check_names_lost_options():
    wanted = debug_kernel._wanted_options()
    assert wanted["CONFIG_KASAN"] == "y" and wanted["CONFIG_X86_KERNEL_IBT"] == "n"
    full = "\n".join(f"{k}={v}" for k, v in wanted.items() if v != "n")
    assert debug_kernel.config_mismatches(full) == []
    lost = full.replace("CONFIG_PROVE_LOCKING=y", "# CONFIG_PROVE_LOCKING is not set")
    assert debug_kernel.config_mismatches(lost) == ["CONFIG_PROVE_LOCKING: wanted y, got n"]
    ibt = full + "\nCONFIG_X86_KERNEL_IBT=y"
    assert debug_kernel.config_mismatches(ibt) == ["CONFIG_X86_KERNEL_IBT: wanted n, got y"]


def test_accel_probes_once_per_machine_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("NSEXP_ACCEL", raising=False)
    monkeypatch.setattr(accel, "KVM_DEVICE", Path("/dev/null"))  # exists, read-write
    calls = []

    def probe():
        calls.append(1)
        return False, "hung"

    assert accel.choose(probe)[0] == "tcg"
    assert accel.choose(probe)[0] == "tcg"
    assert len(calls) == 1  # the second answer came from the cache
    assert "hung" in accel.choose(probe)[1]
    monkeypatch.setenv("NSEXP_ACCEL", "kvm")
    assert accel.choose(probe) == ("kvm", "NSEXP_ACCEL")
    monkeypatch.delenv("NSEXP_ACCEL")
    accel.forget()
    assert accel.choose(lambda: (True, "ran"))[0] == "kvm"


def test_accel_without_dev_kvm_is_tcg_without_a_probe(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("NSEXP_ACCEL", raising=False)
    monkeypatch.setattr(accel, "KVM_DEVICE", tmp_path / "kvm")

    def probe():
        raise AssertionError("no probe boot without /dev/kvm")

    use, why = accel.choose(probe)
    assert use == "tcg" and "does not exist" in why


def test_vng_command_disables_kvm_only_under_tcg():
    t = VMTestbed()
    assert "--disable-kvm" in t.vng_command("vng")
    assert "--disable-kvm" not in t.vng_command("vng", use_kvm=True)


def test_get_testbed():
    assert isinstance(get_testbed("native"), NativeTestbed)
    assert get_testbed("native").name == "native"
    assert isinstance(get_testbed("vm"), VMTestbed)
    with pytest.raises(TestbedError, match="vm, native"):
        get_testbed("cloud")


def test_bad_env_name_is_refused(tmp_path):
    with pytest.raises(TestbedError, match="invalid environment variable"):
        NativeTestbed().run_batch(["true"], load_module=False, env={"A B": "x"}, out_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# native testbed (this host: the module can never be loaded here)
# --------------------------------------------------------------------------------------------


def test_native_without_device_refuses_with_the_fix(tmp_path):
    native = NativeTestbed(device=str(tmp_path / "nsmigrate"))
    with pytest.raises(TestbedError) as e:
        native.run_batch(["true"], out_dir=tmp_path / "out")
    msg = str(e.value)
    assert "--testbed vm" in msg and "DKMS" in msg and "kmod/dkms.conf" in msg


@pytest.mark.skipif(os.path.exists("/dev/nsmigrate"), reason="the module is loaded on this host")
def test_native_default_device_is_dev_nsmigrate(tmp_path):
    with pytest.raises(TestbedError, match="/dev/nsmigrate"):
        NativeTestbed().run_batch(["true"], out_dir=tmp_path)


def test_native_batch_runs_commands(tmp_path):
    native = NativeTestbed()
    res = native.run_batch(
        [
            'python3 -c \'import os, sys; open(os.environ["NSEXP_OUT"] + "/x.txt", "w")'
            '.write("42"); sys.exit(5)\'',
            'echo "$NSEXP_TESTBED $MYVAR"; echo oops >&2; pwd',
            "sleep 30",
            "echo after",
        ],
        out_dir=tmp_path,
        load_module=False,
        command_timeout=2,
        env={"MYVAR": "hello world"},
    )
    assert res.testbed == "native" and res.kernel_release == os.uname().release
    r0, r1, r2, r3 = res.results
    assert r0.returncode == 5 and not r0.timed_out
    assert (tmp_path / "x.txt").read_text() == "42"
    assert r1.returncode == 0
    assert r1.stdout.splitlines() == ["native hello world", str(tb.REPO_ROOT)]
    assert r1.stderr == "oops\n"
    assert r2.timed_out and r2.returncode is None and 1.5 < r2.duration_s < 15
    assert r3.stdout == "after\n" and r3.ok
    assert res.module_loaded is False and res.module_unloaded is None


def test_native_whole_batch_timeout(tmp_path):
    marker = f"sleep 77.{os.getpid()}"
    t0 = time.monotonic()
    with pytest.raises(TestbedError, match="timed out") as e:
        NativeTestbed().run_batch(["true", marker], out_dir=tmp_path, load_module=False, timeout=2)
    assert time.monotonic() - t0 < 15
    assert [r.returncode for r in e.value.result.results] == [0, None]
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout == ""


# --------------------------------------------------------------------------------------------
# VM: two boots in this file
# --------------------------------------------------------------------------------------------

VM_COMMANDS = [
    # 0: Python in the guest writes a file into the shared folder and exits with a chosen status
    'python3 -c \'import os, sys; p = os.path.join(os.environ["NSEXP_OUT"], "inside.txt"); '
    'open(p, "w").write("written in " + os.uname().release); sys.exit(7)\'',
    # 1: environment, stdout/stderr, guest python is the plain distribution one
    'echo "$NSEXP_TESTBED|$MYVAR|$PWD"; python3 -c "import sys; print(sys.prefix)"; echo e >&2',
    # 2: overruns its per-command timeout
    "sleep 600",
    # 3: the batch goes on after a timed-out command
    "echo after; uname -r",
    # 4: the extra kernel arguments reached the guest's command line
    "cat /proc/cmdline",
]
#: extra kernel arguments given to the batch's boot (harmless on any kernel)
VM_KERNEL_ARGS = ["nsexp.test=one", "nsexp.other=2"]
VM_COMMAND_TIMEOUT = 20


@pytest.fixture(scope="module")
def vm_batch(vm_testbed) -> BatchResult:
    """One boot of the default kernel carrying the whole batch (module not loaded: the module
    may not be built yet; its own tests load it)."""
    res = vm_testbed.run_batch(
        VM_COMMANDS,
        timeout=600,
        command_timeout=VM_COMMAND_TIMEOUT,
        load_module=False,
        env={"MYVAR": "a b'c"},
        kernel_args=VM_KERNEL_ARGS,
    )
    return res


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(900)
class TestVMBatch:
    def test_exit_status_and_file_written_inside(self, vm_batch, vm_testbed):
        r = vm_batch.results[0]
        assert r.returncode == 7, r
        assert not r.timed_out
        text = (vm_batch.out_dir / "inside.txt").read_text()
        assert text == f"written in {vm_testbed.kernel_release()}"

    def test_kernel_release_is_the_booted_one(self, vm_batch, vm_testbed):
        assert vm_batch.testbed == "vm"
        assert vm_batch.kernel_release == vm_testbed.kernel_release()
        assert vm_batch.results[3].stdout == f"after\n{vm_testbed.kernel_release()}\n"
        # the host is never the guest: the host runs its own kernel
        assert vm_batch.out_dir.is_relative_to(tb.VM_RUNS_DIR)

    def test_environment_and_streams(self, vm_batch):
        r = vm_batch.results[1]
        lines = r.stdout.splitlines()
        assert lines[0] == f"vm|a b'c|{tb.REPO_ROOT}"
        assert lines[1] == "/usr"  # the distribution's python3, standard library only
        assert r.stderr == "e\n"

    def test_command_timeout(self, vm_batch):
        r = vm_batch.results[2]
        assert r.timed_out, r
        assert VM_COMMAND_TIMEOUT * 0.9 <= r.duration_s < VM_COMMAND_TIMEOUT + 15
        assert vm_batch.results[3].ok

    def test_kernel_args_reach_the_guest(self, vm_batch):
        cmdline = vm_batch.results[4].stdout.split()
        assert all(arg in cmdline for arg in VM_KERNEL_ARGS), cmdline

    def test_kernel_log(self, vm_batch):
        assert "Linux version" in vm_batch.dmesg
        assert vm_testbed_release_in(vm_batch)
        assert vm_batch.kernel_log_problems() == []
        assert vm_batch.module_loaded is False and vm_batch.module_unloaded is None
        assert (vm_batch.out_dir / "console.log").exists()

    def test_no_qemu_left(self, vm_batch):
        assert vm_processes(str(vm_batch.out_dir)) == []


def vm_testbed_release_in(res: BatchResult) -> bool:
    return f"Linux version {res.kernel_release}" in res.dmesg


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vm_boot_timeout_kills_qemu(vm_testbed, tmp_path):
    """A boot that overruns its timeout is killed, says so, and leaves no QEMU behind."""
    out = tmp_path / "vm-timeout"
    seen_qemu: set[str] = set()
    stop = threading.Event()

    def watch():  # make sure QEMU really ran before the timeout killed it
        while not stop.is_set():
            for pid in vm_processes(str(out)):
                try:
                    seen_qemu.add(Path(f"/proc/{pid}/comm").read_text().strip())
                except OSError:
                    pass
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TestbedError, match="timed out after 15 s") as e:
            vm_testbed.run_batch(["sleep 600"], out_dir=out, timeout=15, load_module=False)
    finally:
        stop.set()
        watcher.join()
    assert time.monotonic() - t0 < 90
    assert any(name.startswith("qemu-system") for name in seen_qemu), seen_qemu
    assert "console.log" in str(e.value)
    # nothing of that boot survives: no vng, virtme-run or qemu naming its folder
    assert vm_processes(str(out)) == []
    ps = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
    assert str(out) not in ps.stdout


def test_progress_line_names_the_command_and_its_last_output(tmp_path: Path) -> None:
    from nsexp.testbed.vm import _guest_state

    assert _guest_state(tmp_path, 2) == "booting (kernel and init)"
    (tmp_path / "started").write_text("1")
    assert _guest_state(tmp_path, 2) == "loading the module"
    (tmp_path / "cmd-000.start").write_text("t")
    assert _guest_state(tmp_path, 2) == "running command 1/2"
    (tmp_path / "cmd-000.out").write_text("check a ...\ncheck b ...\n\n")
    assert _guest_state(tmp_path, 2) == "running command 1/2 (check b ...)"
    for name in ("cmd-000.end", "cmd-001.start", "cmd-001.end"):
        (tmp_path / name).write_text("t")
    assert _guest_state(tmp_path, 2).startswith("commands done")
