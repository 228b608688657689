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


class FailureSummary:
    """Refused connections, said once and then summed up: the first refusal of a kind from a (port, host) in a
    window gets a line at once; the ones after it are counted and said in one line when the window ends
    ("N more connections from HOST refused on the client port in the last 60 s: why"). `flush(now)` says
    the sums of windows that ended (the runner calls it from its loop); times are the caller's (sans-IO)."""

    def __init__(self, logger: logging.Logger, window: float = 60.0, clock=time.monotonic, max_keys: int = 256):
        self.logger, self.window, self.clock, self.max_keys = logger, window, clock, max_keys
        self._open: dict[tuple[str, str, str], list] = {}  # (port, host, why) -> [window start, count after first]
        self._lock = threading.Lock()

    def record(self, port: str, host: str | None, why: str, now: float | None = None) -> bool:
        """One refused connection; returns whether it got its own line."""
        now = self.clock() if now is None else now
        self.flush(now)
        key = (port, host or "an unknown address", why)
        with self._lock:
            entry = self._open.get(key)
            if entry is None and len(self._open) >= self.max_keys:  # a flood from many addresses: one sum
                key = (port, "other addresses", why)
                entry = self._open.setdefault(key, [now, 0])
            if entry is not None:
                entry[1] += 1
                return False
            self._open[key] = [now, 0]
        self.logger.warning("%s: refused a connection from %s: %s (more like it are summed up every %g s)", *key,
                            self.window)
        return True

    def flush(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        with self._lock:
            ended = [(k, v) for k, v in self._open.items() if now - v[0] >= self.window]
            for k, _ in ended:
                del self._open[k]
        for (port, host, why), (_, count) in ended:
            if count:
                self.logger.warning("%s: %d more connections from %s refused in the last %g s: %s", port, count,
                                    host, self.window, why)


class CauseLog:
    """Errors of the runner's own making (bugs), one ERROR line per cause and window: a cause (the
    exception's type and where it was raised) that repeats is counted, and said again with its count once
    the window has passed; every traceback goes to DEBUG."""

    def __init__(self, logger: logging.Logger, window: float = 60.0, clock=time.monotonic):
        self.logger, self.window, self.clock = logger, window, clock
        self._seen: dict[str, list] = {}  # cause -> [last line's time, repeats since]
        self._lock = threading.Lock()

    @staticmethod
    def cause(e: BaseException) -> str:
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename.rpartition('/')[2]}:{tb.tb_lineno}" if tb is not None else "?"
        return f"{type(e).__name__} at {where}"

    def error(self, e: BaseException, what: str) -> bool:
        """Log `what` (a line naming the failed work) for exception `e`; returns whether it got an ERROR line."""
        self.logger.debug("%s", what, exc_info=e)
        cause, now = self.cause(e), self.clock()
        with self._lock:
            entry = self._seen.get(cause)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return False
            repeats = entry[1] if entry is not None else 0
            self._seen[cause] = [now, 0]
            if len(self._seen) > 1024:
                self._seen.pop(next(iter(self._seen)))
        more = f" ({repeats} more since the last line)" if repeats else ""
        self.logger.error("%s: %s: %s%s (a bug; the traceback is logged at DEBUG, --log-level debug)", what, cause,
                          str(e)[:300], more)
        return True


BUGS = CauseLog(logging.getLogger("prism.run"))  # the runner's own errors: one ERROR line per cause a minute
