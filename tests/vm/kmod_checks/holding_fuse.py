"""A FUSE filesystem that holds its requests, to put a thread to sleep in the kernel on purpose.

Helper of the guest-side module checks (tests/vm/kmod_checks/); runs inside the VM as root;
standard library only.
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import threading
import time

from harness import libc

IN_HEADER = struct.Struct("<IIQQIIII")  # fuse_in_header: len, opcode, unique, nodeid, ...
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
# fuse_init_out, protocol 7.31: major, minor, max_readahead, flags, max_background,
# congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
FUSE_LOOKUP, FUSE_INIT, FUSE_INTERRUPT = 1, 26, 36
MNT_DETACH = 2


class HoldingFuse:
    """A FUSE mount on ``mnt`` whose daemon (this process) answers nothing until told.

    Without ``answer_init`` not even FUSE_INIT is answered: every request waits in
    fuse_get_req(), a killable sleep (state D) that no ordinary signal or task work ends;
    close() aborts the connection and the request fails with ENOTCONN. With it, a thread of
    this process answers FUSE_INIT and reads every later request without answering: the
    requester sleeps in request_wait_answer(), and once it has a fatal signal (an exec in
    another thread kills it) only an answer wakes it, an uninterruptible sleep. answer_held()
    answers them (ENOENT).

    Fork every process that must not keep the connection alive before creating this one.
    """

    def __init__(self, mnt: str, *, answer_init: bool) -> None:
        subprocess.run(["modprobe", "fuse"], capture_output=True, check=False)  # 6.1: a module
        self.mnt = mnt
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        os.makedirs(mnt, exist_ok=True)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"nsm-fuse", mnt.encode(), b"fuse", 0, opts) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, os.strerror(err), mnt)
        self.opcodes: list[int] = []  # every request read, in order
        self._held: list[int] = []  # uniques of requests not answered yet
        self._answering = False
        self._lock = threading.Lock()
        self._daemon: threading.Thread | None = None
        if answer_init:
            self._daemon = threading.Thread(target=self._serve, daemon=True)
            self._daemon.start()

    def _serve(self) -> None:
        while True:
            try:
                req = os.read(self.fd, 1 << 17)
            except OSError:
                return  # ENODEV: the mount is gone
            _, opcode, unique, *_ = IN_HEADER.unpack_from(req)
            with self._lock:
                self.opcodes.append(opcode)
                if opcode == FUSE_INIT:
                    init = INIT_OUT.pack(7, 31, 0, 0, 0, 0, 4096, 0, 0, 0, 0, *[0] * 7)
                    self._reply(unique, 0, init)
                elif opcode != FUSE_INTERRUPT:  # an interrupt is never answered
                    self._held.append(unique)
                    if self._answering:
                        self._answer_held()

    def _reply(self, unique: int, error: int, body: bytes = b"") -> None:
        os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), error, unique) + body)

    def _answer_held(self) -> None:
        while self._held:
            self._reply(self._held.pop(), -2)  # -ENOENT

    def answer_held(self) -> None:
        """Answer every request held so far, and from now on every new one, with ENOENT."""
        with self._lock:
            self._answering = True
            self._answer_held()

    def wait_for(self, opcode: int, wait_s: float = 10.0) -> bool:
        """Whether a request ``opcode`` has been read within wait_s."""
        deadline = time.monotonic() + wait_s
        while opcode not in self.opcodes and time.monotonic() < deadline:
            time.sleep(0.02)
        return opcode in self.opcodes

    def close(self) -> None:
        """End the connection (waking any sleeper) and the mount."""
        if self._daemon is None:
            os.close(self.fd)  # nobody else holds the device file: this aborts the connection
            libc.umount2(self.mnt.encode(), MNT_DETACH)
            return
        self.answer_held()
        libc.umount2(self.mnt.encode(), MNT_DETACH)  # the daemon's read ends with ENODEV
        self._daemon.join(10)
        os.close(self.fd)
