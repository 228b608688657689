"""The partition plan: which device owns which tokens, how it cuts them into segments, who sends to whom.

This module is the single definition of PRISM's bookkeeping (see PRISM.md). It is pure numpy so that the
PyTorch reference (`prism_onnx.simulate`), the exporter and the on-device runtime all use the same code.

Vocabulary:
    span        device p owns tokens [start, end) of the global sequence
    segment     a group of a device's tokens that travels as one mean row (<= CR tokens)
    sink        a token sent as a segment of its own (count 1): the first token, and for BERT the last
    averager    [B, S, n] matrix; averager @ z gives the S segment means of a device's n tokens
    counts      [B, S] valid tokens in each segment (padding excluded); 0 means "no such segment"
    rank        a device of the export (0..P-1), as `prism run --rank` names it
    position    a plan's i-th partition (0..devices-1): the i-th contiguous slice of the sequence
    ranks       a plan's membership: position i is computed by device ranks[i] (strictly increasing, so the
                token order is the rank order). The default is every device, ranks[i] = i. A plan over the
                live devices of an export (elastic partitions: a device was lost) has fewer positions than
                the export has devices; every method below that takes a device takes its *rank*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PlanError

MASKED = -1e9
"""Additive attention bias for a key that must not be seen (finite, so a fully masked row stays NaN-free)."""

SINK_KINDS = ("first", "last")


def split_tokens(n_tokens: int, devices: int, weights: list[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous spans [start, end) for `devices` devices over `n_tokens` tokens.

    Even split by default (the first n % P devices get one more token, like numpy.array_split); with
    `weights`, every device gets one token and the rest is shared in proportion (largest remainder).
    """
    if devices < 1:
        raise PlanError(f"devices must be >= 1, got {devices}")
    if n_tokens < devices:
        raise PlanError(f"cannot split {n_tokens} tokens over {devices} devices: every device needs >= 1 token")
    if weights is None:
        base, extra = divmod(n_tokens, devices)
        sizes = [base + (1 if p < extra else 0) for p in range(devices)]
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (devices,):
            raise PlanError(f"split weights: expected {devices} values (one per device), got {len(weights)}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise PlanError(f"split weights must be positive numbers, got {list(weights)}")
        free = n_tokens - devices
        share = w / w.sum() * free
        sizes_f = np.floor(share).astype(int)
        leftover = free - int(sizes_f.sum())
        order = np.argsort(-(share - sizes_f), kind="stable")
        sizes_f[order[:leftover]] += 1
        sizes = [1 + int(s) for s in sizes_f]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(bounds[p]), int(bounds[p + 1])) for p in range(devices)]


@dataclass(frozen=True)
class Segments:
    """What device p sends per layer: averager [B, S, n] (rows sum to 1 or 0) and counts [B, S]."""

    averager: np.ndarray
    counts: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.counts.shape[1])


