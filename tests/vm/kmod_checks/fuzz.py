"""Random ioctl input: only errnos come back, never an oops."""

from __future__ import annotations

import os
import random

from harness import (
    Namespace,
    Subject,
    check,
    ioctl_errno,
    lib,
    uapi,
)


@check
def fuzz() -> dict:
    """Random ioctl calls; the valid-looking ones only ever name sacrificial processes."""

    n = int(os.environ.get("NSM_FUZZ", "100000"))
    a, b = Namespace("FA", 1), Namespace("FB", 1)
    victims = [Subject(a) for _ in range(2)]
    rng = random.Random(int(os.environ.get("NSM_FUZZ_SEED", "1")))
    dev = lib._device()
    other = os.open("/proc/self/ns/net", os.O_RDONLY)
    pid_choices = [0, -1, 1, 2, 2**31 - 1, 4_000_000, a.init] + [v.gpid for v in victims]
    fd_choices = [-1, 0, 1, 2, 999, dev, other, a.ns_fd, b.ns_fd]
    counts: dict[int, int] = {}
    try:
        for i in range(n):
            kind = rng.random()
            if kind < 0.1:
                arg: int | bytearray = rng.choice(
                    [0, 1, 0xDEAD0000, 0xFFFF888000000000, rng.getrandbits(64)]
                )
            elif kind < 0.4:
                arg = bytearray(rng.getrandbits(8) for _ in range(rng.choice([4, 8, 64, 72])))
            else:
                r = uapi.NsmigrateReq(
                    size=rng.choice([uapi.REQ_SIZE_VER1] * 6 + [0, 63, 65, 4096, 4097]),
                    version=rng.choice([1, 1, 1, 0, 2]),
                    flags=rng.choice([0, 0, 0, 1, 2, 3, 4, 0x80000000]),
                    pid=rng.choice(pid_choices),
                    target_fd=rng.choice(fd_choices),
                    parent=rng.choice([0, -1, 1, a.init, b.init]),
                    timeout_ns=rng.choice([0, 1, 1000, 10**9, 2**64 - 1]),
                )
                arg = bytearray(r)
            cmd = uapi.IOC_MIGRATE if rng.random() < 0.95 else rng.getrandbits(32)
            e = ioctl_errno(dev, cmd, arg)
            counts[e] = counts.get(e, 0) + 1
            if i % 20000 == 0:
                print(f"fuzz {i}/{n}", flush=True)
        return {"n": n, "counts": counts}
    finally:
        os.close(other)
        for v in victims:
            v.kill()
        a.kill()
        b.kill()
