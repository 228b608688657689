"""How a coordinator splits each request's tokens over the devices of its plan.

    even      as even as possible (plan.split_tokens without weights); the default when the export gives
              no split
    static    fixed weights, one per device rank (the export's `--split`, or `prism run --split 2,1`)
    auto      adaptive (opt-in: `prism run --split auto`): weights proportional to each device's measured
              speed, so that the devices of a plan finish their compute together

Why the default is fixed. At CR > 1 a request's outputs depend on where its partition boundaries fall (which
tokens are averaged together), so a split that moves with measured speeds gives the same text a different
embedding from one call to the next (MiniLM P=2 CR=8: up to 0.70 apart right after start), which no vector
index or cache can use; even at CR=1 the sums change order in the last bits. So by default the boundaries
depend only on the request and the live devices: identical requests give bit-identical outputs. A mixed
fleet measures its boards once (`prism profile device-K`) and fixes the weights (`prism run --split
w0,w1,...`), or opts into `auto` where latency matters more than reproducibility. Whatever the mode, every
reply reports its plan (`stats.ranks`, `spans`, `split_weights`, and `split`: the `prism infer --split`
value that reproduces it), and a request may carry its own split (`requested`).

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

from ..errors import DevicesUnavailable, InputError, PlanError

MODES = ("auto", "even", "static")


def default_policy(export_split) -> "SplitPolicy":
    """`prism run` without --split: the export's weights if it was given --split, else even (fixed, so that
    identical requests give identical outputs: see the module's docstring)."""
    return SplitPolicy("static", tuple(export_split)) if export_split else SplitPolicy("even")


def requested(split, live, coordinator: int) -> tuple[list[int], tuple[float, ...] | None]:
    """A request's own split (`prism infer --split`): one weight per device of the export, 0 for a device
    left out of the plan -> (the plan's ranks, their weights; None when equal: even). Every device with a
    weight must be live (DevicesUnavailable otherwise: the plan cannot be reproduced now), and the
    coordinator must be one of them (it runs a part of every plan it coordinates)."""
    ranks = [r for r, w in enumerate(split) if w > 0]
    if coordinator not in ranks:
        raise InputError(f"split {split_arg_of(split)} leaves out device {coordinator}, which coordinates this "
                         f"request: send it to a server of a device in the split")
    lost = [r for r in ranks if r not in set(live)]
    if lost:
        raise DevicesUnavailable(f"split {split_arg_of(split)} needs device{'s' if len(lost) > 1 else ''} {lost}, "
                                 f"which {'are' if len(lost) > 1 else 'is'} not live", ranks=lost)
    weights = tuple(float(split[r]) for r in ranks)
    return ranks, None if len(set(weights)) == 1 else weights


def split_arg(ranks, weights, devices: int) -> str:
    """The `prism infer --split` value of a plan: one weight per device of the export, 0 for a device not
    in it (an even plan: 1 for each of its devices). Weights are written exactly (repr of the float)."""
    per_rank = dict(zip(ranks, weights if weights else [1.0] * len(ranks)))
    return split_arg_of([per_rank.get(r, 0.0) for r in range(devices)])


def split_arg_of(weights) -> str:
    return ",".join("0" if w == 0 else ("%d" % w if float(w).is_integer() else repr(float(w))) for w in weights)


def parse_request_split(text: str) -> tuple[float, ...]:
    """`prism infer --split`: one weight per device of the export, 0 to leave one out ('1,0,1'); refused in
    one line naming the bad entry."""
    out = []
    for x in text.split(","):
        try:
            w = float(x)
        except ValueError:
            raise InputError(f"--split '{text}': '{x.strip()}' is not a number (one weight per device of the "
                             f"export, 0 to leave one out, e.g. 1,0,1)") from None
        if not (w >= 0 and w < float("inf")):
            raise InputError(f"--split '{text}': weights must be numbers >= 0, got '{x.strip()}'")
        out.append(w)
    if not any(out):
        raise InputError(f"--split '{text}': at least one device needs a positive weight")
    return tuple(out)


def parse_split(text: str | None, devices: int) -> tuple[str, tuple[float, ...] | None]:
    """`--split` of `prism run`: 'auto', 'even', or one positive weight per device ('2,1') -> (mode, weights)."""
    if text is None or text.strip().lower() in ("auto", "even"):
        return (text or "even").strip().lower(), None
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

    mode: str = "even"
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
