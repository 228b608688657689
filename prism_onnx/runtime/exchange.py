"""Exchange points: at each point the device program declares (`attn_in.i` or `kv.i`, see program.py),
every device sends its segment-mean rows to its receivers and gathers those of its sources. This is the
only traffic per layer.

`Exchange` holds what every transport shares: encoding in the wire precision, byte counters, checking
each frame against the plan, and matching frames to (request, layer, source) while frames of later
requests wait in a stash bounded in count, in bytes per source and in total bytes; a stashed frame older
than `stash_ttl` seconds (its request never started here) is dropped. Subclasses only move bytes:
`LocalExchange` (in memory, for the in-process executor) and `ZmqExchange` (runtime/lanes.py).

Several requests may run through one endpoint at once (a lane's threads, `prism run --max-inflight`):
each thread gathers only its own request's frames (`_recv(request, ...)`), and the shared state (stash,
counters, finished requests) is guarded by one lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..errors import FrameError, PeerError
from ..plan import Plan
from .counters import RateLimitedLog
from .wire import MeansFrame, decode_means, encode_means, frame_nbytes

log = logging.getLogger("prism.exchange")
rate_limited = RateLimitedLog(log)


class RecentIds:
    """The last `size` request ids marked (e.g. finished here): membership test, oldest forgotten first."""

    def __init__(self, size: int = 4096):
        self.size, self._ids = size, OrderedDict()

    def add(self, request: int) -> None:
        self._ids[request] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, request: int) -> bool:
        return request in self._ids


@dataclass(frozen=True)
class Abort:
    """Put in a device's inbox by its I/O thread: the coordinator gave up on `request`."""

    request: int
    reason: str


@dataclass
class Traffic:
    """Bytes one device sent and received, per exchange point (`layers` of them, one per layer), measured
    on the frames' payloads."""

    layers: int
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    rejected_frames: int = 0
    rejected_bytes: int = 0

    def __post_init__(self):
        self.sent = self.sent or [0] * self.layers
        self.received = self.received or [0] * self.layers

    def to_dict(self) -> dict:
        return {"bytes_sent": sum(self.sent), "bytes_received": sum(self.received),
                "per_layer": {"sent": list(self.sent), "received": list(self.received)},
                "rejected_frames": self.rejected_frames}

    @classmethod
    def from_dict(cls, d: dict, layers: int) -> "Traffic":
        """Inverse of to_dict (a device's traffic as its RESULT message reports it)."""
        return cls(layers, [int(x) for x in d["per_layer"]["sent"]], [int(x) for x in d["per_layer"]["received"]],
                   int(d.get("rejected_frames", 0)))


