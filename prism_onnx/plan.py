"""The partition plan: which device owns which tokens, how it cuts them into segments, who sends to whom.

This module is the single definition of PRISM's bookkeeping (see PRISM.md). It is pure numpy so that the
PyTorch reference (`prism_onnx.simulate`), the exporter and the on-device runtime all use the same code.

Vocabulary:
    span        device p owns tokens [start, end) of the global sequence
    segment     a group of a device's tokens that travels as one mean row (<= CR tokens)
    sink        a token sent as a segment of its own (count 1): the first token, and for BERT the last
    window      the W tokens just before a device's span (and for encoders just after it), which that
                device receives at full resolution, one row per token (PRISM.md, "Halo window")
    far         the remote tokens outside a device's window: their segment means ("means") or nothing
                ("none"; window and sinks only)
    row         what a device sends for one exchange point: a segment mean, a sink, or a window token;
                rows are cut so that every receiver gets each remote token once (a mean whose tokens lie
                in the receiver's window is not sent to it)
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
FAR_CONTEXT = ("means", "none")
MEAN, SINK, WINDOW = 0, 1, 2  # Segments.kinds: what a row is


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
    """The rows a device computes per layer: averager [B, S, n] (rows sum to 1 or 0), counts [B, S], and per
    row its kind (MEAN, SINK or WINDOW) and the global token range [start, end) it may average (a sink's
    range is its own slot: the first token, or -1, -1 for the last real token, which moves with the row)."""

    averager: np.ndarray
    counts: np.ndarray
    kinds: np.ndarray | None = None  # [S] int8
    ranges: np.ndarray | None = None  # [S, 2] int64

    @property
    def rows(self) -> int:
        return int(self.counts.shape[1])

    def take(self, index: np.ndarray) -> "Segments":
        """These segments restricted to rows `index` (in that order)."""
        return Segments(self.averager[:, index], self.counts[:, index], self.kinds[index], self.ranges[index])


def segment_tokens(
    start: int,
    end: int,
    attention_mask: np.ndarray,
    compression_ratio: int,
    sinks: tuple[str, ...] = (),
    cuts: tuple[int, ...] = (),
    window: tuple[int, ...] = (),
) -> Segments:
    """Cut device tokens [start, end) into rows.

    Layout: [first-token sink?] + positional segments + [last-token sink?] + [one row per window token].
    Positional segments hold CR tokens each, counted from `start` and from every global position in `cuts`
    (so no segment straddles a cut; the last segment before a cut may be shorter). `window`: global
    positions sent at full resolution to a neighbour (they stay in their positional segment too: other
    receivers get the mean). A sink slot exists when the device owns that sink in at least one batch row;
    in the other rows its count is 0. A sink is removed from its positional segment. Padding
    (attention_mask == 0) is excluded. Rows that are empty in every batch row are not sent at all (so at
    CR=1 sinks cost nothing). With no cuts and no window this is the paper's segmentation.
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

    bounds = sorted({0, n} | {int(c) - start for c in cuts if start < int(c) < end})
    seg_id, seg_ranges = np.empty(n, np.int64), []
    for a, b in zip(bounds, bounds[1:]):  # each piece cut into CR-token segments from its start
        seg_id[a:b] = len(seg_ranges) + (local[a:b] - a) // cr
        seg_ranges += [(start + lo, start + min(lo + cr, b)) for lo in range(a, b, cr)]
    positional = seg_id[None, :] == np.arange(len(seg_ranges))[:, None]  # [n_pos, n]
    positional = positional[None, :, :] & (valid & ~is_sink)[:, None, :]  # [B, n_pos, n]
    win = [int(t) - start for t in sorted(window) if start <= int(t) < end]
    win_rows = [valid & (local == t)[None, :] for t in win]
    member = np.concatenate([r[:, None, :] for r in head] + [positional] +
                            [r[:, None, :] for r in tail + win_rows], axis=1)
    kinds = np.array([SINK] * len(head) + [MEAN] * len(seg_ranges) + [SINK] * len(tail) + [WINDOW] * len(win),
                     np.int8)
    ranges = np.array([(start, start + 1)] * len(head) + seg_ranges + [(-1, -1)] * len(tail) +
                      [(start + t, start + t + 1) for t in win], np.int64).reshape(-1, 2)

    keep = member.any(axis=(0, 2))  # drop rows empty in every batch row (e.g. a sink's old slot)
    member, kinds, ranges = member[:, keep, :], kinds[keep], ranges[keep]
    counts = member.sum(axis=2).astype(np.int32)  # [B, S]
    averager = member / np.maximum(counts, 1)[:, :, None]  # [B, S, n]
    return Segments(averager=averager.astype(np.float32), counts=counts, kinds=kinds, ranges=ranges)


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
    window: int = 0  # halo window W: tokens next to a span that its device receives at full resolution
    far: str = "means"  # what a device receives of the remote tokens outside its window: means | none
    spans: list[tuple[int, int]] = field(init=False)  # per position
    segments: list[Segments] = field(init=False)  # per position: the rows it computes and sends

    def __post_init__(self):
        mask = np.asarray(self.attention_mask)
        if mask.ndim != 2:
            raise PlanError(f"attention_mask must be [batch, tokens], got shape {mask.shape}")
        if int(self.compression_ratio) != self.compression_ratio or self.compression_ratio < 1:
            raise PlanError(f"compression_ratio must be an integer >= 1, got {self.compression_ratio}")
        if int(self.window) != self.window or self.window < 0:
            raise PlanError(f"window must be an integer >= 0, got {self.window}")
        if self.far not in FAR_CONTEXT:
            raise PlanError(f"far context '{self.far}': choose one of {', '.join(FAR_CONTEXT)}")
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
        segments, routes = [], {}
        for j in range(self.devices):
            seg, routes_j = route_rows(self, j, spans, mask)
            segments.append(seg)
            routes.update(routes_j)
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "_routes", routes)  # (sender position, receiver position) -> (index, counts)

    def _windows(self, i: int, spans) -> list[tuple[int, int]]:
        """The global token ranges position i receives at full resolution: the W tokens before its span, and
        for a bidirectional model the W after it."""
        s, e = spans[i]
        n_tokens, W = spans[-1][1], int(self.window)
        out = [(max(0, s - W), s)] if W and s > 0 else []
        if W and not self.causal and e < n_tokens:
            out.append((e, min(n_tokens, e + W)))
        return out

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
        """The rows device p computes and sends (each receiver gets those of `rows_to`)."""
        return self.segments[self.position(p)]

    def sources(self, p: int) -> list[int]:
        """Devices whose means device p receives, in rank order. With a causal model, only earlier
        devices: later tokens are invisible to p (partition-aware causal mask), so they are not sent."""
        self.position(p)
        return [q for q in self.ranks if q != p and (q < p or not self.causal)]

    def receivers(self, q: int) -> list[int]:
        """Devices that device q sends its means to."""
        return [p for p in self.ranks if q in self.sources(p)]

    def rows_to(self, q: int, p: int) -> np.ndarray:
        """Indices into device q's rows (Plan.segment(q)) of those it sends to device p, in order."""
        return self._routes[(self.position(q), self.position(p))][0]

    def counts_to(self, q: int, p: int) -> np.ndarray:
        """[B, k] counts of the k rows device q sends to device p, as p uses them (0 = masked)."""
        return self._routes[(self.position(q), self.position(p))][1]

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
        parts = [self.counts_to(q, p) for q in self.sources(p)]
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.batch, 0), np.int32)

    def remote_bias(self, p: int) -> np.ndarray:
        return remote_bias(self.remote_counts(p), self.count_bias)

    def projected_rows(self, p: int) -> int:
        """Rows device p projects to keys and values per layer: own tokens + received rows."""
        s, e = self.span(p)
        return (e - s) + int(self.remote_counts(p).shape[1])

    def sent_rows(self, p: int) -> int:
        """Rows device p sends per layer, summed over its receivers (per batch row)."""
        return sum(len(self.rows_to(p, r)) for r in self.receivers(p))

    def visibility(self) -> np.ndarray:
        """[B, N, N] bool: the keys each query sees at full resolution: its own partition's tokens (earlier
        ones only, for a causal model), its window, and the kept sinks; padding never. Defined from spans,
        window and sinks alone (not from the rows), so it is an independent statement of the plan: with
        far="none", PRISM equals the unpartitioned model with attention restricted to these keys (the
        "masked full model" of evaluate/bounds.py), at any CR; with W=0 that is "each partition alone"."""
        mask = np.asarray(self.attention_mask).astype(bool)
        B, N = mask.shape
        owner = np.empty(N, np.int64)
        see = np.zeros((N, N), bool)  # batch-independent part: [query, key]
        for i, (s, e) in enumerate(self.spans):
            owner[s:e] = i
            see[s:e, s:e] = True
            for a, b in self._windows(i, self.spans):
                see[s:e, a:b] = True
            if "first" in self.sinks:
                see[s:e, 0] = True
        vis = np.broadcast_to(see, (B, N, N)).copy()
        if "last" in self.sinks:  # the last real token of each row
            last = N - 1 - np.argmax(mask[:, ::-1], axis=1)
            vis[np.arange(B), :, last] = True
        if self.causal:
            vis &= np.tril(np.ones((N, N), bool))[None]
        vis &= mask[:, None, :]
        vis[:, np.arange(N), np.arange(N)] = True  # a query always sees itself (padding queries too)
        return vis

    def describe(self) -> dict:
        """What a reply reports of the plan in force: the ranks that computed it, their split weights and
        their token spans [start, end), position by position."""
        return {"ranks": list(self.ranks), "split_weights": list(self.weights) if self.weights else None,
                "spans": [list(s) for s in self.spans]}