def segment_tokens(
    start: int,
    end: int,
    attention_mask: np.ndarray,
    compression_ratio: int,
    sinks: tuple[str, ...] = (),
) -> Segments:
    """Cut device tokens [start, end) into segments.

    Layout: [first-token sink?] + ceil(n / CR) positional segments + [last-token sink?]. A sink slot
    exists when the device owns that sink in at least one batch row; in the other rows its count is 0.
    A sink is removed from its positional segment. Padding (attention_mask == 0) is excluded. Rows that
    are empty in every batch row are not sent at all (so at CR=1 sinks cost nothing).
    """
    mask = np.asarray(attention_mask).astype(bool)
    B, N = mask.shape
    n = end - start
    cr = int(compression_ratio)
    valid = mask[:, start:end]  # [B, n]
    local = np.arange(n)

    head, tail = [], []  # sink rows, each [B, n] with at most one token per batch row
    if "first" in sinks and start == 0:
        head.append(valid & (local == 0)[None, :])
    if "last" in sinks:
        last = N - 1 - np.argmax(mask[:, ::-1], axis=1)  # [B] last real token (rows without one: masked below)
        owned = (last[:, None] == start + local[None, :]) & valid & (last[:, None] > 0)
        if owned.any():
            tail.append(owned)
    is_sink = np.zeros((B, n), dtype=bool)
    for row in head + tail:
        is_sink |= row

    n_pos = -(-n // cr)
    positional = (local[None, :] // cr) == np.arange(n_pos)[:, None]  # [n_pos, n]
    positional = positional[None, :, :] & (valid & ~is_sink)[:, None, :]  # [B, n_pos, n]
    member = np.concatenate([r[:, None, :] for r in head] + [positional] + [r[:, None, :] for r in tail], axis=1)

    member = member[:, member.any(axis=(0, 2)), :]  # drop rows empty in every batch row (e.g. a sink's old slot)
    counts = member.sum(axis=2).astype(np.int32)  # [B, S]
    averager = member / np.maximum(counts, 1)[:, :, None]  # [B, S, n]
    return Segments(averager=averager.astype(np.float32), counts=counts)


def remote_bias(counts: np.ndarray, count_bias: bool) -> np.ndarray:
    """Additive attention bias for received mean rows: log(count) (a mean stands for `count` tokens)
    when count_bias, else 0; MASKED for an empty segment."""
    counts = np.asarray(counts)
    bias = np.log(np.maximum(counts, 1)).astype(np.float32) if count_bias else np.zeros(counts.shape, np.float32)
    return np.where(counts > 0, bias, np.float32(MASKED)).astype(np.float32)


def local_bias(valid: np.ndarray) -> np.ndarray:
    """Additive attention bias for a device's own keys: 0 for real tokens, MASKED for padding."""
    return np.where(np.asarray(valid).astype(bool), 0.0, MASKED).astype(np.float32)


@dataclass(frozen=True)
class Plan:
    """Everything a device needs to know about one request's partitioning.

    Built identically on every device (and in `simulate`) from the request's attention mask, so the
    devices agree on every shape without talking about it.
    """

    attention_mask: np.ndarray  # [B, N] 1 = real token, 0 = padding
    devices: int
    compression_ratio: int
    causal: bool = False
    sinks: tuple[str, ...] = ()  # the model's sink tokens that are kept (empty = keep_sinks off)
    count_bias: bool = True
    weights: tuple[float, ...] | None = None  # split weight per position (None: as even as possible)
    ranks: tuple[int, ...] | None = None  # position -> device rank (None: 0..devices-1)
    spans: list[tuple[int, int]] = field(init=False)  # per position
    segments: list[Segments] = field(init=False)  # per position (Plan.segment(rank) by rank)

    def __post_init__(self):
        mask = np.asarray(self.attention_mask)
        if mask.ndim != 2:
            raise PlanError(f"attention_mask must be [batch, tokens], got shape {mask.shape}")
        if int(self.compression_ratio) != self.compression_ratio or self.compression_ratio < 1:
            raise PlanError(f"compression_ratio must be an integer >= 1, got {self.compression_ratio}")
        unknown = set(self.sinks) - set(SINK_KINDS)
        if unknown:
            raise PlanError(f"unknown sink kinds {sorted(unknown)}; known: {SINK_KINDS}")
        ranks = tuple(range(self.devices)) if self.ranks is None else tuple(int(r) for r in self.ranks)
        if len(ranks) != self.devices or any(r < 0 for r in ranks) or any(a >= b for a, b in zip(ranks, ranks[1:])):
            raise PlanError(f"plan ranks must be {self.devices} increasing device ranks, got {list(ranks)}")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "_position", {r: i for i, r in enumerate(ranks)})
        spans = split_tokens(mask.shape[1], self.devices, list(self.weights) if self.weights else None)
        object.__setattr__(self, "spans", spans)
        segs = [segment_tokens(s, e, mask, self.compression_ratio, self.sinks) for s, e in spans]
        object.__setattr__(self, "segments", segs)

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.shape[1])

    @property
    def tail(self) -> int:
        """The rank of the last partition (it decodes a generation request)."""
        return self.ranks[-1]

    def position(self, rank: int) -> int:
        """The plan position device `rank` computes (PlanError when it is not in this plan)."""
        try:
            return self._position[rank]
        except KeyError:
            raise PlanError(f"device {rank} is not in this plan (devices {list(self.ranks)})") from None

    def span(self, p: int) -> tuple[int, int]:
        return self.spans[self.position(p)]

    def segment(self, p: int) -> Segments:
        """The segments device p sends."""
        return self.segments[self.position(p)]

    def sources(self, p: int) -> list[int]:
        """Devices whose means device p receives, in rank order. With a causal model, only earlier
        devices: later tokens are invisible to p (partition-aware causal mask), so they are not sent."""
        self.position(p)
        return [q for q in self.ranks if q != p and (q < p or not self.causal)]

    def receivers(self, q: int) -> list[int]:
        """Devices that device q sends its means to."""
        return [p for p in self.ranks if q in self.sources(p)]

    def averager(self, p: int) -> np.ndarray:
        """[B, S_p, n_p]; an empty [B, 0, n_p] when nobody receives from p."""
        seg = self.segment(p).averager
        return seg if self.receivers(p) else seg[:, :0, :]

    def position_ids(self, p: int) -> np.ndarray:
        """[B, n_p] positions of device p's tokens in their own row: the real tokens before them, so a row
        padded on the left counts from its first real token, as transformers' generate does; with right or
        no padding these are the global indices s_p..e_p-1 (padding takes its neighbour's position, unused)."""
        s, e = self.span(p)
        mask = np.asarray(self.attention_mask).astype(bool)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [B, N]
        return np.ascontiguousarray(pos[:, s:e], dtype=np.int64)

    def valid(self, p: int) -> np.ndarray:
        s, e = self.span(p)
        return np.asarray(self.attention_mask)[:, s:e].astype(bool)

    def local_bias(self, p: int) -> np.ndarray:
        return local_bias(self.valid(p))

    def remote_counts(self, p: int) -> np.ndarray:
        """[B, R_p] counts of the rows device p receives, in device order."""
        parts = [self.segment(q).counts for q in self.sources(p)]
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.batch, 0), np.int32)

    def remote_bias(self, p: int) -> np.ndarray:
        return remote_bias(self.remote_counts(p), self.count_bias)

    def kv_rows(self, p: int) -> int:
        """Rows device p projects to keys and values per layer: own tokens + received means."""
        s, e = self.span(p)
        return (e - s) + int(self.remote_counts(p).shape[1])

    def sent_rows(self, p: int) -> int:
        """Mean rows device p sends per layer, summed over its receivers (per batch row)."""
        return self.segment(p).rows * len(self.receivers(p))

    def describe(self) -> dict:
        """What a reply reports of the plan in force: the ranks that computed it, their split weights and
        their token spans [start, end), position by position."""
        return {"ranks": list(self.ranks), "split_weights": list(self.weights) if self.weights else None,
                "spans": [list(s) for s in self.spans]}


