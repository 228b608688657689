"""Counters of what a runner accepted and rejected, and rate-limited log lines for rejections.

A hostile or broken sender can produce thousands of bad messages a second: each one is counted, but
only the first `burst` per `window` seconds get a log line; the next line says how many were not logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, burst: int = 10, window: float = 10.0, clock=time.monotonic):
        self.logger, self.burst, self.window, self.clock = logger, burst, window, clock
        self._start, self._lines, self._suppressed = -float("inf"), 0, 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args) -> bool:
        """Log unless this window's burst is spent; returns whether it logged."""
        with self._lock:
            now = self.clock()
            if now - self._start >= self.window:
                if self._suppressed:
                    self.logger.warning("... %d more rejections not logged in the last %g s", self._suppressed,
                                        self.window)
                self._start, self._lines, self._suppressed = now, 0, 0
            if self._lines >= self.burst:
                self._suppressed += 1
                return False
            self._lines += 1
        self.logger.warning(msg, *args)
        return True


class Counters:
    """accepted[kind], rejected[category], plus named events (auth_denied, handshake_failed, internal_errors).
    Written by the runner's threads (increments of a Counter under a lock), read by STATUS."""

    def __init__(self, logger: logging.Logger, log: RateLimitedLog | None = None):
        self.accepted: Counter = Counter()
        self.rejected: Counter = Counter()
        self.events: Counter = Counter()
        self.rejected_bytes = 0
        self.recent_reasons: deque = deque(maxlen=16)  # the last rejections' "category: why" (not in STATUS)
        self.log = log or RateLimitedLog(logger)
        self._lock = threading.Lock()

    def accept(self, kind: str) -> None:
        with self._lock:
            self.accepted[kind] += 1

    def reject(self, category: str, why: str, nbytes: int = 0, who: str = "") -> None:
        with self._lock:
            self.rejected[category] += 1
            self.rejected_bytes += nbytes
            self.recent_reasons.append(f"{category}: {why}")
        self.log.warning("rejected %s%s (%d bytes): %s", category, f" from {who}" if who else "", nbytes, why)

    def event(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.events[name] += n

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict:
        with self._lock:
            return {"accepted": dict(self.accepted), "rejected": dict(self.rejected),
                    "rejected_bytes": self.rejected_bytes, **dict(self.events)}
