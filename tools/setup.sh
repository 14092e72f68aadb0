#!/usr/bin/env bash
# nsexp one-command setup (called by `make setup`, hence by `make run` and `make test`).
#
# Idempotent: installs only what is missing and a second run takes seconds.
#   1. system packages (apt): QEMU, Debian kernels with their headers (bookworm's 6.1 and the
#      newest 6.12 from bookworm-backports/-security), kernel sources, the module toolchain, CRIU;
#   2. .venv with the locked Python dependencies (requirements/lock.txt, hash-checked; refresh it
#      with `make lock`), then the project itself, editable, with --no-deps.
# Non-interactive (CI=true, no stdin). Needs root and apt-get only when something is missing:
# otherwise it stops and names exactly what is missing and how to get it.
#
# Environment: PYTHON (interpreter for the venv, default python3, must be >= 3.11),
#              NSEXP_VENV (default <repo>/.venv), NSEXP_SKIP_APT=1 (skip the system part).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${NSEXP_VENV:-$ROOT/.venv}
STAMP=$VENV/.nsexp-setup-stamp
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt

log() { echo "setup: $*" >&2; }
die() {
    echo "setup: ERROR: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# 1. System packages
# ---------------------------------------------------------------------------------------------
# Always needed. gcc + make build the module with kbuild; Debian's linux-headers packages ship a
# prebuilt objtool and kbuild scripts, so flex, bison, bc and libelf-dev are not needed for an
# out-of-tree module (they are for building a whole kernel).
BASE_PKGS=(
    qemu-system-x86 # the VM testbed (TCG; virtme-ng drives it)
    linux-image-amd64 linux-headers-amd64 # Debian's default kernel (6.1 on bookworm) + headers
    linux-source-6.1 # the source the module is written against
    criu procps kmod busybox-static # CRIU baseline, ps/pgrep, insmod/rmmod, vng's initramfs
    gcc make # kbuild for the module
    python3 # the guest side runs the distribution's python3 (standard library only)
)

# What the tests and the provenance need besides: git (a run records the commit it ran), perl
# (the kernel's checkpatch.pl), dkms (the DKMS test installs the module in the guest), chromium
# (the explorer's browser test drives Debian's build: browsers are never downloaded), musl-tools
# (a test builds a static musl program).
TEST_PKGS=(git perl dkms chromium musl-tools)

# Building the debug guest kernel (`make debug-kernel`, run by `make test`) from linux-source-6.12:
# kconfig needs flex/bison, objtool libelf-dev, the build bc, libssl-dev, cpio (BTF is off: no pahole).
DEBUG_KERNEL_PKGS=(flex bison libelf-dev bc libssl-dev cpio xz-utils)

OS_CODENAME=""
if [[ -r /etc/os-release ]]; then
    OS_CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi

is_installed() { # pkg -> 0 if installed
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

missing_of() { # pkgs... -> prints the missing ones
    local p
    for p in "$@"; do
        is_installed "$p" || echo "$p"
    done
}

need_root_and_apt() { # what... ; stop with an exact message unless we can install
    local what="$*"
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
        die "missing: ${what}.
  This machine has no apt-get/dpkg: nsexp's setup targets Debian-family systems (Debian 12
  bookworm is the reference). Install the equivalents of those Debian packages with your
  package manager, or run on Debian 12."
    fi
    if [[ $(id -u) -ne 0 ]]; then
        die "missing: ${what}.
  Installing them needs root. Run as root:
      apt-get update && apt-get install -y ${what}
  (or run \`sudo make setup\`), then run make again."
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get update -q </dev/null >&2 || die "apt-get update failed (network? sources?)"
        APT_UPDATED=1
    fi
}

apt_install() { # pkgs...
    apt_update_once
    log "apt-get install $*"
    apt-get install -y -q --no-install-recommends "$@" </dev/null >&2 ||
        die "apt-get install $* failed"
}

# Newest linux-image-6.12.N+deb12-amd64 whose linux-headers-... also exists in apt.
newest_612_release() {
    local pkg rel
    apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' 2>/dev/null |
        awk '{print $1}' | sed 's/^linux-image-//' | sort -rV |
        while read -r rel; do
            pkg="linux-headers-$rel"
            if apt-cache show "$pkg" >/dev/null 2>&1; then
                echo "$rel"
                break
            fi
        done
}

# An installed 6.12 kernel (image in /boot) with its headers, if any.
installed_612_release() {
    local img rel
    for img in /boot/vmlinuz-6.12.*+deb12-amd64; do
        [[ -e $img ]] || continue
        rel=${img#/boot/vmlinuz-}
        if is_installed "linux-headers-$rel"; then
            echo "$rel"
        fi
    done | sort -V | tail -n 1
}

has_backports_source() {
    grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

system_setup() {
    local missing=()
    mapfile -t missing < <(missing_of "${BASE_PKGS[@]}" "${TEST_PKGS[@]}" "${DEBUG_KERNEL_PKGS[@]}")

    # The venv needs ensurepip: pyenv/python.org builds have it; Debian's python3 needs python3-venv.
    if command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
        if [[ "$(command -v "$PYTHON")" == /usr/bin/* ]] && ! is_installed python3-venv; then
            missing+=(python3-venv)
        fi
    fi

    local want612=0 rel612=""
    if [[ $OS_CODENAME == bookworm ]]; then
        rel612=$(installed_612_release)
        if [[ -z $rel612 ]]; then
            want612=1
        fi
        if ! is_installed linux-source-6.12; then
            want612=1
        fi
    fi

    if [[ ${#missing[@]} -eq 0 && $want612 -eq 0 ]]; then
        log "system packages: all present${rel612:+ (6.12 kernel: $rel612)}"
        return 0
    fi

    local what="${missing[*]}"
    if [[ $want612 -eq 1 ]]; then
        what="${what:+$what }linux-image-6.12.*+deb12-amd64 (newest) with its linux-headers, linux-source-6.12 (from bookworm-backports)"
    fi
    need_root_and_apt "$what"

    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_install "${missing[@]}"
    fi

    if [[ $want612 -eq 1 ]]; then
        if ! has_backports_source; then
            log "adding bookworm-backports to /etc/apt/sources.list.d/nsexp-backports.list"
            echo "deb http://deb.debian.org/debian bookworm-backports main" \
                >/etc/apt/sources.list.d/nsexp-backports.list
            APT_UPDATED=0
        fi
        apt_update_once
        if [[ -z $rel612 ]]; then
            rel612=$(newest_612_release)
            [[ -n $rel612 ]] ||
                die "no linux-image-6.12.*+deb12-amd64 with matching linux-headers found by apt-cache search (is bookworm-backports or bookworm-security in the apt sources?)"
            apt_install "linux-image-$rel612" "linux-headers-$rel612"
        fi
        if ! is_installed linux-source-6.12; then
            apt_install -t bookworm-backports linux-source-6.12
        fi
        log "6.12 kernel: $rel612"
    fi
}

# ---------------------------------------------------------------------------------------------
# 2. Python venv
# ---------------------------------------------------------------------------------------------
venv_setup() {
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "missing: $PYTHON (Python >= 3.11). Install it (apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11+"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); nsexp needs Python >= 3.11 (set PYTHON=/path/to/python3.11+)"

    local pyver key
    pyver=$("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)')
    key=$(cat pyproject.toml "$LOCK" tools/setup.sh | sha256sum | cut -d' ' -f1)
    key="$key $pyver"

    if [[ -x $VENV/bin/python && -x $VENV/bin/nsexp && -f $STAMP && "$(cat "$STAMP")" == "$key" ]]; then
        log "venv: up to date ($VENV)"
        return 0
    fi

    if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        log "creating $VENV with $(command -v "$PYTHON") ($pyver)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" ||
            die "could not create the venv with $PYTHON -m venv (Debian: apt-get install python3-venv)"
    fi
    # Exactly the versions and files of the lock (every extra), nothing resolved here; then the
    # project alone, built with the locked setuptools.
    log "pip install --require-hashes -r $LOCK into $VENV (first run takes a few minutes)"
    local piplog=$VENV/pip-install.log pip=("$VENV/bin/python" -m pip)
    if ! "${pip[@]}" install --disable-pip-version-check --progress-bar off --require-hashes \
        --no-deps -r "$LOCK" </dev/null >"$piplog" 2>&1; then
        tail -n 40 "$piplog" >&2
        die "pip install -r $LOCK failed (full log: $piplog; a changed pyproject.toml needs \`make lock\`)"
    fi
    if ! "${pip[@]}" install --disable-pip-version-check --no-deps --no-build-isolation \
        -e . </dev/null >>"$piplog" 2>&1; then
        tail -n 40 "$piplog" >&2
        die "pip install --no-deps -e . failed (full log: $piplog)"
    fi
    "${pip[@]}" check >>"$piplog" 2>&1 || {
        tail -n 20 "$piplog" >&2
        die "$LOCK is incomplete or inconsistent (pip check failed): refresh it with \`make lock\`"
    }
    grep -E '^Successfully installed' "$piplog" | cut -c1-300 >&2 || true
    echo "$key" >"$STAMP"
    log "venv: ready"
}

if [[ ${NSEXP_SKIP_APT:-0} == 1 ]]; then
    log "NSEXP_SKIP_APT=1: skipping system packages"
else
    system_setup
fi
venv_setup
log "done"