def make_plan(spec, attention_mask, *, devices: int, compression_ratio: int, count_bias: bool = True,
              keep_sinks: bool = True, split_weights=None, ranks=None) -> Plan:
    """The plan for a model (its ModelSpec: `causal`, `sinks`) and a request's [B, N] attention mask;
    `ranks`: the devices that compute it (position i -> ranks[i]; default 0..devices-1)."""
    return Plan(
        attention_mask=attention_mask, devices=devices, compression_ratio=compression_ratio,
        causal=spec.causal, sinks=tuple(spec.sinks) if keep_sinks else (), count_bias=count_bias,
        weights=tuple(split_weights) if split_weights else None, ranks=tuple(ranks) if ranks is not None else None,
    )


def member_weights(split_weights, ranks) -> list[float] | None:
    """An export's split weights (one per device rank, or None) restricted to the devices `ranks` of a plan."""
    if split_weights is None:
        return None
    if any(not 0 <= r < len(split_weights) for r in ranks):
        raise PlanError(f"plan ranks {list(ranks)} outside the {len(split_weights)} devices of the split")
    return [float(split_weights[r]) for r in ranks]


def plan_for(spec, attention_mask, settings, split_weights=None, ranks=None) -> Plan:
    """The plan of PrismSettings (P, CR, switches, split) for a request. `ranks`: the devices that compute it
    (a subset of 0..P-1, e.g. the live ones; default all P); `split_weights`: one weight per *plan position*,
    overriding the settings' split (a run-time choice; by default the settings' weights of those ranks)."""
    if ranks is not None:
        ranks = sorted(int(r) for r in ranks)
        if len(set(ranks)) != len(ranks) or any(not 0 <= r < settings.devices for r in ranks) or not ranks:
            raise PlanError(f"plan ranks {ranks} must be distinct devices of 0..{settings.devices - 1}")
    devices = settings.devices if ranks is None else len(ranks)
    if split_weights is None:
        split_weights = settings.split_weights if ranks is None else member_weights(settings.split_weights, ranks)
    return make_plan(spec, attention_mask, devices=devices, compression_ratio=settings.compression_ratio,
                     count_bias=settings.count_bias, keep_sinks=settings.keep_sinks, split_weights=split_weights,
                     ranks=ranks)


def max_rows(max_tokens: int, compression_ratio: int) -> int:
    """Upper bound on the mean rows one device sends per layer: a device owns at most max_tokens tokens,
    cut into ceil(n / CR) positional segments, plus up to 2 sink rows."""
    return -(-int(max_tokens) // int(compression_ratio)) + 2
