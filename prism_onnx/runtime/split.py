"""How a coordinator splits each request's tokens over the devices of its plan.

    even      as even as possible (plan.split_tokens without weights)
    static    fixed weights, one per device rank (the export's `--split`, or `prism run --split 2,1`)
    auto      adaptive: weights proportional to each device's measured speed, so that the devices of a plan
              finish their compute together; the default when the export gives no split

Adaptive split. Every RESULT reports the seconds the device spent in onnxruntime (`timings`, not the time it
waited for means) and the span it held; `observe` turns that into a speed in tokens per second. A device's
speed is the median of its last `window` results (5), so that one request slowed by something else on the
board does not move the split, and the next request's weights are the speeds of its plan's devices. If a
device's time is t(n) = a + b*n for its n tokens, the weights n_q / t_q(n_q) move the split to where every
t_q is equal, the only fixed point (with a = 0 in one step). A device not measured yet gets the mean speed
of those that are; a speed is kept within `max_ratio` of the fastest, so a device that stalled once is not
starved of tokens for good. The split in force for a set of devices changes only when some device's share
would move by more than `hysteresis` (5% of the tokens by default), so that the noise of a shared machine
does not change the plan (and, at CR > 1, the outputs) from request to request.

Pure logic (no sockets, no clock): the coordinator calls `weights(ranks)` when it plans an attempt and
`observe(...)` for each device result; tests drive it with numbers.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from ..errors import PlanError

MODES = ("auto", "even", "static")


def parse_split(text: str | None, devices: int) -> tuple[str, tuple[float, ...] | None]:
    """`--split` of `prism run`: 'auto', 'even', or one positive weight per device ('2,1') -> (mode, weights)."""
    if text is None or text.strip().lower() in ("auto", "even"):
        return (text or "auto").strip().lower(), None
    try:
        weights = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise PlanError(f"--split '{text}': expected auto, even, or {devices} comma-separated weights") from None
    if len(weights) != devices or not all(w > 0 and w < float("inf") for w in weights):
        raise PlanError(f"--split '{text}': expected {devices} positive weights (one per device), auto or even")
    return "static", weights


@dataclass
class SplitPolicy:
    """mode: auto | even | static; static: one weight per device rank (mode static)."""

    mode: str = "auto"
    static: tuple[float, ...] | None = None
    window: int = 5
    max_ratio: float = 16.0
    speeds: dict[int, float] = field(default_factory=dict)  # rank -> tokens per second (median of the window)
    samples: dict[int, int] = field(default_factory=dict)  # rank -> results observed
    recent: dict[int, deque] = field(default_factory=dict)  # rank -> the last `window` speeds
    hysteresis: float = 0.05
    current: dict[tuple[int, ...], tuple[float, ...]] = field(default_factory=dict)  # ranks -> shares in force

    def __post_init__(self):
        if self.mode not in MODES:
            raise PlanError(f"split mode '{self.mode}': choose one of {', '.join(MODES)}")
        if self.mode == "static" and not self.static:
            raise PlanError("a static split needs one weight per device")

    def weights(self, ranks) -> tuple[float, ...] | None:
        """One weight per plan position (the devices `ranks`, in order), or None for an even split."""
        ranks = list(ranks)
        if self.mode == "static":
            return tuple(float(self.static[r]) for r in ranks)
        if self.mode == "even" or len(ranks) < 2:
            return None
        known = [self.speeds[r] for r in ranks if r in self.speeds]
        if not known:
            return None
        mean = sum(known) / len(known)
        speeds = [self.speeds.get(r, mean) for r in ranks]
        floor = max(speeds) / self.max_ratio
        total = sum(max(s, floor) for s in speeds)
        target = tuple(round(max(s, floor) / total, 4) for s in speeds)
        key = tuple(ranks)
        now = self.current.get(key, tuple(1 / len(ranks) for _ in ranks))  # even until it is worth changing
        if max(abs(a - b) for a, b in zip(target, now)) > self.hysteresis:
            self.current[key] = now = target
        return now if key in self.current else None

    def observe(self, rank: int, tokens: int, compute_s: float) -> None:
        """Device `rank` computed `tokens` tokens (its span times the batch) in `compute_s` seconds."""
        if tokens <= 0 or not compute_s > 0:
            return
        recent = self.recent.setdefault(rank, deque(maxlen=self.window))
        recent.append(tokens / compute_s)
        self.speeds[rank] = statistics.median(recent)
        self.samples[rank] = self.samples.get(rank, 0) + 1

    def describe(self) -> dict:
        """For STATUS: the mode, and per device its smoothed speed and how many results it comes from."""
        return {"mode": self.mode, "static": list(self.static) if self.static else None,
                "tokens_per_s": {str(r): round(s, 1) for r, s in sorted(self.speeds.items())},
                "samples": {str(r): n for r, n in sorted(self.samples.items())},
                "in_force": {",".join(map(str, k)): list(v) for k, v in self.current.items()}}
