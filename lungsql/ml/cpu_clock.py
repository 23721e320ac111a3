"""Where the cores go: CPU seconds per step of a run, summed over the threads that ran it."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class CpuClock:
    """CPU seconds spent in each step, summed over the threads that ran it.

    Threads share the cores, so wall-clock time per step says little when
    steps overlap; the CPU time of each (``time.thread_time``) says where the
    cores went.  ``with clock.step("cnn"): ...`` adds to "cnn".

    A step whose work runs in threads the clock never sees (OpenVINO computes
    each request on a stream thread of its own, the caller only waits) is
    named `elsewhere`: it is given the process's CPU time since the clock
    started less every other step, when that is more than its callers spent.
    """

    STEPS = ("reading", "decoding", "preprocessing", "cnn", "writing")

    def __init__(self, elsewhere: str | None = None) -> None:
        self._seconds = dict.fromkeys(self.STEPS, 0.0)
        self._lock = threading.Lock()
        self._elsewhere = elsewhere
        self._process_start = time.process_time()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self._seconds[name] = self._seconds.get(name, 0.0) + spent

    def seconds(self) -> dict[str, float]:
        with self._lock:
            seconds = dict(self._seconds)
        if self._elsewhere is not None:
            others = sum(s for name, s in seconds.items() if name != self._elsewhere)
            unseen = time.process_time() - self._process_start - others
            seconds[self._elsewhere] = max(seconds.get(self._elsewhere, 0.0), unseen)
        return seconds

    def describe(self, slices: int) -> str:
        """'reading 0.45, decoding 0.05, ... ms of CPU per slice'."""
        per = ", ".join(f"{name} {1000 * s / max(slices, 1):.2f}" for name, s in self.seconds().items())
        return f"{per} ms of CPU per slice"