def route_rows(plan: "Plan", j: int, spans, mask):
    """Plan position j's rows (the union of what its receivers use) and, per receiver, which of them it gets
    and their counts. A receiver gets: the window rows of its own window; the means (far="means") of
    segments outside its window (segments are cut at every receiver's window edge, so each lies wholly
    inside or outside it); the sinks, with count 0 in the batch rows where the sink lies in its window.
    So no remote token is represented twice, and with W=0 and far="means" this is the paper's plan."""
    s, e = spans[j]
    receivers = [i for i in range(plan.devices) if i != j and (j < i or not plan.causal)]
    windows = {i: plan._windows(i, spans) for i in receivers}
    edges = tuple(x for i in receivers for rng in windows[i] for x in rng)
    mine = tuple(t for i in receivers for a, b in windows[i] for t in range(max(a, s), min(b, e)))
    full = segment_tokens(s, e, mask, plan.compression_ratio, plan.sinks, cuts=edges, window=tuple(set(mine)))
    token = s + np.argmax(full.averager > 0, axis=2)  # [B, S] the token of a one-token row
    chosen = {}
    for i in receivers:
        covered = np.zeros(mask.shape[1] + 1, bool)
        for a, b in windows[i]:
            covered[a:b] = True
        start = full.ranges[:, 0]
        take = np.where(full.kinds == WINDOW, covered[start],
                        np.where(full.kinds == MEAN, (plan.far == "means") & ~covered[start], True))
        counts = np.where((full.kinds == SINK)[None, :] & covered[token], 0, full.counts).astype(np.int32)
        take &= counts.any(axis=0)  # a sink inside the window in every batch row is not sent
        chosen[i] = (np.flatnonzero(take), counts)
    used = np.unique(np.concatenate([ix for ix, _ in chosen.values()] + [np.zeros(0, np.int64)]))
    if not receivers:
        used = np.arange(full.rows)  # computed, never sent (Plan.averager gives no rows)
    routes = {(j, i): (np.searchsorted(used, ix), counts[:, ix]) for i, (ix, counts) in chosen.items()}
    return full.take(used), routes


