"""Per-token rate limits: a token bucket for each API token id, in this worker's memory.

A token may make `burst` requests at once and `rate` per second after that; beyond it the
request is answered 429 with `Retry-After`. Time is passed in, so tests need no sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

MAX_TRACKED = 100_000  # buckets kept; the fullest (least recently limited) are dropped first


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # token id -> (tokens left, at time)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """0.0 if `key` may go now (and take one from its bucket), else the seconds to wait."""
        now = self._clock()
        with self._lock:
            left, at = self._buckets.get(key, (float(self.burst), now))
            left = min(float(self.burst), left + (now - at) * self.rate)
            if left >= 1.0:
                self._buckets[key] = (left - 1.0, now)
                if len(self._buckets) > MAX_TRACKED:
                    self._forget_full(now)
                return 0.0
            self._buckets[key] = (left, now)
            return (1.0 - left) / self.rate

    def _forget_full(self, now: float) -> None:
        for key, (left, at) in list(self._buckets.items()):
            if left + (now - at) * self.rate >= self.burst:
                del self._buckets[key]


def retry_after_header(wait_s: float) -> int:
    return max(1, math.ceil(wait_s))
