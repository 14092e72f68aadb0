#!/bin/bash
# Inside the VM guest: install kmod/ with DKMS for the running kernel, load it with modprobe, and
# run the paper's experiment on the native testbed with it. Run by tests/user_vm.py after
# tests/vm/user_checks.py (one boot); tests/test_dkms_vm.py asserts on what lands in $1/dkms/.
# The guest's /usr, /var and /lib are virtme-ng's copy-on-write overlays of the host's: dkms
# writes /usr/src, /var/lib/dkms and /lib/modules/$(uname -r)/updates there, never on the host.
set -u
R=$1/dkms
mkdir -p "$R"
KREL=$(uname -r)
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../kmod" && pwd)
VERSION=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"/\1/p' "$SRC/dkms.conf")

step() { # name command... : run it, keep its output and exit status
    local name=$1
    shift
    echo "== $name: $*"
    "$@" >"$R/$name.out" 2>&1
    local rc=$?
    echo "$name $rc" >>"$R/steps"
    cat "$R/$name.out"
    return $rc
}

{
    echo "kernel $KREL"
    echo "version $VERSION"
    for d in /usr/src /var/lib/dkms "/lib/modules/$KREL"; do
        echo "mount $d $(findmnt -n -o FSTYPE -T "$d")"
    done
} >"$R/facts"

# The batch loaded the module built by the testbed: unload it, so what runs is DKMS's.
step rmmod rmmod nsmigrate &&
    step add dkms add "$SRC" &&
    step build dkms build "nsmigrate/$VERSION" -k "$KREL" &&
    step install dkms install "nsmigrate/$VERSION" -k "$KREL" &&
    step status dkms status nsmigrate &&
    step modprobe modprobe nsmigrate &&
    step modinfo modinfo -n nsmigrate &&
    step device ls -l /dev/nsmigrate &&
    step run python3 -m nsexp run --backend kmod --testbed native --out "$R/run"
rc=$?
echo "done $rc" >>"$R/steps"
exit $rc