def make_plan(spec, attention_mask, *, devices: int, compression_ratio: int, count_bias: bool = True,
              keep_sinks: bool = True, split_weights=None, ranks=None, window: int = 0, far: str = "means") -> Plan:
    """The plan for a model (its ModelSpec: `causal`, `sinks`) and a request's [B, N] attention mask;
    `ranks`: the devices that compute it (position i -> ranks[i]; default 0..devices-1)."""
    return Plan(
        attention_mask=attention_mask, devices=devices, compression_ratio=compression_ratio,
        causal=spec.causal, sinks=tuple(spec.sinks) if keep_sinks else (), count_bias=count_bias,
        weights=tuple(split_weights) if split_weights else None, ranks=tuple(ranks) if ranks is not None else None,
        window=window, far=far,
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
    settings = settings.resolved(spec)  # what the settings leave to the model family
    if split_weights is None:
        split_weights = settings.split_weights if ranks is None else member_weights(settings.split_weights, ranks)
    return make_plan(spec, attention_mask, devices=devices, compression_ratio=settings.compression_ratio,
                     count_bias=settings.count_bias, keep_sinks=settings.keep_sinks, split_weights=split_weights,
                     ranks=ranks, window=settings.window, far=settings.far)


def max_rows(max_tokens: int, compression_ratio: int, window: int = 0, devices: int = 1) -> int:
    """Upper bound on the rows one device sends to one receiver per layer: a device owns at most max_tokens
    tokens, cut into ceil(n / CR) positional segments (one more at each of the other devices' two window
    edges), plus up to 2 sink rows and at most `window` window rows."""
    n = int(max_tokens)
    edges = 2 * max(int(devices) - 1, 0) if window else 0
    return -(-n // int(compression_ratio)) + edges + 2 + min(int(window), n)
