"""The manager's pool of threads for work that must not run on its event loop.

Threads start on demand, whenever no idle one is there to take a job (up to ``size``), and stay
for the next jobs: a slow job never delays another one. Standard library only.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class Pool:
    """Daemon threads that run jobs; a new thread starts whenever none is idle (up to ``size``)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None]
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job and not yet promised one
        self._threads: set[threading.Thread] = set()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self.size:
                t = threading.Thread(target=self._work, name="nsexp-manager-job", daemon=True)
                self._threads.add(t)
                t.start()
        self._jobs.put((fn, args))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, args = job
            fn(*args)
            with self._lock:
                self._idle += 1
        with self._lock:
            self._threads.discard(threading.current_thread())

    def shutdown(self, deadline: float) -> None:
        """Let the threads finish their jobs and exit; wait for them until ``deadline``."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
