"""Slowing down repeated failed sign-ins, in this process.

Failures are counted per (user name, address) and per address alone over a
sliding window. Once a key has `max_failures` failures in the window, the next
attempt must wait `base_delay_s` after the last failure, doubling with each
further failure (at most the window). The per-name key means that someone
guessing a clinician's password from one address does not lock the clinician
out at their own workstation; the per-address key, with a higher threshold,
slows down guessing many names from one address.

State is kept in memory, per process: enough for one waitress process; a
restart forgets it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable


class LoginThrottle:
    MAX_KEYS = 10_000

    def __init__(self, max_failures: int = 5, window_s: float = 600.0, base_delay_s: float = 30.0,
                 max_failures_per_address: int = 50, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.base_delay_s = base_delay_s
        self.max_failures_per_address = max_failures_per_address
        self.clock = clock
        self._failures: dict[tuple, deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, username: str, address: str | None) -> list[tuple[tuple, int]]:
        return [(("user", username.lower(), address), self.max_failures),
                (("address", address), self.max_failures_per_address)]

    def _recent(self, key: tuple, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def _wait(self, times: deque[float], threshold: int, now: float) -> float:
        if len(times) < threshold:
            return 0.0
        delay = min(self.base_delay_s * 2 ** (len(times) - threshold), self.window_s)
        return max(0.0, times[-1] + delay - now)

    def retry_after(self, username: str, address: str | None) -> int:
        """Seconds to wait before this name may try again from this address (0: now)."""
        now = self.clock()
        with self._lock:
            wait = max(self._wait(self._recent(key, now), threshold, now)
                       for key, threshold in self._keys(username, address))
        return math.ceil(wait)

    def failed(self, username: str, address: str | None) -> tuple[int, int]:
        """Count a failure; (failures of this name from this address in the window, seconds to wait now)."""
        now = self.clock()
        with self._lock:
            if len(self._failures) >= self.MAX_KEYS:
                self._prune(now)
            for key, _ in self._keys(username, address):
                self._failures.setdefault(key, deque()).append(now)
            counts = [(self._recent(key, now), threshold) for key, threshold in self._keys(username, address)]
            wait = max(self._wait(times, threshold, now) for times, threshold in counts)
        return len(counts[0][0]), math.ceil(wait)

    def succeeded(self, username: str, address: str | None) -> None:
        with self._lock:
            self._failures.pop(("user", username.lower(), address), None)

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        if len(self._failures) >= self.MAX_KEYS:  # still full: forget the oldest half
            oldest = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in oldest[: len(oldest) // 2]:
                del self._failures[key]
