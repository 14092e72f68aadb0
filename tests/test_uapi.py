"""nsexp.uapi mirrors kmod/nsmigrate.h: compile the header and compare every number."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nsexp import uapi

KMOD = Path(__file__).resolve().parent.parent / "kmod"
FIELDS = [name for name, _ in uapi.NsmigrateReq._fields_]

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include "nsmigrate.h"
#define OFF(f) printf("\"off_%s\": %zu, \"size_%s\": %zu,\n", #f, \
    offsetof(struct nsmigrate_req, f), #f, sizeof(((struct nsmigrate_req *)0)->f))
int main(void)
{
    printf("{\n");
    %OFFSETS%
    printf("\"sizeof\": %zu,\n", sizeof(struct nsmigrate_req));
    printf("\"size_ver1\": %d,\n", NSMIGRATE_REQ_SIZE_VER1);
    printf("\"size_ver2\": %d,\n", NSMIGRATE_REQ_SIZE_VER2);
    printf("\"f_mntns\": %lu,\n", (unsigned long)NSMIGRATE_F_MNTNS);
    printf("\"abi\": %d,\n", NSMIGRATE_ABI_VERSION);
    printf("\"ioc_version\": %lu,\n", (unsigned long)NSMIGRATE_IOC_VERSION);
    printf("\"ioc_migrate\": %lu,\n", (unsigned long)NSMIGRATE_IOC_MIGRATE);
    printf("\"f_pidfd\": %lu, \"f_parent\": %lu, \"f_leave_parent\": %lu, \"f_all\": %lu,\n",
           (unsigned long)NSMIGRATE_F_PIDFD, (unsigned long)NSMIGRATE_F_PARENT,
           (unsigned long)NSMIGRATE_F_LEAVE_PARENT, (unsigned long)NSMIGRATE_F_ALL);
    printf("\"max_timeout\": %llu, \"default_timeout\": %llu,\n",
           (unsigned long long)NSMIGRATE_MAX_TIMEOUT_NS,
           (unsigned long long)NSMIGRATE_DEFAULT_TIMEOUT_NS);
    printf("\"device\": \"%s\"\n}\n", NSMIGRATE_DEVICE);
    return 0;
}
"""


@pytest.fixture(scope="module")
def header(tmp_path_factory) -> dict:
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler: apt-get install gcc (make setup)"
    d = tmp_path_factory.mktemp("uapi")
    src = d / "probe.c"
    src.write_text(PROBE.replace("%OFFSETS%", "\n\t".join(f"OFF({f});" for f in FIELDS)))
    subprocess.run(
        [cc, "-Wall", "-Werror", "-I", str(KMOD), "-o", str(d / "probe"), str(src)], check=True
    )
    return json.loads(
        subprocess.run([str(d / "probe")], capture_output=True, text=True, check=True).stdout
    )


def test_struct_layout_matches(header: dict) -> None:
    assert ctypes.sizeof(uapi.NsmigrateReq) == header["sizeof"]
    for name in FIELDS:
        field = getattr(uapi.NsmigrateReq, name)
        assert (field.offset, field.size) == (header[f"off_{name}"], header[f"size_{name}"]), name


def test_constants_match(header: dict) -> None:
    assert uapi.REQ_SIZE_VER1 == header["size_ver1"] == 64
    assert uapi.REQ_SIZE_VER2 == header["size_ver2"] == header["sizeof"]
    assert uapi.F_MNTNS == header["f_mntns"]
    assert uapi.ABI_VERSION == header["abi"]
    assert uapi.IOC_VERSION == header["ioc_version"]
    assert uapi.IOC_MIGRATE == header["ioc_migrate"]
    assert (uapi.F_PIDFD, uapi.F_PARENT, uapi.F_LEAVE_PARENT, uapi.F_ALL) == (
        header["f_pidfd"],
        header["f_parent"],
        header["f_leave_parent"],
        header["f_all"],
    )
    assert uapi.MAX_TIMEOUT_NS == header["max_timeout"]
    assert uapi.DEFAULT_TIMEOUT_NS == header["default_timeout"]
    assert uapi.DEVICE == header["device"]


def test_every_header_field_is_mirrored() -> None:
    text = (KMOD / "nsmigrate.h").read_text()
    body = text.split("struct nsmigrate_req {", 1)[1].split("};", 1)[0]
    names = [line.split()[-1].rstrip(";") for line in body.strip().splitlines()]
    assert names == FIELDS


def test_command_number_is_frozen_at_version_1(header: dict) -> None:
    # v1 callers computed the command from a 64-byte struct: the number must not move.
    v1 = (3 << 30) | (uapi.IOC_MAGIC << 8) | 1 | (64 << 16)
    assert header["ioc_migrate"] == v1 == uapi.IOC_MIGRATE
