"""How long a peer may stay silent before it is lost: learned from its own heartbeats (sans-IO).

A fixed timeout either flaps or is slow: a board whose I/O loop is starved for a moment by a CPU-heavy
neighbour (or a busy network) misses one heartbeat deadline and is declared lost with nothing wrong, while
a large timeout makes every real loss slow to notice. So each peer's timeout follows what its heartbeats
have shown, in the spirit of a phi-accrual detector (Hayashibara et al., 2004) with a normal model: a gap
is the time between two heartbeats (or how stale a heartbeat's echo of ours had become when the next one
refreshed it); over the last WINDOW gaps, the timeout is the largest of

    the floor (--heartbeat-timeout),
    mean + Z * std of the gaps (Z = 6: a normal gap that long comes once in ~10^9; std at least 10% of the
        mean, so that a perfectly regular peer is not given a razor's edge), and
    MARGIN x the longest gap seen (pauses are heavier-tailed than a normal law: a peer that paused once
        for 1.2 s may pause so again),

and at most CAP_FACTOR x the floor (at least CAP_MIN seconds): a dead peer is always lost within that
bound. Gaps longer than twice the timeout in force are not learned: such a silence is a stopped or cut-off
peer, not jitter, and learning it would slow down the next real loss.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW = 600  # gaps remembered (2 minutes of heartbeats at 5 per second)
MIN_SAMPLES = 5  # fewer: the floor alone
Z = 6.0
MARGIN = 1.5
CAP_FACTOR = 10.0
CAP_MIN = 10.0


@dataclass
class Gaps:
    """The recent gaps of one signal of one peer, and the timeout they imply."""

    gaps: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _memo: tuple[float, float] | None = None  # (floor, timeout) since the last gap

    def observe(self, gap: float, floor: float) -> None:
        if 0 <= gap < 2 * self.timeout(floor):
            self.gaps.append(gap)
            self._memo = None

    def timeout(self, floor: float) -> float:
        if self._memo is not None and self._memo[0] == floor:
            return self._memo[1]
        n, cap, t = len(self.gaps), max(CAP_MIN, CAP_FACTOR * floor), floor
        if n >= MIN_SAMPLES:
            mean = sum(self.gaps) / n
            std = max(math.sqrt(sum((g - mean) ** 2 for g in self.gaps) / (n - 1)), 0.1 * mean)
            t = min(cap, max(floor, mean + Z * std, MARGIN * max(self.gaps)))
        self._memo = (floor, t)
        return t

    def describe(self, floor: float) -> str:
        t = self.timeout(floor)
        if t <= floor:
            return f"timeout {floor:g} s"
        return f"timeout {t:.1f} s, learned from its last {len(self.gaps)} heartbeats (--heartbeat-timeout {floor:g})"