class Exchange:
    """One device's endpoint of the all-gather of segment means."""

    def __init__(self, rank: int, *, wire_dtype: str, width: int, points: list[str], export_tag: int, max_rows: int,
                 max_batch: int, timeout: float = 30.0, max_pending: int = 256, stash_ttl: float | None = None,
                 stash_bytes_per_source: int | None = None, stash_bytes: int | None = None, inflight: int = 1):
        """width: values per row at every point; points: the exchange point names, in program order;
        inflight: requests that may run through this endpoint at once (the stash bounds scale with it)."""
        self.rank = rank
        self.wire_dtype, self.width, self.points = wire_dtype, width, list(points)
        self.layers = len(self.points)
        self.export_tag, self.max_rows, self.max_batch = export_tag, max_rows, max_batch
        self.timeout = timeout
        self.traffic = Traffic(self.layers)  # totals since start
        self._per_request: dict[int, Traffic] = {}  # the same counts, attributed to each request
        self.max_pending = max_pending
        # a source is at most one exchange point ahead of this device within a request, and one request ahead
        biggest = frame_nbytes(max_batch, max_rows, width, wire_dtype)
        self.stash_bytes_per_source = stash_bytes_per_source or 4 * biggest * max(1, inflight)
        self.stash_bytes = stash_bytes or 4 * self.stash_bytes_per_source
        self.stash_ttl = stash_ttl or timeout * (self.layers + 2)
        # (request, layer, src) -> (frame, bytes, arrival time), oldest first
        self._pending: OrderedDict[tuple[int, int, int], tuple[MeansFrame, int, float]] = OrderedDict()
        self._finished = RecentIds()  # requests finished here: their late frames are dropped
        self._lock = threading.RLock()

    # ---- transport hooks
    def _send(self, dst: int, parts: list) -> None:
        raise NotImplementedError

    def _recv(self, request: int, timeout: float) -> list | Abort | None:
        """The parts of one incoming means frame for `request` (a transport may also return other requests'
        frames: they are stashed), or an Abort, or None when `timeout` seconds pass."""
        raise NotImplementedError

    # ---- the exchange
    def send(self, request: int, point: int, rows: np.ndarray, plan: Plan) -> None:
        """Send my rows [B, S, W] at exchange point `point` to every device that receives from me: to each,
        the rows the plan routes to it (Plan.rows_to: with a halo window, its window rows and the means
        outside it)."""
        for dst in plan.receivers(self.rank):
            mine = rows[:, plan.rows_to(self.rank, dst)]
            parts = encode_means(MeansFrame(request, point, self.rank, dst, self.export_tag,
                                            plan.counts_to(self.rank, dst), mine), self.wire_dtype)
            self._send(dst, parts)
            self._count("sent", request, point, sum(len(p) for p in parts))

    def gather(self, request: int, point: int, plan: Plan) -> np.ndarray:
        """The rows [B, R, W] of my sources at exchange point `point`, in device order (waits for them)."""
        sources = plan.sources(self.rank)
        frames = self._collect(request, point, sources, plan)
        rows = [frames[q].means for q in sources]
        return np.concatenate(rows, axis=1) if rows else np.zeros((plan.batch, 0, self.width), np.float32)

    def all_gather(self, request: int, point: int, rows: np.ndarray, plan: Plan) -> np.ndarray:
        """send, then gather."""
        self.send(request, point, rows, plan)
        return self.gather(request, point, plan)

    def finish(self, request: int) -> Traffic:
        """Request done (or failed) on this device: drop its stashed frames and any that arrive later.
        Returns the bytes this request moved through this device."""
        with self._lock:
            self._finished.add(request)
            for key in [k for k in self._pending if k[0] == request]:
                del self._pending[key]
            self._expire_stash(time.monotonic())
            return self._per_request.pop(request, Traffic(self.layers))

    def _count(self, direction: str, request: int, layer: int, nbytes: int) -> None:
        with self._lock:
            for t in (self.traffic, self._per_request.setdefault(request, Traffic(self.layers))):
                getattr(t, direction)[layer] += nbytes

    def _reject(self, nbytes: int, why: str) -> None:
        with self._lock:
            self.traffic.rejected_frames += 1
            self.traffic.rejected_bytes += nbytes
        rate_limited.warning("device %d rejected a frame (%d bytes): %s", self.rank, nbytes, why)

    def _expire_stash(self, now: float) -> None:
        for key, (_, _, t) in list(self._pending.items()):
            if now - t > self.stash_ttl:
                del self._pending[key]
                rate_limited.warning("device %d: dropped a frame of request %d that never started here (%.0f s old)",
                                     self.rank, key[0], now - t)

    def _stash(self, f: MeansFrame, nbytes: int) -> None:
        with self._lock:
            self._stash_locked(f, nbytes)

    def _stash_locked(self, f: MeansFrame, nbytes: int) -> None:
        """Keep an early frame; over a bound, the oldest frames (of that source first) make room."""
        self._pending[(f.request, f.layer, f.src)] = (f, nbytes, time.monotonic())

        def evict(keys, why):
            old = keys[0]
            self._pending.pop(old)
            rate_limited.warning("device %d: frame stash %s, dropped request %d layer %d from device %d", self.rank,
                                 why, *old)

        while sum(v[1] for k, v in self._pending.items() if k[2] == f.src) > self.stash_bytes_per_source:
            evict([k for k in self._pending if k[2] == f.src], f"over {self.stash_bytes_per_source} bytes for one source")
        while len(self._pending) > self.max_pending or sum(v[1] for v in self._pending.values()) > self.stash_bytes:
            evict(list(self._pending), "full")

    def _collect(self, request: int, layer: int, sources: list[int], plan: Plan) -> dict[int, MeansFrame]:
        got = {}
        with self._lock:
            self._expire_stash(time.monotonic())
            early = {q: self._pending.pop((request, layer, q), (None, 0, 0.0)) for q in sources}
        for q, (f, nbytes, _) in early.items():  # frames that arrived while this device was at an earlier point
            if f is not None and self._fits_plan(f, plan, nbytes):
                self._count("received", request, layer, nbytes)
                got[q] = f
        deadline = time.monotonic() + self.timeout
        while len(got) < len(sources):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [q for q in sources if q not in got]
                raise PeerError(f"device {self.rank}, request {request}, exchange {self.points[layer]}: no means "
                                f"from device(s) {missing} within {self.timeout:g} s")
            parts = self._recv(request, remaining)
            if parts is None:
                continue
            if isinstance(parts, Abort):
                if parts.request == request:
                    raise PeerError(f"request {request} aborted by the coordinator: {parts.reason}")
                continue
            nbytes = sum(len(p) for p in parts)
            try:
                f = decode_means(parts, wire_dtype=self.wire_dtype, hidden=self.width, max_rows=self.max_rows,
                                 max_batch=self.max_batch)
                self._check_header(f)
            except FrameError as e:
                self._reject(nbytes, str(e))
                continue
            if f.request in self._finished:
                log.debug("device %d dropped a late frame of finished request %d", self.rank, f.request)
                continue
            if f.request == request and f.layer == layer:
                if f.src not in sources or f.src in got:
                    self._reject(nbytes, f"unexpected or duplicate frame from device {f.src}")
                    continue
                if not self._fits_plan(f, plan, nbytes):
                    continue
                self._count("received", request, layer, nbytes)
                got[f.src] = f
            else:  # a later exchange point or request: keep it until we get there (counted when accepted)
                self._stash(f, nbytes)
        return got

    def _fits_plan(self, f: MeansFrame, plan: Plan, nbytes: int) -> bool:
        """A frame's counts must be exactly what the request's plan says its source sends here; else it is
        rejected."""
        if f.src not in plan.ranks:
            self._reject(nbytes, f"frame from device {f.src}, which is not in this request's plan {list(plan.ranks)}")
            return False
        expected = plan.counts_to(f.src, self.rank)
        if f.counts.shape == expected.shape and np.array_equal(f.counts, expected):
            return True
        self._reject(nbytes, f"frame from device {f.src} has counts {f.counts.shape} that do not match the plan "
                             f"{expected.shape}")
        return False

    def _check_header(self, f: MeansFrame) -> None:
        if f.dst != self.rank:
            raise FrameError(f"frame addressed to device {f.dst}, this is device {self.rank}")
        if f.export_tag != self.export_tag:
            raise FrameError(f"frame from another export (tag {f.export_tag:08x}, ours {self.export_tag:08x})")
        if not 0 <= f.layer < self.layers:
            raise FrameError(f"frame for exchange point {f.layer}, the model has {self.layers}")
        if f.src == self.rank:
            raise FrameError(f"frame claims to come from this device ({f.src})")


class LocalHub:
    """In-memory transport for P devices in one process (the in-process executor): one inbox per device."""

    def __init__(self, devices: int, **kw):
        self.inboxes = [queue.Queue() for _ in range(devices)]
        self.endpoints = [LocalExchange(self, p, **kw) for p in range(devices)]


class LocalExchange(Exchange):
    def __init__(self, hub: LocalHub, rank: int, **kw):
        super().__init__(rank, **kw)
        self.hub = hub

    def _send(self, dst, parts):
        self.hub.inboxes[dst].put([bytes(p) for p in parts])

    def _recv(self, request, timeout):
        try:
            return self.hub.inboxes[self.rank].get(timeout=timeout)
        except queue.Empty:
            return None
